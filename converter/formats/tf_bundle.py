"""Read TensorFlow "V2" checkpoints (tensor bundles) with numpy alone.

A V2 checkpoint is a prefix with two kinds of files next to it:

* ``<prefix>.index``: a LevelDB-format sorted table. The empty key holds a ``BundleHeaderProto``; every
  other key is a tensor name whose value is a serialized ``BundleEntryProto`` (dtype, shape, shard,
  offset, size, masked crc32c).
* ``<prefix>.data-NNNNN-of-MMMMM``: the raw little-endian tensor bytes, at the recorded offsets.

Everything read from disk is treated as hostile: each length, offset and shape is checked against the
file sizes before it is used, every table block and every tensor is checksummed, and all problems are
raised as :class:`~converter.errors.CheckpointFormatError` (or its subclasses) naming the file or tensor.
TensorFlow is never imported here.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from types import TracebackType

import google_crc32c
import numpy as np

from converter.errors import CheckpointFormatError, ChecksumError, SourceError, UnsupportedDTypeError
from converter.formats import protobuf

__all__ = ["TensorBundle", "TensorInfo", "masked_crc32c", "read_checkpoint"]

# LevelDB table layout (table_format.md): blocks, each followed by a 5-byte trailer (compression type +
# masked crc32c), then a 48-byte footer holding two block handles and the magic number.
_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48
_FOOTER_HANDLES_SIZE = 40
_BLOCK_TRAILER_SIZE = 5
_NO_COMPRESSION = 0

# Sanity limits: far above any real checkpoint, low enough that hostile values fail before allocating.
_MAX_INDEX_BYTES = 1 << 30
_MAX_SHARDS = 100_000
_MAX_RANK = 254  # TensorFlow's own limit on TensorShape rank
# Prefix compression lets each key reuse the previous one, so a hostile block could make decoding
# quadratic; real blocks expand by a small factor at most (names share prefixes of tens of bytes).
_MAX_KEY_EXPANSION = 64

# tensor_bundle.proto: the reader version we implement and the endianness enum.
_BUNDLE_CONSUMER_VERSION = 1
_LITTLE_ENDIAN, _BIG_ENDIAN = 0, 1

# Slice entries of partitioned variables have keys made by EncodeTensorNameSlice, which start with a
# zero byte; they are not tensors of their own.
_SLICE_KEY_PREFIX = b"\x00"

_CRC_MASK_DELTA = 0xA282EAD8

# tensorflow/core/framework/types.proto DataType -> little-endian numpy dtype.
_NUMPY_DTYPES: dict[int, str] = {
    1: "<f4",  # DT_FLOAT
    2: "<f8",  # DT_DOUBLE
    3: "<i4",  # DT_INT32
    4: "u1",  # DT_UINT8
    5: "<i2",  # DT_INT16
    6: "i1",  # DT_INT8
    8: "<c8",  # DT_COMPLEX64
    9: "<i8",  # DT_INT64
    10: "?",  # DT_BOOL (one byte per element, like numpy)
    17: "<u2",  # DT_UINT16
    18: "<c16",  # DT_COMPLEX128
    19: "<f2",  # DT_HALF
    22: "<u4",  # DT_UINT32
    23: "<u8",  # DT_UINT64
}
_DT_BFLOAT16 = 14
_DT_STRING = 7
_UNSUPPORTED_DTYPE_NAMES: dict[int, str] = {
    0: "invalid",
    7: "string",
    11: "qint8",
    12: "quint8",
    13: "qint32",
    15: "qint16",
    16: "quint16",
    20: "resource",
    21: "variant",
}


class _Corrupt(protobuf.MalformedMessage):
    """Internal: a structural problem, re-raised with the file name by :class:`TensorBundle`."""


class _BadChecksum(ChecksumError):
    """Internal: a block checksum mismatch, re-raised with the file name by :class:`TensorBundle`."""


def masked_crc32c(data: bytes | bytearray | memoryview | np.ndarray) -> int:
    """CRC-32C of ``data`` masked the way TensorFlow and LevelDB store it.

    The mask (rotate right by 15 bits, add a constant) keeps a CRC of data that itself contains CRCs from
    being trivially predictable.
    """
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------------
# Bundle messages (tensor_bundle.proto, tensor_shape.proto, versions.proto)
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Header:
    num_shards: int
    endianness: int
    min_consumer: int
    bad_consumers: tuple[int, ...]


@dataclass(frozen=True)
class _Entry:
    dtype_code: int
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc32c: int
    sliced: bool


def _parse_header(buf: bytes) -> _Header:
    num_shards = endianness = min_consumer = 0
    bad_consumers: list[int] = []
    for field, wire, value in protobuf.fields(buf):
        if field == 1:
            num_shards = protobuf.expect_int(wire, value, "header num_shards")
        elif field == 2:
            endianness = protobuf.expect_int(wire, value, "header endianness")
        elif field == 3:
            min_consumer, bad_consumers = _parse_version(protobuf.expect_bytes(wire, value, "header version"))
    return _Header(num_shards, endianness, min_consumer, tuple(bad_consumers))


def _parse_version(buf: bytes) -> tuple[int, list[int]]:
    """Return ``(min_consumer, bad_consumers)`` of a ``VersionDef``."""
    min_consumer = 0
    bad_consumers: list[int] = []
    for field, wire, value in protobuf.fields(buf):
        if field == 2:
            min_consumer = protobuf.expect_int(wire, value, "version min_consumer")
        elif field == 3 and wire == protobuf.LENGTH_DELIMITED:  # packed repeated int32
            assert isinstance(value, bytes)
            pos = 0
            while pos < len(value):
                consumer, pos = protobuf.read_varint(value, pos, len(value))
                bad_consumers.append(protobuf.signed64(consumer))
        elif field == 3:
            bad_consumers.append(protobuf.expect_int(wire, value, "version bad_consumers"))
    return min_consumer, bad_consumers


def _parse_shape(buf: bytes) -> tuple[int, ...]:
    dims: list[int] = []
    for field, wire, value in protobuf.fields(buf):
        if field == 2:
            dims.append(_parse_dim(protobuf.expect_bytes(wire, value, "shape dim")))
            if len(dims) > _MAX_RANK:
                raise _Corrupt(f"shape has more than {_MAX_RANK} dimensions")
        elif field == 3 and protobuf.expect_int(wire, value, "shape unknown_rank"):
            raise _Corrupt("shape has unknown rank")
    return tuple(dims)


def _parse_dim(buf: bytes) -> int:
    size = 0
    for field, wire, value in protobuf.fields(buf):
        if field == 1:
            size = protobuf.expect_int(wire, value, "dimension size")
    if size < 0:
        raise _Corrupt(f"dimension of size {size}")
    return size


def _parse_entry(buf: bytes) -> _Entry:
    dtype_code = shard = offset = size = crc = 0
    shape: tuple[int, ...] = ()
    sliced = False
    for field, wire, value in protobuf.fields(buf):
        if field == 1:
            dtype_code = protobuf.expect_int(wire, value, "dtype")
        elif field == 2:
            shape = _parse_shape(protobuf.expect_bytes(wire, value, "shape"))
        elif field == 3:
            shard = protobuf.expect_int(wire, value, "shard_id")
        elif field == 4:
            offset = protobuf.expect_int(wire, value, "offset")
        elif field == 5:
            size = protobuf.expect_int(wire, value, "size")
        elif field == 6:
            crc = protobuf.expect(wire, value, protobuf.FIXED32, "crc32c")
            assert isinstance(crc, int)
        elif field == 7:
            sliced = True
    return _Entry(dtype_code, shape, shard, offset, size, crc, sliced)


# ---------------------------------------------------------------------------------------------------
# LevelDB sorted table
# ---------------------------------------------------------------------------------------------------


def _read_handle(buf: bytes, pos: int, end: int) -> tuple[tuple[int, int], int]:
    """Decode a BlockHandle (offset, size); return ``((offset, size), next_pos)``."""
    offset, pos = protobuf.read_varint(buf, pos, end)
    size, pos = protobuf.read_varint(buf, pos, end)
    return (offset, size), pos


def _read_block(table: bytes, handle: tuple[int, int], blocks_end: int, what: str) -> bytes:
    """Return the contents of the block at ``handle`` after checking its bounds, checksum and type."""
    offset, size = handle
    contents_end = offset + size
    if contents_end + _BLOCK_TRAILER_SIZE > blocks_end:
        raise _Corrupt(f"{what} block [{offset}, {contents_end}) lies outside the table")
    stored_crc = int.from_bytes(table[contents_end + 1 : contents_end + _BLOCK_TRAILER_SIZE], "little")
    # The checksum covers the contents and the compression-type byte.
    if masked_crc32c(table[offset : contents_end + 1]) != stored_crc:
        raise _BadChecksum(f"checksum mismatch in the {what} block at offset {offset}")
    compression = table[contents_end]
    if compression != _NO_COMPRESSION:
        raise _Corrupt(f"{what} block at offset {offset} uses compression type {compression}, unsupported")
    return table[offset:contents_end]


def _block_entries(block: bytes, what: str) -> list[tuple[bytes, bytes]]:
    """Decode a block's prefix-compressed ``(key, value)`` entries and check its restart array."""
    if len(block) < 4:
        raise _Corrupt(f"{what} block of {len(block)} bytes has no restart count")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    if num_restarts == 0 or num_restarts > (len(block) - 4) // 4:
        raise _Corrupt(f"{what} block has an impossible restart count {num_restarts}")
    entries_end = len(block) - 4 - 4 * num_restarts
    restarts = struct.unpack_from(f"<{num_restarts}I", block, entries_end)

    entries: list[tuple[bytes, bytes]] = []
    full_key_offsets: set[int] = set()  # entries that store their whole key: valid restart points
    key = b""
    key_bytes_left = _MAX_KEY_EXPANSION * len(block) + 4096
    pos = 0
    while pos < entries_end:
        entry_start = pos
        shared, pos = protobuf.read_varint32(block, pos, entries_end)
        unshared, pos = protobuf.read_varint32(block, pos, entries_end)
        value_length, pos = protobuf.read_varint32(block, pos, entries_end)
        if shared > len(key) or unshared + value_length > entries_end - pos:
            raise _Corrupt(f"{what} block entry at offset {entry_start} runs past its block")
        key_bytes_left -= shared + unshared
        if key_bytes_left < 0:
            raise _Corrupt(f"{what} block keys expand implausibly (over {_MAX_KEY_EXPANSION}x the block size)")
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        entries.append((key, block[pos : pos + value_length]))
        pos += value_length
        if shared == 0:
            full_key_offsets.add(entry_start)

    empty_block = not entries and restarts == (0,)
    if not empty_block and (restarts[0] != 0 or not full_key_offsets.issuperset(restarts)):
        raise _Corrupt(f"{what} block has an invalid restart array")
    if any(later <= earlier for earlier, later in pairwise(restarts)):
        raise _Corrupt(f"{what} block restart offsets are not increasing")
    return entries


def _short(key: bytes, limit: int = 80) -> str:
    """A key for an error message: hostile keys can be megabytes long."""
    return repr(key[:limit]) + ("..." if len(key) > limit else "")


def _read_table(table: bytes) -> list[tuple[bytes, bytes]]:
    """Return every ``(key, value)`` of a LevelDB table in order, all block checksums verified."""
    if len(table) < _FOOTER_SIZE:
        raise _Corrupt(f"{len(table)} bytes is too short to be a checkpoint index")
    footer = len(table) - _FOOTER_SIZE
    if int.from_bytes(table[-8:], "little") != _TABLE_MAGIC:
        raise _Corrupt("no table magic number at its end (truncated?)")
    handles_end = footer + _FOOTER_HANDLES_SIZE
    metaindex_handle, pos = _read_handle(table, footer, handles_end)
    index_handle, _ = _read_handle(table, pos, handles_end)
    # TensorFlow writes no filter blocks, so the metaindex is only checked, never used.
    _block_entries(_read_block(table, metaindex_handle, footer, "metaindex"), "metaindex")
    index = _block_entries(_read_block(table, index_handle, footer, "index"), "index")

    entries: list[tuple[bytes, bytes]] = []
    previous_separator: bytes | None = None
    for separator, handle_bytes in index:
        handle, _ = _read_handle(handle_bytes, 0, len(handle_bytes))
        block = _block_entries(_read_block(table, handle, footer, "data"), "data")
        # An index key separates its block from the next: previous separator < first key <= last key
        # <= separator. With the check below this makes all keys strictly increasing.
        if not block or block[-1][0] > separator:
            raise _Corrupt("index block does not match its data blocks")
        if previous_separator is not None and block[0][0] <= previous_separator:
            raise _Corrupt("data blocks are out of order")
        previous_separator = separator
        entries.extend(block)
    for (earlier, _), (later, _) in pairwise(entries):
        if later <= earlier:
            raise _Corrupt(f"keys are not strictly increasing ({_short(later)} after {_short(earlier)})")
    return entries


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """Where and how one tensor is stored in a bundle."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc32c: int  # masked, as stored in the index


def _numpy_dtype(name: str, entry: _Entry) -> np.dtype:
    """The little-endian numpy dtype of a stored tensor, or UnsupportedDTypeError naming it."""
    if entry.sliced:
        raise UnsupportedDTypeError(
            f"tensor {name!r} is a partitioned variable (saved in slices), which this reader does not "
            "support; re-save the checkpoint with unpartitioned variables"
        )
    code = entry.dtype_code
    if code in _NUMPY_DTYPES:
        return np.dtype(_NUMPY_DTYPES[code])
    if code == _DT_BFLOAT16:
        try:  # numpy has no bfloat16; ml_dtypes (if installed) registers one
            import ml_dtypes
        except ImportError:
            raise UnsupportedDTypeError(
                f"tensor {name!r} is bfloat16, which numpy cannot represent; install ml_dtypes"
            ) from None
        return np.dtype(ml_dtypes.bfloat16)
    kind = _UNSUPPORTED_DTYPE_NAMES.get(code, f"enum value {code}")
    raise UnsupportedDTypeError(f"tensor {name!r} has dtype {kind}, which this reader does not support")


def _shard_path(prefix: str, shard: int, num_shards: int) -> Path:
    return Path(f"{prefix}.data-{shard:05d}-of-{num_shards:05d}")


def _read_index_file(path: Path) -> bytes:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise SourceError(f"no checkpoint index {path}; pass the checkpoint prefix (the path without .index)") from None
    except OSError as err:
        raise CheckpointFormatError(f"cannot read {path}: {err.strerror}") from None
    if size > _MAX_INDEX_BYTES:
        raise CheckpointFormatError(f"{path} is {size} bytes, too large for a checkpoint index")
    try:
        return path.read_bytes()
    except OSError as err:
        raise CheckpointFormatError(f"cannot read {path}: {err.strerror}") from None


class TensorBundle:
    """A TensorFlow V2 checkpoint opened for reading.

    Opening parses and validates the whole ``.index`` and checks that every data shard exists and is
    large enough for the tensors it should hold. Tensors are then read on demand from a read-only
    memory map of their shard (mapped once, on first use), so :meth:`read` copies nothing. Arrays
    returned by :meth:`read` stay valid after :meth:`close`: they keep their mapping alive themselves.

    Use it as a context manager::

        with TensorBundle("model.ckpt") as bundle:
            weights = bundle.read("MobilenetV2/Conv/weights")
    """

    def __init__(self, prefix: str | os.PathLike[str]) -> None:
        self._prefix = os.fspath(prefix)
        self._index_path = Path(f"{self._prefix}.index")
        header, self._entries = self._load_index(_read_index_file(self._index_path))
        self._check_header(header)
        self._shard_paths = [_shard_path(self._prefix, i, header.num_shards) for i in range(header.num_shards)]
        self._shard_sizes = [self._shard_size(path, header.num_shards) for path in self._shard_paths]
        for name, entry in self._entries.items():
            self._check_entry(name, entry)
        self._shards: dict[int, np.ndarray] = {}
        self._closed = False

    # -- opening ------------------------------------------------------------------------------------

    def _load_index(self, table: bytes) -> tuple[_Header, dict[str, _Entry]]:
        try:
            pairs = _read_table(table)
            if not pairs or pairs[0][0] != b"":
                raise _Corrupt("the bundle header entry (empty key) is missing")
            header = _parse_header(pairs[0][1])
            entries = {
                self._decode_name(key): _parse_entry(value)
                for key, value in pairs[1:]
                if not key.startswith(_SLICE_KEY_PREFIX)
            }
        except _BadChecksum as err:
            raise ChecksumError(
                f"{self._index_path}: {err}: the index file is corrupted; re-download the checkpoint"
            ) from None
        except protobuf.MalformedMessage as err:
            raise CheckpointFormatError(
                f"{self._index_path}: {err}; the file is damaged or not a TensorFlow V2 checkpoint index"
            ) from None
        return header, entries

    @staticmethod
    def _decode_name(key: bytes) -> str:
        try:
            return key.decode("utf-8")
        except UnicodeDecodeError:
            raise _Corrupt(f"tensor name {_short(key)} is not UTF-8") from None

    def _check_header(self, header: _Header) -> None:
        problem = None
        if header.endianness == _BIG_ENDIAN:
            problem = "was written on a big-endian machine; only little-endian checkpoints are supported"
        elif header.endianness != _LITTLE_ENDIAN:
            problem = f"declares an unknown byte order {header.endianness}"
        elif not 1 <= header.num_shards <= _MAX_SHARDS:
            problem = f"declares {header.num_shards} data shards"
        elif header.min_consumer > _BUNDLE_CONSUMER_VERSION:
            problem = f"needs a reader of bundle version {header.min_consumer}; this one reads version 1"
        elif _BUNDLE_CONSUMER_VERSION in header.bad_consumers:
            problem = "declares this reader's bundle version (1) unable to read it"
        if problem:
            raise CheckpointFormatError(f"{self._index_path}: the checkpoint {problem}")

    def _shard_size(self, path: Path, num_shards: int) -> int:
        try:
            return path.stat().st_size
        except FileNotFoundError:
            raise CheckpointFormatError(
                f"data shard {path} is missing (the checkpoint {self._index_path.name} has {num_shards} "
                "shard(s)); copy all .data-* files next to the .index"
            ) from None
        except OSError as err:
            raise CheckpointFormatError(f"cannot read data shard {path}: {err.strerror}") from None

    def _check_entry(self, name: str, entry: _Entry) -> None:
        """Check an entry against its shard before anything is mapped or allocated."""
        if not 0 <= entry.shard < len(self._shard_paths):
            raise CheckpointFormatError(
                f"{self._index_path}: tensor {name!r} is in shard {entry.shard}, but the checkpoint has "
                f"{len(self._shard_paths)}"
            )
        try:
            dtype = _numpy_dtype(name, entry)
        except UnsupportedDTypeError:
            return  # reported only when that tensor is asked for; the others stay readable
        expected_size = math.prod(entry.shape) * dtype.itemsize
        if entry.size != expected_size:
            raise CheckpointFormatError(
                f"{self._index_path}: tensor {name!r} of shape {entry.shape} and dtype {dtype} needs "
                f"{expected_size} bytes, but the index records {entry.size}"
            )
        shard_size = self._shard_sizes[entry.shard]
        if entry.offset < 0 or entry.offset + entry.size > shard_size:
            raise CheckpointFormatError(
                f"{self._index_path}: tensor {name!r} lies at bytes [{entry.offset}, "
                f"{entry.offset + entry.size}) of {self._shard_paths[entry.shard].name}, which has only "
                f"{shard_size} bytes (truncated data file?)"
            )

    # -- reading ------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """All tensor names, sorted."""
        return sorted(self._entries)

    def info(self, name: str) -> TensorInfo:
        """Dtype, shape and location of tensor ``name`` (KeyError if absent)."""
        entry = self._entry(name)
        dtype = _numpy_dtype(name, entry)
        return TensorInfo(name, dtype, entry.shape, entry.shard, entry.offset, entry.size, entry.crc32c)

    def read(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a read-only little-endian array, checksum verified.

        The array is a view into the memory-mapped shard (no copy).
        """
        if self._closed:
            raise ValueError("read from a closed TensorBundle")
        info = self.info(name)
        shard = self._shard(info.shard)
        end = info.offset + info.size
        if end > shard.size:  # the file shrank after opening
            raise CheckpointFormatError(
                f"tensor {name!r} lies past the end of {self._shard_paths[info.shard]} (truncated data file?)"
            )
        raw = shard[info.offset : end]
        if masked_crc32c(raw) != info.crc32c:
            raise ChecksumError(
                f"tensor {name!r} in {self._shard_paths[info.shard]}: checksum mismatch, the data file is "
                "corrupted; re-download the checkpoint"
            )
        return np.asarray(raw).view(info.dtype).reshape(info.shape)

    def read_strings(self, name: str) -> list[bytes]:
        """The elements of the string tensor ``name`` (such as a SavedModel's object graph), checksum verified.

        tensor_bundle.cc stores them as a varint64 length per element, a 4-byte CRC-32C of the lengths,
        then the bytes; the entry's masked CRC covers the lengths (each as a little-endian uint32, or
        uint64 past 4 GiB), that checksum and the bytes.
        """
        if self._closed:
            raise ValueError("read from a closed TensorBundle")
        entry = self._entry(name)
        if entry.dtype_code != _DT_STRING:
            raise UnsupportedDTypeError(f"tensor {name!r} is not a string tensor")
        count = math.prod(entry.shape)
        shard = self._shard(entry.shard)
        if entry.offset < 0 or entry.offset + entry.size > shard.size:
            raise CheckpointFormatError(f"string tensor {name!r} lies past the end of {self._shard_paths[entry.shard]}")
        raw = bytes(shard[entry.offset : entry.offset + entry.size])
        lengths, pos = [], 0
        try:
            for _ in range(count):
                length, pos = protobuf.read_varint(raw, pos, len(raw))
                lengths.append(length)
        except protobuf.MalformedMessage as err:
            raise CheckpointFormatError(f"string tensor {name!r}: {err}") from None
        lengths_crc, body = raw[pos : pos + 4], raw[pos + 4 :]
        if len(lengths_crc) != 4 or sum(lengths) != len(body):
            raise CheckpointFormatError(f"string tensor {name!r}: its lengths do not add up to its {len(raw)} bytes")
        as_fixed = b"".join(length.to_bytes(4 if length < 1 << 32 else 8, "little") for length in lengths)
        if masked_crc32c(as_fixed + lengths_crc + body) != entry.crc32c:
            raise ChecksumError(f"string tensor {name!r}: checksum mismatch, the data file is corrupted")
        values = []
        for length in lengths:
            values.append(body[:length])
            body = body[length:]
        return values

    def close(self) -> None:
        """Drop this bundle's references to the shard mappings.

        A mapping is unmapped once the last array read from it is garbage collected.
        """
        self._shards.clear()
        self._closed = True

    def __enter__(self) -> TensorBundle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TensorBundle({self._prefix!r}, {len(self._entries)} tensors)"

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"no tensor named {name!r} in {self._index_path}") from None

    def _shard(self, shard: int) -> np.ndarray:
        """The whole shard as a read-only uint8 array, memory-mapped on first use."""
        if shard not in self._shards:
            self._shards[shard] = self._map_shard(self._shard_paths[shard])
        return self._shards[shard]

    @staticmethod
    def _map_shard(path: Path) -> np.ndarray:
        try:
            if path.stat().st_size == 0:  # mmap cannot map an empty file
                empty = np.empty(0, dtype=np.uint8)
                empty.flags.writeable = False
                return empty
            return np.memmap(path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as err:
            raise CheckpointFormatError(f"cannot map data shard {path}: {err}") from None


def read_checkpoint(prefix: str | os.PathLike[str], *, skip_unsupported: bool = False) -> dict[str, np.ndarray]:
    """Read every tensor of the checkpoint at ``prefix`` into ``{name: array}`` (sorted by name).

    With ``skip_unsupported``, tensors of unsupported dtypes (strings, partitioned variables, ...) are
    left out instead of raising :class:`~converter.errors.UnsupportedDTypeError`.
    """
    tensors: dict[str, np.ndarray] = {}
    with TensorBundle(prefix) as bundle:
        for name in bundle.names():
            try:
                tensors[name] = bundle.read(name)
            except UnsupportedDTypeError:
                if not skip_unsupported:
                    raise
    return tensors
