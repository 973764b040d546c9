"""The fast inference paths compute the same function: channels_last and `fuse()` (and both) stay within
1e-5 of transformers' port with tf_padding=True, at even, odd and non-square sizes."""

from __future__ import annotations

import copy

import pytest
import torch

from mobilenet_torch import MobileNetV2Config, MobileNetV2ForImageClassification, MobileNetV2ForSemanticSegmentation
from tests.helpers import with_random_batchnorm

transformers = pytest.importorskip("transformers")

SIZES = [(224, 224), (97, 97), (160, 192)]
VOC = {i: str(i) for i in range(21)}


def variants(model) -> dict[str, tuple[torch.nn.Module, torch.memory_format]]:
    last = torch.channels_last
    return {
        "eager": (model, torch.contiguous_format),
        "channels_last": (copy.deepcopy(model).to(memory_format=last), last),
        "fused": (copy.deepcopy(model).fuse(), torch.contiguous_format),
        "fused channels_last": (copy.deepcopy(model).fuse().to(memory_format=last), last),
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


def images(size: tuple[int, int], memory_format) -> torch.Tensor:
    x = torch.empty(2, 3, *size).uniform_(-1, 1, generator=torch.Generator().manual_seed(sum(size)))
    return x.contiguous(memory_format=memory_format)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_classifier_variants_match_transformers(classifiers, size):
    models, theirs = classifiers
    with torch.no_grad():
        expected = theirs.mobilenet_v2(images(size, torch.contiguous_format))
        for name, (model, memory_format) in models.items():
            x = images(size, memory_format)
            features = model.mobilenet_v2(x).last_hidden_state
            assert features.is_contiguous(memory_format=memory_format), name
            torch.testing.assert_close(features, expected.last_hidden_state, rtol=0, atol=1e-5, msg=name)
            logits = model(x).logits
            torch.testing.assert_close(logits, theirs(x).logits, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_deeplab_variants_match_transformers(segmenters, size):
    models, theirs = segmenters
    with torch.no_grad():
        expected = theirs(images(size, torch.contiguous_format)).logits
        for name, (model, memory_format) in models.items():
            logits = model(images(size, memory_format)).logits
            torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5, msg=name)


def test_strided_dilated_convolutions_are_refused():
    from mobilenet_torch.layers import ConvLayer

    with pytest.raises(ValueError, match="strided and dilated"):
        ConvLayer(8, 8, 3, stride=2, dilation=2)
