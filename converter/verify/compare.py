"""Run the converted model and the original graph on the same inputs and compare every slim endpoint.

For each input and each endpoint of `converter.pipeline.table.endpoints_for(kind)` (network order) the report
holds `max_abs_diff = max |ours - reference|` and `max_rel_diff = max_abs_diff / max |reference|` (the
difference relative to the tensor's scale; element-wise ratios are meaningless after a ReLU).

The tolerance is calibrated per endpoint and input from the computation itself. The model is run a second
time in float64 on the same inputs (same float32 weights): `float64_distance = max |ours32 - ours64|` is
the rounding noise float32 adds by that endpoint, on that input. TensorFlow's float32 result carries noise
of the same order (other kernels, other summation orders), so

    tolerance = max(NOISE_FACTOR x float64_distance / max |ours32|, NOISE_FLOOR) x max |reference|,
                at most MAX_RELATIVE_TOLERANCE x max |reference|.

The noise is taken relative to our own scale and applied to the reference's, and the cap is relative to
the reference too: a fault in the model that inflates its activations cannot inflate its tolerance. With
`atol` / `rtol` given, the fixed rule `atol + rtol x max |reference|` replaces the calibrated one.

An endpoint passes when `max_abs_diff <= tolerance` on every input. The first endpoint in network order
that does not is the first divergence: the fault lies in the module that computes it or upstream. An
endpoint the reference graph does not hold is "not compared", with the reason; shapes that differ fail,
saying so. A PASS needs the logits compared on every input.

The reference is the source's own original (:mod:`.references`): a TF graph, a SavedModel's signature,
Keras' model or TFLite's interpreter. A quantized ``.tflite`` is an integer model that the float model
does not equal end to end; there each conv of the float model is compared on the interpreter's own
input of that layer (`float/<module>` rows, the head's as `logits`) and each step of the integer
emulation with the interpreter's (`integer/<step>` rows), both within one output quantization step.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from converter.errors import ConverterError, ModelFolderError, VerificationError
from converter.hashing import file_sha256
from converter.output.records import ConversionRecord
from converter.pipeline.conventions import plan_weights
from converter.pipeline.table import DEEPLAB, endpoints_for
from converter.slim import KIND_MARKERS
from converter.verify.inputs import RANDOM, InputCase, fit_to_reference, make_inputs
from converter.verify.references.base import GraphBuilder
from converter.verify.rows import (
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    LOGITS,
    ParityResult,
    Row,
    compare_arrays,
    to_nhwc,
    without_background,
)
from converter.vocabulary import kind_of_architecture


def verify_model(
    checkpoint: str | os.PathLike,
    model_dir: str | os.PathLike,
    *,
    inputs: Sequence[str] = (RANDOM,),
    size: int | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    threads: int | None = None,
    reference_kind: str = "auto",
    format: str | None = None,
    graph_builder: GraphBuilder | None = None,
) -> ParityResult:
    """Compare the model folder with the original it was converted from (see :mod:`.references`).

    Raises VerificationError (exit code 2) when the comparison cannot be made; a failed comparison is a
    result (`ParityResult.passed` false), not an error. `reference_kind`: "auto" (the best there is),
    "meta_graph", "frozen_graph" or "builder" (a graph from `graph_builder`, also the fallback of "auto"
    where a checkpoint ships no graph; without one that is refused). `format` reads `checkpoint` as that
    format; by default it is read as the conversion read it when it is the very file conversion.json
    records (an archive holding several formats is then compared with the one converted), else its format
    is recognised.
    """
    started = time.perf_counter()
    model_dir = Path(model_dir)
    record = ConversionRecord.read(model_dir)
    preprocessing = _read_json(model_dir / "preprocessor_config.json")
    model = _load_model(model_dir)
    config = model.config
    kind = kind_of_architecture([type(model).__name__])
    notes: list[str] = []
    size = size or config.image_size
    cases = make_inputs(inputs, kind, size, preprocessing)
    endpoints = endpoints_for(kind)
    tensors = [tensor for _, tensor, _ in endpoints]
    drop_background = record is not None and record.drop_background

    from converter.formats import open_reader
    from converter.verify.references import import_tensorflow, open_reference

    tf = import_tensorflow()
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        with open_reader(checkpoint, format or _recorded_format(record, Path(checkpoint))) as source:
            weights = record.weights if record else plan_weights(source.names()).convention
            if record is None:
                notes.append(f"conversion.json does not say which weights were used: assumed {weights}")
            notes += _provenance_notes(record, source)
            _check_classes(source, kind, config.num_labels, record)
            references = source.references
            stride = config.output_stride if kind == DEEPLAB else None
            reference = open_reference(
                references, kind=kind, depth=config.depth_multiplier, convention=weights, tensors=tensors,
                output_stride=stride, threads=threads, prefer=reference_kind, image_size=config.image_size,
                graph_builder=graph_builder,
            )  # fmt: skip
            with reference:
                model = _at_reference_stride(model, reference.info.output_stride, notes)
                models = (model, copy.deepcopy(model).double())  # float32 and float64, same weights
                cases = fit_to_reference(cases, reference, notes)
                quantized = getattr(reference, "quantized", False)
                if quantized:
                    from converter.verify.quantized import compare_quantized, quantized_endpoints

                    endpoints, emulator = quantized_endpoints(endpoints, reference, model_dir, notes)
                rows = []
                for case in _progress(cases, reference.info.kind):
                    wanted = _comparable(endpoints, case, config)
                    if quantized:
                        rows += compare_quantized(model, emulator, reference, case, endpoints, drop_background)
                    else:
                        rows += _compare_case(models, reference, case, wanted, drop_background, atol, rtol)
                    rows += _not_compared(endpoints, wanted, case, reference.missing)
    except VerificationError:
        raise
    except (ConverterError, ModelFolderError) as error:
        raise VerificationError(f"cannot verify: {error}") from None
    order = {endpoint: i for i, (endpoint, _, _) in enumerate(endpoints)}
    rows.sort(key=lambda row: ([case.name for case in cases].index(row.input), order[row.endpoint]))
    fixed = atol is not None or rtol is not None
    return ParityResult(
        model=model_dir.name,
        variant=(record.variant.get("name") if record else None) or model_dir.name,
        kind=kind,
        checkpoint=Path(checkpoint).name,
        weights=weights,
        reference=reference.info.to_json(),
        atol=(DEFAULT_ATOL if atol is None else atol) if fixed else None,
        rtol=(DEFAULT_RTOL if rtol is None else rtol) if fixed else None,
        endpoints=endpoints,
        inputs=[
            {"name": case.name, "description": case.description, "shape": list(case.pixels.shape)} for case in cases
        ],
        rows=rows,
        notes=notes + reference.info.notes,
        versions=_versions(tf),
        seconds=time.perf_counter() - started,
    )


def _progress(cases: list[InputCase], reference: str):
    """The input cases, with a progress bar on a terminal: a DeepLab input takes tens of seconds."""
    from tqdm import tqdm

    return tqdm(cases, desc=f"comparing with {reference}", unit="input", file=sys.stderr, leave=False,
                disable=not sys.stderr.isatty())  # fmt: skip


def _compare_case(models, reference, case: InputCase, endpoints, drop_background: bool, atol, rtol) -> list[Row]:
    """Compare the endpoints the reference holds; our float64 run (`models` is the float32 model and its
    float64 copy) gives each its noise floor."""
    import torch

    model, model64 = models
    present = [row for row in endpoints if row[1] not in reference.missing]
    names = [endpoint for endpoint, _, _ in present]
    if not names:
        return []
    with torch.inference_mode():
        ours = model.extract_features(torch.from_numpy(case.pixels), names)
        with _fast_float64_depthwise():
            ours64 = model64.extract_features(torch.from_numpy(case.pixels).double(), names)
    theirs = reference.run(np.ascontiguousarray(case.pixels.transpose(0, 2, 3, 1)), [t for _, t, _ in present])
    rows = []
    for endpoint, tensor, module in present:
        mine, mine64, ref = to_nhwc(ours[endpoint].numpy()), to_nhwc(ours64[endpoint].numpy()), theirs[tensor]
        if endpoint == LOGITS:
            ref = without_background(ref, mine.shape, drop_background)
        result = compare_arrays(mine, mine64, ref, atol, rtol)
        rows.append(Row(case.name, endpoint, module, tensor, list(ref.shape), **result))
    return rows


@contextmanager
def _fast_float64_depthwise():
    """PyTorch's float64 depthwise convolution is a slow generic kernel (~30x float32's); while the float64
    run lasts, `F.conv2d` computes depthwise ones as kh x kw shifted multiply-adds instead: the same sums,
    whose order does not matter at float64 precision. Every other call goes to the real `F.conv2d`."""
    import torch
    import torch.nn.functional as F

    original = F.conv2d

    def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        depthwise = groups > 1 and groups == x.shape[1] == weight.shape[0] and weight.shape[1] == 1
        if not depthwise or x.dtype != torch.float64 or isinstance(padding, str):
            return original(x, weight, bias, stride, padding, dilation, groups)
        (sh, sw), (ph, pw), (dh, dw) = (_pair(value) for value in (stride, padding, dilation))
        x = F.pad(x, (pw, pw, ph, ph))
        kh, kw = weight.shape[-2:]
        out_h, out_w = (x.shape[-2] - dh * (kh - 1) - 1) // sh + 1, (x.shape[-1] - dw * (kw - 1) - 1) // sw + 1
        out = torch.zeros(x.shape[0], x.shape[1], out_h, out_w, dtype=x.dtype)
        for i in range(kh):
            for j in range(kw):
                rows = slice(i * dh, i * dh + (out_h - 1) * sh + 1, sh)
                columns = slice(j * dw, j * dw + (out_w - 1) * sw + 1, sw)
                out += x[:, :, rows, columns] * weight[:, 0, i, j].view(1, -1, 1, 1)
        return out if bias is None else out + bias.view(1, -1, 1, 1)

    F.conv2d = conv2d
    try:
        yield
    finally:
        F.conv2d = original


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _not_compared(endpoints, wanted, case: InputCase, missing: dict[str, str]) -> list[Row]:
    """Rows for the endpoints that were not compared on this input, each with why."""
    rows = []
    for endpoint, tensor, module in endpoints:
        if tensor in missing:
            reason = missing[tensor]
        elif (endpoint, tensor, module) not in wanted:
            reason = "the model pools with a fixed 7x7 window, the reference graph over the whole feature map"
        else:
            continue
        nan = math.nan
        rows.append(Row(case.name, endpoint, module, tensor, [], nan, nan, nan, nan, True, reason, compared=False))
    return rows


def _check_classes(source, kind: str, num_labels: int, record: ConversionRecord | None) -> None:
    """A model is compared with the very head it was converted from: one with another number of classes
    (another fine-tuning of the same backbone) cannot be, whatever its backbone."""
    head = KIND_MARKERS.get(kind)
    if head is None or head not in source.names():
        return
    classes = int(source.shape(head)[-1])
    expected = (
        num_labels + (record is not None and record.drop_background) - (record is not None and record.add_background)
    )
    if classes != expected:
        raise VerificationError(
            f"the reference has {classes} classes and the model {num_labels}: they are different models; "
            "verify the folder against the source it was converted from"
        )


def _at_reference_stride(model, stride: int | None, notes: list[str]):
    """The model at the reference graph's output stride (DeepLab): the weights do not depend on it, so a
    model converted at 16 is verified against a graph at 8 by running the same weights at 8."""
    if stride is None or stride == model.config.output_stride:
        return model
    config = copy.deepcopy(model.config)
    config.output_stride = stride
    at_stride = type(model)(config)
    at_stride.load_state_dict(model.state_dict())
    notes.append(
        f"the reference graph runs at output stride {stride} and the model was converted at "
        f"{model.config.output_stride}: the model's weights were verified at output stride {stride}"
    )
    return at_stride.eval()


def _comparable(endpoints, case: InputCase, config):
    """Endpoints to compare on this input: a model pooling with slim's fixed 7x7 window differs from a
    graph that pools globally once the last feature map is larger than 7x7, so its pooled outputs are
    left out there (the backbone is still compared)."""
    height, width = case.pixels.shape[-2:]
    if getattr(config, "avg_pool", "global") == "global" or max(-(-height // 32), -(-width // 32)) <= 7:
        return endpoints
    return [row for row in endpoints if row[0] not in ("global_pool", LOGITS)]


def _load_model(model_dir: Path):
    from mobilenet_torch import load_pretrained

    if not (model_dir / "config.json").is_file():
        raise VerificationError(f"{model_dir} has no config.json: pass a folder written by convert-mobilenet")
    try:
        return load_pretrained(model_dir)
    except ModelFolderError as error:
        raise VerificationError(f"cannot load the model: {error}") from None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise VerificationError(f"{path} is not readable JSON ({error})") from None
    return data if isinstance(data, dict) else {}


def _recorded_format(record: ConversionRecord | None, checkpoint: Path) -> str | None:
    """The format conversion.json records, when `checkpoint` is the one file it records (same sha256)."""
    source = record.source if record else {}
    files = source.get("files") or []
    if len(files) != 1 or not isinstance(files[0], dict) or not checkpoint.is_file():
        return None
    recorded = files[0]
    if recorded.get("name") != checkpoint.name or recorded.get("bytes") != checkpoint.stat().st_size:
        return None
    return source.get("format") if file_sha256(checkpoint) == recorded.get("sha256") else None


def _provenance_notes(record: ConversionRecord | None, source) -> list[str]:
    """A note when the source is not the one conversion.json records (parity will then fail)."""
    files = (record.source.get("files") if record else None) or []
    recorded = {f.get("name"): f.get("sha256") for f in files}
    if not recorded:
        return []
    for file in source.provenance():
        if recorded.get(file.name) == file.sha256:
            continue
        return [f"{file.name} is not the source conversion.json records ({', '.join(sorted(recorded))})"]
    return []


def _versions(tf) -> dict[str, str]:
    import torch

    from converter import __version__

    return {
        "mobilenet-convert": __version__,
        "torch": torch.__version__,
        "tensorflow": tf.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
