"""Run the converted model and the original graph on the same inputs and compare every slim endpoint.

For each input and each endpoint of `converter.pipeline.table.endpoints_for(kind)` (network order) the report
holds `max_abs_diff = max |ours - reference|` and `max_rel_diff = max_abs_diff / max |reference|` (the
difference relative to the tensor's scale; element-wise ratios are meaningless after a ReLU). An endpoint
passes when `max_abs_diff <= atol + rtol * max |reference|` for every input. The first endpoint in network
order that does not is the first divergence: the fault lies in the module that computes it or upstream.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from converter.errors import ConverterError, ImageError, ModelFolderError, VerificationError
from converter.formats.files import file_sha256
from converter.images import open_image, preprocess
from converter.output.writer import preprocessor_config
from converter.pipeline.table import CLASSIFICATION, DEEPLAB, endpoints_for

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-4
RANDOM = "random"
RANDOM_BATCH = 2
ODD_SIZE = {CLASSIFICATION: 97, DEEPLAB: 129}
NON_SQUARE = (160, 192)  # (height, width)


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

    @property
    def ratio(self) -> float:
        """max_abs_diff / tolerance: above 1 fails."""
        return self.max_abs_diff / self.tolerance if self.tolerance > 0 else math.inf

    def to_json(self, with_input: bool = True) -> dict[str, Any]:
        data = {
            "endpoint": self.endpoint,
            "module": self.module,
            "tensor": self.tensor,
            "shape": self.shape,
            "max_abs_diff": _finite(self.max_abs_diff),
            "max_rel_diff": _finite(self.max_rel_diff),
            "max_abs_reference": _finite(self.max_abs_reference),
            "tolerance": _finite(self.tolerance),
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
    atol: float
    rtol: float
    endpoints: list[tuple[str, str, str]]  # (endpoint, tensor, module) in network order
    inputs: list[dict[str, Any]]
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(row.passed for row in self.rows)

    @property
    def max_abs_diff(self) -> float:
        return max((row.max_abs_diff for row in self.rows), default=math.nan)

    @property
    def max_rel_diff(self) -> float:
        return max((row.max_rel_diff for row in self.rows), default=math.nan)

    def endpoint_rows(self, endpoint: str) -> list[Row]:
        return [row for row in self.rows if row.endpoint == endpoint]

    def summary(self) -> list[dict[str, Any]]:
        """One entry per endpoint, worst over the inputs."""
        out = []
        for endpoint, tensor, module in self.endpoints:
            rows = self.endpoint_rows(endpoint)
            if not rows:
                continue
            worst = max(rows, key=lambda row: (row.max_abs_diff, row.ratio))
            out.append(
                {
                    "endpoint": endpoint,
                    "module": module,
                    "tensor": tensor,
                    "max_abs_diff": _finite(worst.max_abs_diff),
                    "max_rel_diff": _finite(max(row.max_rel_diff for row in rows)),
                    "tolerance": _finite(worst.tolerance),
                    "worst_input": worst.input,
                    "worst_ratio": _finite(max(row.ratio for row in rows)),
                    "passed": all(row.passed for row in rows),
                }
            )
        return out

    @property
    def first_divergence(self) -> dict[str, Any] | None:
        for endpoint, tensor, module in self.endpoints:
            failing = [row for row in self.endpoint_rows(endpoint) if not row.passed]
            if failing:
                worst = max(failing, key=lambda row: row.ratio)
                return {
                    "endpoint": endpoint,
                    "module": module,
                    "tensor": tensor,
                    "input": worst.input,
                    "max_abs_diff": _finite(worst.max_abs_diff),
                    "tolerance": _finite(worst.tolerance),
                    **({"error": worst.error} if worst.error else {}),
                }
        return None

    def to_json(self) -> dict[str, Any]:
        worst = max(self.rows, key=lambda row: row.ratio) if self.rows else None
        return {
            "passed": self.passed,
            "verdict": "PASS" if self.passed else "FAIL",
            "model": self.model,
            "variant": self.variant,
            "kind": self.kind,
            "checkpoint": self.checkpoint,
            "weights": self.weights,
            "reference": self.reference,
            "tolerance": f"atol {self.atol:g} + rtol {self.rtol:g} x max abs reference, per endpoint and input",
            "atol": self.atol,
            "rtol": self.rtol,
            "max_abs_diff": _finite(self.max_abs_diff),
            "max_rel_diff": _finite(self.max_rel_diff),
            "worst": None if worst is None else worst.to_json(),
            "first_divergence": self.first_divergence,
            "endpoints": self.summary(),
            "inputs": [
                {**case, "layers": [row.to_json(False) for row in self.rows if row.input == case["name"]]}
                for case in self.inputs
            ],
            "notes": list(self.notes),
            "versions": dict(self.versions),
            "seconds": round(self.seconds, 3),
        }


def _finite(value: float) -> float | None:
    """JSON has no inf/nan: those become null (the row's `error` or `passed` says why)."""
    return float(value) if value is not None and math.isfinite(value) else None


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
def compare_arrays(ours: np.ndarray, reference: np.ndarray, atol: float, rtol: float) -> dict[str, Any]:
    """max abs / rel diff and the verdict for one endpoint (both NHWC or both 2-D)."""
    if ours.shape != reference.shape:
        return {
            "max_abs_diff": math.inf,
            "max_rel_diff": math.inf,
            "max_abs_reference": float(np.abs(reference).max()) if reference.size else 0.0,
            "tolerance": atol,
            "passed": False,
            "error": f"shape {list(ours.shape)} (ours) vs {list(reference.shape)} (reference)",
        }
    ref = reference.astype(np.float64)
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    diff = float(np.abs(ours.astype(np.float64) - ref).max()) if ref.size else 0.0
    tolerance = atol + rtol * scale
    error = None
    if not (math.isfinite(diff) and math.isfinite(scale)):
        diff, error = math.inf, "NaN or Inf in an output"
    return {
        "max_abs_diff": diff,
        "max_rel_diff": diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf),
        "max_abs_reference": scale,
        "tolerance": tolerance,
        "passed": bool(diff <= tolerance),
        "error": error,
    }


def to_nhwc(array: np.ndarray) -> np.ndarray:
    return array.transpose(0, 2, 3, 1) if array.ndim == 4 else array


def verify_model(
    checkpoint: str | os.PathLike,
    model_dir: str | os.PathLike,
    *,
    inputs: Sequence[str] = (RANDOM,),
    size: int | None = None,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    threads: int | None = None,
) -> ParityResult:
    """Compare the model folder with the original graph of the checkpoint it was converted from.

    Raises VerificationError (exit code 2) when the comparison cannot be made; a failed comparison is a
    result (`ParityResult.passed` false), not an error.
    """
    started = time.perf_counter()
    model_dir = Path(model_dir)
    conversion = _read_json(model_dir / "conversion.json")
    preprocessing = _read_json(model_dir / "preprocessor_config.json")
    model = _load_model(model_dir)
    config = model.config
    kind = DEEPLAB if type(model).__name__.endswith("SemanticSegmentation") else CLASSIFICATION
    notes: list[str] = []
    size = size or config.image_size
    cases = make_inputs(inputs, kind, size, preprocessing)
    endpoints = endpoints_for(kind)
    tensors = [tensor for _, tensor, _ in endpoints]
    drop_background = bool(conversion.get("drop_background"))

    from converter.formats.files import open_source
    from converter.verify.reference import import_tensorflow, open_reference

    tf = import_tensorflow()
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        with open_source(checkpoint) as source:
            weights = conversion.get("weights") or _default_convention(source)
            if "weights" not in conversion:
                notes.append(f"conversion.json does not say which weights were used: assumed {weights}")
            notes += _provenance_notes(conversion, source)
            stride = config.output_stride if kind == DEEPLAB else None
            reference = open_reference(
                source, kind=kind, depth=config.depth_multiplier, convention=weights, output_stride=stride,
                threads=threads,
            )  # fmt: skip
            with reference:
                reference.check_tensors(tensors)
                cases = _fit_to_reference(cases, reference, notes)
                rows = []
                for case in cases:
                    wanted = _comparable(endpoints, case, config, notes)
                    rows += _compare_case(model, reference, case, wanted, drop_background, atol, rtol)
    except VerificationError:
        raise
    except (ConverterError, ModelFolderError) as error:
        raise VerificationError(f"cannot verify: {error}") from None
    return ParityResult(
        model=model_dir.name,
        variant=(conversion.get("variant") or {}).get("name") or model_dir.name,
        kind=kind,
        checkpoint=Path(checkpoint).name,
        weights=weights,
        reference=reference.info.to_json(),
        atol=atol,
        rtol=rtol,
        endpoints=endpoints,
        inputs=[
            {"name": case.name, "description": case.description, "shape": list(case.pixels.shape)} for case in cases
        ],
        rows=rows,
        notes=notes + reference.info.notes,
        versions=_versions(tf),
        seconds=time.perf_counter() - started,
    )


def _compare_case(model, reference, case: InputCase, endpoints, drop_background: bool, atol: float, rtol: float):
    import torch

    names = [endpoint for endpoint, _, _ in endpoints]
    with torch.inference_mode():
        ours = model.extract_features(torch.from_numpy(case.pixels), names)
    theirs = reference.run(np.ascontiguousarray(case.pixels.transpose(0, 2, 3, 1)), [t for _, t, _ in endpoints])
    rows = []
    for endpoint, tensor, module in endpoints:
        mine, ref = to_nhwc(ours[endpoint].numpy()), theirs[tensor]
        if endpoint == "logits" and drop_background and ref.shape[-1] == mine.shape[-1] + 1:
            ref = ref[..., 1:]  # the model was written without the background class
        result = compare_arrays(mine, ref, atol, rtol)
        rows.append(Row(case.name, endpoint, module, tensor, list(ref.shape), **result))
    return rows


def _comparable(endpoints, case: InputCase, config, notes: list[str]):
    """Endpoints to compare on this input: a model pooling with slim's fixed 7x7 window differs from a
    graph that pools globally once the last feature map is larger than 7x7, so its pooled outputs are
    left out there (the backbone is still compared)."""
    height, width = case.pixels.shape[-2:]
    if getattr(config, "avg_pool", "global") == "global" or max(-(-height // 32), -(-width // 32)) <= 7:
        return endpoints
    notes.append(
        f"{case.name}: global_pool and logits not compared (the model pools with a fixed 7x7 window, the "
        "reference graph over the whole feature map)"
    )
    return [row for row in endpoints if row[0] not in ("global_pool", "logits")]


def _fit_to_reference(cases: list[InputCase], reference, notes: list[str]) -> list[InputCase]:
    """Drop inputs a graph with a fixed input size cannot take; never leave none."""
    kept = [case for case in cases if reference.accepts(*case.pixels.shape[-2:])]
    dropped = [case.name for case in cases if case not in kept]
    if dropped:
        _, height, width = reference.fixed_shape
        notes.append(f"the reference graph fixes its input at {height}x{width}: skipped {', '.join(dropped)}")
    if not kept:
        _, height, width = reference.fixed_shape
        kept = [random_case(f"random-{height}x{width}", 1, height, width, seed=3)]
    return kept


def _load_model(model_dir: Path):
    from mobilenet_torch import MobileNetV2ForImageClassification, MobileNetV2ForSemanticSegmentation

    config = _read_json(model_dir / "config.json")
    if not config:
        raise VerificationError(f"{model_dir} has no config.json: pass a folder written by convert-mobilenet")
    architectures = config.get("architectures") or []
    cls = (
        MobileNetV2ForSemanticSegmentation
        if any("Segmentation" in name for name in architectures)
        else MobileNetV2ForImageClassification
    )
    try:
        return cls.from_pretrained(model_dir)
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


def _default_convention(source) -> str:
    from converter.formats.tf_bundle import TensorBundle
    from converter.pipeline.conventions import plan_weights

    with TensorBundle(source.prefix) as bundle:
        return plan_weights(bundle.names()).convention


def _provenance_notes(conversion: dict[str, Any], source) -> list[str]:
    """A note when the checkpoint is not the one conversion.json records (parity will then fail)."""
    recorded = {f.get("name"): f.get("sha256") for f in (conversion.get("source") or {}).get("files") or []}
    if not recorded:
        return []
    files = [source.archive] if source.archive else list(source.files)
    for path in files:
        if path.name in recorded and recorded[path.name] == file_sha256(path):
            continue
        return [f"{path.name} is not the checkpoint conversion.json records ({', '.join(sorted(recorded))})"]
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
