"""The numpy-only tensor-bundle reader against TensorFlow's own reader, and against hostile files."""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from converter.errors import CheckpointFormatError, ChecksumError, ConverterError, SourceError, UnsupportedDTypeError
from converter.formats.tf_bundle import TensorBundle, masked_crc32c, read_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]

DTYPE_NAMES = [
    "float32",
    "float64",
    "float16",
    "bfloat16",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool",
    "complex64",
    "complex128",
]
SHAPES = [(), (0,), (1,), (3,), (2, 3), (3, 3, 2, 1), (4, 0, 2), (1, 1, 1, 1, 5)]


# ---------------------------------------------------------------------------------------------------
# TensorFlow-written checkpoints (the truth)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return pytest.importorskip("tensorflow")


def _save_v2(tf, prefix: Path, tensors: dict[str, object], slices: dict[str, str] | None = None) -> Path:
    """Write a V2 bundle with TensorFlow's SaveV2 op (what Saver and Checkpoint run underneath)."""
    names = list(tensors)
    tf.raw_ops.SaveV2(
        prefix=str(prefix),
        tensor_names=names,
        shape_and_slices=[(slices or {}).get(name, "") for name in names],
        tensors=[tensors[name] for name in names],
    )
    return prefix


def _varied_tensors(tf, count: int, name_padding: int = 0) -> dict[str, object]:
    """``count`` tensors cycling through every supported dtype and several shapes, scalars included."""
    rng = np.random.default_rng(0)
    tensors = {}
    for i in range(count):
        dtype = DTYPE_NAMES[i % len(DTYPE_NAMES)]
        shape = SHAPES[i % len(SHAPES)]
        values = rng.normal(scale=50.0, size=shape)
        name = f"{i:05d}/{'scope_' * name_padding}{dtype}"
        tensors[name] = tf.cast(tf.constant(values), getattr(tf, dtype))
    return tensors


@pytest.fixture(scope="module")
def many_blocks_ckpt(tf, tmp_path_factory) -> Path:
    """>1000 tensors with long names: the index spans several 256 KiB blocks and many restart points."""
    return _save_v2(tf, tmp_path_factory.mktemp("many") / "model.ckpt", _varied_tensors(tf, 1300, 150))


@pytest.fixture(scope="module")
def small_ckpt(tf, tmp_path_factory) -> Path:
    return _save_v2(tf, tmp_path_factory.mktemp("small") / "small.ckpt", _varied_tensors(tf, 40))


@pytest.fixture(scope="module")
def tiny_ckpt(tf, tmp_path_factory) -> Path:
    return _save_v2(tf, tmp_path_factory.mktemp("tiny") / "tiny.ckpt", _varied_tensors(tf, 8))


def _assert_matches_tensorflow(tf, prefix: Path, tensors: dict[str, np.ndarray]) -> None:
    reader = tf.train.load_checkpoint(str(prefix))
    expected_dtypes = reader.get_variable_to_dtype_map()
    assert sorted(expected_dtypes) == list(tensors)
    for name, dtype in expected_dtypes.items():
        expected = np.asarray(reader.get_tensor(name))
        got = tensors[name]
        assert got.dtype == dtype.as_numpy_dtype, name
        assert got.shape == expected.shape, name
        assert got.tobytes() == expected.tobytes(), name


def _copy_bundle(prefix: Path, destination: Path) -> Path:
    destination.mkdir(parents=True, exist_ok=True)
    for file in prefix.parent.glob(prefix.name + ".*"):
        shutil.copy(file, destination / file.name)
    return destination / prefix.name


def _data_file(prefix: Path) -> Path:
    (path,) = prefix.parent.glob(prefix.name + ".data-*")
    return path


def _index_file(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + ".index")


def _snapshot(prefix: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    return {name: (a.dtype.str, a.shape, a.tobytes()) for name, a in read_checkpoint(prefix).items()}


# ---------------------------------------------------------------------------------------------------
# A minimal bundle writer, for files TensorFlow would never write (checked against TF's reader below)
# ---------------------------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative ints are encoded as 64-bit two's complement
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, value: int | bytes) -> bytes:
    if isinstance(value, bytes):
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    return _varint(number << 3) + _varint(value)


def _header_proto(num_shards: int = 1, endianness: int = 0, min_consumer: int = 0) -> bytes:
    version = _field(1, 1) + (_field(2, min_consumer) if min_consumer else b"")
    return _field(1, num_shards) + (_field(2, endianness) if endianness else b"") + _field(3, version)


TF_DTYPE_CODES = {"float32": 1, "float64": 2, "int32": 3, "uint8": 4, "int64": 9, "bool": 10, "float16": 19}


def _entry_proto(dtype: int, shape: tuple[int, ...], offset: int, size: int, crc: int, shard: int = 0) -> bytes:
    shape_proto = b"".join(_field(2, _field(1, dim)) for dim in shape)
    return (
        _field(1, dtype)
        + _field(2, shape_proto)
        + (_field(3, shard) if shard else b"")
        + (_field(4, offset) if offset else b"")
        + _field(5, size)
        + _varint(6 << 3 | 5)
        + struct.pack("<I", crc)
    )


def _block(entries: list[tuple[bytes, bytes]], restart_interval: int) -> bytes:
    out, restarts, previous = bytearray(), [], b""
    for i, (key, value) in enumerate(entries):
        shared = 0
        if i % restart_interval:
            while shared < min(len(key), len(previous)) and key[shared] == previous[shared]:
                shared += 1
        else:
            restarts.append(len(out))
        out += _varint(shared) + _varint(len(key) - shared) + _varint(len(value)) + key[shared:] + value
        previous = key
    restarts = restarts or [0]
    return bytes(out) + struct.pack(f"<{len(restarts)}I", *restarts) + struct.pack("<I", len(restarts))


def _table(
    entries: list[tuple[bytes, bytes]],
    *,
    per_block: int = 5,
    restart_interval: int = 2,
    compression: int = 0,
    edit_data_block=lambda contents: contents,
) -> bytes:
    """A LevelDB table with small blocks (so a few entries already give many blocks).

    ``edit_data_block`` may alter each data block's contents before its checksum is computed.
    """
    out = bytearray()

    def append_block(contents: bytes) -> bytes:
        handle = _varint(len(out)) + _varint(len(contents))
        trailer = bytes([compression])
        out.extend(contents + trailer + struct.pack("<I", masked_crc32c(contents + trailer)))
        return handle

    index = []
    for start in range(0, len(entries), per_block):
        chunk = entries[start : start + per_block]
        index.append((chunk[-1][0], append_block(edit_data_block(_block(chunk, restart_interval)))))
    metaindex_handle = append_block(_block([], 1))
    index_handle = append_block(_block(index, 1))
    handles = metaindex_handle + index_handle
    return bytes(out) + handles + bytes(40 - len(handles)) + struct.pack("<Q", 0xDB4775248B80FB57)


def _write_bundle(prefix: Path, arrays: dict[str, np.ndarray], **table_options) -> Path:
    """A single-shard bundle holding ``arrays`` (dtypes from TF_DTYPE_CODES)."""
    data, entries = bytearray(), [(b"", _header_proto())]
    for name in sorted(arrays):
        raw = np.ascontiguousarray(arrays[name]).tobytes()
        code = TF_DTYPE_CODES[arrays[name].dtype.name]
        entries.append((name.encode(), _entry_proto(code, arrays[name].shape, len(data), len(raw), masked_crc32c(raw))))
        data += raw
    _write_raw(prefix, _table(entries, **table_options), bytes(data))
    return prefix


def _write_raw(prefix: Path, index: bytes, data: bytes | None, num_shards: int = 1) -> Path:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    _index_file(prefix).write_bytes(index)
    if data is not None:
        prefix.with_name(f"{prefix.name}.data-00000-of-{num_shards:05d}").write_bytes(data)
    return prefix


def _sample_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        f"net/layer_{i:02d}/{kind}": rng.normal(size=(i % 3 + 1, 4)).astype(np.float32)
        for i in range(12)
        for kind in ("weights", "biases")
    } | {"global_step": np.array(30000, dtype=np.int64)}


# ---------------------------------------------------------------------------------------------------
# Agreement with TensorFlow
# ---------------------------------------------------------------------------------------------------


def test_matches_tensorflow_tensor_for_tensor(tf, many_blocks_ckpt):
    assert _index_file(many_blocks_ckpt).stat().st_size > 3 * 262144  # several index blocks
    tensors = read_checkpoint(many_blocks_ckpt)
    assert len(tensors) == 1300
    _assert_matches_tensorflow(tf, many_blocks_ckpt, tensors)


def test_info_describes_the_stored_tensor(tf, small_ckpt):
    with TensorBundle(small_ckpt) as bundle:
        name = bundle.names()[5]
        info = bundle.info(name)
        array = bundle.read(name)
    assert (info.name, info.dtype, info.shape, info.shard) == (name, array.dtype, array.shape, 0)
    assert info.size == array.nbytes
    assert info.crc32c == masked_crc32c(array.tobytes())
    raw = _data_file(small_ckpt).read_bytes()[info.offset : info.offset + info.size]
    assert raw == array.tobytes()


def test_saver_v2_checkpoint_with_global_step_and_ema(tf, tmp_path):
    prefix = tmp_path / "mobilenet_v2_1.0_224.ckpt"
    with tf.Graph().as_default():
        weights = tf.compat.v1.get_variable("MobilenetV2/Conv/weights", initializer=tf.ones([3, 3, 3, 8]))
        tf.compat.v1.get_variable("MobilenetV2/Conv/BatchNorm/moving_mean", initializer=tf.zeros([8]))
        step = tf.compat.v1.train.get_or_create_global_step()
        ema = tf.compat.v1.train.ExponentialMovingAverage(0.999)
        update = ema.apply([weights])
        saver = tf.compat.v1.train.Saver(write_version=tf.compat.v1.train.SaverDef.V2)
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            session.run([update, step.assign(30000)])
            saver.save(session, str(prefix))
    tensors = read_checkpoint(prefix)
    assert tensors["global_step"].shape == () and tensors["global_step"].dtype == np.int64
    assert int(tensors["global_step"]) == 30000
    assert "MobilenetV2/Conv/weights/ExponentialMovingAverage" in tensors
    _assert_matches_tensorflow(tf, prefix, tensors)


def test_multi_shard_bundle(tf, tmp_path):
    first = _save_v2(tf, tmp_path / "a", {"a/w": tf.ones([2, 2]), "z/b": tf.constant([1, 2], tf.int64)})
    second = _save_v2(tf, tmp_path / "b", {"m/w": tf.fill([3], 7.0), "global_step": tf.constant(5, tf.int64)})
    merged = tmp_path / "merged.ckpt"
    tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=[str(first), str(second)], destination_prefix=str(merged))
    with TensorBundle(merged) as bundle:
        assert {bundle.info(name).shard for name in bundle.names()} == {0, 1}
    _assert_matches_tensorflow(tf, merged, read_checkpoint(merged))


def test_strings_and_partitioned_variables_are_unsupported_but_named(tf, tmp_path):
    # "part" is saved as rows 0-1 of a 4x2 variable, the way partitioned variables are saved.
    prefix = _save_v2(
        tf,
        tmp_path / "sliced",
        {"part": tf.ones([2, 2]), "text": tf.constant("hello"), "w": tf.ones([2])},
        slices={"part": "4 2 0,2:-"},
    )
    with TensorBundle(prefix) as bundle:
        assert bundle.names() == sorted(tf.train.load_checkpoint(str(prefix)).get_variable_to_shape_map())
        with pytest.raises(UnsupportedDTypeError, match="'text'.*string"):
            bundle.read("text")
        with pytest.raises(UnsupportedDTypeError, match="'part'.*partitioned"):
            bundle.info("part")
        assert bundle.read("w").tolist() == [1.0, 1.0]
    with pytest.raises(UnsupportedDTypeError):
        read_checkpoint(prefix)
    assert list(read_checkpoint(prefix, skip_unsupported=True)) == ["w"]


def test_object_based_checkpoint(tf, tmp_path):
    checkpoint = tf.train.Checkpoint(kernel=tf.Variable(tf.ones([3, 4])), step=tf.Variable(7, dtype=tf.int64))
    prefix = Path(checkpoint.write(str(tmp_path / "object")))
    tensors = read_checkpoint(prefix, skip_unsupported=True)
    assert "_CHECKPOINTABLE_OBJECT_GRAPH" not in tensors  # a serialized proto stored as DT_STRING
    assert tensors["kernel/.ATTRIBUTES/VARIABLE_VALUE"].shape == (3, 4)
    reader = tf.train.load_checkpoint(str(prefix))
    for name, array in tensors.items():
        assert array.tobytes() == np.asarray(reader.get_tensor(name)).tobytes()


@pytest.mark.parametrize("per_block, restart_interval", [(1, 1), (3, 2), (7, 16), (1000, 16)])
def test_own_writer_round_trips_through_tensorflow(tf, tmp_path, per_block, restart_interval):
    """Validates the test writer used for hostile files: TF reads what it writes, and so do we."""
    prefix = _write_bundle(tmp_path / "own", _sample_arrays(), per_block=per_block, restart_interval=restart_interval)
    tensors = read_checkpoint(prefix)
    _assert_matches_tensorflow(tf, prefix, tensors)
    assert {name: a.tobytes() for name, a in tensors.items()} == {
        name: a.tobytes() for name, a in _sample_arrays().items()
    }


def test_reader_works_without_tensorflow(tf, small_ckpt):
    script = textwrap.dedent(
        """
        import sys

        class NoTensorFlow:
            def find_spec(self, name, path=None, target=None):
                if name == "tensorflow" or name.startswith("tensorflow."):
                    raise ImportError("tensorflow is blocked in this test")

        sys.meta_path.insert(0, NoTensorFlow())
        from converter.formats.tf_bundle import read_checkpoint
        tensors = read_checkpoint(sys.argv[1])
        leaked = [name for name in sys.modules if name.split(".")[0] == "tensorflow"]
        assert not leaked, leaked
        print(len(tensors), sum(int(a.size) for a in tensors.values()))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", script, str(small_ckpt)], capture_output=True, text=True, env=env, cwd=REPO_ROOT
    )
    assert result.returncode == 0, result.stderr
    expected = read_checkpoint(small_ckpt)
    assert result.stdout.split() == [str(len(expected)), str(sum(a.size for a in expected.values()))]


# ---------------------------------------------------------------------------------------------------
# Zero copy, mapping, lifetime
# ---------------------------------------------------------------------------------------------------


def test_arrays_are_read_only_views_that_outlive_close(tmp_path):
    prefix = _write_bundle(tmp_path / "m", _sample_arrays())
    with TensorBundle(prefix) as bundle:
        array = bundle.read("net/layer_01/weights")
    assert not array.flags.writeable and not array.flags.owndata
    np.testing.assert_array_equal(array, _sample_arrays()["net/layer_01/weights"])
    with pytest.raises(ValueError):
        bundle.read("global_step")


def test_each_shard_is_mapped_once(tmp_path, monkeypatch):
    prefix = _write_bundle(tmp_path / "m", _sample_arrays())
    calls = []
    real_memmap = np.memmap

    def counting_memmap(*args, **kwargs):
        calls.append(args)
        return real_memmap(*args, **kwargs)

    monkeypatch.setattr(np, "memmap", counting_memmap)
    assert len(read_checkpoint(prefix)) == len(_sample_arrays())
    assert len(calls) == 1


def test_unknown_name_is_a_key_error(tmp_path):
    with TensorBundle(_write_bundle(tmp_path / "m", _sample_arrays())) as bundle:
        with pytest.raises(KeyError, match="nope"):
            bundle.read("nope")


def test_reading_a_checkpoint_of_mobilenet_size_is_fast(tf, tmp_path):
    """~25 MB in 525 tensors, like mobilenet_v2_1.4_224."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 48_000, size=525)
    sizes = (sizes * (6_300_000 / sizes.sum())).astype(int) + 1
    tensors = {
        f"MobilenetV2/layer_{i:03d}/weights": tf.constant(rng.normal(size=n).astype(np.float32))
        for i, n in enumerate(sizes)
    }
    prefix = _save_v2(tf, tmp_path / "big.ckpt", tensors)
    assert _data_file(prefix).stat().st_size > 24_000_000
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        arrays = read_checkpoint(prefix)
        best = min(best, time.perf_counter() - start)
    assert len(arrays) == 525
    assert best < 0.3, f"reading took {best:.3f} s"


# ---------------------------------------------------------------------------------------------------
# Corrupted and hostile files
# ---------------------------------------------------------------------------------------------------


def test_flipped_data_byte_names_the_tensor(small_ckpt, tmp_path):
    prefix = _copy_bundle(small_ckpt, tmp_path)
    with TensorBundle(prefix) as bundle:
        victim = next(name for name in bundle.names() if bundle.info(name).size > 4)
        position = bundle.info(victim).offset + 2
    data = bytearray(_data_file(prefix).read_bytes())
    data[position] ^= 0x40
    _data_file(prefix).write_bytes(bytes(data))
    with TensorBundle(prefix) as bundle:
        with pytest.raises(ChecksumError, match=repr(victim)):
            bundle.read(victim)
        others = [name for name in bundle.names() if name != victim]
        assert all(bundle.read(name) is not None for name in others)


def test_every_single_byte_flip_in_the_index_is_caught_or_harmless(tiny_ckpt, tmp_path):
    clean = _snapshot(tiny_ckpt)
    prefix = _copy_bundle(tiny_ckpt, tmp_path)
    original = _index_file(tiny_ckpt).read_bytes()
    outcomes = {"error": 0, "clean": 0}
    for position in range(len(original)):
        mutated = bytearray(original)
        mutated[position] ^= 0x01 << (position % 8)
        _index_file(prefix).write_bytes(bytes(mutated))
        try:
            result = _snapshot(prefix)
        except ConverterError:
            outcomes["error"] += 1
        else:
            assert result == clean, f"flip at {position} changed the result"
            outcomes["clean"] += 1
    # Only the footer's padding (after the two handles) is not covered by a checksum.
    assert outcomes["clean"] < 40
    assert outcomes["error"] > len(original) - 40


def test_flipped_index_block_byte_is_a_checksum_error(small_ckpt, tmp_path):
    prefix = _copy_bundle(small_ckpt, tmp_path)
    index = bytearray(_index_file(prefix).read_bytes())
    index[10] ^= 0xFF  # inside the first data block
    _index_file(prefix).write_bytes(bytes(index))
    with pytest.raises(ChecksumError, match="index"):
        TensorBundle(prefix)


@pytest.mark.parametrize("keep", [0, 1, 8, 47, 48, 100, -49, -48, -5, -1])
def test_truncated_index(small_ckpt, tmp_path, keep):
    prefix = _copy_bundle(small_ckpt, tmp_path)
    index = _index_file(prefix).read_bytes()
    _index_file(prefix).write_bytes(index[:keep])
    with pytest.raises(CheckpointFormatError):
        TensorBundle(prefix)


@pytest.mark.parametrize("keep", [0, 1, 100, -1])
def test_truncated_data_names_a_tensor(small_ckpt, tmp_path, keep):
    prefix = _copy_bundle(small_ckpt, tmp_path)
    data = _data_file(prefix).read_bytes()
    _data_file(prefix).write_bytes(data[:keep])
    with pytest.raises(CheckpointFormatError, match="tensor '.*truncated data file"):
        TensorBundle(prefix)


def test_missing_data_shard(small_ckpt, tmp_path):
    prefix = _copy_bundle(small_ckpt, tmp_path)
    _data_file(prefix).unlink()
    with pytest.raises(CheckpointFormatError, match=r"small\.ckpt\.data-00000-of-00001 is missing"):
        TensorBundle(prefix)


def test_missing_index_is_a_source_error(tmp_path):
    with pytest.raises(SourceError, match="without .index"):
        TensorBundle(tmp_path / "nothing.ckpt")


@pytest.mark.parametrize("content", [b"", b"\x00" * 48, b"\xff" * 4096, os.urandom(10_000)])
def test_empty_or_random_index(tmp_path, content):
    prefix = _write_raw(tmp_path / "junk", content, b"")
    with pytest.raises(CheckpointFormatError):
        TensorBundle(prefix)


def test_empty_data_file_with_only_empty_tensors(tmp_path):
    prefix = _write_bundle(tmp_path / "e", {"empty": np.zeros((0, 3), np.float32)})
    assert _data_file(prefix).stat().st_size == 0
    assert read_checkpoint(prefix)["empty"].shape == (0, 3)


def _single_entry_bundle(tmp_path: Path, entry: bytes, data: bytes = b"\x00" * 16, **header) -> Path:
    index = _table([(b"", _header_proto(**header)), (b"w", entry)])
    return _write_raw(tmp_path / "crafted", index, data)


@pytest.mark.parametrize(
    "shape, size",
    [((2**20, 2**20), 16), ((2**20, 2**20), 4 * 2**40), ((2**62, 2**62, 2**62), 16), ((4,), 4 * 2**40)],
)
def test_huge_claimed_shape_fails_before_allocating(tmp_path, shape, size):
    prefix = _single_entry_bundle(tmp_path, _entry_proto(1, shape, 0, size, 0))
    with pytest.raises(CheckpointFormatError, match="tensor 'w'"):
        TensorBundle(prefix)


@pytest.mark.parametrize(
    "entry, message",
    [
        (_entry_proto(1, (4,), 4, 16, 0), "truncated data file"),  # runs past the shard's end
        (_entry_proto(1, (4,), -8, 16, 0), "lies at bytes"),
        (_entry_proto(1, (3,), 0, 16, 0), "needs 12 bytes"),
        (_entry_proto(1, (4,), 0, 16, 0, shard=3), "shard 3"),
        (_field(1, 1) + _field(2, _field(2, _field(1, -1))), "dimension of size -1"),
        (_field(1, 1) + _field(2, _field(3, 1)), "unknown rank"),
        (_field(1, 1) + _field(2, b"\x12\x05"), "runs past the end"),
        (_field(1, 1) + b"\x0b", "wire type 3"),
        (_field(1, 1) + b"\x08" + b"\xff" * 11, "varint longer"),
        (_field(1, b"\x01"), "wire type 2, expected 0"),
    ],
)
def test_inconsistent_entries_are_format_errors(tmp_path, entry, message):
    with pytest.raises(CheckpointFormatError, match=message):
        TensorBundle(_single_entry_bundle(tmp_path, entry))


def test_unknown_dtype_is_reported_on_access(tmp_path):
    with TensorBundle(_single_entry_bundle(tmp_path, _entry_proto(99, (4,), 0, 16, 0))) as bundle:
        assert bundle.names() == ["w"]
        with pytest.raises(UnsupportedDTypeError, match="'w'.*enum value 99"):
            bundle.read("w")


@pytest.mark.parametrize(
    "header, message",
    [
        ({"endianness": 1}, "big-endian"),
        ({"endianness": 7}, "unknown byte order"),
        ({"num_shards": 0}, "0 data shards"),
        ({"num_shards": 10**9}, "data shards"),
        ({"min_consumer": 2}, "bundle version 2"),
    ],
)
def test_unusable_headers(tmp_path, header, message):
    with pytest.raises(CheckpointFormatError, match=message):
        TensorBundle(_single_entry_bundle(tmp_path, _entry_proto(1, (4,), 0, 16, masked_crc32c(bytes(16))), **header))


def test_missing_header_entry(tmp_path):
    prefix = _write_raw(tmp_path / "h", _table([(b"w", _entry_proto(1, (1,), 0, 4, 0))]), bytes(4))
    with pytest.raises(CheckpointFormatError, match="header"):
        TensorBundle(prefix)


def test_keys_out_of_order(tmp_path):
    entry = _entry_proto(1, (1,), 0, 4, masked_crc32c(bytes(4)))
    for entries in (
        [(b"", _header_proto()), (b"b", entry), (b"a", entry)],
        [(b"", _header_proto()), (b"a", entry), (b"a", entry)],
    ):
        for per_block in (1, 5):
            prefix = _write_raw(tmp_path / "o", _table(entries, per_block=per_block), bytes(4))
            with pytest.raises(CheckpointFormatError, match="increasing|out of order|does not match"):
                TensorBundle(prefix)


def test_compressed_blocks_are_refused(tmp_path):
    index = _table([(b"", _header_proto())], compression=1)
    with pytest.raises(CheckpointFormatError, match="compression type 1"):
        TensorBundle(_write_raw(tmp_path / "c", index, b""))


def test_block_handle_outside_the_file(tmp_path):
    index = bytearray(_table([(b"", _header_proto())]))
    footer = len(index) - 48
    index[footer : footer + 40] = (_varint(0) + _varint(10**6) + _varint(0) + _varint(8)).ljust(40, b"\0")
    with pytest.raises(CheckpointFormatError, match="outside the table"):
        TensorBundle(_write_raw(tmp_path / "h", bytes(index), b""))


@pytest.mark.parametrize(
    "restarts",
    [[3], [0, 0], [0, 2], [5], [0, 10**6]],  # mid-entry, repeated, mid-entry, mid-entry, past the end
)
def test_bad_restart_array(tmp_path, restarts):
    def replace_restarts(contents: bytes) -> bytes:
        (count,) = struct.unpack_from("<I", contents, len(contents) - 4)
        entries = contents[: len(contents) - 4 - 4 * count]
        return entries + struct.pack(f"<{len(restarts)}I", *restarts) + struct.pack("<I", len(restarts))

    entries = [(b"", _header_proto()), (b"abc", _entry_proto(1, (0,), 0, 0, masked_crc32c(b"")))]
    index = _table(entries, per_block=10, restart_interval=16, edit_data_block=replace_restarts)
    with pytest.raises(CheckpointFormatError, match="restart"):
        TensorBundle(_write_raw(tmp_path / "r", index, b""))


@pytest.mark.parametrize("count", [0, 2**32 - 1, 1000])
def test_impossible_restart_counts(tmp_path, count):
    def replace_count(contents: bytes) -> bytes:
        return contents[:-4] + struct.pack("<I", count)

    index = _table([(b"", _header_proto())], edit_data_block=replace_count)
    with pytest.raises(CheckpointFormatError, match="restart count"):
        TensorBundle(_write_raw(tmp_path / "r", index, b""))


def test_prefix_compression_cannot_make_decoding_quadratic(tmp_path):
    """Each key reuses all of the previous one plus a byte: 20k keys of up to 20 kB from a 100 kB block."""
    entries = bytearray(_varint(0) + _varint(1000) + _varint(0) + b"a" * 1000)
    for length in range(1000, 21000):
        entries += _varint(length) + _varint(1) + _varint(0) + b"b"
    crafted = bytes(entries) + struct.pack("<II", 0, 1)
    index = _table([(b"", _header_proto()), (b"a" * 1000 + b"b" * 20000, b"")], edit_data_block=lambda _: crafted)
    start = time.perf_counter()
    with pytest.raises(CheckpointFormatError, match="expand implausibly"):
        TensorBundle(_write_raw(tmp_path / "q", index, b""))
    assert time.perf_counter() - start < 1.0


def test_bfloat16_needs_ml_dtypes(tmp_path, monkeypatch):
    data = bytes(range(16))
    prefix = _single_entry_bundle(tmp_path, _entry_proto(14, (8,), 0, 16, masked_crc32c(data)), data)
    if importlib.util.find_spec("ml_dtypes"):
        assert read_checkpoint(prefix)["w"].dtype.name == "bfloat16"
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # as if it were not installed
    with pytest.raises(UnsupportedDTypeError, match="'w' is bfloat16.*ml_dtypes"):
        read_checkpoint(prefix)
