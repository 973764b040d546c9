"""Input formats: one reader per format (see :mod:`converter.formats.base`), registered in `READERS`.

`open_reader(path)` finds the format by sniffing (file magic, folder layout), `--format NAME` forces one.
Archives (.tgz, .tar.gz, .tar) are unpacked safely into a private temporary folder first, whatever
they hold, so every format can come as a folder or as an archive of it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from converter.errors import SourceError, UsageError
from converter.formats.base import Hints, Reader, References, SourceFile
from converter.formats.checkpoint import CheckpointReader
from converter.formats.files import (
    DEFAULT_MAX_EXTRACT_BYTES,
    DEFAULT_MAX_MEMBERS,
    SKIPPED_NAMES,
    extracted,
    is_archive,
)
from converter.formats.keras import KerasReader
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
    if is_archive(origin):
        with extracted(origin, max_extract_bytes, max_members) as folder:
            with _opened(_archive_root(folder), forced, origin, backbone_only) as reader:
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


@contextmanager
def _opened(path: Path, forced: type[Reader] | None, archive: Path | None, backbone_only: bool) -> Iterator[Reader]:
    cls = forced or _sniff(path, archive)
    reader = cls(path, archive, backbone_only=backbone_only)
    try:
        yield reader
    finally:
        reader.close()


def _recognised(path: Path) -> type[Reader] | None:
    return next((reader for reader in READERS if reader.sniff(path)), None)


def _sniff(path: Path, archive: Path | None) -> type[Reader]:
    if reader := _recognised(path):
        return reader
    if archive is None and not path.exists():
        raise SourceError(
            f"{path} does not exist (nor does {path.name}.index); pass a model file, a folder, a checkpoint "
            "prefix or an archive"
        )
    what = f"archive {archive}" if archive else str(path)
    raise SourceError(f"{what} is in no format this tool reads; known formats: {known_formats()}")


def _archive_root(folder: Path) -> Path:
    """Where an unpacked archive's content starts: the folder itself, or its one top-level folder."""
    entries = [
        entry for entry in folder.iterdir() if not entry.name.startswith(".") and entry.name not in SKIPPED_NAMES
    ]
    if len(entries) == 1 and entries[0].is_dir() and _recognised(folder) is None:
        return entries[0]
    return folder
