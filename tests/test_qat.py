"""Quantization-aware-training checkpoints (tf.contrib.quantize): converted to the float model with the
quantization variables set aside by rule, and to the fake-quant model, both checked against TF graphs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from converter import convert_checkpoint
from fixtures.spec import checkpoint_inventory, get_variant
from mobilenet_torch import MobileNetV2ForImageClassification
from tests.helpers import logit_tolerance, random_images, to_torch

tf = pytest.importorskip("tensorflow")
from fixtures.qat_builder import ensure_qat_fixture  # noqa: E402
from fixtures.tf_builder import GraphRunner  # noqa: E402

VARIANT = get_variant("mobilenet_v2_0.35_96")


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
