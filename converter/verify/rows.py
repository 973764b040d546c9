"""The rows of a parity check: one endpoint on one input, compared with its calibrated tolerance (the rule
is in :mod:`converter.verify.compare`'s docstring), and the result that the reports are made of."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: The fixed rule's defaults, used when only one of --atol / --rtol is given.
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-4
#: The calibrated rule (see the module docstring).
NOISE_FACTOR = 16.0
NOISE_FLOOR = 16 * float(np.finfo(np.float32).eps)
MAX_RELATIVE_TOLERANCE = 1e-3
LOGITS = "logits"
#: A check is weak where the output is below one float32 rounding step (eps x the value) of the largest
#: activation that computed it: such an output is mostly cancellation, it carries almost nothing of the
#: input (a network with untrained weights gives logits ~1e-11 for activations ~1), and agreeing on it,
#: however exactly, says little about the conversion of the layers that feed it.
WEAK_SIGNAL = float(np.finfo(np.float32).eps)
#: The rows of a quantized reference (see :mod:`.quantized`): each float layer on the interpreter's own
#: input, and each step of the integer emulation, named by these prefixes.
FLOAT_STEP, INTEGER_STEP = "float/", "integer/"


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
    def images(self) -> int:
        """How many images were compared (an input case may be a batch)."""
        return sum(int(case["shape"][0]) if case.get("shape") else 1 for case in self.inputs)

    @property
    def weak_signal(self) -> str | None:
        """Why the check is weak (see `WEAK_SIGNAL`), or None where the output carries the input."""
        compared = self.compared_rows
        if not compared:
            return None
        last = LOGITS if any(row.endpoint == LOGITS for row in compared) else compared[-1].endpoint
        output = [row.max_abs_reference for row in compared if row.endpoint == last]
        inner = [
            row.max_abs_reference for row in compared if row.endpoint != last and math.isfinite(row.max_abs_reference)
        ]
        if not output or not inner:
            return None
        signal, activations = max(output), max(inner)
        if not signal < WEAK_SIGNAL * activations:
            return None
        return (
            f"the reference's `{last}` are at most {signal:.2g} in magnitude for activations up to "
            f"{activations:.2g}, below float32's rounding of them ({WEAK_SIGNAL:.2g} x): the output carries "
            "almost none of the input (untrained weights?), so agreeing on it says little"
        )

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
    def against_integer_model(self) -> bool:
        """Whether the reference is an integer model, compared layer by layer and step by step."""
        return any(endpoint.startswith((FLOAT_STEP, INTEGER_STEP)) for endpoint, _, _ in self.endpoints)

    @property
    def tolerance_rule(self) -> str:
        if self.against_integer_model:
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
            "weak_signal": self.weak_signal,
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


def without_background(logits: np.ndarray, our_shape: tuple[int, ...], drop_background: bool) -> np.ndarray:
    """The reference's logits without the background class, where the model was written without it (only
    the logits can have one class more than ours)."""
    if drop_background and logits.shape[-1] == our_shape[-1] + 1:
        return logits[..., 1:]
    return logits
