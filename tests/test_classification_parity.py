"""Every zoo classification variant converts to a model whose logits equal the original TF graph's,
for every weights convention, at the native size and at an odd and a non-square size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from converter import convert_checkpoint
from fixtures.cache import ensure_fixture
from fixtures.spec import ZOO_CLASSIFICATION
from mobilenet_torch import MobileNetV2ForImageClassification
from tests.helpers import logit_tolerance, random_images, to_torch

pytest.importorskip("tensorflow")
from fixtures.tf_builder import GraphRunner  # noqa: E402

CONVENTIONS = ("ema", "raw", "ema-all")
ODD, NON_SQUARE = (97, 97), (160, 123)


@pytest.mark.parametrize("name", [v.name for v in ZOO_CLASSIFICATION])
def test_logits_equal_tf_graph(name, tmp_path):
    fixture = ensure_fixture(name)
    size = fixture.variant.size
    inputs = [
        random_images((size, size), batch=2, seed=1),
        random_images(ODD, seed=2),
        random_images(NON_SQUARE, seed=3),
    ]
    logits_by_convention = {}
    with GraphRunner(fixture.variant) as graph:
        for convention in CONVENTIONS:
            summary = convert_checkpoint(fixture.tarball, tmp_path / convention, weights=convention)
            assert summary.weights == convention
            model = MobileNetV2ForImageClassification.from_pretrained(tmp_path / convention)
            graph.restore(fixture.checkpoint_prefix, convention)
            for images in inputs:
                expected = graph.run(images, ["Logits"])["Logits"]
                with torch.no_grad():
                    ours = model(to_torch(images)).logits.numpy()
                assert ours.shape == expected.shape == (len(images), 1001)
                difference = float(np.abs(ours - expected).max())
                assert difference <= logit_tolerance(expected), (convention, images.shape, difference)
            logits_by_convention[convention] = expected
    # The conventions are really different weights: a test that mixed them up would notice.
    assert np.abs(logits_by_convention["ema"] - logits_by_convention["raw"]).max() > 1e-3
    assert np.abs(logits_by_convention["ema"] - logits_by_convention["ema-all"]).max() > 1e-3


@pytest.mark.parametrize("name", [v.name for v in ZOO_CLASSIFICATION])
def test_transformers_loads_the_folder_with_identical_logits(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    fixture = ensure_fixture(name)
    convert_checkpoint(fixture.tarball, tmp_path / "model")
    theirs, info = transformers.MobileNetV2ForImageClassification.from_pretrained(
        tmp_path / "model", output_loading_info=True
    )
    assert not any(info.get(key) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert theirs.config.id2label[0] == "background" and theirs.config.num_labels == 1001
    ours = MobileNetV2ForImageClassification.from_pretrained(tmp_path / "model")
    images = to_torch(random_images((fixture.variant.size, fixture.variant.size), batch=2, seed=4))
    with torch.no_grad():
        difference = (theirs.eval()(images).logits - ours(images).logits).abs().max().item()
    assert difference <= 1e-5
