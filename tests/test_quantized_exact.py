"""The integer model's fast path is exact: float32 convolutions (split where a sum could leave float32's
exact integers) and float64 requantization compute TFLite's integers bit for bit.

- On Google's real quantized models (classification and both DeepLabs, ../shared/realdata) and an int8
  per-channel model rebuilt from real weights, a batch of real images gives, image by image, every
  intermediate tensor of the interpreter's reference kernels exactly (the float softmax: within one step).
- A synthetic conv at the int8 extremes, with more input channels than one float32 sum holds exactly,
  matches an exact int64 computation made here by another method (numpy windows and TFLite's fixed-point
  formulas as gemmlowp writes them): its accumulator and its outputs, as do the rarer cases (a multiplier
  whose steps exceed one level, a channel with no weights and a saturating bias).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mobilenet_torch.layers import ConvLayer
from mobilenet_torch.quantized import QTensor, QuantizedConv, QuantizedMobileNetV2

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

# --- the exact reference: numpy int64, written from TFLite's reference kernels -------------------------


def tf_same_windows(x: np.ndarray, kernel: int, stride: int) -> np.ndarray:
    """[N, C, out_h, out_w, k, k] windows of NCHW `x` zero-padded as TF 'SAME' (padding adds nothing)."""
    pads = []
    for size in x.shape[-2:]:
        out = -(-size // stride)
        total = max((out - 1) * stride + kernel - size, 0)
        pads.append((total // 2, total - total // 2))
    padded = np.pad(x, ((0, 0), (0, 0), *pads))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (kernel, kernel), axis=(2, 3))
    return windows[:, :, ::stride, ::stride]


def exact_accumulator(x: np.ndarray, zx: int, weight: np.ndarray, zw: np.ndarray, bias: np.ndarray, stride: int):
    """bias + sum of (x - zx)(w - zw), int64 (a dense conv)."""
    windows = tf_same_windows(x.astype(np.int64) - zx, weight.shape[-1], stride)
    offset_weight = weight.astype(np.int64) - zw.reshape(-1, 1, 1, 1)
    return np.einsum("nchwij,ocij->nohw", windows, offset_weight) + bias.reshape(1, -1, 1, 1)


def quantize_multiplier(real: float) -> tuple[int, int]:
    fraction, shift = math.frexp(real)
    multiplier = round(fraction * (1 << 31))
    return (multiplier // 2, shift + 1) if multiplier == 1 << 31 else (multiplier, shift)


def gemmlowp_requantize(accumulator: np.ndarray, multipliers: list[tuple[int, int]]) -> np.ndarray:
    """MultiplyByQuantizedMultiplier per output channel, as TFLite's reference code spells it:
    SaturatingRoundingDoublingHighMul (nudge, then C's truncating division) and RoundingDivideByPOT."""
    out = np.empty_like(accumulator)
    for channel, (multiplier, shift) in enumerate(multipliers):
        x = accumulator[:, channel] * (1 << max(shift, 0))
        product = x * multiplier
        nudged = product + np.where(product >= 0, 1 << 30, 1 - (1 << 30))
        high = np.sign(nudged) * (np.abs(nudged) // (1 << 31))
        exponent = max(-shift, 0)
        mask = (1 << exponent) - 1
        remainder, threshold = high & mask, (mask >> 1) + (high < 0)
        out[:, channel] = (high >> exponent) + (remainder > threshold)
    return out


def conv_case(seed: int, in_channels: int, out_channels: int, kernel: int, stride: int, size: int):
    """A conv at the int8 extremes: weights -128 or 127 (a quarter of the channels all 127, so that sums reach
    past 2^24), inputs at the ends of their range, and what it needs to run."""
    rng = np.random.default_rng(seed)
    weight = rng.choice(np.array([-128, 127], dtype=np.int8), size=(out_channels, in_channels, kernel, kernel))
    weight[: out_channels // 4] = 127
    x = rng.choice(np.array([-128, 127], dtype=np.int8), size=(2, in_channels, size, size)).astype(np.int64)
    x[0] = 127  # every window at the top of the range: the largest sums the weights allow
    bias = rng.integers(-(1 << 20), 1 << 20, size=out_channels)
    weight_scale = rng.uniform(0.5, 2.0, size=out_channels) * 1e-3
    return weight, x, bias, weight_scale


def quantized_conv(weight, bias, weight_scale, output_scale, output_zero_point, stride, activation=None):
    out_channels, in_channels, kernel, _ = weight.shape
    record = {
        "op": "CONV_2D",
        "weight_scale": [float(s) for s in weight_scale],
        "weight_zero_point": [0] * out_channels,
        "output": {"scale": output_scale, "zero_point": output_zero_point},
        "activation": activation,
    }
    layout = ConvLayer(in_channels, out_channels, kernel, stride, norm_eps=None, activation=None)
    return QuantizedConv(layout, record, torch.from_numpy(weight), torch.from_numpy(bias.astype(np.int32)), "int8")


def expected_output(accumulator, weight_scale, input_scale, output_scale, output_zero_point, low=-128, high=127):
    multipliers = [quantize_multiplier(input_scale * s / output_scale) for s in weight_scale]
    return np.clip(gemmlowp_requantize(accumulator, multipliers) + output_zero_point, low, high)


@pytest.mark.parametrize(
    ("kernel", "stride", "size", "in_channels"), [(1, 1, 7, 601), (3, 2, 9, 301), (3, 2, 10, 301), (3, 1, 5, 261)]
)
def test_a_conv_past_float32_s_exact_sums_is_split_and_stays_exact(kernel, stride, size, in_channels):
    weight, x, bias, weight_scale = conv_case(kernel * 100 + size, in_channels, 16, kernel, stride, size)
    input_scale, input_zero_point = 0.02, -128
    accumulator = exact_accumulator(x, input_zero_point, weight, np.zeros(16, np.int64), bias, stride)
    sums = accumulator - bias.reshape(1, -1, 1, 1)
    assert ((np.abs(sums) > 1 << 24) & (sums % 2 == 1)).any(), "some sums must be integers float32 cannot hold"
    # The output scale puts the largest accumulators inside the output range, where every unit counts.
    output_scale = float(input_scale * weight_scale.max() * np.abs(accumulator).max() / 100)
    conv = quantized_conv(weight, bias, weight_scale, output_scale, 3, stride)
    assert len(conv.chunks) > 1
    q = QTensor(torch.from_numpy(x).to(torch.float32), input_scale, input_zero_point)
    ours, folded_bias = conv.accumulate(q)
    np.testing.assert_array_equal((ours.to(torch.float64) + folded_bias).numpy(), accumulator)
    theirs = expected_output(accumulator, weight_scale, input_scale, output_scale, 3)
    assert len(np.unique(theirs)) > 20 and theirs.max() < 127  # spread over the range, not saturated
    np.testing.assert_array_equal(conv(q).values.numpy(), theirs)


def test_rare_requantizations_stay_exact():
    """A multiplier above one (its output steps by more than one level: TFLite's int64 arithmetic itself
    runs) and a channel with no weights whose bias saturates the int32 range (a constant)."""
    weight, x, bias, weight_scale = conv_case(7, 32, 8, 1, 1, 6)
    weight[0] = 0
    bias[0] = (1 << 30) - 64  # what the current converter writes for a channel whose weights are all zero
    input_scale = 0.02
    accumulator = exact_accumulator(x, -128, weight, np.zeros(8, np.int64), bias, 1)
    for output_scale in (input_scale * weight_scale.max() * np.abs(accumulator[:, 1:]).max() / 100, 1e-6):
        conv = quantized_conv(weight, bias, weight_scale, float(output_scale), -5, 1)
        q = QTensor(torch.from_numpy(x).to(torch.float32), input_scale, -128)
        theirs = expected_output(accumulator, weight_scale, input_scale, float(output_scale), -5)
        np.testing.assert_array_equal(conv(q).values.numpy(), theirs)
        stepping = output_scale < input_scale * weight_scale.min()
        assert (conv.float_requantization(q, conv.accumulate(q)[1]) is None) == stepping


# --- the real models against the interpreter's reference kernels, a batch at a time -------------------

EXACT_EXCEPT = {"softmax": 1}  # computed in float on the dequantized logits (see mobilenet_torch.quantized)
IMAGENET, IMAGENET_INT8 = "mobilenet_v2_1.0_224_quant", "mobilenet_v2_1.0_224_quant_int8"  # as tests.test_tflite
DEEPLAB, DEEPLAB_DM05 = "deeplabv3_mnv2_pascal_quant", "deeplabv3_mnv2_dm05_pascal_quant"
CLASSIFICATION_IMAGES = ("cat", "bird", "grace_hopper", "dragonfly", "missvickie_potato_chips")
SEGMENTATION_IMAGES = ("bird_segmentation", "dog_segmentation")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """model name -> its converted folder (each once); skips without the real models and TensorFlow."""
    from tests.realdata_tflite import REALDATA

    if not REALDATA.is_dir():
        pytest.skip(f"{REALDATA} is absent: no real quantized models to check against")
    pytest.importorskip("tensorflow", reason="TensorFlow (tf.lite) runs the reference kernels")
    pytest.importorskip("PIL", reason="pillow is needed to read the real images")
    from tests.test_tflite import converted_once

    return converted_once(tmp_path_factory)


@pytest.mark.parametrize(
    ("name", "size", "images"),
    [
        (IMAGENET, 224, CLASSIFICATION_IMAGES[:3]),
        (IMAGENET_INT8, 224, CLASSIFICATION_IMAGES[3:]),
        (DEEPLAB, 513, SEGMENTATION_IMAGES),
        (DEEPLAB_DM05, 513, SEGMENTATION_IMAGES[::-1]),
    ],
)
def test_a_batch_gives_the_reference_kernels_integers_exactly(converted, name, size, images):
    from tests.realdata_tflite import IMAGES, interpreter, pixel_values, quantized_image
    from tests.test_tflite import compare_steps, tflite_path

    model = QuantizedMobileNetV2.from_pretrained(converted(name))
    interp = interpreter(tflite_path(name), preserve_all_tensors=True, reference_kernels=True)
    batch = np.concatenate([quantized_image(IMAGES / f"{image}.bmp", size) for image in images])
    steps = model.run(pixel_values(batch))
    for i, image in enumerate(images):
        one = {step: QTensor(q.values[i : i + 1], q.scale, q.zero_point) for step, q in steps.items()}
        errors = compare_steps(model, interp, batch[i : i + 1], one)
        worse = {step: worst for step, (worst, _) in errors.items() if worst > EXACT_EXCEPT.get(step, 0)}
        assert not worse, f"{name} {image}: steps off the reference kernels (in levels): {worse}"
        if "labels" in steps:
            theirs = interp.get_tensor(interp.get_output_details()[0]["index"])[0]
            np.testing.assert_array_equal(steps["labels"].values[i].numpy(), theirs)
    if len(images) > 1:  # the batch computes what each image alone computes
        alone = model.run(pixel_values(batch[-1:]))
        assert all(torch.equal(alone[step].values[0], q.values[-1]) for step, q in steps.items())
