"""`convert-mobilenet --verify` where TensorFlow cannot be imported: it stops before downloading or
converting anything, with one line saying how to install it; converting alone still works there."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.helpers import REPO
from tests.zoo_server import ZooServer, running_zoo_server

SMALL = "mobilenet_v2_0.35_96"


@pytest.fixture
def zoo_server() -> Iterator[ZooServer]:
    with running_zoo_server() as server:
        yield server


@pytest.fixture
def without_tensorflow(tmp_path) -> dict[str, str]:
    """An environment in which `import tensorflow` raises ImportError, as where it is not installed."""
    shim = tmp_path / "no-tensorflow" / "tensorflow"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError(\"No module named 'tensorflow'\")\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim.parent), str(REPO)])}


def _convert(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", "from converter.app.cli import convert_main; convert_main()", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def test_verify_without_tensorflow_stops_before_converting(without_tensorflow, tmp_path):
    from fixtures import ensure_fixture

    tarball = ensure_fixture(SMALL).tarball
    out = tmp_path / "out"
    result = _convert("--checkpoint", str(tarball), "--output", str(out), "--verify", env=without_tensorflow)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "verifying needs TensorFlow" in result.stderr and "converted" not in result.stdout
    assert not out.exists()
    # The same conversion without --verify works in that environment: only the verification needed TensorFlow.
    assert _convert("--checkpoint", str(tarball), "--output", str(out), env=without_tensorflow).returncode == 0


def test_verify_without_tensorflow_downloads_nothing(zoo_server: ZooServer, without_tensorflow, tmp_path):
    zoo_server.serve(f"{SMALL}.tgz", b"never asked for")
    args = ["--depth", "0.35", "--size", "96", "--verify", "--mirror", zoo_server.url]
    result = _convert(*args, "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "out"),
                      env=without_tensorflow)  # fmt: skip
    assert result.returncode == 2 and "verifying needs TensorFlow" in result.stderr
    assert zoo_server.count() == 0 and not (tmp_path / "out").exists()
