"""`--force` cannot lose data: it replaces only an empty folder or one this toolkit wrote, never one that
holds the source or any file the toolkit did not write, and it deletes nothing else."""

from __future__ import annotations

import json
import shutil

import pytest

from converter import convert_checkpoint
from converter.errors import OutputError
from fixtures.cache import ensure_fixture
from tests.helpers import SMALL, run_cli
from tests.test_cli import assert_one_line_error


@pytest.fixture(scope="module")
def tarball():
    return ensure_fixture(SMALL).tarball


def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_source_tarball_inside_the_output_is_never_deleted(tarball, tmp_path):
    downloads = tmp_path / "dl"
    downloads.mkdir()
    source = downloads / "x.tgz"
    shutil.copy(tarball, source)
    before = tree(downloads)
    result = run_cli("--checkpoint", source, "--output", downloads, "--force")
    assert_one_line_error(result, 1, "holds the source")
    assert tree(downloads) == before


def test_a_checkpoint_folder_is_not_replaced_by_its_own_conversion(tarball, tmp_path):
    files = ensure_fixture(SMALL).root / "files"
    folder = tmp_path / "ckpt"
    shutil.copytree(files, folder)
    before = tree(folder)
    with pytest.raises(OutputError, match="holds the source"):
        convert_checkpoint(folder, folder, force=True)
    assert tree(folder) == before


def test_unrelated_files_are_never_deleted(tarball, tmp_path):
    out = tmp_path / "some" / "folder"
    out.mkdir(parents=True)
    (out / "thesis.tex").write_text("years of work")
    (out / "config.json").write_text("{}")  # a name we write, but not in a folder we wrote
    before = tree(out)
    result = run_cli("--checkpoint", tarball, "--output", out, "--force")
    assert_one_line_error(result, 1, "thesis.tex")
    assert tree(out) == before


def test_a_folder_with_our_file_names_but_no_record_of_ours_is_refused(tarball, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "README.md").write_text("my notes")
    with pytest.raises(OutputError, match="conversion.json"):
        convert_checkpoint(tarball, out, force=True)
    assert (out / "README.md").read_text() == "my notes"


def test_a_file_added_to_a_converted_folder_blocks_replacing_it(tarball, tmp_path):
    out = tmp_path / "model"
    convert_checkpoint(tarball, out)
    (out / "parity").mkdir()
    (out / "parity" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="parity/notes.txt"):
        convert_checkpoint(tarball, out, force=True)
    assert (out / "parity" / "notes.txt").read_text() == "mine"


def test_a_folder_this_tool_wrote_is_replaced_and_nothing_else_is_touched(tarball, tmp_path):
    out = tmp_path / "model"
    neighbour = tmp_path / "neighbour.txt"
    neighbour.write_text("beside the output")
    convert_checkpoint(tarball, out, weights="raw")
    (out / "parity").mkdir()
    (out / "parity" / "parity.json").write_text("{}")  # reports the verifier writes are ours too
    convert_checkpoint(tarball, out, force=True)
    assert json.loads((out / "conversion.json").read_text())["weights"] == "ema"
    assert not (out / "parity").exists()
    assert neighbour.read_text() == "beside the output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "neighbour.txt"]


def test_an_empty_folder_is_used_with_or_without_force(tarball, tmp_path):
    for force in (False, True):
        out = tmp_path / f"empty-{force}"
        out.mkdir()
        convert_checkpoint(tarball, out, force=force)
        assert (out / "model.safetensors").is_file()
