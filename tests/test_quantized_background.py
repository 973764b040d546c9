"""--drop-background on Google's real uint8 ImageNet `.tflite`: the integer model loses the background
class as the float model does, and keeps the TFLite interpreter's top-1 label on the real images.

Before, the integer model kept 1001 classes under the float model's 1000 labels (the cat came out a
"cougar", one class off) and verify-mobilenet ended in an internal ValueError.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from converter import convert_checkpoint
from converter.errors import UsageError
from mobilenet_torch.quantized import QuantizedMobileNetV2
from mobilenet_torch.quantized_files import QUANTIZATION_FILE
from tests.realdata_tflite import IMAGES, MODELS, interpreter, labels, pixel_values, quantized_image

IMAGENET = MODELS / "mobilenet_v2_1.0_224_quant.tflite"
CLASSIFICATION_IMAGES = ("cat", "bird", "grace_hopper", "dragonfly", "missvickie_potato_chips")

if not IMAGENET.is_file():
    pytest.skip(f"{IMAGENET} is absent: no real quantized model to check against", allow_module_level=True)
pytest.importorskip("tensorflow", reason="TensorFlow (tf.lite) is needed to run the real TFLite model")
pytest.importorskip("PIL", reason="pillow is needed to read the real images")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dropped(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dropped") / "out"
    summary = convert_checkpoint(IMAGENET, folder, drop_background=True)
    return folder, summary


def test_integer_model_keeps_the_interpreter_top1_without_background(dropped):
    folder, summary = dropped
    model = QuantizedMobileNetV2.from_pretrained(folder)
    interp = interpreter(IMAGENET, preserve_all_tensors=True, reference_kernels=True)
    imagenet = labels("imagenet_labels.txt")  # 1001 names, background first
    logits_tensor = model.records["classifier"]["tensor"]
    step = model.records["classifier"]["output"]["scale"]
    output_index = interp.get_output_details()[0]["index"]
    found = {}
    for image in CLASSIFICATION_IMAGES:
        quantized = quantized_image(IMAGES / f"{image}.bmp", 224)
        interp.set_tensor(interp.get_input_details()[0]["index"], quantized)
        interp.invoke()
        theirs = interp.get_tensor(output_index)[0]
        scale, zero_point = interp._get_tensor_details(logits_tensor, 0)["quantization"]
        their_logits = scale * (interp.get_tensor(logits_tensor).reshape(-1).astype(np.float64) - zero_point)
        output = model(pixel_values(quantized))
        ours = output.logits[0].numpy()
        assert ours.shape == (1000,) and output.probabilities is None
        np.testing.assert_allclose(ours, their_logits[1:], atol=step * 1.0001)
        label = model.config.id2label[int(ours.argmax())]
        best = {imagenet[i] for i in np.flatnonzero(theirs == theirs.max())}  # the quantized softmax may tie
        assert label in best, f"{image}: ours {label!r}, TFLite's {sorted(best)}"
        found[image] = label
    assert found["cat"] != "cougar, puma, catamount, mountain lion, painter, panther, Felis concolor"
    print(f"\ntop-1 without background: {found}")


def test_the_conversion_says_the_softmax_was_left_out(dropped):
    folder, summary = dropped
    steps = json.loads((folder / QUANTIZATION_FILE).read_text())["steps"]
    assert "softmax" not in steps and "classifier" in steps
    recorded = json.loads((folder / "conversion.json").read_text())["notes"]
    note = next(note for note in summary.notes if "softmax" in note)
    assert note in recorded and "1001" in note


def test_float_twin_agrees_with_the_integer_labels(dropped):
    folder, _ = dropped
    model = QuantizedMobileNetV2.from_pretrained(folder)
    assert model.float_twin().config.id2label == model.config.id2label
    quantized = quantized_image(IMAGES / "cat.bmp", 224)
    with torch.no_grad():
        assert model.float_twin()(pixel_values(quantized)).logits.shape == model(pixel_values(quantized)).logits.shape


def test_verify_mobilenet_passes_on_the_dropped_folder(dropped):
    from click.testing import CliRunner

    from converter.app.cli import verify_main

    folder, _ = dropped
    arguments = ["--checkpoint", str(IMAGENET), "--model", str(folder), "--inputs", str(IMAGES / "cat.bmp")]
    result = CliRunner().invoke(verify_main, [*arguments, "--report-dir", str(folder.parent / "parity")])
    assert "internal error" not in result.output
    assert result.exit_code == 0, result.output
    assert "Parity PASS" in result.output


def test_add_background_is_refused_for_an_integer_model(tmp_path):
    """The real model has 1001 classes, so the flag is refused for its count first; the integer refusal
    is checked on the reader, which a 1000-class full-integer model would reach."""
    from converter.formats.tflite import TFLiteReader

    with pytest.raises(UsageError, match="add-background"):
        TFLiteReader(IMAGENET).extra_files("add")
