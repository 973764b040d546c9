"""Capabilities beyond the Hugging Face port, each checked against the original TF graph: every slim
endpoint by name (with early exit), the backbone wrapper, slim's fixed 7x7 pooling, a 1000-class head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from converter import convert_checkpoint
from converter.pipeline.table import endpoints_for
from fixtures.cache import ensure_fixture
from mobilenet_torch import ENDPOINTS, MobileNetV2Backbone, MobileNetV2ForImageClassification
from tests.helpers import SMALL, logit_tolerance, random_images, to_nhwc, to_torch

pytest.importorskip("tensorflow")
from fixtures.tf_builder import TENSOR_NAMES, GraphRunner  # noqa: E402

GRAPH_NAME = {"logits": "Logits"}  # the builder's short name for the classifier's logits


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """mobilenet_v2_0.5_160, converted with EMA weights, and its fixture."""
    fixture = ensure_fixture("mobilenet_v2_0.5_160")
    folder = tmp_path_factory.mktemp("features") / "model"
    convert_checkpoint(fixture.tarball, folder)
    return fixture, folder


@pytest.mark.parametrize("size", [(160, 160), (97, 131)])
def test_every_endpoint_equals_the_tf_tensor_of_that_name(converted, size):
    fixture, folder = converted
    model = MobileNetV2ForImageClassification.from_pretrained(folder)
    images = random_images(size, seed=7)
    names = list(ENDPOINTS)
    with GraphRunner(fixture.variant) as graph:
        graph.restore(fixture.checkpoint_prefix, "ema")
        expected = graph.run(images, [GRAPH_NAME.get(n, n) for n in names])
    with torch.no_grad():
        ours = model.extract_features(to_torch(images), names)
    assert list(ours) == names
    for name in names:
        reference = expected[GRAPH_NAME.get(name, name)]
        mine = to_nhwc(ours[name])
        assert mine.shape == reference.shape, name
        assert np.abs(mine - reference).max() <= logit_tolerance(reference), name


def test_endpoint_table_names_the_graph_tensors_the_builder_uses():
    rows = endpoints_for("classification")
    assert [endpoint for endpoint, _, _ in rows] == list(ENDPOINTS)
    for endpoint, tensor, _ in rows:
        assert TENSOR_NAMES[GRAPH_NAME.get(endpoint, endpoint)] == tensor


def test_extract_features_stops_at_the_deepest_requested_endpoint(converted):
    _, folder = converted
    model = MobileNetV2ForImageClassification.from_pretrained(folder)
    ran = []
    layers = model.mobilenet_v2.layer
    for name, module in [("layer_5 projection", layers[2].reduce_1x1), ("layer_6 expansion", layers[3].expand_1x1),
                         ("conv_1x1", model.mobilenet_v2.conv_1x1), ("classifier", model.classifier)]:  # fmt: skip
        module.register_forward_hook(lambda *_, name=name: ran.append(name))
    with torch.no_grad():
        features = model.extract_features(torch.zeros(1, 3, 160, 160), ["layer_3", "layer_5/expansion_output"])
    assert set(features) == {"layer_3", "layer_5/expansion_output"}
    assert ran == []
    with torch.no_grad():
        model.extract_features(torch.zeros(1, 3, 160, 160), ["layer_5"])
    assert ran == ["layer_5 projection"]


def test_backbone_returns_the_requested_maps_in_order(converted):
    _, folder = converted
    model = MobileNetV2ForImageClassification.from_pretrained(folder)
    backbone = MobileNetV2Backbone(model, out_features=["layer_19", "layer_15/expansion_output"])
    images = torch.from_numpy(random_images((160, 160), seed=3).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        c5, c4 = backbone(images).feature_maps
        reference = model.extract_features(images, ["layer_19", "layer_15/expansion_output"])
    assert c5.shape == (1, 1280, 5, 5) and c4.shape[-2:] == (10, 10)
    assert torch.equal(c5, reference["layer_19"]) and torch.equal(c4, reference["layer_15/expansion_output"])


def test_transformers_hidden_states_are_layers_3_to_18(converted):
    transformers = pytest.importorskip("transformers")
    _, folder = converted
    theirs = transformers.MobileNetV2Model.from_pretrained(folder).eval()
    ours = MobileNetV2ForImageClassification.from_pretrained(folder)
    images = to_torch(random_images((160, 160), seed=9))
    with torch.no_grad():
        hidden = theirs(images, output_hidden_states=True).hidden_states
        features = ours.extract_features(images, [f"layer_{i + 3}" for i in range(16)])
    assert len(hidden) == 16
    for i, state in enumerate(hidden):
        assert (state - features[f"layer_{i + 3}"]).abs().max() <= 1e-5


@pytest.mark.parametrize("size", [224, 320])
def test_fixed_7x7_pooling_matches_slim(size, tmp_path):
    fixture = ensure_fixture("mobilenet_v2_1.0_224")
    convert_checkpoint(fixture.tarball, tmp_path / "model", avg_pool="fixed7x7")
    model = MobileNetV2ForImageClassification.from_pretrained(tmp_path / "model")
    assert model.config.avg_pool == "fixed7x7"
    images = random_images((size, size), batch=2, seed=size)
    with GraphRunner(fixture.variant, pool="fixed7x7", static_size=size) as graph:
        graph.restore(fixture.checkpoint_prefix, "ema")
        expected = graph.run(images, ["Logits"])["Logits"]
    with torch.no_grad():
        logits = model(to_torch(images)).logits
    spatial = -(-size // 32) - 6  # 7x7 VALID window over the final map
    if spatial == 1:
        assert logits.shape == (2, 1001)
    else:
        assert logits.shape == (2, 1001, spatial, spatial)
    ours = to_nhwc(logits)
    assert np.abs(ours - expected).max() <= logit_tolerance(expected)


def test_drop_background_keeps_the_1000_imagenet_classes(tmp_path):
    fixture = ensure_fixture(SMALL)
    convert_checkpoint(fixture.tarball, tmp_path / "model", drop_background=True)
    model = MobileNetV2ForImageClassification.from_pretrained(tmp_path / "model")
    assert model.config.num_labels == 1000
    assert model.config.id2label[0].startswith("tench") and "background" not in model.config.label2id
    images = random_images((96, 96), batch=2, seed=11)
    with GraphRunner(fixture.variant) as graph:
        graph.restore(fixture.checkpoint_prefix, "ema")
        expected = graph.run(images, ["Logits"])["Logits"][:, 1:]
    with torch.no_grad():
        ours = model(to_torch(images)).logits.numpy()
    assert ours.shape == (2, 1000)
    assert np.abs(ours - expected).max() <= logit_tolerance(expected)
