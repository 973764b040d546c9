"""How each format is recognised, by file magic or folder layout: cheap checks that import no reader, so the
registry can sniff every format and import only the reader of the one it picks."""

from __future__ import annotations

from pathlib import Path

from converter.formats.files import DATA_SHARD, SEARCH_LEVELS, find_index_files

SAVED_MODEL_PB = "saved_model.pb"
HUB_MODULE_PB = "tfhub_module.pb"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
KERAS_ARCHIVE_MEMBERS = ("config.json", "model.weights.h5")
SHARD_INDEX_SUFFIX = ".weights.json"
TFLITE_IDENTIFIER = b"TFL3"


def is_checkpoint(path: Path) -> bool:
    """A prefix, its .index or .data file, or a folder holding an .index (up to `SEARCH_LEVELS` deep)."""
    if path.is_dir():
        return bool(find_index_files(path, SEARCH_LEVELS))
    return (
        path.name.endswith(".index")
        or bool(DATA_SHARD.search(path.name))
        or path.with_name(f"{path.name}.index").is_file()
    )


def is_saved_model(path: Path) -> bool:
    return path.is_dir() and (path / SAVED_MODEL_PB).is_file()


def is_hub_module(path: Path) -> bool:
    return path.is_dir() and (path / HUB_MODULE_PB).is_file()


def is_keras_file(path: Path) -> bool:
    """An HDF5 .h5/.hdf5, a .keras zip holding Keras' members, or a sharded save's index."""
    path = Path(path)
    if not path.is_file():
        return False
    name = path.name.lower()
    if name.endswith(SHARD_INDEX_SUFFIX):
        return True
    if name.endswith(".keras"):
        import zipfile  # here: it imports bz2 and lzma, which no other format needs to be recognised

        try:
            with zipfile.ZipFile(path) as archive:
                return set(KERAS_ARCHIVE_MEMBERS) <= set(archive.namelist())
        except (OSError, zipfile.BadZipFile):
            return False
    if name.endswith((".h5", ".hdf5")):
        with open(path, "rb") as fh:
            return fh.read(len(HDF5_MAGIC)) == HDF5_MAGIC
    return False


def has_tflite_identifier(head: bytes) -> bool:
    """The flatbuffer file identifier of TFLite models sits at bytes 4..8."""
    return len(head) >= 8 and head[4:8] == TFLITE_IDENTIFIER


def is_tflite_file(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as handle:
        return has_tflite_identifier(handle.read(8))
