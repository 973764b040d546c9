"""Every form a converter writes for a dilated depthwise conv and its BatchNorm converts and emulates exactly,
whatever this machine's TFLite converter writes.

TF's converter writes DeepLab's dilated depthwise convs as SPACE_TO_BATCH_ND -> VALID DEPTHWISE_CONV_2D ->
BATCH_TO_SPACE_ND, then what it left of the BatchNorm: a per-channel MUL and ADD on some machines, the ADD
alone on others (the scale folded into the weights). The forms are made here deterministically from the int8
DeepLab rebuilt from the real weights (as ``tests/test_tflite.py`` builds it), by editing its ops: each dilated
conv is first folded (the converter's MUL into the per-channel weight scales, its ADD into the int32 bias, its
ReLU6 into the conv), then given the ops of the form under test, with seeded constants whose arithmetic the
conv's weights and bias give back, so the network computes what it did:

- ``folded``: nothing after the conv, its ReLU6 fused; ``folded + RELU6``: a RELU6 op of its own;
- ``MUL``, ``ADD``, ``MUL + ADD``: the BatchNorm's ops, the ReLU6 fused into the last;
- ``MUL + ADD + RELU6``: a RELU6 op after them.

For each form, on a real image: the integer model is within one step of every intermediate tensor of the
TFLite interpreter with reference kernels, and keeps its label map; the float model's logits are within the
project's parity bar of the float model the file stands for (``tests.tflite_editing.dequantized_copy``, run by
the interpreter), and keep its label map. Run with ``-rA -s`` to see the measured steps.
"""

from __future__ import annotations

import pytest

from converter import convert_checkpoint
from mobilenet_torch.quantized import QuantizedMobileNetV2
from tests.realdata_tflite import IMAGES, REALDATA, interpreter, pixel_values, quantized_image
from tests.tflite_editing import form_copy

if not REALDATA.is_dir():
    pytest.skip(f"{REALDATA} is absent: no real TFLite models to build the forms from", allow_module_level=True)
tf = pytest.importorskip("tensorflow", reason="TensorFlow (tf.lite) is needed to run the edited TFLite models")
pytest.importorskip("PIL", reason="pillow is needed to read the real images")

from tests.test_tflite import (  # noqa: E402 (after the skips: it needs the real data and TensorFlow)
    DEEPLAB_INT8,
    LABELS_EQUAL,
    compare_steps,
    float_truth,
    tflite_path,
)

IMAGE = "dog_segmentation"
# name -> (the BatchNorm's ops after the conv, whether the ReLU6 is an op of its own)
FORMS = {
    "folded": ((), False),
    "folded+RELU6": ((), True),
    "MUL": (("MUL",), False),
    "ADD": (("ADD",), False),
    "MUL+ADD": (("MUL", "ADD"), False),
    "MUL+ADD+RELU6": (("MUL", "ADD"), True),
}
SUFFIXES = {"MUL": "mul", "ADD": "bias_add", "RELU6": "relu6"}  # the integer model's step names


@pytest.fixture(scope="module")
def image():
    return quantized_image(IMAGES / f"{IMAGE}.bmp", 513)


@pytest.mark.parametrize("form", list(FORMS))
def test_every_form_converts_and_emulates_exactly(tmp_path, form, image):
    ops, separate_relu6 = FORMS[form]
    path = form_copy(tflite_path(DEEPLAB_INT8), tmp_path / "form.tflite", ops, separate_relu6)
    folder = tmp_path / "out"
    convert_checkpoint(path, folder)
    model = QuantizedMobileNetV2.from_pretrained(folder)
    dilated = [name for name, record in model.records.items() if record.get("dilation", 1) > 1]
    assert dilated, "no dilated conv was read"
    expected = [SUFFIXES[op] for op in ops] + (["relu6"] if separate_relu6 else [])
    for conv in dilated:
        assert model.after_conv[conv] == [f"{conv}.{suffix}" for suffix in expected]

    # The integer model, step by step against the reference kernels.
    interp = interpreter(path, preserve_all_tensors=True, reference_kernels=True)
    steps = model.run(pixel_values(image))
    errors = compare_steps(model, interp, image, steps)
    theirs = interp.get_tensor(interp.get_output_details()[0]["index"])[0]
    labels_equal = float((steps["labels"].values[0].numpy() == theirs).mean())
    form_steps = {name: errors[name][0] for conv in dilated for name in [conv, *model.after_conv[conv]]}
    worst = max(worst for name, (worst, _) in errors.items() if name != "labels")

    # The float model against the float model the file stands for, run by the interpreter.
    logits_error, tolerance, float_equal = float_truth(folder, path, tmp_path / "float.tflite", image)
    print(
        f"\nform {form}: integer steps of the dilated convs {max(form_steps.values())} (worst of all steps "
        f"{worst}), labels equal {labels_equal:.4%}; float logits {logits_error:.2e} from the dequantized file's "
        f"(tolerance {tolerance:.2e}), labels equal {float_equal:.4%}"
    )
    assert worst <= 1
    assert labels_equal >= LABELS_EQUAL
    assert logits_error <= tolerance
    assert float_equal >= LABELS_EQUAL
