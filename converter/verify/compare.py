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

The reference is the source's own original (:mod:`.reference`): a TF graph, a SavedModel's signature,
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
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from converter.errors import ConverterError, ImageError, ModelFolderError, VerificationError
from converter.hashing import file_sha256
from converter.images import open_image, preprocess
from converter.output.records import ConversionRecord
from converter.output.writer import preprocessor_config
from converter.pipeline.conventions import plan_weights
from converter.pipeline.table import CLASSIFICATION, DEEPLAB, endpoints_for
from converter.vocabulary import BACKBONE, kind_of_architecture

#: The fixed rule's defaults, used when only one of --atol / --rtol is given.
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-4
#: The calibrated rule (see the module docstring).
NOISE_FACTOR = 16.0
NOISE_FLOOR = 16 * float(np.finfo(np.float32).eps)
MAX_RELATIVE_TOLERANCE = 1e-3
RANDOM = "random"
RANDOM_BATCH = 2
ODD_SIZE = {CLASSIFICATION: 97, BACKBONE: 97, DEEPLAB: 129}
NON_SQUARE = (160, 192)  # (height, width)
LOGITS = "logits"


@dataclass
class InputCase:
    name: str
    description: str
    pixels: np.ndarray  # NCHW float32 in [-1, 1]


@dataclass
class Row:
    """One endpoint on one input."""

    input: str
    endpoint: str
    module: str
    tensor: str
    shape: list[int]
    max_abs_diff: float
    max_rel_diff: float
    max_abs_reference: float
    tolerance: float
    passed: bool
    error: str | None = None
    float64_distance: float = math.nan
    compared: bool = True

    @property
    def ratio(self) -> float:
        """max_abs_diff / tolerance: above 1 fails."""
        if not self.compared:
            return math.nan
        if not math.isfinite(self.max_abs_diff):
            return math.inf
        return self.max_abs_diff / self.tolerance if self.tolerance > 0 else math.inf

    def to_json(self, with_input: bool = True) -> dict[str, Any]:
        data = {
            "endpoint": self.endpoint,
            "module": self.module,
            "tensor": self.tensor,
            "shape": self.shape,
            "compared": self.compared,
            "max_abs_diff": _finite(self.max_abs_diff),
            "max_rel_diff": _finite(self.max_rel_diff),
            "max_abs_reference": _finite(self.max_abs_reference),
            "float64_distance": _finite(self.float64_distance),
            "tolerance": _finite(self.tolerance),
            "ratio": _finite(self.ratio),
            "passed": self.passed,
        }
        if self.error:
            data["error"] = self.error
        return {"input": self.input, **data} if with_input else data


@dataclass
class ParityResult:
    """Everything the reports are made of (`to_json` is parity.json)."""

    model: str
    variant: str
    kind: str
    checkpoint: str
    weights: str
    reference: dict[str, Any]
    atol: float | None  # None: the calibrated tolerance
    rtol: float | None
    endpoints: list[tuple[str, str, str]]  # (endpoint, tensor, module) in network order
    inputs: list[dict[str, Any]]
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def compared_rows(self) -> list[Row]:
        return [row for row in self.rows if row.compared]

    @property
    def logits_problem(self) -> str | None:
        """Why the logits were compared on no input (None: they were compared, or the model has none)."""
        rows = self.endpoint_rows(LOGITS)
        if any(row.compared for row in rows) or not any(endpoint == LOGITS for endpoint, _, _ in self.endpoints):
            return None
        return f"the logits could not be compared: {rows[0].error if rows else 'no input reached them'}"

    @property
    def passed(self) -> bool:
        compared = self.compared_rows
        return bool(compared) and all(row.passed for row in compared) and self.logits_problem is None

    @property
    def max_abs_diff(self) -> float:
        return max((_or_zero(row.max_abs_diff) for row in self.compared_rows), default=math.nan)

    @property
    def max_rel_diff(self) -> float:
        return max((_or_zero(row.max_rel_diff) for row in self.compared_rows), default=math.nan)

    @property
    def tolerance_rule(self) -> str:
        if any(endpoint.startswith((FLOAT_STEP, INTEGER_STEP)) for endpoint, _, _ in self.endpoints):
            return "one output quantization step of the interpreter's tensor, per layer and integer step"
        if self.atol is not None:
            return f"atol {self.atol:g} + rtol {self.rtol:g} x max abs reference, per endpoint and input"
        return (
            f"calibrated per endpoint and input: max({NOISE_FACTOR:g} x max|ours32 - ours64| / max|ours32|, "
            f"{NOISE_FLOOR:.3g}) x max|reference|, at most {MAX_RELATIVE_TOLERANCE:g} x max|reference|"
        )

    def endpoint_rows(self, endpoint: str) -> list[Row]:
        return [row for row in self.rows if row.endpoint == endpoint]

    def not_compared(self) -> list[dict[str, str]]:
        """Endpoints left out on some input, with why (first reason per endpoint)."""
        out = []
        for endpoint, _, _ in self.endpoints:
            skipped = [row for row in self.endpoint_rows(endpoint) if not row.compared]
            if skipped:
                inputs = sorted({row.input for row in skipped})
                out.append({"endpoint": endpoint, "inputs": inputs, "reason": skipped[0].error or "not compared"})
        return out

    def summary(self) -> list[dict[str, Any]]:
        """One entry per endpoint, worst over the inputs it was compared on."""
        out = []
        for endpoint, tensor, module in self.endpoints:
            all_rows = self.endpoint_rows(endpoint)
            rows = [row for row in all_rows if row.compared]
            if not all_rows:
                continue
            entry = {"endpoint": endpoint, "module": module, "tensor": tensor, "compared": bool(rows)}
            if not rows:
                out.append({**entry, "passed": None, "reason": all_rows[0].error})
                continue
            worst = max(rows, key=lambda row: (row.ratio, _or_zero(row.max_abs_diff)))
            entry.update(
                {
                    "max_abs_diff": _finite(worst.max_abs_diff),
                    "max_rel_diff": _finite(max((_or_zero(row.max_rel_diff) for row in rows), default=0.0)),
                    "float64_distance": _finite(worst.float64_distance),
                    "tolerance": _finite(worst.tolerance),
                    "worst_input": worst.input,
                    "worst_ratio": _finite(worst.ratio),
                    "passed": all(row.passed for row in rows),
                }
            )
            if worst.error:
                entry["error"] = worst.error
            out.append(entry)
        return out

    @property
    def first_divergence(self) -> dict[str, Any] | None:
        for endpoint, tensor, module in self.endpoints:
            failing = [row for row in self.endpoint_rows(endpoint) if row.compared and not row.passed]
            if failing:
                worst = max(failing, key=lambda row: row.ratio)
                return {
                    "endpoint": endpoint,
                    "module": module,
                    "tensor": tensor,
                    "input": worst.input,
                    "max_abs_diff": _finite(worst.max_abs_diff),
                    "tolerance": _finite(worst.tolerance),
                    "ratio": _finite(worst.ratio),
                    **({"error": worst.error} if worst.error else {}),
                }
        return None

    def to_json(self) -> dict[str, Any]:
        compared = self.compared_rows
        worst = max(compared, key=lambda row: row.ratio) if compared else None
        return {
            "passed": self.passed,
            "verdict": "PASS" if self.passed else "FAIL",
            "model": self.model,
            "variant": self.variant,
            "kind": self.kind,
            "checkpoint": self.checkpoint,
            "weights": self.weights,
            "reference": self.reference,
            "tolerance": self.tolerance_rule,
            "atol": self.atol,
            "rtol": self.rtol,
            "max_abs_diff": _finite(self.max_abs_diff),
            "max_rel_diff": _finite(self.max_rel_diff),
            "worst": None if worst is None else worst.to_json(),
            "first_divergence": self.first_divergence,
            "logits_problem": self.logits_problem,
            "not_compared": self.not_compared(),
            "endpoints": self.summary(),
            "inputs": [
                {**case, "layers": [row.to_json(False) for row in self.rows if row.input == case["name"]]}
                for case in self.inputs
            ],
            "notes": list(self.notes),
            "versions": dict(self.versions),
            "seconds": round(self.seconds, 3),
        }


def _finite(value: float | None) -> float | None:
    """JSON has no inf/nan: those become null (the row's `error`, `compared` or `passed` says why)."""
    return float(value) if value is not None and math.isfinite(value) else None


def _or_zero(value: float) -> float:
    return value if math.isfinite(value) else 0.0


# ---------------------------------------------------------------------------------------------- inputs
def make_inputs(
    specs: Sequence[str], kind: str, size: int, preprocessing: dict[str, Any] | None = None
) -> list[InputCase]:
    """`random` gives seeded images in [-1, 1]: a batch of 2 at `size`, one at an odd size and one
    non-square; any other spec is an image file, preprocessed like transformers' MobileNetV2ImageProcessor."""
    cases: list[InputCase] = []
    for spec in specs or (RANDOM,):
        if spec == RANDOM:
            odd = ODD_SIZE[kind]
            cases += [
                random_case(f"random-{size}x{size}", RANDOM_BATCH, size, size, seed=0),
                random_case(f"random-{odd}x{odd}", 1, odd, odd, seed=1),
                random_case(f"random-{NON_SQUARE[0]}x{NON_SQUARE[1]}", 1, *NON_SQUARE, seed=2),
            ]
        else:
            path = Path(spec)
            settings = preprocessing or preprocessor_config(size, segmentation=kind == DEEPLAB)
            try:
                pixels = preprocess(open_image(path), settings)
            except ImageError as error:
                raise VerificationError(str(error)) from None
            cases.append(InputCase(f"image-{path.name}", f"{path.name}, preprocessed", pixels[None]))
    names = [case.name for case in cases]
    return [case for i, case in enumerate(cases) if case.name not in names[:i]]


def random_case(name: str, batch: int, height: int, width: int, seed: int) -> InputCase:
    pixels = np.random.default_rng(seed).uniform(-1.0, 1.0, (batch, 3, height, width)).astype(np.float32)
    return InputCase(name, f"uniform [-1, 1], seed {seed}, batch {batch}", pixels)


# --------------------------------------------------------------------------------------------- compare
def compare_arrays(
    ours: np.ndarray, ours64: np.ndarray, reference: np.ndarray, atol: float | None = None, rtol: float | None = None
) -> dict[str, Any]:
    """max abs / rel diff, the tolerance and the verdict for one endpoint (all NHWC or all 2-D): `ours64` is
    the model's float64 result on the same input; `atol` / `rtol` (either given) select the fixed rule."""
    scale = float(np.abs(reference).max()) if reference.size else 0.0
    if ours.shape != reference.shape:
        return {
            "max_abs_diff": math.nan,
            "max_rel_diff": math.nan,
            "max_abs_reference": scale,
            "tolerance": math.nan,
            "passed": False,
            "error": f"shapes differ: {list(ours.shape)} (ours) vs {list(reference.shape)} (reference)",
        }
    ref = reference.astype(np.float64)
    diff = float(np.abs(ours.astype(np.float64) - ref).max()) if ref.size else 0.0
    noise = float(np.abs(ours.astype(np.float64) - ours64).max()) if ref.size else 0.0
    if atol is not None or rtol is not None:
        tolerance = (DEFAULT_ATOL if atol is None else atol) + (DEFAULT_RTOL if rtol is None else rtol) * scale
    else:
        tolerance = calibrated_tolerance(noise, float(np.abs(ours).max()) if ours.size else 0.0, scale)
    error = None
    if not (math.isfinite(diff) and math.isfinite(scale)):
        diff, error = math.inf, "NaN or Inf in an output"
    return {
        "max_abs_diff": diff,
        "max_rel_diff": diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf),
        "max_abs_reference": scale,
        "float64_distance": noise,
        "tolerance": tolerance,
        "passed": bool(diff <= tolerance),
        "error": error,
    }


def calibrated_tolerance(float64_distance: float, our_scale: float, reference_scale: float) -> float:
    """The calibrated tolerance of one endpoint (see the module docstring)."""
    relative_noise = float64_distance / our_scale if our_scale > 0 else 0.0
    relative = min(max(NOISE_FACTOR * relative_noise, NOISE_FLOOR), MAX_RELATIVE_TOLERANCE)
    return relative * reference_scale


def to_nhwc(array: np.ndarray) -> np.ndarray:
    return array.transpose(0, 2, 3, 1) if array.ndim == 4 else array


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
) -> ParityResult:
    """Compare the model folder with the original it was converted from (see :mod:`.reference`).

    Raises VerificationError (exit code 2) when the comparison cannot be made; a failed comparison is a
    result (`ParityResult.passed` false), not an error. `reference_kind`: "auto" (the best there is),
    "meta_graph", "frozen_graph" or "builder". `format` reads `checkpoint` as that format; by default it is
    read as the conversion read it when it is the very file conversion.json records (an archive holding
    several formats is then compared with the one converted), else its format is recognised.
    """
    started = time.perf_counter()
    model_dir = Path(model_dir)
    record = ConversionRecord.read(model_dir)
    conversion = record.to_json() if record else {}
    preprocessing = _read_json(model_dir / "preprocessor_config.json")
    model = _load_model(model_dir)
    config = model.config
    kind = kind_of_architecture([type(model).__name__])
    notes: list[str] = []
    size = size or config.image_size
    cases = make_inputs(inputs, kind, size, preprocessing)
    endpoints = endpoints_for(kind)
    tensors = [tensor for _, tensor, _ in endpoints]
    drop_background = bool(conversion.get("drop_background"))

    from converter.formats import open_reader
    from converter.verify.reference import import_tensorflow, open_reference

    tf = import_tensorflow()
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        with open_reader(checkpoint, format or _recorded_format(conversion, Path(checkpoint))) as source:
            weights = conversion.get("weights") or plan_weights(source.names()).convention
            if "weights" not in conversion:
                notes.append(f"conversion.json does not say which weights were used: assumed {weights}")
            notes += _provenance_notes(conversion, source)
            references = source.references
            stride = config.output_stride if kind == DEEPLAB else None
            reference = open_reference(
                references, kind=kind, depth=config.depth_multiplier, convention=weights, tensors=tensors,
                output_stride=stride, threads=threads, prefer=reference_kind, image_size=config.image_size,
            )  # fmt: skip
            with reference:
                model = _at_reference_stride(model, reference.info.output_stride, notes)
                models = (model, copy.deepcopy(model).double())  # float32 and float64, same weights
                cases = _fit_to_reference(cases, reference, notes)
                quantized = getattr(reference, "quantized", False)
                if quantized:
                    endpoints, emulator = _quantized_endpoints(endpoints, reference, model_dir, notes)
                rows = []
                for case in cases:
                    wanted = _comparable(endpoints, case, config)
                    if quantized:
                        rows += _compare_quantized(model, emulator, reference, case, endpoints)
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
        variant=(conversion.get("variant") or {}).get("name") or model_dir.name,
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
        if endpoint == LOGITS and drop_background and ref.shape[-1] == mine.shape[-1] + 1:
            ref = ref[..., 1:]  # the model was written without the background class
        result = compare_arrays(mine, mine64, ref, atol, rtol)
        rows.append(Row(case.name, endpoint, module, tensor, list(ref.shape), **result))
    return rows


#: A quantized reference: each float layer on the interpreter's own input is within one output step of the
#: interpreter's output (see `_compare_quantized`), as is each step of the integer emulation.
FLOAT_STEP, INTEGER_STEP = "float/", "integer/"
#: One output step, plus the float32 rounding of a real value near a step boundary.
STEP_SLACK = 1.0 + 1e-4


def _quantized_endpoints(endpoints, reference, model_dir: Path, notes: list[str]):
    """The endpoints compared against a quantized `.tflite`: the slim ones (not compared, with the
    reason, but the logits), every conv of the float model in network order (the head's under the
    name `logits`), then every step of the integer emulation where the folder carries it; and the
    emulation (None where the folder has none)."""
    from mobilenet_torch.errors import ModelFolderError as EmulationError
    from mobilenet_torch.quantized import QuantizedMobileNetV2

    logits_module = next(module for endpoint, _, module in endpoints if endpoint == LOGITS)
    slim = [row for row in endpoints if row[0] != LOGITS]
    tensor_names = {detail["index"]: detail["name"] for detail in reference.interpreter.get_tensor_details()}
    layers = []
    for step in _layer_steps(reference):
        name = LOGITS if step.name == logits_module else FLOAT_STEP + step.name
        layers.append((name, tensor_names[step.output_tensor], step.name))
    try:
        emulator = QuantizedMobileNetV2.from_pretrained(model_dir)
    except EmulationError as error:
        notes.append(f"the integer model was not compared: {error}")
        return slim + layers, None
    steps = [
        (INTEGER_STEP + name, tensor_names[record["tensor"]], name)
        for name, record in emulator.records.items()
        if record.get("output")
    ]
    notes.append(
        "quantized reference: each conv of the float (dequantized) model is run on the interpreter's own "
        "input of that layer, clamped to the range its output type holds, and compared with the interpreter's "
        "output, within one output quantization step: "
        "the integer kernel computes the same sum exactly and rounds it once to its output step (half a "
        "step) after a fixed-point multiply; end to end the float model is not the integer model (their "
        "difference accumulates over the layers, ~10 steps at the logits of a real model), so it is not "
        "compared end to end. The integer emulation (mobilenet_torch.quantized) is compared step by step, "
        "within one output step of the interpreter"
    )
    return slim + layers + steps, emulator


def _layer_steps(reference):
    """The conv steps whose output is the output of one layer of our float model on the op's input:
    not those behind a space-to-batch (their op runs on a reshuffled input) nor those whose BatchNorm
    the converter left as separate ops."""
    names = {step.name for step in reference.steps}
    return [
        step
        for step in reference.steps
        if step.scope is not None and step.output is None and f"{step.name}.mul" not in names
    ]


def _compare_quantized(model, emulator, reference, case: InputCase, endpoints) -> list[Row]:
    """Rows of the float layers and the integer steps on one input (one image at a time: the
    interpreter's batch is 1); every tolerance is one output quantization step."""
    import torch

    layers = {module: endpoint for endpoint, _, module in endpoints if endpoint.startswith(FLOAT_STEP)}
    layers.update({module: endpoint for endpoint, _, module in endpoints if endpoint == LOGITS})
    found: dict[str, list[tuple[np.ndarray, np.ndarray, float]]] = {}
    for image in case.pixels:
        reference.invoke(np.ascontiguousarray(image[None].transpose(0, 2, 3, 1)))
        with torch.inference_mode():
            for step in _layer_steps(reference):
                layer_input = torch.from_numpy(reference.real(step.op.inputs[0]).transpose(0, 3, 1, 2).copy())
                layer = model.get_submodule(step.name)
                ours = layer(layer_input.flatten(1) if isinstance(layer, torch.nn.Linear) else layer_input)
                # The kernel saturates to what its integer type holds (a projection has no other clamp).
                ours = np.clip(to_nhwc(ours.numpy()), *reference.representable(step.output_tensor))
                theirs = reference.real(step.output_tensor).reshape(ours.shape)
                scale = reference.quantization(step.output_tensor)[0]
                found.setdefault(layers[step.name], []).append((ours, theirs, scale))
            if emulator is not None:
                integers = emulator.run(torch.from_numpy(image[None]))
                for name, record in emulator.records.items():
                    if name not in integers:  # a step it does not compute (a reshape): nothing to compare
                        continue
                    q = integers[name]
                    ours = to_nhwc(q.values.numpy()).astype(np.float64)
                    theirs = reference.integers(record["tensor"]).astype(np.float64).reshape(ours.shape)
                    step = (ours - q.zero_point) * q.scale, (theirs - q.zero_point) * q.scale, q.scale
                    found.setdefault(INTEGER_STEP + name, []).append(step)
    rows = []
    for endpoint, tensor, module in endpoints:
        if endpoint not in found:
            continue
        ours = np.concatenate([part[0] for part in found[endpoint]])
        theirs = np.concatenate([part[1] for part in found[endpoint]])
        scale = found[endpoint][0][2]
        result = {**compare_arrays(ours, ours, theirs, atol=scale * STEP_SLACK, rtol=0.0), "float64_distance": math.nan}
        rows.append(Row(case.name, endpoint, module, tensor, list(theirs.shape), **result))
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


def _fit_to_reference(cases: list[InputCase], reference, notes: list[str]) -> list[InputCase]:
    """Inputs as the reference graph takes them: padded to its crop (DeepLab export graphs), or only those
    of its fixed size; never none."""
    crop = reference.info.crop_size
    if crop:
        return _pad_to_crop(cases, crop, notes)
    kept = [case for case in cases if reference.accepts(*case.pixels.shape[-2:])]
    dropped = [case.name for case in cases if case not in kept]
    if dropped:
        _, height, width = reference.fixed_shape
        notes.append(f"the reference graph fixes its input at {height}x{width}: skipped {', '.join(dropped)}")
    if not kept:
        _, height, width = reference.fixed_shape
        kept = [random_case(f"random-{height}x{width}", 1, height, width, seed=3)]
    return kept


def _pad_to_crop(cases: list[InputCase], crop: int, notes: list[str]) -> list[InputCase]:
    """A graph built with a crop size (DeepLab's export_model.py) pads every image at the bottom and right
    to the crop with the mean pixel (0 once scaled to [-1, 1]) and pools over the crop's whole feature map
    with a fixed window, so it only computes on padded images: both models get the padded image."""
    kept, dropped = [], []
    for case in cases:
        height, width = case.pixels.shape[-2:]
        if height > crop or width > crop:
            dropped.append(case.name)
            continue
        pixels = np.pad(case.pixels, ((0, 0), (0, 0), (0, crop - height), (0, crop - width)))
        kept.append(InputCase(case.name, f"{case.description}, padded to {crop}x{crop}", pixels))
    notes.append(
        f"the reference graph pads every image to its {crop}x{crop} crop with the mean pixel (as DeepLab's "
        "export_model.py does) and pools with a window fixed by the crop: every input was padded so"
        + (f"; {', '.join(dropped)} larger than the crop skipped" if dropped else "")
    )
    return kept or [random_case(f"random-{crop}x{crop}", 1, crop, crop, seed=3)]


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


def _recorded_format(conversion: dict[str, Any], checkpoint: Path) -> str | None:
    """The format conversion.json records, when `checkpoint` is the one file it records (same sha256)."""
    source = conversion.get("source") or {}
    files = source.get("files") or []
    if len(files) != 1 or not isinstance(files[0], dict) or not checkpoint.is_file():
        return None
    recorded = files[0]
    if recorded.get("name") != checkpoint.name or recorded.get("bytes") != checkpoint.stat().st_size:
        return None
    return source.get("format") if file_sha256(checkpoint) == recorded.get("sha256") else None


def _provenance_notes(conversion: dict[str, Any], source) -> list[str]:
    """A note when the source is not the one conversion.json records (parity will then fail)."""
    recorded = {f.get("name"): f.get("sha256") for f in (conversion.get("source") or {}).get("files") or []}
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
