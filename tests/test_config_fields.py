"""Every config field computes what it computes in transformers, or is refused by name.

A folder with odd settings is written by transformers (the independent truth) and loaded here, or written
here and loaded there; both libraries must then give the same outputs.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from mobilenet_torch import (
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    MobileNetV2ForSemanticSegmentation,
    ModelFolderError,
    UnsupportedConfigError,
    load_pretrained,
)
from mobilenet_torch.configuration import ACTIVATIONS
from tests.helpers import logit_tolerance, with_random_batchnorm

transformers = pytest.importorskip("transformers")

SMALL = dict(depth_multiplier=0.35, num_labels=5)
CLASSIFIER_SETTINGS = {
    "issue example": dict(tf_padding=False, hidden_act="gelu", expand_ratio=4.0),
    "narrow rounding": dict(depth_multiplier=0.6, depth_divisible_by=4, min_depth=4, hidden_act="silu"),
    "stem expansion, no widening": dict(first_layer_is_expansion=False, expand_ratio=1.0, hidden_act="relu"),
    "coarse final conv": dict(finegrained_output=False, depth_multiplier=0.5, output_stride=8, tf_padding=False),
    "output stride 4": dict(output_stride=4, hidden_act="tanh", layer_norm_eps=0.1),
    "one channel, wide minimum": dict(num_channels=1, depth_multiplier=0.75, min_depth=16, hidden_act="mish"),
}
SEGMENTER_SETTINGS = {
    "symmetric padding, stride 8": dict(
        tf_padding=False, hidden_act="silu", output_stride=8, expand_ratio=3.0, first_layer_is_expansion=False
    ),
    "divisible by 1, stride 16": dict(
        depth_multiplier=0.5, depth_divisible_by=1, min_depth=1, output_stride=16, hidden_act="gelu"
    ),
}
SIZE = (67, 50)  # odd and even sides: TF padding differs from symmetric padding on the even one


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Conv and linear weights at He scale (transformers' N(0, 0.02) would shrink every activation to
    nothing, so any two models would agree), BatchNorm away from the identity; in eval mode."""
    torch.manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0, (2 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.normal_(0, 0.1)
    return with_random_batchnorm(model)


def images(size: tuple[int, int], channels: int = 3) -> torch.Tensor:
    return torch.empty(2, channels, *size).uniform_(-1, 1, generator=torch.Generator().manual_seed(sum(size)))


def assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    tolerance = logit_tolerance(theirs.numpy())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=tolerance)


def written_by_transformers(cls, settings: dict, folder) -> torch.nn.Module:
    theirs = randomised(cls(transformers.MobileNetV2Config(**{**SMALL, **settings})))
    theirs.save_pretrained(folder)
    return theirs


@pytest.mark.parametrize("settings", CLASSIFIER_SETTINGS.values(), ids=CLASSIFIER_SETTINGS)
def test_classifier_folder_from_transformers_computes_the_same(settings, tmp_path):
    theirs = written_by_transformers(transformers.MobileNetV2ForImageClassification, settings, tmp_path)
    ours = load_pretrained(tmp_path)
    assert isinstance(ours, MobileNetV2ForImageClassification)
    channels = settings.get("num_channels", 3)
    x = images(SIZE, channels)
    with torch.no_grad():
        mine, reference = ours(x, output_hidden_states=True), theirs(x, output_hidden_states=True)
    assert_same(mine.logits, reference.logits)
    assert len(mine.hidden_states) == len(reference.hidden_states)
    for a, b in zip(mine.hidden_states, reference.hidden_states, strict=True):
        assert_same(a, b)


@pytest.mark.parametrize("settings", SEGMENTER_SETTINGS.values(), ids=SEGMENTER_SETTINGS)
def test_segmenter_folder_from_transformers_computes_the_same(settings, tmp_path):
    theirs = written_by_transformers(transformers.MobileNetV2ForSemanticSegmentation, settings, tmp_path)
    ours = load_pretrained(tmp_path)
    assert isinstance(ours, MobileNetV2ForSemanticSegmentation)
    with torch.no_grad():
        assert_same(ours(images(SIZE)).logits, theirs(images(SIZE)).logits)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_every_activation_offered_computes_transformers_activation(activation, tmp_path):
    ours = randomised(MobileNetV2ForImageClassification(MobileNetV2Config(**SMALL, hidden_act=activation)))
    ours.save_pretrained(tmp_path)
    theirs = transformers.MobileNetV2ForImageClassification.from_pretrained(tmp_path).eval()
    assert theirs.config.hidden_act == activation
    with torch.no_grad():
        assert_same(ours(images(SIZE)).logits, theirs(images(SIZE)).logits)


def test_segmenter_written_here_computes_the_same_in_transformers(tmp_path):
    config = MobileNetV2Config(**SMALL, **SEGMENTER_SETTINGS["symmetric padding, stride 8"])
    ours = randomised(MobileNetV2ForSemanticSegmentation(config))
    ours.save_pretrained(tmp_path)
    theirs = transformers.MobileNetV2ForSemanticSegmentation.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert_same(ours(images(SIZE)).logits, theirs(images(SIZE)).logits)


def test_classifier_dropout_prob_drops_as_transformers(tmp_path):
    theirs = written_by_transformers(
        transformers.MobileNetV2ForImageClassification, dict(classifier_dropout_prob=0.5), tmp_path
    )
    ours = load_pretrained(tmp_path)
    x = images((40, 40))
    outputs = []
    for model in (ours, theirs):
        torch.manual_seed(7)  # the same dropout mask in both, BatchNorm in training mode drawing nothing
        with torch.no_grad():
            outputs.append(model.train()(x).logits)
    assert_same(*outputs)
    with torch.no_grad():
        assert not torch.allclose(ours.eval()(x).logits, outputs[0]), "dropout changed nothing"


def test_generic_output_fields_of_config_json_are_honoured(tmp_path):
    theirs = written_by_transformers(
        transformers.MobileNetV2ForImageClassification, dict(output_hidden_states=True, return_dict=False), tmp_path
    )
    ours = load_pretrained(tmp_path)
    with torch.no_grad():
        mine, reference = ours(images((40, 40))), theirs(images((40, 40)))
    assert isinstance(mine, tuple) and isinstance(reference, tuple) and len(mine) == len(reference) == 2
    assert_same(mine[0], reference[0])
    assert len(mine[1]) == len(reference[1]) == 16


def test_a_new_head_is_initialised_with_initializer_range(tmp_path):
    written_by_transformers(transformers.MobileNetV2ForImageClassification, dict(initializer_range=0.5), tmp_path)
    options = dict(num_labels=300, ignore_mismatched_sizes=True)
    torch.manual_seed(0)
    ours = load_pretrained(tmp_path, **options)
    theirs = transformers.MobileNetV2ForImageClassification.from_pretrained(tmp_path, **options)
    for model in (ours, theirs):
        weight, bias = model.classifier.weight, model.classifier.bias
        assert abs(weight.std().item() - 0.5) < 0.02 and abs(weight.mean().item()) < 0.02
        assert not bias.any()


@pytest.mark.parametrize(
    "field, value",
    [
        ("hidden_act", "gelu_new"),
        ("hidden_act", "quick_gelu"),
        ("hidden_act", "prelu"),
        ("depth_multiplier", 0),
        ("depth_divisible_by", 0),
        ("min_depth", 0),
        ("num_channels", 0),
    ],
)
def test_a_value_not_computed_is_refused_by_name(field, value, tmp_path):
    with pytest.raises(UnsupportedConfigError, match=f"{field}={value!r}"):
        MobileNetV2Config(**{field: value})
    config = MobileNetV2Config().to_dict()
    (tmp_path / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ModelFolderError, match=f"config.json: {field}={value!r}"):
        MobileNetV2Config.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "settings, reason",
    [
        (dict(strided_padding="bottom_right"), "give a list of 5 values"),
        (dict(strided_padding=["same"] * 4), "give a list of 5 values"),
        (dict(strided_padding=["same"] * 4, output_stride=8), "give a list of 3 values"),
        (dict(strided_padding=["same", "valid", "same", "same", "same"]), "each one of same, bottom_right"),
        (dict(strided_padding=["same"] + ["bottom_right"] * 4, tf_padding=False), "contradict each other"),
    ],
)
def test_a_strided_padding_not_computed_is_refused(settings, reason, tmp_path):
    with pytest.raises(UnsupportedConfigError, match=re.escape(f"strided_padding={settings['strided_padding']!r}")):
        MobileNetV2Config(**settings)
    (tmp_path / "config.json").write_text(json.dumps({**MobileNetV2Config().to_dict(), **settings}))
    with pytest.raises(ModelFolderError, match=reason):
        MobileNetV2Config.from_pretrained(tmp_path)


def test_a_stem_block_as_wide_as_its_input_is_refused():
    # slim and Keras add a residual around this stem block, transformers does not.
    with pytest.raises(ModelFolderError, match="depth_multiplier=0.1, min_depth=8 .* equal input and output"):
        MobileNetV2Config(depth_multiplier=0.1)


def test_a_classifier_without_labels_is_refused():
    with pytest.raises(ModelFolderError, match="num_labels=0"):
        MobileNetV2ForImageClassification(MobileNetV2Config(num_labels=0))
