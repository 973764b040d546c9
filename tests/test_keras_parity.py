"""Keras files of every kind convert to models whose outputs equal Keras' own (computed by Keras when
the fixtures were built), at the native, an odd and a non-square size, in mobilenet_torch and in
transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from converter.formats.keras import KerasReader
from converter.pipeline.table import CLASSIFICATION, TRANSFORMS, apply_rules, rules_for
from converter.pipeline.variants import class_names, detect_variant, expected_shapes
from fixtures.keras_builder import ALPHAS, FINE_TUNED_ALPHA, FINE_TUNED_CLASSES, IMAGENET_KINDS, ensure_keras_fixture
from mobilenet_torch import MobileNetV2ForImageClassification, MobileNetV2Model
from tests.helpers import logit_tolerance, to_torch

pytest.importorskip("keras")  # Keras builds the fixtures and computes the outputs compared against
pytest.importorskip("tf_keras")

SIZES = ("native", "odd", "non_square")


def read_all(path, **options):
    with_reader = KerasReader(path, **options)
    try:
        tensors = {name: with_reader.read(name) for name in with_reader.names()}
        return tensors, with_reader.hints
    finally:
        with_reader.close()


def classifier(path, **options):
    """Reader tensors -> the mapping table -> mobilenet_torch, as the pipeline does."""
    tensors, hints = read_all(path, **options)
    variant = detect_variant({name: a.shape for name, a in tensors.items()}, size=hints.image_size)
    state = apply_rules(tensors, CLASSIFICATION, expected_shapes(variant))
    model = MobileNetV2ForImageClassification(variant.config())
    model.load_state_dict({name: torch.from_numpy(a) for name, a in state.items()})
    return model.eval(), variant, hints


def logits(model, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(to_torch(images)).logits.numpy()


def assert_close(ours: np.ndarray, theirs: np.ndarray, what) -> float:
    assert ours.shape == theirs.shape, what
    difference = float(np.abs(ours - theirs).max())
    assert difference <= logit_tolerance(theirs), (what, difference)
    # The outputs depend on the input: a constant model would not prove anything.
    assert float(np.abs(theirs - theirs.mean(axis=0)).max()) > 100 * logit_tolerance(theirs) or len(theirs) == 1
    return difference


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("kind", IMAGENET_KINDS)
def test_imagenet_files_equal_keras(kind, alpha):
    fixture = ensure_keras_fixture(alpha)
    refs = fixture.references()
    model, variant, hints = classifier(fixture.file(kind))
    assert (variant.depth, variant.num_labels) == (alpha, 1000)
    assert hints.convention == "raw" and hints.labels == tuple(class_names(CLASSIFICATION, 1001)[1:])
    for size in SIZES:
        assert_close(logits(model, refs[f"images_{size}"]), refs[f"logits_{size}"], (kind, size))


@pytest.mark.parametrize("alpha", ALPHAS)
def test_no_top_file_gives_the_backbone_features(alpha):
    fixture = ensure_keras_fixture(alpha)
    refs = fixture.references()
    tensors, hints = read_all(fixture.file("tf_keras_no_top"))
    assert hints.labels is None and hints.image_size == fixture.size  # from the published file name
    heads = {r.tf_name for r in rules_for(CLASSIFICATION) if r.is_classifier}
    assert not heads & set(tensors)
    # The depth from the backbone's shapes, with a stand-in ImageNet head for the detection alone.
    features = tensors["MobilenetV2/Conv_1/weights"].shape[3]
    head = {
        "MobilenetV2/Logits/Conv2d_1c_1x1/weights": (1, 1, features, 1001),
        "MobilenetV2/Logits/Conv2d_1c_1x1/biases": (1001,),
    }
    variant = detect_variant({**{n: a.shape for n, a in tensors.items()}, **head})
    model = MobileNetV2Model(variant.config(), add_pooling_layer=False)
    prefix = "mobilenet_v2."
    state = {
        r.torch_name[len(prefix) :]: TRANSFORMS[r.transform](tensors[r.tf_name])
        for r in rules_for(CLASSIFICATION)
        if not r.is_classifier
    }
    missing, unexpected = model.load_state_dict(
        {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in state.items()}, strict=False
    )
    assert not unexpected and all(name.endswith("num_batches_tracked") for name in missing)
    for size in SIZES:
        with torch.no_grad():
            ours = model.eval()(to_torch(refs[f"images_{size}"])).last_hidden_state.numpy().transpose(0, 2, 3, 1)
        assert_close(ours, refs[f"features_{size}"], size)


@pytest.mark.parametrize("kind", ["fine_tuned_archive", "fine_tuned_tf_keras"])
def test_fine_tuned_model_with_rescaling_equals_keras(kind):
    fixture = ensure_keras_fixture(FINE_TUNED_ALPHA)
    refs = fixture.references()
    model, variant, hints = classifier(fixture.file(kind))
    assert variant.num_labels == FINE_TUNED_CLASSES
    assert hints.labels == tuple(f"LABEL_{i}" for i in range(FINE_TUNED_CLASSES))
    assert hints.image_size == fixture.size
    assert any("Rescaling" in note for note in hints.notes) and any("RandomFlip" in note for note in hints.notes)
    for size in SIZES:
        # The Keras model takes pixels in [0, 255] and rescales them itself; ours takes the rescaled values.
        images = refs[f"images_{size}"]
        pixels = ((images + 1) * 127.5).astype(np.float32)
        mean, std = np.asarray(hints.preprocessing["image_mean"]), np.asarray(hints.preprocessing["image_std"])
        rescaled = ((pixels * hints.preprocessing["rescale_factor"] - mean) / std).astype(np.float32)
        assert_close(logits(model, rescaled), refs[f"fine_tuned_{size}"], size)


@pytest.mark.parametrize("kind", ["sequential_archive", "sequential_weights"])
def test_sequential_wrapper_equals_keras(kind):
    fixture = ensure_keras_fixture(FINE_TUNED_ALPHA)
    refs = fixture.references()
    model, variant, _ = classifier(fixture.file(kind))
    assert variant.num_labels == FINE_TUNED_CLASSES
    assert_close(logits(model, refs["images_native"]), refs["sequential_native"], kind)


def test_dynamic_input_model_differs_from_same_padding_only_at_odd_sizes():
    """Keras pads (0, 1) at every size when the input size is open; the converted model pads SAME."""
    fixture = ensure_keras_fixture(FINE_TUNED_ALPHA)
    refs = fixture.references()
    model, _, hints = classifier(fixture.file("dynamic_archive"))
    assert hints.image_size is None and any("input_shape=None" in note for note in hints.notes)
    assert_close(logits(model, refs["images_native"]), refs["dynamic_native"], "even size")
    difference = np.abs(logits(model, refs["images_odd"]) - refs["dynamic_odd"]).max()
    assert difference > 100 * logit_tolerance(refs["dynamic_odd"])
    # ... while at that odd size it equals the fixed-size Keras model, which pads like SAME.
    fixed, _, _ = classifier(fixture.file("fine_tuned_archive"))
    assert np.abs(logits(model, refs["images_odd"]) - logits(fixed, refs["images_odd"])).max() < 1e-5


@pytest.mark.parametrize("alpha", ALPHAS)
def test_transformers_gives_the_same_logits(alpha):
    transformers = pytest.importorskip("transformers")
    fixture = ensure_keras_fixture(alpha)
    refs = fixture.references()
    ours, variant, _ = classifier(fixture.file("keras3_archive"))
    theirs = transformers.MobileNetV2ForImageClassification(
        transformers.MobileNetV2Config(**variant.config().to_dict())
    )
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not missing and not unexpected
    for size in SIZES:
        with torch.no_grad():
            output = theirs.eval()(to_torch(refs[f"images_{size}"])).logits.numpy()
        assert_close(output, refs[f"logits_{size}"], size)
