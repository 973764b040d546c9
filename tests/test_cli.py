"""The command line: documented exit codes, one-line errors (no traceback), outputs that are complete or
absent, and conversion without TensorFlow."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fixtures.cache import ensure_fixture
from fixtures.spec import make_weights
from tests.helpers import REPO, SMALL, assert_one_line_error, run_cli

EXPECTED_FILES = {"config.json", "model.safetensors", "preprocessor_config.json", "conversion.json"}


def test_converts_a_zoo_tarball(small, tmp_path):
    out = tmp_path / "new" / "model"  # missing parents are created
    result = run_cli("--depth", "0.35", "--size", "96", "--checkpoint", small.tarball, "--output", out)
    assert result.returncode == 0, result.stderr
    assert EXPECTED_FILES <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mobilenet_v2" and config["tf_padding"] is True
    assert config["image_size"] == 96 and config["depth_multiplier"] == 0.35
    assert config["id2label"]["0"] == "background" and len(config["id2label"]) == 1001
    assert config["architectures"] == ["MobileNetV2ForImageClassification"]
    preprocessor = json.loads((out / "preprocessor_config.json").read_text())
    assert preprocessor["size"] == {"shortest_edge": 128} and preprocessor["crop_size"]["height"] == 96
    conversion = json.loads((out / "conversion.json").read_text())
    assert conversion["weights"] == "ema" and conversion["tensors"]["mapped"] == 262
    assert conversion["source"]["files"][0]["name"] == small.tarball.name
    assert len(conversion["source"]["files"][0]["sha256"]) == 64
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "np") as handle:
        assert handle.metadata() == {"format": "pt"}
    assert not list(out.parent.glob(".model.partial-*"))


@pytest.mark.parametrize("source", ["prefix", "index", "folder"])
def test_accepts_a_prefix_an_index_file_and_a_folder(small, tmp_path, source):
    path = {"prefix": small.checkpoint_prefix, "index": small.index, "folder": small.files}[source]
    result = run_cli("--checkpoint", path, "--output", tmp_path / "model", "--size", "96")
    assert result.returncode == 0, result.stderr


def test_wrong_depth_names_both(small, tmp_path):
    result = run_cli("--depth", "1.0", "--checkpoint", small.tarball, "--output", tmp_path / "model")
    assert_one_line_error(result, 1, "--depth 1.0", "0.35")
    assert not (tmp_path / "model").exists()


def test_wrong_size_names_both(small, tmp_path):
    result = run_cli("--size", "224", "--checkpoint", small.tarball, "--output", tmp_path / "model")
    assert_one_line_error(result, 1, "--size 224", "96")


def test_ema_requested_without_shadows(tmp_path):
    deeplab = ensure_fixture("deeplabv3_mnv2_dm05_pascal_trainaug")
    result = run_cli("--weights", "ema", "--checkpoint", deeplab.tarball, "--output", tmp_path / "model")
    assert_one_line_error(result, 1, "--weights raw")


def test_existing_output_is_refused_without_force_and_replaced_with_it(small, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = run_cli("--checkpoint", small.tarball, "--output", out)
    assert_one_line_error(result, 1, "--force")
    assert (out / "precious.txt").read_text() == "keep me"
    (out / "precious.txt").unlink()
    assert run_cli("--checkpoint", small.tarball, "--output", out).returncode == 0
    result = run_cli("--checkpoint", small.tarball, "--output", out, "--force")
    assert result.returncode == 0, result.stderr
    assert {p.name for p in out.iterdir()} >= EXPECTED_FILES
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # nothing left beside it


def test_unwritable_output_location(small, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run_cli("--checkpoint", small.tarball, "--output", blocker / "model")
    assert_one_line_error(result, 1, "cannot create the folder")


@pytest.mark.parametrize("damage", ["flip_data", "flip_index", "truncate_data", "empty_index", "remove_data"])
def test_damaged_checkpoints_give_one_line_errors_and_no_output(small, tmp_path, damage):
    files = tmp_path / "ckpt"
    files.mkdir()
    for path in (small.index, small.data):
        (files / path.name).write_bytes(path.read_bytes())
    index, data = files / small.index.name, files / small.data.name
    if damage == "flip_data":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif damage == "flip_index":
        raw = bytearray(index.read_bytes())
        raw[len(raw) // 3] ^= 0x10
        index.write_bytes(bytes(raw))
    elif damage == "truncate_data":
        data.write_bytes(data.read_bytes()[:-1000])
    elif damage == "empty_index":
        index.write_bytes(b"")
    else:
        data.unlink()
    result = run_cli("--checkpoint", files, "--output", tmp_path / "model")
    assert_one_line_error(result, 1, "error:")
    assert not (tmp_path / "model").exists()
    assert not list(tmp_path.glob(".model.*"))


def test_missing_source_and_random_bytes(tmp_path):
    assert_one_line_error(run_cli("--checkpoint", tmp_path / "nothing", "--output", tmp_path / "m"), 1, "nothing")
    junk = tmp_path / "junk.tgz"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    assert_one_line_error(run_cli("--checkpoint", junk, "--output", tmp_path / "m"), 1, "junk.tgz")


def test_non_finite_weights_are_refused_unless_allowed(tmp_path):
    from fixtures.tf_builder import write_checkpoint

    weights = make_weights(SMALL)
    bad = "MobilenetV2/expanded_conv_3/project/weights/ExponentialMovingAverage"
    weights[bad] = weights[bad].copy()
    weights[bad][0, 0, 0, 0] = np.nan
    prefix = write_checkpoint(tmp_path / "ckpt", SMALL, weights=weights)
    result = run_cli("--checkpoint", prefix, "--output", tmp_path / "model")
    assert_one_line_error(result, 1, "NaN", "expanded_conv_3/project/weights")
    result = run_cli("--checkpoint", prefix, "--output", tmp_path / "model", "--allow-non-finite")
    assert result.returncode == 0, result.stderr


def test_unmapped_variables_are_named(tmp_path):
    from fixtures.tf_builder import write_checkpoint

    weights = make_weights(SMALL)
    weights["MobilenetV2/expanded_conv_3/surprise/weights"] = np.ones((1, 1, 8, 8), np.float32)
    prefix = write_checkpoint(tmp_path / "ckpt", SMALL, weights=weights)
    result = run_cli("--checkpoint", prefix, "--output", tmp_path / "model")
    assert_one_line_error(result, 1, "MobilenetV2/expanded_conv_3/surprise/weights")


def test_usage_errors_exit_2(small, tmp_path):
    result = run_cli("--checkpoint", small.tarball, "--weights", "bogus")
    assert result.returncode == 2
    result = run_cli("--checkpoint", small.tarball, "--output", tmp_path / "m", "--output-stride", "16")
    assert_one_line_error(result, 1, "--output-stride")


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("--checkpoint", tmp_path / "nothing", "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_racing_conversions_leave_one_complete_output(small, tmp_path):
    out = tmp_path / "model"
    command = [sys.executable, "-c", "from converter.app.cli import convert_main; convert_main()",
               "--checkpoint", str(small.tarball), "--output", str(out), "--force"]  # fmt: skip
    racers = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    codes = [racer.wait(timeout=300) for racer in racers]
    assert codes == [0, 0, 0], [racer.stderr.read() for racer in racers]
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES | ({"README.md"} & {p.name for p in out.iterdir()})
    from mobilenet_torch import MobileNetV2ForImageClassification

    MobileNetV2ForImageClassification.from_pretrained(out)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_conversion_never_imports_tensorflow(small, tmp_path):
    """With TensorFlow made unimportable, conversion still works and nothing imports it."""
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('tensorflow', 'tf_keras', 'keras'):\n"
        "            raise ImportError('tensorflow is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from converter import convert_checkpoint\n"
        f"convert_checkpoint({str(small.tarball)!r}, {str(tmp_path / 'model')!r})\n"
        "assert not [m for m in sys.modules if m.startswith('tensorflow')]\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_from_pretrained_refuses_pickles(tmp_path):
    from mobilenet_torch import MobileNetV2ForImageClassification, ModelFolderError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mobilenet_v2"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelFolderError, match="pickled weights are never loaded"):
        MobileNetV2ForImageClassification.from_pretrained(tmp_path)
    assert os.path.exists(tmp_path / "pytorch_model.bin")


def test_the_project_never_unpickles():
    sources = [p for package in ("converter", "mobilenet_torch") for p in (REPO / package).rglob("*.py")]
    for source in sources:
        text = source.read_text()
        for unsafe in ("import pickle", "torch.load(", "np.load(", "allow_pickle=True"):
            assert unsafe not in text, f"{source.name} uses {unsafe}"


def _scripts() -> dict[str, str]:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("name", ["convert-mobilenet", "verify-mobilenet", "predict-mobilenet", "eval-mobilenet"])
def test_every_command_answers_version(name):
    import importlib
    import tomllib

    from click.testing import CliRunner

    module, function = _scripts()[name].split(":")
    command = getattr(importlib.import_module(module), function)
    result = CliRunner().invoke(command, ["--version"], prog_name=name)
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert result.exit_code == 0 and result.stdout == f"{name} {version}\n", result.output


def test_checkpoint_with_zoo_options_is_refused_in_plain_words(small, tmp_path):
    result = run_cli("--checkpoint", small.tarball, "--all")
    assert_one_line_error(result, 2)
    assert result.stderr == (
        "error: --all converts the whole zoo and --checkpoint one local checkpoint: pass only one of them\n"
    )
    result = run_cli("--checkpoint", small.tarball, "--mirror", "http://127.0.0.1:1", "--cache-dir", tmp_path)
    assert_one_line_error(result, 2)
    assert result.stderr == (
        "error: --cache-dir and --mirror choose what is downloaded from the zoo, but --checkpoint downloads "
        "nothing: leave them out\n"
    )


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=oct)
def test_output_modes_follow_the_umask(small, tmp_path, umask):
    """Every file and folder written gets the mode a plain open / mkdir gives under the same umask."""
    script = (
        "import os, stat, sys\n"
        f"os.umask({umask})\n"
        "from converter import convert_checkpoint\n"
        f"out = {str(tmp_path / 'model')!r}\n"
        f"convert_checkpoint({str(small.tarball)!r}, out)\n"
        f"open({str(tmp_path / 'plain.txt')!r}, 'w').close()\n"
        f"os.mkdir({str(tmp_path / 'plain')!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    file_mode = (tmp_path / "plain.txt").stat().st_mode & 0o777
    folder_mode = (tmp_path / "plain").stat().st_mode & 0o777
    out = tmp_path / "model"
    assert out.stat().st_mode & 0o777 == folder_mode
    modes = {path.name: path.stat().st_mode & 0o777 for path in out.iterdir()}
    assert EXPECTED_FILES <= set(modes) and modes == dict.fromkeys(modes, file_mode), (oct(file_mode), modes)


def test_verify_takes_several_inputs_after_one_flag(small, tmp_path):
    """The README's `--inputs a.png b.png` form, next to the default and the repeated form."""
    pytest.importorskip("tensorflow")
    from click.testing import CliRunner
    from PIL import Image

    from converter import convert_checkpoint
    from converter.app.cli import verify_main

    model = tmp_path / "model"
    convert_checkpoint(small.tarball, model)
    photos = [tmp_path / "a.png", tmp_path / "b.png"]
    for seed, photo in enumerate(photos):
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(photo)
    base = ["--checkpoint", str(small.tarball), "--model", str(model), "--report-dir", str(tmp_path / "r")]
    result = CliRunner().invoke(verify_main, [*base, "--inputs", *map(str, photos)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "parity.json").read_text())
    assert [case["name"] for case in report["inputs"]] == ["image-a.png", "image-b.png"]
