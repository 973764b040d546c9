"""Class names packed into a ``.tflite`` file.

TFLite metadata appends a zip archive to the flatbuffer holding the model's associated files, and its
``TFLITE_METADATA`` buffer names them; a label file (``TENSOR_AXIS_LABELS``) has one class name a line.
The weights do not depend on it, so a label file that is named or present but cannot be used costs the
names, with a note saying why, not the conversion.
"""

from __future__ import annotations

import io
import lzma
import struct
import zipfile
import zlib

from converter.errors import TFLiteFormatError
from converter.formats.tflite_schema import label_file_names

LABEL_FILE_LIMIT = 1 << 20  # an embedded label file is a few tens of KB
METADATA_KEY = "TFLITE_METADATA"  # the model metadata entry whose buffer names the packed label files
# What zipfile raises on a damaged archive: its own errors, and those of the struct, zlib, bz2 and lzma
# decoders below it.
ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, NotImplementedError,
              RuntimeError, zlib.error, lzma.LZMAError, struct.error)  # fmt: skip


def packed_labels(data: bytes, metadata: dict[str, bytes], count: int) -> tuple[tuple[str, ...] | None, list[str]]:
    """The `count` class names of the packed label file (those the metadata names first), or None; and
    notes on each label file that is named or packed but cannot be used, saying why."""
    notes, declared = [], ()
    if METADATA_KEY in metadata:
        try:
            declared = label_file_names(metadata[METADATA_KEY])
        except TFLiteFormatError as error:
            notes.append(f"the model's metadata is damaged ({error}); the label files it names are unknown")
    default = "the classes get the default names: re-download the model to get its own"
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except ZIP_ERRORS as error:
        if declared:
            notes.append(
                f"the label file {declared[0]} that the model's metadata names cannot be read: the zip archive "
                f"appended to the model is damaged or truncated ({_reason(error)}); {default}"
            )
        return None, notes
    with archive:
        members = {member.filename: member for member in archive.infolist() if member.filename.endswith(".txt")}
        problems = [
            f"{name} is not in the zip archive appended to the model" for name in declared if name not in members
        ]
        for name in sorted(members, key=lambda name: name not in declared):
            member = members[name]
            if member.file_size > LABEL_FILE_LIMIT:
                problems.append(f"{name} holds {member.file_size} bytes, more than a label file")
                continue
            try:
                lines = archive.read(member).decode("utf-8", errors="replace").splitlines()
            except ZIP_ERRORS as error:
                problems.append(f"{name} cannot be read from the zip archive appended to the model ({_reason(error)})")
                continue
            if len(lines) == count:
                return tuple(lines), notes
            problems.append(f"{name} has {len(lines)} lines for the model's {count} classes")
    if problems:
        notes.append(f"the packed label file is not used: {'; '.join(problems)}; {default}")
    return None, notes


def _reason(error: Exception) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
