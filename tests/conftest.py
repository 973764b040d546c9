"""pytest fixtures shared by the tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import SHARED, SMALL


@pytest.fixture(scope="session")
def shared_reference() -> Path:
    path = SHARED / "reference"
    if not path.is_dir():
        pytest.skip("../shared/reference is absent: the original checkpoints' inventories are not available")
    return path


@pytest.fixture(scope="session")
def small():
    """The fixture files of the smallest zoo classifier (built on first use, cached)."""
    from fixtures import ensure_fixture

    return ensure_fixture(SMALL)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's forwards: on a shared, loaded machine torch's spinning workers cost
    far more than they win (a 224 forward took ~1.4 s on 2 threads and ~0.2 s on 1). Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def classifier_folder(tmp_path_factory) -> Path:
    """mobilenet_v2_0.35_96 converted with default options (read-only: copy it before changing it)."""
    from converter import convert_checkpoint
    from fixtures import ensure_fixture

    out = tmp_path_factory.mktemp("converted") / SMALL
    convert_checkpoint(ensure_fixture(SMALL).tarball, out)
    return out


@pytest.fixture(scope="session")
def segmenter_folder(tmp_path_factory) -> Path:
    """The depth-1.0 DeepLab fixture converted at output stride 16 (read-only)."""
    from converter import convert_checkpoint
    from fixtures import ensure_fixture

    out = tmp_path_factory.mktemp("converted") / "deeplab"
    convert_checkpoint(ensure_fixture("deeplabv3_mnv2_pascal_train_aug").tarball, out, output_stride=16)
    return out
