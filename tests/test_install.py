"""Installing and the Makefile: hints that work from a clone, a torch requirement that keeps the user's
build, `make demo` / `make test` in a folder whose path holds a space, and what to do after `make demo`."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tomllib

import pytest

from tests.helpers import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Every place that prints or documents how to install something.
HINT_SOURCES = [*(REPO / "converter").rglob("*.py"), *(REPO / "mobilenet_torch").rglob("*.py"), REPO / "README.md"]


def test_install_hints_work_from_a_clone():
    """The package is not on PyPI: `pip install 'mobilenet-convert[x]'` cannot work; `-e '.[x]'` can."""
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    hints = []
    for path in HINT_SOURCES:
        text = path.read_text()
        assert "mobilenet-convert[" not in text, f"{path.relative_to(REPO)} names the unpublished package"
        hints += re.findall(r"pip install -e '\.\[(\w+)\]'", text)
    assert {"verify", "hub", "onnx"} <= set(hints) and set(hints) <= extras


def test_torch_is_a_range_and_the_makefile_pins_what_ci_runs():
    from packaging.requirements import Requirement
    from packaging.version import Version

    (torch,) = [Requirement(r) for r in PYPROJECT["project"]["dependencies"] if Requirement(r).name == "torch"]
    for build in ("2.4.1+cu121", "2.6.0+cu124", "2.13.0+cpu", "2.13.0", "3.0.0"):  # a user's CPU or CUDA build
        assert torch.specifier.contains(build), f"installing would replace torch {build}"
    (pin,) = re.findall(r"^TORCH := torch==(\S+)$", (REPO / "Makefile").read_text(), flags=re.M)
    installed = pytest.importorskip("torch").__version__
    assert Version(installed).base_version == pin, f"the tests run torch {installed}, the Makefile pins {pin}"


def _stub(path, record):
    """An executable that appends its arguments (one per line, then a blank line) to `record`."""
    path.write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done >> "{record}"\necho >> "{record}"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def spaced_clone(tmp_path):
    """The Makefile in a folder whose path holds a space, with .venv/bin holding recording stubs."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    clone = tmp_path / "my projects" / "mobilenet convert"
    (clone / ".venv" / "bin").mkdir(parents=True)
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, clone / name)
    record = clone / "calls.txt"
    for name in ("python", "convert-mobilenet"):
        _stub(clone / ".venv" / "bin" / name, record)
    # Installed, the demo's part first and then the tests': skip the pip steps.
    for offset, stamp in enumerate((".installed-demo", ".installed-test"), start=1):
        (clone / ".venv" / stamp).touch()
        os.utime(clone / ".venv" / stamp, (os.path.getmtime(clone / "pyproject.toml") + 10 * offset,) * 2)
    return clone, record


def _calls(record) -> list[list[str]]:
    return [block.splitlines() for block in record.read_text().split("\n\n") if block.strip()]


def _make(clone, target) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("MOBILENET_FIXTURES", "MAKEFLAGS")}
    return subprocess.run(["make", target], cwd=clone, env=env, capture_output=True, text=True, timeout=60)


def test_make_demo_in_a_folder_with_a_space(spaced_clone):
    clone, record = spaced_clone
    result = _make(clone, "demo")
    assert result.returncode == 0, result.stderr
    build, convert = _calls(record)
    assert build == ["-m", "fixtures", "build", "--name", "mobilenet_v2_1.0_224"]
    checkpoint = convert[convert.index("--checkpoint") + 1]
    assert checkpoint == f"{clone}/.cache/fixtures/mobilenet_v2_1.0_224/mobilenet_v2_1.0_224.tgz"
    # What to do next, as the README says it.
    assert "source .venv/bin/activate" in result.stdout and ".venv/bin/convert-mobilenet" in result.stdout
    readme = (REPO / "README.md").read_text()
    assert "`source .venv/bin/activate`" in readme and "`.venv/bin/convert-mobilenet`" in readme


def test_make_test_in_a_folder_with_a_space(spaced_clone):
    clone, record = spaced_clone
    result = _make(clone, "test")
    assert result.returncode == 0, result.stderr
    ((module, runner, *_),) = _calls(record)
    assert (module, runner) == ("-m", "pytest")
