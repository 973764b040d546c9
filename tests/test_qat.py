"""Quantization-aware-training checkpoints (tf.contrib.quantize): converted to the float model with the
quantization variables set aside by rule, and to the fake-quant model, both checked against TF graphs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from converter import convert_checkpoint
from converter.pipeline.conventions import plan_weights
from converter.pipeline.fake_quantization import BITS, fake_quantization_files, quantization_places
from fixtures.spec import checkpoint_inventory, get_variant
from mobilenet_torch import MobileNetV2ForImageClassification
from mobilenet_torch.errors import ModelFolderError
from mobilenet_torch.fakequant import FakeQuantMobileNetV2, nudged_range
from tests.helpers import SMALL, logit_tolerance, random_images, to_nhwc, to_torch

tf = pytest.importorskip("tensorflow")
from fixtures.qat_builder import (  # noqa: E402
    CLASSIFIER_SCOPE,
    build_fake_quant_graph,
    ensure_qat_fixture,
    quantization_points,
    run_graph,
)
from fixtures.tf_builder import GraphRunner  # noqa: E402

VARIANT = get_variant(SMALL)


@pytest.fixture(scope="module")
def qat_fixture():
    return ensure_qat_fixture(VARIANT)


@pytest.fixture(scope="module")
def qat_folder(qat_fixture, tmp_path_factory):
    out = tmp_path_factory.mktemp("qat") / "converted"
    convert_checkpoint(qat_fixture.checkpoint_prefix, out, size=VARIANT.size)
    return out


def test_float_model_from_qat_checkpoint_equals_tf_graph(qat_fixture, qat_folder):
    images = random_images((VARIANT.size, VARIANT.size), batch=2, seed=5)
    with GraphRunner(VARIANT) as graph:
        graph.restore(qat_fixture.checkpoint_prefix, "ema")  # TF's Saver reads the float model from it
        expected = graph.run(images, ["Logits"])["Logits"]
    model = MobileNetV2ForImageClassification.from_pretrained(qat_folder)
    with torch.no_grad():
        ours = model(to_torch(images)).logits.numpy()
    assert np.abs(ours - expected).max() <= logit_tolerance(expected)


def test_quantization_variables_are_ignored_under_their_own_reason(qat_fixture, qat_folder, classifier_folder):
    stored = {name for name, _ in tf.train.list_variables(str(qat_fixture.checkpoint_prefix))}
    float_inventory = set(checkpoint_inventory(VARIANT))
    assert float_inventory < stored
    rewriter_variables = stored - float_inventory
    assert any(n.endswith("post_activation_bypass_quant/max") for n in rewriter_variables)
    assert any(n.endswith("/local_step") for n in rewriter_variables)
    ignored = json.loads((qat_folder / "conversion.json").read_text())["tensors"]["ignored"]
    assert ignored.pop("quantization") == len(rewriter_variables)
    # Everything else is set aside exactly as for the float checkpoint of the same variant.
    float_ignored = json.loads((classifier_folder / "conversion.json").read_text())["tensors"]["ignored"]
    assert ignored == {reason: count for reason, count in float_ignored.items() if reason != "quantization"}


def _fake_quant_reference(checkpoint_prefix, images):
    """The rewriter's eval graph, built with tf.quantization.fake_quant_with_min_max_vars on the weights
    and ranges TensorFlow reads from the checkpoint: {quantization prefix: output}, and the ranges."""
    stored = tf.train.load_checkpoint(str(checkpoint_prefix))
    weights = {name: stored.get_tensor(name) for name, _ in tf.train.list_variables(str(checkpoint_prefix))}
    ranges = {p.prefix: (float(weights[f"{p.prefix}/min"]), float(weights[f"{p.prefix}/max"]))
              for p in quantization_points(VARIANT)}  # fmt: skip
    graph, inputs, outputs = build_fake_quant_graph(VARIANT, weights, ranges)
    return run_graph(graph, inputs, outputs, images), ranges


def _worst_steps(ours, expected, ranges) -> dict[str, float]:
    """Per step: the largest difference to the TF graph's output, in that step's quantization steps."""
    places = quantization_places(VARIANT.kind)
    worst = {}
    for point in quantization_points(VARIANT):
        if point.role == "weights":
            continue
        step = places[point.prefix][0]
        reference = expected[point.prefix]
        mine = to_nhwc(ours[step]).reshape(reference.shape)
        _, _, scale = nudged_range(*ranges[point.prefix], BITS, narrow_range=False)
        worst[step] = float(np.abs(mine - reference).max()) / scale
    return worst


def test_fake_quant_model_equals_tf_fake_quant_graph_within_one_step_per_layer(qat_fixture, qat_folder):
    images = random_images((VARIANT.size, VARIANT.size), batch=2, seed=7)
    expected, ranges = _fake_quant_reference(qat_fixture.checkpoint_prefix, images)
    model = FakeQuantMobileNetV2.from_pretrained(qat_folder)
    places = quantization_places(VARIANT.kind)
    feed = {}
    for point in quantization_points(VARIANT):
        if point.role != "weights":
            reference = expected[point.prefix]
            step = places[point.prefix][0]
            feed[step] = torch.from_numpy(reference if reference.ndim == 2 else reference.transpose(0, 3, 1, 2))
    # Each layer from the TF graph's own input to it: one quantization step at most, per layer.
    worst = _worst_steps(model.run(to_torch(images), feed=feed), expected, ranges)
    assert len(worst) == len(feed) == 53 + 10  # 52 convs and the classifier, 10 residual adds
    assert max(worst.values()) <= 1.0 + 1e-3, sorted(worst.items(), key=lambda kv: -kv[1])[:5]
    # The first layers, fed the image alone, match outright; the quantization is real: the float model
    # of the same folder lands many steps away at the logits.
    ours = model.run(to_torch(images))
    assert _worst_steps(ours, expected, ranges)["mobilenet_v2.conv_stem.conv_3x3"] == 0.0
    with torch.no_grad():
        float_logits = MobileNetV2ForImageClassification.from_pretrained(qat_folder)(to_torch(images)).logits
    _, _, logit_scale = nudged_range(*ranges[f"{CLASSIFIER_SCOPE}/act_quant"], BITS, narrow_range=False)
    assert float((float_logits - ours["classifier"]).abs().max()) / logit_scale > 3


def test_fake_quant_model_needs_the_ranges_file(classifier_folder):
    with pytest.raises(ModelFolderError, match="fake_quantization.json"):
        FakeQuantMobileNetV2.from_pretrained(classifier_folder)


def test_quantization_names_of_newer_rewriters_are_ignored_too():
    names = ["MobilenetV2/Conv/weights", "fake_quantization_step", "MobilenetV2/expanded_conv_4/project/conv_quant/min"]
    plan = plan_weights(names, "raw")
    assert plan.sources == {"MobilenetV2/Conv/weights": "MobilenetV2/Conv/weights"}
    assert plan.ignored["quantization"] == sorted(names[1:])


def test_ranges_without_a_place_in_the_model_leave_a_note_instead_of_the_file():
    names = ["MobilenetV2/expanded_conv_4/project/conv_quant/min", "MobilenetV2/expanded_conv_4/project/conv_quant/max"]
    files, notes = fake_quantization_files(names, lambda name: np.float32(1.0), VARIANT.kind)
    assert files == {} and len(notes) == 1 and "expanded_conv_4/project/conv_quant" in notes[0]
