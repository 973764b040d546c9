"""Loading a model folder or Hub id: config.json + model.safetensors, nothing else (never pickles).

Names are compared in the wrapper models' namespace (`mobilenet_v2.*` for the backbone, anything else a
head), so one folder serves every class: a backbone drops the head it does not have, a head the folder
lacks starts fresh, and a bare backbone (as transformers' `MobileNetV2Model` saves it) gains the prefix.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from .architecture import BACKBONE_PREFIX, PLACEHOLDER_PREFIX
from .configuration import CONFIG_NAME, LABEL_KEYS, OUTPUT_OPTIONS, WEIGHTS_NAME, MobileNetV2Config
from .errors import ModelFolderError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SEGMENTATION_HEAD_PREFIX = "segmentation_head."
# A Hub id as huggingface_hub accepts it: "name" or "owner/name", no leading dot, no "..".
HUB_ID = re.compile(r"(?!\.)(?!.*\.\.)[\w.-]{1,96}(/(?!\.)[\w.-]{1,96})?")
HUB_OPTIONS = ("cache_dir", "revision", "token", "local_files_only")  # resolve_folder's keywords
# Options of transformers' from_pretrained that mean nothing for this model, with what to do instead.
UNSUPPORTED_OPTIONS = {
    "config": "pass config fields as keywords (num_labels=10), or build the model from a MobileNetV2Config",
    "subfolder": "pass the subfolder's path",
    "variant": "convert each variant into its own folder",
    "output_loading_info": "what was dropped or newly initialised is logged (logger 'mobilenet_torch')",
    "quantization_config": "convert a quantized .tflite and load it with QuantizedMobileNetV2.from_pretrained",
    "attn_implementation": "MobileNetV2 has no attention layers; drop the argument",
    "max_memory": "MobileNetV2 runs on one device: pass device_map='auto' or a device",
    "offload_folder": "MobileNetV2 runs on one device: pass device_map='auto' or a device",
}

logger = logging.getLogger("mobilenet_torch")


def resolve_folder(
    name_or_path: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Path:
    """A local folder as is, or a Hub id fetched (config and safetensors only) through huggingface_hub,
    which honours its own settings: HF_HUB_OFFLINE, HF_HUB_CACHE, HF_ENDPOINT, the stored login."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if not isinstance(name_or_path, str) or not HUB_ID.fullmatch(name_or_path):
        raise ModelFolderError(
            f"{name_or_path} is not a folder: pass a folder written by convert-mobilenet, or a Hub id"
        )
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError
    except ImportError:
        raise ModelFolderError(
            f"{name_or_path} is not a folder, and loading it as a Hub id needs huggingface_hub: "
            "pip install huggingface_hub"
        ) from None
    try:
        snapshot = snapshot_download(
            name_or_path,
            allow_patterns=[CONFIG_NAME, WEIGHTS_NAME],
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
        )
    except (HfHubHTTPError, EntryNotFoundError, HFValidationError, OSError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelFolderError(
            f"{name_or_path} is neither a folder nor a model found on the Hub ({reason}); "
            "check the id, log in for a private model, or go online"
        ) from None
    return Path(snapshot)


def load_folder(
    cls,
    folder: Path,
    *,
    dtype: Any = None,
    torch_dtype: Any = None,
    device: Any = None,
    device_map: Any = None,
    ignore_mismatched_sizes: bool = False,
    **overrides: Any,
):
    """`cls` built from the folder. `overrides` naming config fields (or labels, or transformers'
    `output_hidden_states` and `return_dict`) replace those of config.json; those naming arguments of
    the constructor go there (e.g. `add_pooling_layer=False`); any other is refused."""
    import torch

    _refuse_unknown_options(cls, overrides)
    dtype, device = loading_dtype(dtype, torch_dtype), loading_device(device, device_map)
    if not (folder / CONFIG_NAME).is_file():
        raise ModelFolderError(f"{folder} has no {CONFIG_NAME}: pass a folder written by convert-mobilenet")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = f" (found {', '.join(pickled)}: pickled weights are never loaded)" if pickled else ""
        raise ModelFolderError(f"{folder} has no {WEIGHTS_NAME}{hint}; convert the checkpoint again")
    config = MobileNetV2Config.from_pretrained(folder)
    config_fields = set(config.to_dict()) | set(LABEL_KEYS) | set(OUTPUT_OPTIONS)
    config_overrides = {key: overrides.pop(key) for key in list(overrides) if key in config_fields}
    if config_overrides:
        config = config.with_overrides(**config_overrides)
    state = _read_state(weights, device)
    if not any(key.startswith(BACKBONE_PREFIX) for key in state):
        state = {BACKBONE_PREFIX + key: tensor for key, tensor in state.items()}

    from .modeling import MobileNetV2Model

    prefix = BACKBONE_PREFIX if issubclass(cls, MobileNetV2Model) else ""
    if prefix and any(key.startswith(SEGMENTATION_HEAD_PREFIX) for key in state):
        overrides.setdefault("final_conv", False)  # a segmentation folder's final conv is a placeholder
    with torch.device("meta"):
        model = cls(config, **overrides)
    expected = {prefix + key: tensor.shape for key, tensor in model.state_dict().items()}
    state = _matched(cls.__name__, weights, state, expected, ignore_mismatched_sizes)
    model.load_state_dict({key[len(prefix) :]: tensor for key, tensor in state.items()}, strict=False, assign=True)
    _initialise_missing(model, device)
    return model.to(dtype=dtype).eval()


def _refuse_unknown_options(cls, options: dict[str, Any]) -> None:
    """A keyword that is neither a config field nor a constructor argument gets a one-line reason."""
    import inspect
    from dataclasses import fields

    known = {f.name for f in fields(MobileNetV2Config)} | set(LABEL_KEYS) | set(OUTPUT_OPTIONS)
    known |= set(inspect.signature(cls.__init__).parameters) - {"self", "config"}
    for key in options:
        if key in UNSUPPORTED_OPTIONS:
            raise TypeError(f"from_pretrained() does not take {key}=: {UNSUPPORTED_OPTIONS[key]}")
        if key not in known:
            raise TypeError(
                f"from_pretrained() got an unexpected keyword argument {key!r}: it takes config fields "
                "(num_labels=10, output_hidden_states=True, ...), dtype, device_map, ignore_mismatched_sizes, "
                "and for Hub ids cache_dir, revision, token, local_files_only"
            )


def loading_device(device: Any = None, device_map: Any = None):
    """The one device a model loads onto, from `device` or transformers' `device_map` for one device:
    "auto" (the first GPU, else Apple's MPS, else the CPU), a device, its name or its CUDA index, or a
    dict placing every module on the same device ({"": "cuda:0"})."""
    import torch

    chosen = _device_in_map(device_map) if device_map is not None else device
    if chosen is None:
        return torch.device("cpu")
    try:
        chosen = torch.device(f"cuda:{chosen}" if isinstance(chosen, int) else chosen)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"{chosen!r} is not a device: MobileNetV2 runs on one device; pass device_map='auto', 'cpu', 'cuda:0' "
            "or a torch.device"
        ) from None
    if device is not None and device_map is not None and torch.device(device) != chosen:
        raise ValueError(f"device={device!r} and device_map={device_map!r} differ; pass one of them")
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{chosen} is not available here (no CUDA device); pass device_map='auto' or 'cpu'")
    return chosen


def _device_in_map(device_map: Any):
    import torch

    if isinstance(device_map, dict):
        devices = {str(device) for device in device_map.values()}
        if len(devices) != 1:
            raise ValueError(
                f"device_map places modules on {sorted(devices)}; MobileNetV2 runs on one device: pass "
                "device_map='auto' or a device"
            )
        (device_map,) = device_map.values()
    if device_map == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    return device_map


def loading_dtype(dtype: Any = None, torch_dtype: Any = None):
    """A floating torch dtype, or None ("auto", or nothing given) for the file's own. `torch_dtype` is
    transformers' older name for `dtype`, which wins when both are given (as in transformers)."""
    import torch

    dtype = dtype if dtype is not None else torch_dtype
    if dtype is None or dtype == "auto":
        return None
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype must be a floating point torch dtype, its name or 'auto', got {dtype!r}")
    return resolved


def _read_state(weights: Path, device) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(weights, device=str(device))
    except (SafetensorError, OSError) as error:
        raise ModelFolderError(f"{weights} is not a readable safetensors file ({error})") from None


def _matched(name: str, weights: Path, state: dict, expected: dict, ignore_mismatched_sizes: bool) -> dict:
    """The tensors of `state` that the model takes; heads it does not have are dropped, heads it has
    that the folder lacks (or, when asked, has in another shape) are left to be initialised."""
    unexpected = sorted(key for key in state if key not in expected and not key.startswith(PLACEHOLDER_PREFIX))
    dropped_heads = sorted({key.split(".")[0] for key in unexpected if not key.startswith(BACKBONE_PREFIX)})
    missing = sorted(key for key in expected if key not in state)
    resized = sorted(key for key in expected if key in state and state[key].shape != expected[key])
    in_backbone = [key for key in missing + unexpected + resized if key.startswith(BACKBONE_PREFIX)]
    if in_backbone or (resized and not ignore_mismatched_sizes):
        differ = [f"{key} {tuple(state[key].shape)} vs {tuple(expected[key])}" for key in resized[:5]]
        hint = "" if in_backbone else "; pass ignore_mismatched_sizes=True to start a new head"
        raise ModelFolderError(
            f"{weights} does not match {name}: missing {[k for k in missing if k in in_backbone][:5]}, "
            f"unexpected {[k for k in unexpected if k in in_backbone][:5]}, shapes differ {differ}{hint}"
        )
    if dropped_heads:
        logger.warning("%s: %s takes no %s; dropped those weights", weights, name, ", ".join(dropped_heads))
    fresh = missing + resized
    if fresh:
        heads = ", ".join(sorted({key.rsplit(".", 1)[0] for key in fresh}))
        logger.warning("%s: %s is newly initialised (%s); train it before use", weights, heads, name)
    return {key: tensor for key, tensor in state.items() if key in expected and key not in resized}


def _initialise_missing(model, device) -> None:
    """Modules left on the meta device (a head the folder lacks) get storage and transformers' init:
    weights of convolutions and linear layers drawn from N(0, initializer_range), biases zero,
    BatchNorm as identity."""
    import torch

    std = model.config.initializer_range or 0.02  # transformers' fallback for 0
    for module in model.modules():
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if any(tensor.is_meta for tensor in own):
            module.to_empty(device=device, recurse=False)
            module.reset_parameters()
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                torch.nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
