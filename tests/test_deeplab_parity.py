"""DeepLab v3 MobileNetV2 checkpoints (depth 1.0 and 0.5) convert to a segmentation model whose logits and
label maps equal the original TF graph's at output stride 8 and 16, and which transformers loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from converter import convert_checkpoint
from fixtures.cache import ensure_fixture
from fixtures.spec import ZOO_DEEPLAB
from mobilenet_torch import MobileNetV2ForSemanticSegmentation
from tests.helpers import logit_tolerance, random_images, to_nhwc, to_torch

pytest.importorskip("tensorflow")
from fixtures.tf_builder import GraphRunner  # noqa: E402

SIZES = ((513, 513), (97, 97), (161, 226))


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("name", [v.name for v in ZOO_DEEPLAB])
def test_logits_and_label_maps_equal_tf_graph(name, output_stride, tmp_path):
    fixture = ensure_fixture(name)
    convert_checkpoint(fixture.tarball, tmp_path / "model", output_stride=output_stride)
    model = MobileNetV2ForSemanticSegmentation.from_pretrained(tmp_path / "model")
    assert model.config.output_stride == output_stride and model.config.num_labels == 21
    agreeing = total = 0
    with GraphRunner(fixture.variant, output_stride=output_stride) as graph:
        graph.restore(fixture.checkpoint_prefix, "raw")
        for seed, size in enumerate(SIZES):
            images = random_images(size, seed=seed)
            expected = graph.run(images, ["logits", "upsampled_logits", "SemanticPredictions"])
            with torch.no_grad():
                logits = to_nhwc(model(to_torch(images)).logits)
                labels = model.predict_labels(to_torch(images)).numpy()
            assert logits.shape == expected["logits"].shape
            assert logits.shape[1:3] == tuple(-(-s // output_stride) for s in size)
            difference = np.abs(logits - expected["logits"]).max()
            assert difference <= logit_tolerance(expected["logits"]), (size, difference)
            same = labels == expected["SemanticPredictions"]
            agreeing, total = agreeing + same.sum(), total + same.size
            # A pixel may only disagree where TF's own top two classes are a near tie.
            upsampled = expected["upsampled_logits"][~same]
            top_two = np.sort(upsampled, axis=-1)[:, -2:]
            assert np.all(top_two[:, 1] - top_two[:, 0] <= logit_tolerance(expected["logits"])), size
    assert agreeing / total >= 0.9999, agreeing / total


@pytest.mark.parametrize("name", [v.name for v in ZOO_DEEPLAB])
def test_transformers_loads_the_folder_with_identical_logits(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    fixture = ensure_fixture(name)
    convert_checkpoint(fixture.tarball, tmp_path / "model", output_stride=16)
    conversion = json.loads((tmp_path / "model" / "conversion.json").read_text())
    assert "conv_1x1" in conversion["placeholders"]["tensors"]
    theirs, info = transformers.MobileNetV2ForSemanticSegmentation.from_pretrained(
        tmp_path / "model", output_loading_info=True
    )
    assert not any(info.get(key) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ours = MobileNetV2ForSemanticSegmentation.from_pretrained(tmp_path / "model")
    assert not any(name.startswith("mobilenet_v2.conv_1x1") for name in ours.state_dict())
    images = to_torch(random_images((129, 161), seed=5))
    with torch.no_grad():
        expected = theirs.eval()(images).logits
        difference = (expected - ours(images).logits).abs().max().item()
    # Relative: ours runs channels_last, whose sums run in another order (transformers' own model
    # differs from itself by ~1e-6 relative between the two layouts).
    assert difference <= 1e-5 * max(1.0, expected.abs().max().item())


def test_depth_is_validated_for_deeplab(tmp_path):
    from converter.errors import VariantError

    fixture = ensure_fixture(ZOO_DEEPLAB[-1].name)
    with pytest.raises(VariantError, match="--depth 1.0 does not match"):
        convert_checkpoint(fixture.tarball, tmp_path / "model", depth=1.0 if fixture.variant.depth != 1.0 else 0.5)
