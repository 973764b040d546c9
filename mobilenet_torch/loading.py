"""Loading a model folder: config.json + model.safetensors, nothing else (never pickles)."""

from __future__ import annotations

from pathlib import Path

import torch

from .configuration import CONFIG_NAME, MobileNetV2Config
from .errors import ModelFolderError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def load_folder(cls, folder: Path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .architecture import PLACEHOLDER_PREFIX
    from .modeling import WEIGHTS_NAME

    if not (folder / CONFIG_NAME).is_file():
        raise ModelFolderError(f"{folder} has no {CONFIG_NAME}: pass a folder written by convert-mobilenet")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = f" (found {', '.join(pickled)}: pickled weights are never loaded)" if pickled else ""
        raise ModelFolderError(f"{folder} has no {WEIGHTS_NAME}{hint}; convert the checkpoint again")
    config = MobileNetV2Config.from_pretrained(folder)
    with torch.device("meta"):
        model = cls(config)
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as error:
        raise ModelFolderError(f"{weights} is not a readable safetensors file ({error})") from None
    expected = set(model.state_dict())
    state = {k: v for k, v in state.items() if k in expected or not k.startswith(PLACEHOLDER_PREFIX)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelFolderError(
            f"{weights} does not match {cls.__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict(state, assign=True)
    return model.eval()
