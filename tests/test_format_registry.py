"""The registry inside folders and archives: a .tflite or Keras file there is found; where several formats
lie together (the TFLite hosted archives hold a checkpoint next to a .tflite), the registry's order picks
one, a note names the others with the --format that picks them, and --format does; several files of one
format with nothing to choose between them are an error that lists them.

Each conversion through a folder or archive is checked against the conversion of the same file passed
directly (which the format's own tests check against TFLite, Keras or TensorFlow)."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from converter import convert_checkpoint
from converter.app.cli import convert_main
from converter.errors import SourceError
from converter.output import layout
from fixtures import ensure_fixture
from mobilenet_torch.quantized_files import INTEGER_WEIGHTS_FILE
from tests.helpers import SHARED, SMALL

REAL_TFLITE = SHARED / "realdata" / "models" / "mobilenet_v2_1.0_224_quant.tflite"


@pytest.fixture(scope="module")
def tflite_file() -> Path:
    """A uint8 MobileNetV2 .tflite: the real one where present, else the TFLite converter's from a fixture."""
    if REAL_TFLITE.is_file():
        return REAL_TFLITE
    pytest.importorskip("tensorflow", reason=f"{REAL_TFLITE} is absent and TensorFlow is needed to build one")
    from fixtures.tflite_builder import build_tflite

    return build_tflite(SMALL, "int8")


@pytest.fixture(scope="module")
def direct(tflite_file, tmp_path_factory) -> Path:
    """The .tflite converted as a file."""
    out = tmp_path_factory.mktemp("direct") / "out"
    convert_checkpoint(tflite_file, out)
    return out


def folder_of(tmp_path: Path, *, checkpoint: bool = False, tflites: tuple[Path, ...] = (), name="bundle") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    if checkpoint:
        for path in ensure_fixture(SMALL).files.iterdir():
            shutil.copyfile(path, folder / path.name)
    for i, tflite in enumerate(tflites):
        target = folder / ("model.tflite" if i == 0 else f"models/variant_{i}.tflite")
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(tflite, target)
    return folder


def archived(folder: Path) -> Path:
    archive = folder.with_name(f"{folder.name}.tgz")
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            tar.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
    return archive


def record(folder: Path) -> dict:
    return json.loads((folder / layout.CONVERSION).read_text())


def same_model(folder: Path, reference: Path) -> bool:
    return all(
        (folder / name).read_bytes() == (reference / name).read_bytes()
        for name in (layout.WEIGHTS, INTEGER_WEIGHTS_FILE)
        if (reference / name).is_file()
    )


@pytest.mark.parametrize("packed", [False, True], ids=["folder", "archive"])
def test_a_tflite_inside_a_folder_or_archive_is_found(tflite_file, direct, tmp_path, packed):
    source = folder_of(tmp_path, tflites=(tflite_file,))
    source = archived(source) if packed else source
    out = tmp_path / "out"
    convert_checkpoint(source, out)
    assert record(out)["source"]["format"] == "tflite" and same_model(out, direct)
    assert record(out)["source"]["name"] == (source.name if packed else "model.tflite")
    assert not [note for note in record(out)["notes"] if "also holds" in note]  # nothing else was there


def test_with_a_checkpoint_beside_it_the_registry_order_decides_and_the_note_says_how_to_pick(
    tflite_file, direct, tmp_path
):
    archive = archived(folder_of(tmp_path, checkpoint=True, tflites=(tflite_file,)))
    first, second = tmp_path / "first", tmp_path / "second"
    convert_checkpoint(archive, first)
    assert record(first)["source"]["format"] == "tf-checkpoint"
    assert "which also holds model.tflite (--format tflite)" in " ".join(record(first)["notes"])
    # The checkpoint itself, converted as the zoo's tarball is: the same folder.
    plain = tmp_path / "plain"
    convert_checkpoint(ensure_fixture(SMALL).tarball, plain)
    assert (first / layout.WEIGHTS).read_bytes() == (plain / layout.WEIGHTS).read_bytes()

    convert_checkpoint(archive, second, format="tflite")
    assert record(second)["source"]["format"] == "tflite" and same_model(second, direct)
    notes = " ".join(record(second)["notes"])
    assert "converted model.tflite (tflite) from the archive bundle.tgz" in notes
    assert "a tf-checkpoint (--format tf-checkpoint)" in notes


def test_the_cli_prints_the_note(tflite_file, tmp_path):
    folder = folder_of(tmp_path, checkpoint=True, tflites=(tflite_file,))
    result = CliRunner().invoke(convert_main, ["--checkpoint", str(folder), "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    note = "note: converted a tf-checkpoint from the folder bundle, which also holds model.tflite (--format tflite)"
    assert note in result.stderr


def test_several_tflite_files_with_nothing_to_choose_are_an_error_listing_them(tflite_file, tmp_path):
    archive = archived(folder_of(tmp_path, tflites=(tflite_file, tflite_file)))
    with pytest.raises(SourceError) as caught:
        convert_checkpoint(archive, tmp_path / "out")
    message = str(caught.value)
    assert "holds 2 tflite files (model.tflite, models/variant_1.tflite)" in message
    assert "extract it and pass one of them" in message and not (tmp_path / "out").exists()


def test_beside_a_checkpoint_several_tflite_files_are_named_and_format_tflite_refuses_to_guess(tflite_file, tmp_path):
    folder = folder_of(tmp_path, checkpoint=True, tflites=(tflite_file, tflite_file))
    out = tmp_path / "out"
    convert_checkpoint(folder, out)
    assert "model.tflite, models/variant_1.tflite (--format tflite)" in " ".join(record(out)["notes"])
    with pytest.raises(SourceError, match=r"holds 2 tflite files .*; pass one of them"):
        convert_checkpoint(folder, tmp_path / "other", format="tflite")
    (folder / "keras.h5").write_bytes(b"\x89HDF\r\n\x1a\n")  # the HDF5 magic: sniffed as a Keras file
    with pytest.raises(SourceError, match=r"pass one of them, or another format it holds: .*\(--format keras\)"):
        convert_checkpoint(folder, tmp_path / "other", format="tflite")


def test_format_naming_a_file_format_the_folder_lacks_says_what_it_holds(tmp_path):
    folder = folder_of(tmp_path, checkpoint=True)
    with pytest.raises(SourceError) as caught:
        convert_checkpoint(folder, tmp_path / "out", format="keras")
    message = str(caught.value)
    assert "holds no keras file" in message and "it holds: a tf-checkpoint (--format tf-checkpoint)" in message


@pytest.fixture(scope="module")
def keras_files():
    pytest.importorskip("keras", reason="Keras writes the Keras fixture files")
    from fixtures.keras_builder import ensure_keras_fixture

    return ensure_keras_fixture(0.35)


def test_a_keras_file_inside_an_archive_is_found(keras_files, tmp_path):
    source = keras_files.file("keras3_weights")
    folder = tmp_path / "keras"
    folder.mkdir()
    shutil.copyfile(source, folder / source.name)
    from_archive, from_file = tmp_path / "a", tmp_path / "b"
    convert_checkpoint(archived(folder), from_archive)
    convert_checkpoint(source, from_file)
    assert record(from_archive)["source"]["format"] == "keras"
    assert (from_archive / layout.WEIGHTS).read_bytes() == (from_file / layout.WEIGHTS).read_bytes()


def test_a_sharded_keras_save_is_one_model_and_other_keras_files_beside_it_are_listed(keras_files, tmp_path):
    index = keras_files.file("keras3_sharded")
    folder = tmp_path / "sharded"
    folder.mkdir()
    for path in index.parent.glob("keras3_sharded*"):
        shutil.copyfile(path, folder / path.name)
    convert_checkpoint(folder, tmp_path / "out")  # the index and its two shards: one model
    assert record(tmp_path / "out")["source"]["format"] == "keras"
    shutil.copyfile(keras_files.file("keras3_weights"), folder / "keras3.weights.h5")
    with pytest.raises(SourceError, match=r"holds 2 keras files \(keras3.weights.h5, keras3_sharded.weights.json\)"):
        convert_checkpoint(folder, tmp_path / "other")
