"""The wheel holds the two packages and their data, and not the test builders (`fixtures` would shadow the
well-known test library of that name) nor the CI tools."""

from __future__ import annotations

import subprocess
import sys
import zipfile

from tests.helpers import REPO


def test_the_wheel_has_converter_and_mobilenet_torch_but_not_fixtures(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("*.whl")
    top = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {"converter", "mobilenet_torch"} <= top and "fixtures" not in top and "tests" not in top
    assert "tools" not in top  # the CI tools (the parity matrix) run from a clone
    names = zipfile.ZipFile(wheel).namelist()
    assert "converter/data/zoo.json" in names and "converter/formats/savedmodel.py" in names
    assert "converter/verify/references/graph.py" in names
