"""pytest fixtures shared by the tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import SHARED


@pytest.fixture(scope="session")
def shared_reference() -> Path:
    path = SHARED / "reference"
    if not path.is_dir():
        pytest.skip("../shared/reference is absent: the original checkpoints' inventories are not available")
    return path


@pytest.fixture(scope="session")
def classifier_folder(tmp_path_factory) -> Path:
    """mobilenet_v2_0.35_96 converted with default options (read-only: copy it before changing it)."""
    from converter import convert_checkpoint
    from fixtures import ensure_fixture

    out = tmp_path_factory.mktemp("converted") / "mobilenet_v2_0.35_96"
    convert_checkpoint(ensure_fixture("mobilenet_v2_0.35_96").tarball, out)
    return out


@pytest.fixture(scope="session")
def segmenter_folder(tmp_path_factory) -> Path:
    """The depth-1.0 DeepLab fixture converted at output stride 16 (read-only)."""
    from converter import convert_checkpoint
    from fixtures import ensure_fixture

    out = tmp_path_factory.mktemp("converted") / "deeplab"
    convert_checkpoint(ensure_fixture("deeplabv3_mnv2_pascal_train_aug").tarball, out, output_stride=16)
    return out
