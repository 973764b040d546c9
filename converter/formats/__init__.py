"""Input formats: one reader per format (see :mod:`converter.formats.base`), registered in `READERS`.

`open_reader(path)` finds the format by sniffing (file magic, folder layout), `--format NAME` forces one.
Archives (.tgz, .tar.gz, .tar, .zip) are unpacked safely into a private temporary folder first, whatever
they hold, so every format can come as a folder or as an archive of it.

A folder (or unpacked archive) is recognised by its layout (a SavedModel, a checkpoint) and searched for
the single-file formats (`FILE_FORMATS`: a ``.tflite``, a Keras file) up to `SEARCH_LEVELS` deep. When it
holds several formats, the first in `READERS` order is converted and the reader's notes name the others
with the `--format` that picks them (the TFLite hosted ``mobilenet_v2_1.0_224_quant.tgz`` holds a
checkpoint and a ``.tflite``); several files of the chosen format are an error that lists them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from converter.errors import SourceError, UsageError
from converter.formats.base import Hints, Reader, References, SourceFile
from converter.formats.checkpoint import CheckpointReader
from converter.formats.files import (
    DEFAULT_MAX_EXTRACT_BYTES,
    DEFAULT_MAX_MEMBERS,
    SEARCH_LEVELS,
    SKIPPED_NAMES,
    extracted,
    files_under,
    is_archive,
)
from converter.formats.keras import SHARD_INDEX_SUFFIX, KerasReader
from converter.formats.savedmodel import HubModuleReader, SavedModelReader
from converter.formats.tflite import TFLiteReader

__all__ = ["READERS", "Hints", "Reader", "References", "SourceFile", "known_formats", "open_reader"]

#: Every format, in the order sniffing tries them (a Hub module is also a SavedModel, and a SavedModel
#: holds a checkpoint in variables/, so the more specific layouts come first).
READERS: tuple[type[Reader], ...] = (
    HubModuleReader,
    SavedModelReader,
    CheckpointReader,
    KerasReader,
    TFLiteReader,
)
#: The formats that are one file, looked for inside folders and archives; the others are folder layouts,
#: recognised at the folder's root.
FILE_FORMATS: tuple[type[Reader], ...] = (KerasReader, TFLiteReader)
_KERAS_SHARD = re.compile(r"(?P<stem>.+)_\d{5}\.weights\.h5")


def known_formats() -> str:
    return "; ".join(f"{reader.format} ({reader.description})" for reader in READERS)


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


def _forced(format: str | None) -> type[Reader] | None:
    if format is None:
        return None
    for reader in READERS:
        if reader.format == format:
            return reader
    raise UsageError(f"unknown format {format!r}; known formats: {', '.join(r.format for r in READERS)}")


@dataclass(frozen=True)
class _Candidate:
    """A format found at `path` (the folder itself for a layout, a file in it for a single-file format)."""

    reader: type[Reader]
    path: Path


@contextmanager
def _opened(path: Path, forced: type[Reader] | None, archive: Path | None, backbone_only: bool) -> Iterator[Reader]:
    found = _candidates(path)
    chosen = _chosen(path, forced, archive, found)
    reader = chosen.reader(chosen.path, archive, backbone_only=backbone_only)
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
    found = [_Candidate(reader, path) for reader in READERS if reader.sniff(path)]
    if path.is_dir():
        files = [file for file in files_under(path, SEARCH_LEVELS) if not _keras_shard(file)]
        found += [_Candidate(reader, file) for file in files for reader in FILE_FORMATS if reader.sniff(file)]
    unique: dict[Path, _Candidate] = {}
    for candidate in found:
        unique.setdefault(candidate.path, candidate)
    return sorted(unique.values(), key=lambda candidate: READERS.index(candidate.reader))


def _keras_shard(file: Path) -> bool:
    """`<stem>_00000.weights.h5` next to `<stem>.weights.json` is a shard (Keras' names), read through the index."""
    shard = _KERAS_SHARD.fullmatch(file.name)
    return shard is not None and (file.parent / f"{shard['stem']}{SHARD_INDEX_SUFFIX}").is_file()


def _chosen(path: Path, forced: type[Reader] | None, archive: Path | None, found: list[_Candidate]) -> _Candidate:
    if forced is not None and not (forced in FILE_FORMATS and path.is_dir()):
        _check_not_another_format(path, forced, found)
        return _Candidate(forced, path)  # a layout, or a file named directly: the reader says what is wrong
    reader = forced or _sniff(path, archive, found)
    matches = [candidate for candidate in found if candidate.reader is reader]
    if len(matches) == 1:
        return matches[0]
    where = f"archive {archive}" if archive else f"folder {path}"
    if not matches:
        holds = f"; it holds: {_listing(path, found)}" if found else ""
        raise SourceError(f"{where} holds no {reader.format} file ({reader.description}){holds}")
    advice = "extract it and pass one of them" if archive else "pass one of them"
    others = [candidate for candidate in found if candidate.reader is not reader]
    if others:
        advice += f", or another format it holds: {_listing(path, others)}"
    raise SourceError(
        f"{where} holds {len(matches)} {reader.format} files ({', '.join(_relative(path, m) for m in matches)}) "
        f"and nothing says which to convert; {advice}"
    )


def _check_not_another_format(path: Path, forced: type[Reader], found: list[_Candidate]) -> None:
    """A file --format names as one format that is recognisably another: say so, rather than let the
    forced reader call it damaged (a file that no format recognises is left to the forced reader)."""
    others = [c.reader for c in found if c.path == path and c.reader is not forced]
    if path.is_file() and others and not forced.sniff(path):
        other = others[0]
        looks_like = re.split(r" \(|:", other.description, maxsplit=1)[0]  # "TensorFlow Lite flatbuffer"
        raise UsageError(
            f"{path.name} is not a {forced.format} file: it looks like a {looks_like}; pass --format "
            f"{other.format} or leave --format out"
        )


def _sniff(path: Path, archive: Path | None, found: list[_Candidate]) -> type[Reader]:
    if found:
        return found[0].reader
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
        what += f" ({chosen.reader.format})"
    return f"converted {what} from {where}, which also holds {_listing(path, others)}"


def _listing(path: Path, candidates: list[_Candidate]) -> str:
    """Each format once, after all its files: `a tf-checkpoint (--format tf-checkpoint); model.tflite,
    models/other.tflite (--format tflite)`."""
    parts = []
    for reader in dict.fromkeys(candidate.reader for candidate in candidates):
        names = [_relative(path, c) for c in candidates if c.reader is reader]
        parts.append(f"{', '.join(names)} (--format {reader.format})")
    return "; ".join(parts)


def _relative(path: Path, candidate: _Candidate) -> str:
    if candidate.path == path:
        return f"a {candidate.reader.format}"
    return candidate.path.relative_to(path).as_posix()


def _archive_root(folder: Path) -> Path:
    """Where an unpacked archive's content starts: the folder itself, or its one top-level folder: the only
    entry, or a model layout beside files no format reads (Teachable Machine's ``converted_savedmodel.zip``
    holds ``model.savedmodel/`` and ``labels.txt``)."""
    entries = [
        entry for entry in folder.iterdir() if not entry.name.startswith(".") and entry.name not in SKIPPED_NAMES
    ]
    folders = [entry for entry in entries if entry.is_dir()]
    at_root = {reader for reader in READERS if reader.sniff(folder)}
    if len(folders) != 1:
        return folder
    if len(entries) == 1:
        return folder if at_root else folders[0]
    # The root is the subfolder's layout seen from above (a checkpoint is searched for in subfolders).
    in_folder = {reader for reader in READERS if reader.sniff(folders[0])}
    files = [entry for entry in entries if entry.is_file()]
    if in_folder and at_root <= in_folder and not any(r.sniff(file) for file in files for r in FILE_FORMATS):
        return folders[0]
    return folder
