"""Locate the checkpoint the user points at: a prefix, an ``.index`` or ``.data-*`` file, a folder, or an
archive: a zoo tarball (``.tgz`` / ``.tar.gz`` / ``.tar``) or a ``.zip`` (Teachable Machine's downloads).

Archives are unpacked into a private temporary folder that exists only while the :func:`open_source`
context is open. Every member is checked before anything is written: links, devices, absolute paths,
``..`` components, too many members or too many bytes are refused; the standard library's ``data``
extraction filter guards a tar's extraction, and a zip's members are written one by one, each cut off
at its checked size.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import itertools
import os
import queue
import re
import shutil
import stat
import tarfile
import tempfile
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, BinaryIO

from converter.errors import SourceError, UnsafeArchiveError
from converter.hashing import file_sha256

if TYPE_CHECKING:
    import zipfile

__all__ = ["CheckpointSource", "open_source", "DEFAULT_MAX_EXTRACT_BYTES", "DEFAULT_MAX_MEMBERS"]

DEFAULT_MAX_EXTRACT_BYTES = 2 << 30  # the largest zoo tarball unpacks to well under 100 MB
DEFAULT_MAX_MEMBERS = 10_000  # zoo tarballs hold about 7 files

_TAR_SUFFIXES = (".tgz", ".tar.gz", ".tar")
_ZIP_SUFFIX = ".zip"
DATA_SHARD = re.compile(r"\.data-\d{5}-of-\d{5}$")
SEARCH_LEVELS = 2  # zoo DeepLab tarballs put the checkpoint one folder down
_GZIP_MAGIC = b"\x1f\x8b"
_GZIP_WBITS = zlib.MAX_WBITS | 16  # a gzip header and trailer around the deflate stream
_CHUNK = 1 << 20
# An archive's tar stream is held in memory up to this size (the zoo's are under 100 MB), in a private file beyond.
_SPOOL_BYTES = 256 << 20
# Room for tar headers and padding on top of the member bytes when capping a decompressed stream.
_TAR_OVERHEAD_PER_MEMBER = 4096
SKIPPED_NAMES = ("__MACOSX",)  # macOS resource forks in tarballs; hidden names are skipped too
_PASS_INSTEAD = (
    "pass a checkpoint prefix (e.g. .../mobilenet_v2_1.0_224.ckpt), its .index file, a folder holding "
    "exactly one checkpoint, or a zoo .tgz"
)


@dataclass(frozen=True)
class CheckpointSource:
    """A located checkpoint and the files that come with it.

    When the origin is an archive, every path except ``origin`` and ``archive`` lies in a temporary
    folder that is deleted when the :func:`open_source` context exits.
    """

    origin: Path  # what the user passed
    prefix: Path  # checkpoint prefix (path without .index)
    files: tuple[Path, ...]  # .index + .data-* shards (for provenance hashing)
    meta_graph: Path | None  # <prefix>.meta if present
    frozen_graph: Path | None  # a *frozen*.pb next to the checkpoint if present
    archive: Path | None  # the .tgz/.tar.gz/.tar if the origin was an archive


@contextmanager
def open_source(
    path: str | os.PathLike[str],
    *,
    max_extract_bytes: int = DEFAULT_MAX_EXTRACT_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> Iterator[CheckpointSource]:
    """Find the single checkpoint at ``path``, unpacking it first if it is an archive.

    Raises :class:`~converter.errors.SourceError` when nothing or more than one checkpoint is found, and
    :class:`~converter.errors.UnsafeArchiveError` for archives that are refused.
    """
    origin = Path(path)
    if is_archive(origin):
        with extracted(origin, max_extract_bytes, max_members) as unpacked:
            yield locate_checkpoint(unpacked.folder, archive=origin)
    else:
        yield locate_checkpoint(origin)


def locate_checkpoint(path: Path, archive: Path | None = None) -> CheckpointSource:
    """The one checkpoint at `path`; `archive` is what `path` was unpacked from (named in messages)."""
    if archive is not None:
        prefix = _single_checkpoint_in(path, f"archive {archive}", example_prefixes=False)
        return describe_checkpoint(archive, prefix, archive=archive)
    return describe_checkpoint(path, locate_prefix(path), archive=None)


def is_archive(path: Path) -> bool:
    """A .tgz / .tar.gz / .tar file (the zoo's and Kaggle's archives) or a .zip (Teachable Machine's)."""
    return path.is_file() and path.name.lower().endswith((*_TAR_SUFFIXES, _ZIP_SUFFIX))


# ---------------------------------------------------------------------------------------------------
# Finding the checkpoint
# ---------------------------------------------------------------------------------------------------


def locate_prefix(origin: Path) -> Path:
    """The checkpoint prefix for a prefix, an .index or .data-* path, or a folder."""
    if origin.is_dir():
        return _single_checkpoint_in(origin, f"folder {origin}", example_prefixes=True)
    if origin.is_file():
        if origin.name.endswith(".index"):
            return origin.with_name(origin.name[: -len(".index")])
        shard = DATA_SHARD.search(origin.name)
        if shard:
            return origin.with_name(origin.name[: shard.start()])
    if _index_of(origin).is_file():
        return origin
    if origin.exists():
        raise SourceError(f"{origin} is neither a checkpoint, a folder nor a .tgz/.tar archive; {_PASS_INSTEAD}")
    raise SourceError(f"{origin} does not exist (nor does {_index_of(origin).name}); {_PASS_INSTEAD}")


def _index_of(prefix: Path) -> Path:
    return prefix.with_name(f"{prefix.name}.index")


def _single_checkpoint_in(folder: Path, described: str, *, example_prefixes: bool) -> Path:
    """The prefix of the one checkpoint found in ``folder`` (searched ``SEARCH_LEVELS`` deep)."""
    found = find_index_files(folder, SEARCH_LEVELS)
    if len(found) == 1:
        return found[0].with_name(found[0].name[: -len(".index")])
    if not found:
        raise SourceError(
            f"no checkpoint (*.index file) in {described} or its subfolders up to {SEARCH_LEVELS} levels "
            f"deep; {_PASS_INSTEAD}"
        )
    listing = ", ".join(str(index.relative_to(folder)) for index in found)
    if example_prefixes:
        advice = f"pass one checkpoint prefix instead, e.g. {str(found[0])[: -len('.index')]}"
    else:
        advice = "extract it and pass one checkpoint prefix instead"
    raise SourceError(f"{described} holds {len(found)} checkpoints ({listing}); {advice}")


def find_index_files(folder: Path, levels: int) -> list[Path]:
    return [path for path in files_under(folder, levels) if path.name.endswith(".index")]


def files_under(folder: Path, levels: int) -> list[Path]:
    """Every file in `folder` and its subfolders up to `levels` deep, in sorted order, hidden names and
    macOS resource forks left out."""
    try:
        entries = sorted(folder.iterdir())
    except OSError as err:
        raise SourceError(f"cannot list {folder}: {err.strerror}") from None
    found: list[Path] = []
    for entry in entries:
        if entry.name.startswith(".") or entry.name in SKIPPED_NAMES:
            continue
        if entry.is_dir():
            if levels > 0:
                found.extend(files_under(entry, levels - 1))
        elif entry.is_file():
            found.append(entry)
    return found


def describe_checkpoint(origin: Path, prefix: Path, archive: Path | None) -> CheckpointSource:
    index = _index_of(prefix)
    if not index.is_file():
        raise SourceError(f"{origin}: the checkpoint index {index} is missing; {_PASS_INSTEAD}")
    return CheckpointSource(
        origin=origin,
        prefix=prefix,
        files=(index, *_data_shards(prefix)),
        meta_graph=_existing_file(prefix.with_name(f"{prefix.name}.meta")),
        frozen_graph=_find_frozen_graph(prefix),
        archive=archive,
    )


def _data_shards(prefix: Path) -> list[Path]:
    pattern = re.compile(re.escape(prefix.name) + DATA_SHARD.pattern)
    try:
        return sorted(path for path in prefix.parent.iterdir() if pattern.fullmatch(path.name))
    except OSError as err:
        raise SourceError(f"cannot list {prefix.parent}: {err.strerror}") from None


def _existing_file(path: Path) -> Path | None:
    return path if path.is_file() else None


def _find_frozen_graph(prefix: Path) -> Path | None:
    """The frozen graph shipped next to the checkpoint: the zoo's names first, else a lone *frozen*.pb."""
    stem = prefix.name.removesuffix(".ckpt")
    for name in (f"{stem}_frozen.pb", "frozen_inference_graph.pb"):
        candidate = _existing_file(prefix.with_name(name))
        if candidate:
            return candidate
    try:
        others = [
            path
            for path in sorted(prefix.parent.iterdir())
            if path.suffix == ".pb" and "frozen" in path.name and path.is_file()
        ]
    except OSError:
        return None
    return others[0] if len(others) == 1 else None  # several: ambiguous, so none


# ---------------------------------------------------------------------------------------------------
# Archives
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unpacked:
    """An archive unpacked into a private temporary folder, with the sha256 of the archive's own bytes,
    computed while they were read (provenance then needs no second pass over them)."""

    folder: Path
    sha256: str


@contextmanager
def extracted(archive: Path, max_bytes: int, max_members: int) -> Iterator[Unpacked]:
    """Unpack ``archive`` into a private temporary folder, removed on exit whatever happens."""
    if not hasattr(tarfile, "data_filter"):
        raise SourceError(
            "this Python has no tarfile extraction filters (needs 3.10.12+ or 3.11.4+); extract "
            f"{archive} yourself and pass the folder"
        )
    try:
        workdir = Path(tempfile.mkdtemp(prefix="mobilenet-convert-"))
    except OSError as err:
        raise SourceError(f"cannot create a temporary folder to unpack {archive}: {err}") from None
    try:
        destination = workdir / "extracted"
        destination.mkdir()
        if archive.name.lower().endswith(_ZIP_SUFFIX):
            # zipfile seeks to the central directory at the end: the zip is hashed in a pass of its own.
            _extract_zip(archive, destination, max_bytes, max_members)
            yield Unpacked(destination, file_sha256(archive))
            return
        limit = max_bytes + max_members * _TAR_OVERHEAD_PER_MEMBER + _CHUNK
        stream, digest = _tar_stream(archive, workdir, limit)
        with stream:
            _extract_checked(archive, stream, destination, max_bytes, max_members)
        yield Unpacked(destination, digest)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _tar_stream(archive: Path, workdir: Path, limit: int) -> tuple[BinaryIO, str]:
    """The archive's tar stream (inflated when it is gzipped, its CRC and length checked), at most `limit`
    bytes, held in memory up to `_SPOOL_BYTES` and beyond that in a private file in `workdir`; and the
    sha256 of the archive's own bytes. One pass over the file."""
    digest = _BackgroundSha256()
    chunks: list[bytes] = []
    held = 0
    spill: BinaryIO | None = None
    try:
        with archive.open("rb") as file:
            head = file.read(len(_GZIP_MAGIC))
            file.seek(0)
            blocks = _blocks(file, digest)
            for chunk in _gunzipped(blocks, archive) if head == _GZIP_MAGIC else blocks:
                held += len(chunk)
                if held > limit:
                    raise UnsafeArchiveError(
                        f"{archive} decompresses to more than {limit} bytes; refusing it (raise "
                        "max_extract_bytes if it is genuine)"
                    )
                if spill is None and held > _SPOOL_BYTES:
                    spill = tempfile.TemporaryFile(dir=workdir)
                    spill.writelines(chunks)
                    chunks.clear()
                if spill is None:
                    chunks.append(chunk)
                else:
                    spill.write(chunk)
    except BaseException as err:
        digest.hexdigest()  # ends its thread
        if spill is not None:
            spill.close()
        if isinstance(err, OSError):
            raise SourceError(f"cannot read {archive} or unpack it into {workdir}: {err.strerror or err}") from None
        raise
    if spill is None:
        return _ChunkFile(chunks), digest.hexdigest()
    spill.seek(0)
    return spill, digest.hexdigest()


class _ChunkFile(io.RawIOBase):
    """A read-only, seekable file over a list of byte strings: the inflated tar stream, held without
    joining it into one more copy."""

    def __init__(self, chunks: list[bytes]) -> None:
        super().__init__()
        self._chunks = chunks
        self._starts = list(itertools.accumulate(map(len, chunks), initial=0))
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._starts[-1]}[whence]
        self._position = max(0, base + offset)
        return self._position

    def read(self, size: int | None = -1) -> bytes:
        end = self._starts[-1] if size is None or size < 0 else min(self._position + size, self._starts[-1])
        parts = []
        while self._position < end:
            index = bisect.bisect_right(self._starts, self._position) - 1
            start = self._position - self._starts[index]
            part = self._chunks[index][start : start + end - self._position]
            parts.append(part)
            self._position += len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)


def _blocks(file: BinaryIO, digest: _BackgroundSha256) -> Iterator[bytes]:
    while block := file.read(_CHUNK):
        digest.update(block)
        yield block


class _BackgroundSha256:
    """The sha256 of the blocks passed to `update`, computed on a thread of its own: hashlib releases the
    GIL, as zlib does, so hashing an archive overlaps inflating it."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._blocks: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (block := self._blocks.get()) is not None:
            self._digest.update(block)

    def update(self, block: bytes) -> None:
        self._blocks.put(block)

    def hexdigest(self) -> str:
        """The digest of every block passed so far; no block may follow."""
        if self._thread.is_alive():
            self._blocks.put(None)
            self._thread.join()
        return self._digest.hexdigest()


def _gunzipped(blocks: Iterator[bytes], archive: Path) -> Iterator[bytes]:
    """The inflated data of a gzip stream: one member or several, zero padding between them allowed (as
    gzip itself reads them). zlib checks each member's CRC and length; each step yields at most `_CHUNK`
    bytes, so a decompression bomb is cut off while streaming."""
    inflater: zlib._Decompress | None = zlib.decompressobj(_GZIP_WBITS)
    try:
        for block in blocks:
            if inflater is None:  # between members
                block = block.lstrip(b"\0")
                if not block:
                    continue
                inflater = zlib.decompressobj(_GZIP_WBITS)
            while True:
                chunk = inflater.decompress(block, _CHUNK)
                if chunk:
                    yield chunk
                block = inflater.unconsumed_tail
                if inflater.eof:
                    block, inflater = inflater.unused_data.lstrip(b"\0"), None
                    if not block:
                        break
                    inflater = zlib.decompressobj(_GZIP_WBITS)
                elif not block and len(chunk) < _CHUNK:
                    break
    except zlib.error as err:
        raise SourceError(f"{archive} is not a valid gzip file (truncated or corrupted?): {err}") from None
    if inflater is not None and not inflater.eof:
        raise SourceError(f"{archive} is not a valid gzip file (truncated or corrupted?): it ends mid-stream")


def _extract_checked(archive: Path, stream: BinaryIO, destination: Path, max_bytes: int, max_members: int) -> None:
    try:
        with tarfile.open(fileobj=stream, mode="r:", copybufsize=_CHUNK) as tar:
            members = _checked_members(tar, archive, max_bytes, max_members)
            _check_nothing_after_members(stream, members, archive)
            tar.extractall(destination, members=members, filter="data")
    except tarfile.FilterError as err:  # our checks should have caught it first; belt and braces
        raise UnsafeArchiveError(f"{archive}: refused by the extraction filter: {err}") from None
    except (tarfile.TarError, EOFError, ValueError, UnicodeError) as err:
        raise SourceError(f"{archive} is not a readable tar archive (truncated or corrupted?): {err}") from None
    except OSError as err:  # the tar stream is in memory or a private file by now, so this is the disk
        raise SourceError(f"cannot extract {archive} into {destination}: {err}") from None


def _checked_members(tar: tarfile.TarFile, archive: Path, max_bytes: int, max_members: int) -> list[tarfile.TarInfo]:
    """All members, each vetted; caps are enforced while reading headers, before extracting anything."""
    members: list[tarfile.TarInfo] = []
    total_bytes = 0
    for member in tar:  # iterating reads headers lazily, so a huge member list stops at the cap
        if len(members) >= max_members:
            raise UnsafeArchiveError(f"{archive} has more than {max_members} members; refusing it")
        _check_member(archive, member)
        total_bytes += member.size
        if total_bytes > max_bytes:
            raise UnsafeArchiveError(
                f"{archive} would extract to more than {max_bytes} bytes; refusing it (raise "
                "max_extract_bytes if it is genuine)"
            )
        members.append(member)
    return members


def _check_nothing_after_members(stream: BinaryIO, members: list[tarfile.TarInfo], archive: Path) -> None:
    """Only zero padding may follow the last member.

    tarfile ends an archive quietly at the first damaged header after the first one, so without this
    check a corrupted archive could look like a shorter, valid one.
    """
    end = max((member.offset_data + _padded(member.size) for member in members), default=0)
    stream.seek(end)
    while chunk := stream.read(_CHUNK):
        if chunk.count(0) != len(chunk):
            raise SourceError(
                f"{archive} has unreadable data after byte {end} of its tar stream (a damaged member "
                "header?): the archive is corrupted; re-download it"
            )


def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    name = member.name
    if member.issym() or member.islnk():
        kind = "symbolic" if member.issym() else "hard"
        raise UnsafeArchiveError(f"{archive}: member {name!r} is a {kind} link to {member.linkname!r}; refused")
    if not (member.isreg() or member.isdir()):
        raise UnsafeArchiveError(f"{archive}: member {name!r} is a device, FIFO or other special file; refused")
    _check_member_name(archive, name)
    if member.size < 0:
        raise SourceError(f"{archive}: member {name!r} declares a negative size (corrupted archive?)")


def _check_member_name(archive: Path, name: str) -> PurePosixPath:
    """The member's path inside the extraction folder; absolute paths and ``..`` components are refused."""
    portable = name.replace("\\", "/")
    if portable.startswith("/") or re.match(r"[A-Za-z]:", portable):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path; refused")
    if ".." in PurePosixPath(portable).parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} would escape the extraction folder; refused")
    return PurePosixPath(portable)


def _extract_zip(archive: Path, destination: Path, max_bytes: int, max_members: int) -> None:
    """Every member checked first (names, kinds, the declared sizes against the caps), then each file
    written on its own, cut off at its declared size (zipfile stops there and checks the CRC)."""
    import zipfile  # here, not at the top: it imports bz2 and lzma, which a conversion of a .tgz never needs

    # What zipfile raises on a damaged archive (its own errors and those of the decoders below it).
    damaged = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError, RuntimeError,
               zlib.error)  # fmt: skip
    try:
        with zipfile.ZipFile(archive) as zipped:
            members = _checked_zip_members(zipped, archive, max_bytes, max_members)
            for member, relative in members:
                target = destination.joinpath(*relative.parts)
                if member.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zipped.open(member) as source, target.open("xb") as sink:
                    shutil.copyfileobj(source, sink, _CHUNK)
    except damaged as err:
        raise SourceError(f"{archive} is not a readable zip archive (truncated or corrupted?): {err}") from None
    except OSError as err:
        raise SourceError(f"cannot extract {archive} into {destination}: {err}") from None


def _checked_zip_members(
    zipped: zipfile.ZipFile, archive: Path, max_bytes: int, max_members: int
) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    members = zipped.infolist()
    if len(members) > max_members:
        raise UnsafeArchiveError(f"{archive} has more than {max_members} members; refusing it")
    checked, total_bytes, seen = [], 0, set()
    for member in members:
        kind = stat.S_IFMT(member.external_attr >> 16)  # the Unix file type, where the writer recorded one
        if kind == stat.S_IFLNK:
            raise UnsafeArchiveError(f"{archive}: member {member.filename!r} is a symbolic link; refused")
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise UnsafeArchiveError(
                f"{archive}: member {member.filename!r} is a device, FIFO or other special file; refused"
            )
        relative = _check_member_name(archive, member.filename)
        if not member.is_dir() and relative in seen:
            raise UnsafeArchiveError(f"{archive}: member {member.filename!r} appears twice; refused")
        seen.add(relative)
        total_bytes += member.file_size
        if total_bytes > max_bytes:
            raise UnsafeArchiveError(
                f"{archive} would extract to more than {max_bytes} bytes; refusing it (raise "
                "max_extract_bytes if it is genuine)"
            )
        checked.append((member, relative))
    return checked
