"""TFLite's fixed-point arithmetic as its reference kernels compute it, for the integer model
(:mod:`mobilenet_torch.quantized`): the multipliers (``QuantizeMultiplier``), the rounding doubling high
multiply and rounding right shift, activation ranges, and the same requantization as one float64 floor
division where every term stays exact."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .errors import ModelFolderError
from .quantized_files import QUANTIZATION_FILE

DTYPE_RANGES = {"uint8": (0, 255), "int8": (-128, 127)}


def quantize_multiplier(real: float) -> tuple[int, int]:
    """TFLite's QuantizeMultiplier: real = multiplier * 2^(shift - 31), multiplier in [2^30, 2^31)."""
    if real == 0.0:
        return 0, 0
    fraction, shift = math.frexp(real)
    multiplier = math.floor(fraction * (1 << 31) + 0.5)  # std::round: half away from zero (positive here)
    if multiplier == 1 << 31:
        multiplier //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    return multiplier, shift


def _rounding_doubling_high_mul(x: torch.Tensor, multiplier: torch.Tensor) -> torch.Tensor:
    product = x * multiplier
    nudge = torch.where(product >= 0, 1 << 30, 1 - (1 << 30))
    return torch.div(product + nudge, 1 << 31, rounding_mode="trunc")


def _rounding_divide_by_pot(x: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    mask = (1 << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (remainder > threshold)


def multiply_by_quantized_multiplier(x: torch.Tensor, multiplier: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """TFLite's MultiplyByQuantizedMultiplier on int64 tensors holding int32 values: a saturating
    rounding doubling high multiply, then a rounding right shift (rounding twice, as TFLite does)."""
    left, right = shift.clamp(min=0), (-shift).clamp(min=0)
    return _rounding_divide_by_pot(_rounding_doubling_high_mul(x * (1 << left), multiplier), right)


def multiply_by_quantized_multiplier_single_rounding(
    x: torch.Tensor, multiplier: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    """The same product rounded once (half up): what TFLite's FULLY_CONNECTED kernel was measured to do."""
    total_shift = 31 - shift
    return (x * multiplier + (1 << (total_shift - 1))) >> total_shift


def multiplier_tensors(reals: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [quantize_multiplier(real) for real in reals]
    return torch.tensor([m for m, _ in pairs], dtype=torch.int64), torch.tensor([s for _, s in pairs])


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """TfLiteRound / std::round (torch.round rounds half to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _quantize_real(value: float, scale: float, zero_point: int) -> int:
    """zero_point + round(value / scale) in float32, as CalculateActivationRangeQuantized does."""
    quotient = torch.tensor(value, dtype=torch.float32) / torch.tensor(scale, dtype=torch.float32)
    return zero_point + int(round_half_away(quotient))


def activation_range(activation: str | None, scale: float, zero_point: int, dtype: str) -> tuple[int, int]:
    low, high = DTYPE_RANGES[dtype]
    if activation in ("relu", "relu6"):
        low = max(low, _quantize_real(0.0, scale, zero_point))
    if activation == "relu6":
        high = min(high, _quantize_real(6.0, scale, zero_point))
    elif activation not in (None, "relu"):
        raise ModelFolderError(f"{QUANTIZATION_FILE}: activation {activation!r} is not emulated")
    return low, high


# Integers up to 2^24 (2^53) are float32 (float64) values: a sum of integer products whose partial sums stay
# within that bound is exact, in any order of summation.
FLOAT32_EXACT = 1 << 24
FLOAT64_EXACT = 1 << 53
SLICE_ELEMENTS = 1 << 18  # the requantization's float64 temporaries: 2 MiB
ROW_ELEMENTS = 1 << 12  # ... in rows this long


class FixedPoint(NamedTuple):
    """A requantization per output channel as one integer formula: r(a) = (a * multiplier + offset) >> shift,
    the offset being `below` for a < `boundary` (where TFLite's rounding goes away from zero) and `at_or_above`
    otherwise. Both of TFLite's roundings reduce to it (see `fixed_point`)."""

    multiplier: int
    shift: int
    at_or_above: int
    below: int
    boundary: int

    def __call__(self, a: int) -> int:
        return (a * self.multiplier + (self.below if a < self.boundary else self.at_or_above)) >> self.shift

    def first_reaching(self, target: int) -> int:
        """The smallest a with r(a) >= target (r is non-decreasing; multiplier > 0)."""
        below = -((self.below - (target << self.shift)) // self.multiplier)  # ceil((target 2^s - offset) / m)
        if below < self.boundary:
            return below
        return max(-((self.at_or_above - (target << self.shift)) // self.multiplier), self.boundary)


def fixed_point(multiplier: int, shift: int, single_rounding: bool) -> FixedPoint:
    """MultiplyByQuantizedMultiplier as one floor division. Its rounding doubling high multiply is
    floor((x m + 2^30) / 2^31) (half up), its rounding right shift by e rounds half away from zero:
    floor((t + 2^(e-1) - [t < 0]) / 2^e); nested floors of power-of-two divisions merge into one, and
    t < 0 exactly where a < -(2^30 // m). The single rounding is floor((x m + 2^(s-1)) / 2^s)."""
    if single_rounding:
        total = 31 - shift
        return FixedPoint(multiplier, total, 1 << (total - 1), 1 << (total - 1), 0)
    left, right = max(shift, 0), max(-shift, 0)
    scaled, half = multiplier << left, 1 << 30
    if right == 0:
        return FixedPoint(scaled, 31, half, half, 0)
    at_or_above = half + (1 << (30 + right))
    return FixedPoint(scaled, 31 + right, at_or_above, at_or_above - (1 << 31), -(half // scaled) if scaled else 0)


class FloatRequantization:
    """A conv's requantization in float64, exact for the layer and input it was made for (see
    `float_requantization`): the sums clamped to where the output can change, then floor(s m + c), less one
    step of the rounding shift where the accumulator is negative (`negative_bias`: minus the bias, given
    where any channel can be). Each argument holds one value per channel."""

    def __init__(self, low, high, multiplier, offset, negative_bias: torch.Tensor | None, negative_step) -> None:
        self.constants = (low, high, multiplier, offset) + (
            (negative_bias, negative_step) if negative_bias is not None else ()
        )
        self._tiled: dict[tuple[int, torch.dtype], tuple[torch.Tensor, ...]] = {}

    def __call__(self, sums: torch.Tensor) -> torch.Tensor:
        """The output values, written over `sums` (float32). The values are taken as rows of channels
        (channels_last), several pixels to a row, so that the per-channel constants broadcast along long
        rows, and a slice of rows at a time: float64 temporaries of a bounded size, which the allocator
        reuses, where whole-tensor ones of a large batch would be fresh memory every time."""
        channels = sums.shape[1]
        out = sums if sums.dtype == torch.float32 else torch.empty_like(sums, dtype=torch.float32)
        out = out.contiguous(memory_format=torch.channels_last)
        pixels = sums.numel() // channels
        tile = 1
        while 2 * tile * channels <= ROW_ELEMENTS and pixels % (2 * tile) == 0:
            tile *= 2
        if (tile, sums.dtype) not in self._tiled:
            tiled = [constant.repeat(tile) for constant in self.constants]
            self._tiled[tile, sums.dtype] = (*(bound.to(sums.dtype) for bound in tiled[:2]), *tiled[2:])
        low, high, *constants = self._tiled[tile, sums.dtype]
        rows = sums.permute(0, 2, 3, 1).reshape(-1, tile * channels)
        rows.clamp_(low, high)  # in the sums' own type: the bounds lie within the sums' reach, so are exact
        out_rows = out.permute(0, 2, 3, 1).view(-1, tile * channels)
        step = max(1, SLICE_ELEMENTS // rows.shape[1])
        for start in range(0, rows.shape[0], step):
            out_rows[start : start + step] = _requantize_rows(rows[start : start + step], *constants)
        return out


def _requantize_rows(sums, multiplier, offset, negative_bias=None, negative_step=None) -> torch.Tensor:
    a = sums.to(torch.float64)
    if negative_bias is not None:  # -1 where sums + bias < 0 (integers), else 0
        below = a.clamp(negative_bias - 1, negative_bias).sub_(negative_bias)
    a.mul_(multiplier).add_(offset)
    if negative_bias is not None:
        a.add_(below.mul_(negative_step))
    return a.floor_()


def float_requantization(
    formulas: list[FixedPoint], biases: list[int], reach: list[tuple[int, int]], zero_point: int, low: int, high: int
) -> FloatRequantization | None:
    """The float64 form of `formulas` applied to the accumulator a = bias + sum, one per channel, with the
    output zero point and clamp (`reach`: the range a can take), or None where float64 cannot hold it
    exactly.

    Clamping the accumulator a to [the last a giving `low`, the first giving `high`] leaves the output
    unchanged when no step of r exceeds 1, keeps a >= 0 in layers that clamp at their zero point (ReLU:
    no sign term), and bounds |a m|: every term is then an integer times a power of two with fewer than
    53 significant bits, so exact. A channel whose output cannot change (no weights, a zero multiplier,
    saturated over all it can reach) is a constant."""
    columns, signed = [], False
    for r, bias, (reach_low, reach_high) in zip(formulas, biases, reach, strict=True):
        if r.multiplier:
            last_low, first_high = r.first_reaching(low - zero_point + 1) - 1, r.first_reaching(high - zero_point)
            if (r(last_low) + zero_point, r(first_high) + zero_point) != (low, high):
                return None  # a step of more than one: the clamp would not be the output's
        if not r.multiplier or reach_low == reach_high or reach_high <= last_low or reach_low >= first_high:
            constant = min(max(r(reach_low) + zero_point, low), high)
            columns.append((0, 0, 0.0, float(constant), 0.0))
            continue
        bounds = (max(last_low, reach_low), min(first_high, reach_high))
        offsets = [offset + (zero_point << r.shift) for offset in (r.at_or_above, r.below)]
        exact = (  # s m, c (the bias folded in) and s m + c at either end of the clamp: all within 2^53
            max(abs(b - bias) for b in bounds) * r.multiplier < FLOAT64_EXACT
            and max(abs(bias * r.multiplier + offset) for offset in offsets) < FLOAT64_EXACT
            and max(abs(b * r.multiplier + offset) for b in bounds for offset in offsets) < FLOAT64_EXACT
            # a < 0 takes `below`: r itself switches at `boundary`, which is 0 or -1 (where both agree)
            and all(r(a) == ((a * r.multiplier + r.below) >> r.shift) for a in range(r.boundary, 0))
        )
        if not exact:
            return None
        signed |= bounds[0] < 0
        scale = 2.0**-r.shift
        columns.append((bounds[0] - bias, bounds[1] - bias, r.multiplier * scale,
                        (bias * r.multiplier + offsets[0]) * scale, (offsets[1] - offsets[0]) * scale))  # fmt: skip
    low_sum, high_sum, multiplier, offset, step = torch.tensor(columns, dtype=torch.float64).T
    negative_bias = -torch.tensor(biases, dtype=torch.float64) if signed else None
    return FloatRequantization(low_sum, high_sum, multiplier, offset, negative_bias, -step)
