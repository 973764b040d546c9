"""The fast inference paths compute the same function.

Models are channels_last as built and as loaded; `.to(memory_format=torch.contiguous_format)` switches
them to NCHW, and `fuse()` folds the BatchNorms. Every variant stays within 1e-5 of transformers' port
with tf_padding=True, at even, odd and non-square sizes, and gives the same result for inputs in
either layout.
"""

from __future__ import annotations

import copy

import pytest
import torch

from mobilenet_torch import MobileNetV2Config, MobileNetV2ForImageClassification, MobileNetV2ForSemanticSegmentation
from tests.helpers import logit_tolerance, with_random_batchnorm

transformers = pytest.importorskip("transformers")

SIZES = [(224, 224), (97, 97), (160, 193)]
VOC = {i: str(i) for i in range(21)}
LAYOUTS = (torch.channels_last, torch.contiguous_format)


def variants(model) -> dict[str, tuple[torch.nn.Module, torch.memory_format]]:
    """Each variant with the layout its feature maps must come out in."""
    nchw = torch.contiguous_format
    return {
        "as built": (model, torch.channels_last),
        "nchw": (copy.deepcopy(model).to(memory_format=nchw), nchw),
        "fused": (copy.deepcopy(model).fuse(), torch.channels_last),
        "fused nchw": (copy.deepcopy(model).fuse().to(memory_format=nchw), nchw),
    }


@pytest.fixture(scope="module")
def classifiers():
    ours = with_random_batchnorm(MobileNetV2ForImageClassification(MobileNetV2Config()))
    theirs = transformers.MobileNetV2ForImageClassification(
        transformers.MobileNetV2Config(tf_padding=True, num_labels=1001)
    ).eval()
    theirs.load_state_dict(ours.state_dict())
    return variants(ours), theirs


@pytest.fixture(scope="module")
def segmenters():
    config = MobileNetV2Config(depth_multiplier=0.5, output_stride=8, id2label=VOC)
    ours = with_random_batchnorm(MobileNetV2ForSemanticSegmentation(config))
    hf_config = transformers.MobileNetV2Config(depth_multiplier=0.5, output_stride=8, tf_padding=True, num_labels=21)
    theirs = transformers.MobileNetV2ForSemanticSegmentation(hf_config).eval()
    theirs.load_state_dict({**ours.state_dict(), **ours.transformers_placeholders()})
    return variants(ours), theirs


def images(size: tuple[int, int], memory_format=torch.contiguous_format) -> torch.Tensor:
    x = torch.empty(2, 3, *size).uniform_(-1, 1, generator=torch.Generator().manual_seed(sum(size)))
    return x.contiguous(memory_format=memory_format)


def assert_same_for_either_layout(module, size: tuple[int, int], name: str, output: str = "logits") -> torch.Tensor:
    """`module` on the same images in both layouts gives an identical `output`; returns it."""
    first, second = (getattr(module(images(size, layout)), output) for layout in LAYOUTS)
    assert torch.equal(first, second), f"{name}: the input layout changed the result"
    return first


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_classifier_variants_match_transformers(classifiers, size):
    models, theirs = classifiers
    with torch.no_grad():
        expected = theirs(images(size))
        expected_features = theirs.mobilenet_v2(images(size)).last_hidden_state
        for name, (model, layout) in models.items():
            features = assert_same_for_either_layout(model.mobilenet_v2, size, name, "last_hidden_state")
            assert features.is_contiguous(memory_format=layout), name
            torch.testing.assert_close(features, expected_features, rtol=0, atol=1e-5, msg=name)
            logits = assert_same_for_either_layout(model, size, name)
            torch.testing.assert_close(logits, expected.logits, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_deeplab_variants_match_transformers(segmenters, size):
    models, theirs = segmenters
    with torch.no_grad():
        expected = theirs(images(size)).logits
        for name, (model, layout) in models.items():
            logits = assert_same_for_either_layout(model, size, name)
            assert logits.is_contiguous(memory_format=layout), name
            torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind", ["classifier", "segmenter"])
def test_from_pretrained_returns_channels_last_model(kind, classifier_folder, segmenter_folder):
    """As loaded, a converted folder runs channels_last (and computes what transformers computes from
    it); the standard `.to(memory_format=...)` switches it to NCHW."""
    folder = classifier_folder if kind == "classifier" else segmenter_folder
    ours_class = MobileNetV2ForImageClassification if kind == "classifier" else MobileNetV2ForSemanticSegmentation
    ours = ours_class.from_pretrained(folder)
    theirs = getattr(transformers, ours_class.__name__).from_pretrained(folder).eval()
    size = (96, 96) if kind == "classifier" else (65, 80)
    with torch.no_grad():
        expected = theirs(images(size)).logits
        nchw = torch.contiguous_format
        for model, layout in ((ours, torch.channels_last), (copy.deepcopy(ours).to(memory_format=nchw), nchw)):
            assert model.mobilenet_v2(images(size)).last_hidden_state.is_contiguous(memory_format=layout)
            logits = assert_same_for_either_layout(model, size, kind)
            atol = logit_tolerance(expected.numpy())
            torch.testing.assert_close(logits, expected, rtol=0, atol=atol, msg=str(layout))


def test_strided_dilated_convolutions_are_refused():
    from mobilenet_torch.layers import ConvLayer

    with pytest.raises(ValueError, match="strided and dilated"):
        ConvLayer(8, 8, 3, stride=2, dilation=2)
