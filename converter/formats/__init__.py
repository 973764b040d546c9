"""Input formats: one reader per format (see :mod:`converter.formats.base`), registered in `FORMATS`.

`open_reader(path)` finds the format by sniffing (file magic, folder layout), `--format NAME` forces one.
Archives (.tgz, .tar.gz, .tar, .zip) are unpacked safely into a private temporary folder first, whatever
they hold, so every format can come as a folder or as an archive of it.

A folder (or unpacked archive) is recognised by its layout (a SavedModel, a checkpoint) and searched for
the single-file formats (``single_file``: a ``.tflite``, a Keras file) up to `SEARCH_LEVELS` deep. When it
holds several formats, the first in `FORMATS` order is converted and the reader's notes name the others
with the `--format` that picks them (the TFLite hosted ``mobilenet_v2_1.0_224_quant.tgz`` holds a
checkpoint and a ``.tflite``); several files of the chosen format are an error that lists them.

Each format is registered by a light entry: its sniff (:mod:`converter.formats.sniffing`) and the dotted
path of its reader, imported only when that format is chosen (a .tgz checkpoint never loads h5py or the
TFLite decoder).
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from converter.errors import SourceError, UsageError
from converter.formats import sniffing
from converter.formats.base import Hints, Reader, References, SourceFile
from converter.formats.files import (
    DEFAULT_MAX_EXTRACT_BYTES,
    DEFAULT_MAX_MEMBERS,
    SEARCH_LEVELS,
    SKIPPED_NAMES,
    extracted,
    files_under,
    is_archive,
)

__all__ = ["FORMATS", "Format", "Hints", "Reader", "References", "SourceFile", "known_formats", "open_reader"]


@dataclass(frozen=True)
class Format:
    """One input format as the registry knows it before its reader is imported."""

    name: str  # used by --format and recorded in conversion.json
    description: str  # one line for the list of known formats
    sniff: Callable[[Path], bool]  # True when a file or unpacked folder is in this format; by magic or layout
    reader_path: str  # "module:class" of its Reader, imported when the format is chosen
    single_file: bool = False  # one file, looked for inside folders and archives (else a folder layout)

    def reader(self) -> type[Reader]:
        module, _, name = self.reader_path.partition(":")
        return getattr(importlib.import_module(module), name)


#: Every format, in the order sniffing tries them (a Hub module is also a SavedModel, and a SavedModel
#: holds a checkpoint in variables/, so the more specific layouts come first).
FORMATS: tuple[Format, ...] = (
    Format(
        "tf-hub-module",
        "TF1 Hub module folder or .tar.gz (tfhub_module.pb + saved_model.pb + variables/)",
        sniffing.is_hub_module,
        "converter.formats.savedmodel:HubModuleReader",
    ),
    Format(
        "saved-model",
        "SavedModel folder or .tar.gz (saved_model.pb + variables/; TF Hub / Kaggle, TF1 or TF2, Keras)",
        sniffing.is_saved_model,
        "converter.formats.savedmodel:SavedModelReader",
    ),
    Format(
        "tf-checkpoint",
        "TensorFlow checkpoint: a prefix, its .index file, or a folder or .tgz holding one (the zoo's)",
        sniffing.is_checkpoint,
        "converter.formats.checkpoint:CheckpointReader",
    ),
    Format(
        "keras",
        "Keras MobileNetV2 (.h5 / .weights.h5 / .keras / sharded .weights.json), h5py only",
        sniffing.is_keras_file,
        "converter.formats.keras:KerasReader",
        single_file=True,
    ),
    Format(
        "tflite",
        "TensorFlow Lite flatbuffer (.tflite): float32, float16, dynamic-range, uint8 per-tensor or int8 "
        "per-channel quantized",
        sniffing.is_tflite_file,
        "converter.formats.tflite:TFLiteReader",
        single_file=True,
    ),
)
_FILE_FORMATS = tuple(entry for entry in FORMATS if entry.single_file)
_KERAS_SHARD = re.compile(r"(?P<stem>.+)_\d{5}\.weights\.h5")


def known_formats() -> str:
    return "; ".join(f"{entry.name} ({entry.description})" for entry in FORMATS)


def format_of(reader: type[Reader]) -> Format:
    """The entry that registers `reader`."""
    path = f"{reader.__module__}:{reader.__qualname__}"
    return next(entry for entry in FORMATS if entry.reader_path == path)


@contextmanager
def open_reader(
    path: str | os.PathLike[str],
    format: str | None = None,
    *,
    backbone_only: bool = False,
    max_extract_bytes: int = DEFAULT_MAX_EXTRACT_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> Iterator[Reader]:
    """The reader for `path` (a file, a folder, a checkpoint prefix or an archive of any of them);
    `backbone_only` tells it that the head will be set aside.

    Raises:
        UsageError: `format` names no known format.
        SourceError: nothing is at `path`, or no format recognises it (the message lists the known ones).
    """
    forced = _forced(format)
    origin = Path(path)
    if origin.is_file() and origin.stat().st_size == 0:
        raise SourceError(f"{origin} is empty (0 bytes): it was cut short or never written; pass the whole file")
    if is_archive(origin):
        with extracted(origin, max_extract_bytes, max_members) as unpacked:
            with _opened(_archive_root(unpacked.folder), forced, origin, backbone_only) as reader:
                reader.archive_sha256 = unpacked.sha256
                yield reader
    else:
        with _opened(origin, forced, None, backbone_only) as reader:
            yield reader


def _forced(format: str | None) -> Format | None:
    if format is None:
        return None
    for entry in FORMATS:
        if entry.name == format:
            return entry
    raise UsageError(f"unknown format {format!r}; known formats: {', '.join(e.name for e in FORMATS)}")


@dataclass(frozen=True)
class _Candidate:
    """A format found at `path` (the folder itself for a layout, a file in it for a single-file format)."""

    format: Format
    path: Path


@contextmanager
def _opened(path: Path, forced: Format | None, archive: Path | None, backbone_only: bool) -> Iterator[Reader]:
    found = _candidates(path)
    chosen = _chosen(path, forced, archive, found)
    reader = chosen.format.reader()(chosen.path, archive, backbone_only=backbone_only)
    try:
        others = [candidate for candidate in found if candidate.path != chosen.path]
        if others:
            reader.registry_notes = (_others_note(path, archive, chosen, others),)
        yield reader
    finally:
        reader.close()


def _candidates(path: Path) -> list[_Candidate]:
    """Every format at `path`, in registry order; one per path (a Hub module is also a SavedModel, and a
    SavedModel holds a checkpoint: the most specific layout names it)."""
    found = [_Candidate(entry, path) for entry in FORMATS if entry.sniff(path)]
    if path.is_dir():
        files = [file for file in files_under(path, SEARCH_LEVELS) if not _keras_shard(file)]
        found += [_Candidate(entry, file) for file in files for entry in _FILE_FORMATS if entry.sniff(file)]
    unique: dict[Path, _Candidate] = {}
    for candidate in found:
        unique.setdefault(candidate.path, candidate)
    return sorted(unique.values(), key=lambda candidate: FORMATS.index(candidate.format))


def _keras_shard(file: Path) -> bool:
    """`<stem>_00000.weights.h5` next to `<stem>.weights.json` is a shard (Keras' names), read through the index."""
    shard = _KERAS_SHARD.fullmatch(file.name)
    return shard is not None and (file.parent / f"{shard['stem']}{sniffing.SHARD_INDEX_SUFFIX}").is_file()


def _chosen(path: Path, forced: Format | None, archive: Path | None, found: list[_Candidate]) -> _Candidate:
    if forced is not None and not (forced.single_file and path.is_dir()):
        _check_not_another_format(path, forced, found)
        return _Candidate(forced, path)  # a layout, or a file named directly: the reader says what is wrong
    entry = forced or _sniff(path, archive, found)
    matches = [candidate for candidate in found if candidate.format is entry]
    if len(matches) == 1:
        return matches[0]
    where = f"archive {archive}" if archive else f"folder {path}"
    if not matches:
        holds = f"; it holds: {_listing(path, found)}" if found else ""
        raise SourceError(f"{where} holds no {entry.name} file ({entry.description}){holds}")
    advice = "extract it and pass one of them" if archive else "pass one of them"
    others = [candidate for candidate in found if candidate.format is not entry]
    if others:
        advice += f", or another format it holds: {_listing(path, others)}"
    raise SourceError(
        f"{where} holds {len(matches)} {entry.name} files ({', '.join(_relative(path, m) for m in matches)}) "
        f"and nothing says which to convert; {advice}"
    )


def _check_not_another_format(path: Path, forced: type[Reader], found: list[_Candidate]) -> None:
    """A file --format names as one format that is recognisably another: say so, rather than let the
    forced reader call it damaged (a file that no format recognises is left to the forced reader)."""
    others = [c.format for c in found if c.path == path and c.format is not forced]
    if path.is_file() and others and not forced.sniff(path):
        other = others[0]
        looks_like = re.split(r" \(|:", other.description, maxsplit=1)[0]  # "TensorFlow Lite flatbuffer"
        raise UsageError(
            f"{path.name} is not a {forced.name} file: it looks like a {looks_like}; pass --format "
            f"{other.name} or leave --format out"
        )


def _sniff(path: Path, archive: Path | None, found: list[_Candidate]) -> Format:
    if found:
        return found[0].format
    if archive is None and not path.exists():
        raise SourceError(
            f"{path} does not exist (nor does {path.name}.index); pass a model file, a folder, a checkpoint "
            "prefix or an archive"
        )
    what = f"archive {archive}" if archive else str(path)
    raise SourceError(f"{what} is in no format this tool reads; known formats: {known_formats()}")


def _others_note(path: Path, archive: Path | None, chosen: _Candidate, others: list[_Candidate]) -> str:
    where = f"the archive {archive.name}" if archive else f"the folder {path.name}"
    what = _relative(path, chosen)
    if chosen.path != path:
        what += f" ({chosen.format.name})"
    return f"converted {what} from {where}, which also holds {_listing(path, others)}"


def _listing(path: Path, candidates: list[_Candidate]) -> str:
    """Each format once, after all its files: `a tf-checkpoint (--format tf-checkpoint); model.tflite,
    models/other.tflite (--format tflite)`."""
    parts = []
    for entry in dict.fromkeys(candidate.format for candidate in candidates):
        names = [_relative(path, c) for c in candidates if c.format is entry]
        parts.append(f"{', '.join(names)} (--format {entry.name})")
    return "; ".join(parts)


def _relative(path: Path, candidate: _Candidate) -> str:
    if candidate.path == path:
        return f"a {candidate.format.name}"
    return candidate.path.relative_to(path).as_posix()


def _archive_root(folder: Path) -> Path:
    """Where an unpacked archive's content starts: the folder itself, or its one top-level folder: the only
    entry, or a model layout beside files no format reads (Teachable Machine's ``converted_savedmodel.zip``
    holds ``model.savedmodel/`` and ``labels.txt``)."""
    entries = [
        entry for entry in folder.iterdir() if not entry.name.startswith(".") and entry.name not in SKIPPED_NAMES
    ]
    folders = [entry for entry in entries if entry.is_dir()]
    at_root = {entry for entry in FORMATS if entry.sniff(folder)}
    if len(folders) != 1:
        return folder
    if len(entries) == 1:
        return folder if at_root else folders[0]
    # The root is the subfolder's layout seen from above (a checkpoint is searched for in subfolders).
    in_folder = {entry for entry in FORMATS if entry.sniff(folders[0])}
    files = [entry for entry in entries if entry.is_file()]
    if in_folder and at_root <= in_folder and not any(e.sniff(file) for file in files for e in _FILE_FORMATS):
        return folders[0]
    return folder
