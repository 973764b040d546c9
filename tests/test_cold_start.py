"""Cold start: importing the model package and asking the CLI for help load nothing heavy they do not need.

Each check runs in a fresh interpreter and lists the heavy top-level packages left in sys.modules.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO

NEVER = {"tensorflow", "transformers", "onnx", "onnxruntime", "onnxscript"}
REPORT = "import json, sys; print(json.dumps(sorted(sys.modules)))"
# What a conversion has no use for: each costs start-up time (logging and subprocess came with the loader
# and ctypes.util; metadata scans, email and PIL with packaging and image helpers; importlib.resources and
# zipfile with reading the toolkit's data files).
NOT_FOR_A_CONVERSION = {
    "logging",
    "subprocess",
    "ctypes.util",
    "importlib.metadata",
    "importlib.resources",
    "email",
    "PIL",
    "h5py",
    "zipfile",
}
# The readers of the other formats: the registry sniffs every format but imports only the chosen one's reader.
NOT_FOR_A_CHECKPOINT = {
    "converter.formats.keras",
    "converter.formats.keras_hdf5",
    "converter.formats.savedmodel",
    "converter.formats.tflite",
    "converter.formats.tflite_schema",
}


def modules_after(code: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-c", f"{code}\n{REPORT}"], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def imported_after(code: str) -> set[str]:
    """The top-level packages in sys.modules after running `code` in a fresh interpreter."""
    return {name.split(".")[0] for name in modules_after(code)}


@pytest.mark.parametrize(
    "code",
    [
        "import mobilenet_torch",
        "from mobilenet_torch import MobileNetV2ForImageClassification, MobileNetV2ForSemanticSegmentation",
    ],
)
def test_the_model_package_imports_no_tensorflow_transformers_or_onnx(code):
    assert not imported_after(code) & NEVER


@pytest.mark.parametrize("command", ["convert_main", "verify_main"])
def test_cli_help_imports_neither_torch_nor_tensorflow(command):
    code = (
        f"from converter.app.cli import {command}\n"
        "try:\n"
        f"    {command}(['--help'])\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
    )
    assert not imported_after(code) & (NEVER | {"torch", "numpy"})


@pytest.mark.parametrize("name", ["mobilenet_v2_0.35_96", "deeplabv3_mnv2_dm05_pascal_trainaug"])
def test_a_conversion_imports_neither_torch_nor_what_it_has_no_use_for(name, tmp_path):
    from fixtures.cache import ensure_fixture

    tarball = ensure_fixture(name).tarball
    code = f"from converter import convert_checkpoint\nconvert_checkpoint({str(tarball)!r}, {str(tmp_path / 'out')!r})"
    modules = modules_after(code)
    assert not {module.split(".")[0] for module in modules} & (NEVER | {"torch"})
    assert not modules & NOT_FOR_A_CONVERSION
    assert not modules & NOT_FOR_A_CHECKPOINT
    assert (tmp_path / "out" / "model.safetensors").is_file()
