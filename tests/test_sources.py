"""Finding the checkpoint behind a prefix, file, folder or archive, and refusing hostile archives."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from converter.errors import SourceError, UnsafeArchiveError
from converter.formats import files
from converter.formats.files import (
    DEFAULT_MAX_EXTRACT_BYTES,
    DEFAULT_MAX_MEMBERS,
    CheckpointSource,
    extracted,
    open_source,
)

ZOO_NAME = "mobilenet_v2_1.0_224"
ZOO_FILES = [
    f"{ZOO_NAME}.ckpt.index",
    f"{ZOO_NAME}.ckpt.data-00000-of-00001",
    f"{ZOO_NAME}.ckpt.meta",
    f"{ZOO_NAME}_frozen.pb",
    f"{ZOO_NAME}.tflite",
    f"{ZOO_NAME}_eval.pbtxt",
    f"{ZOO_NAME}_info.txt",
]
DEEPLAB_DIR = "deeplabv3_mnv2_pascal_train_aug"
DEEPLAB_FILES = [
    f"{DEEPLAB_DIR}/model.ckpt-30000.index",
    f"{DEEPLAB_DIR}/model.ckpt-30000.data-00000-of-00001",
    f"{DEEPLAB_DIR}/frozen_inference_graph.pb",
]


@pytest.fixture(autouse=True)
def private_tempdir(tmp_path, monkeypatch) -> Path:
    """Route mkdtemp into a folder of our own so the tests can see what is left behind."""
    folder = tmp_path / "system-tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _make_files(root: Path, names: list[str]) -> Path:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"contents of {name}".encode())
    return root


def _tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]], compress: bool) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if compress else "w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _regular(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _directory(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info, None


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def _archive(tmp_path: Path, members, name: str = "model.tgz") -> Path:
    path = tmp_path / name
    path.write_bytes(_tar_bytes(members, compress=not name.endswith(".tar")))
    return path


def _zoo_members(names: list[str]) -> list[tuple[tarfile.TarInfo, bytes]]:
    return [_regular(name, f"contents of {name}".encode()) for name in names]


# ---------------------------------------------------------------------------------------------------
# Prefixes, files and folders
# ---------------------------------------------------------------------------------------------------


def test_prefix(tmp_path):
    _make_files(tmp_path, ZOO_FILES)
    prefix = tmp_path / f"{ZOO_NAME}.ckpt"
    with open_source(prefix) as source:
        assert source == CheckpointSource(
            origin=prefix,
            prefix=prefix,
            files=(tmp_path / ZOO_FILES[0], tmp_path / ZOO_FILES[1]),
            meta_graph=tmp_path / ZOO_FILES[2],
            frozen_graph=tmp_path / ZOO_FILES[3],
            archive=None,
        )


@pytest.mark.parametrize("passed", [f"{ZOO_NAME}.ckpt.index", f"{ZOO_NAME}.ckpt.data-00000-of-00001", "."])
def test_index_shard_or_folder_normalise_to_the_prefix(tmp_path, passed):
    _make_files(tmp_path, ZOO_FILES)
    with open_source(str(tmp_path / passed)) as source:
        assert source.prefix.resolve() == (tmp_path / f"{ZOO_NAME}.ckpt").resolve()
        assert source.origin == tmp_path / passed


def test_training_step_prefix_without_meta_or_frozen_graph(tmp_path):
    _make_files(tmp_path, ["model.ckpt-30000.index", "model.ckpt-30000.data-00000-of-00002"])
    _make_files(tmp_path, ["model.ckpt-30000.data-00001-of-00002", "model.ckpt-3000.index"])
    with open_source(tmp_path / "model.ckpt-30000") as source:
        assert [path.name for path in source.files] == [
            "model.ckpt-30000.index",
            "model.ckpt-30000.data-00000-of-00002",
            "model.ckpt-30000.data-00001-of-00002",
        ]
        assert source.meta_graph is None and source.frozen_graph is None


def test_nested_zoo_layout(tmp_path):
    _make_files(tmp_path, DEEPLAB_FILES)
    with open_source(tmp_path) as source:
        assert source.prefix == tmp_path / DEEPLAB_DIR / "model.ckpt-30000"
        assert source.frozen_graph == tmp_path / DEEPLAB_DIR / "frozen_inference_graph.pb"
        assert source.meta_graph is None


def test_search_stops_two_levels_down(tmp_path):
    _make_files(tmp_path, ["a/b/c/model.ckpt.index"])
    with pytest.raises(SourceError, match="2 levels deep"):
        with open_source(tmp_path):
            pass
    with open_source(tmp_path / "a") as source:
        assert source.prefix == tmp_path / "a/b/c/model.ckpt"


def test_hidden_and_macos_resource_files_are_ignored(tmp_path):
    _make_files(tmp_path, [*ZOO_FILES, f"._{ZOO_FILES[0]}", f"__MACOSX/{ZOO_FILES[0]}"])
    with open_source(tmp_path) as source:
        assert source.prefix == tmp_path / f"{ZOO_NAME}.ckpt"


def test_folder_with_two_checkpoints_lists_both(tmp_path):
    _make_files(tmp_path, ["a/model.ckpt-100.index", "b/model.ckpt-200.index"])
    with pytest.raises(SourceError, match=r"2 checkpoints \(a/model.ckpt-100.index, b/model.ckpt-200.index\)"):
        with open_source(tmp_path):
            pass


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no checkpoint"):
        with open_source(tmp_path / "empty"):
            pass


@pytest.mark.parametrize("name", ["nothing.ckpt", "notes.txt", f"{ZOO_NAME}_frozen.pb"])
def test_paths_that_are_not_checkpoints(tmp_path, name):
    _make_files(tmp_path, ["notes.txt", f"{ZOO_NAME}_frozen.pb"])
    with pytest.raises(SourceError, match="pass a checkpoint prefix"):
        with open_source(tmp_path / name):
            pass


def test_data_shard_without_index(tmp_path):
    _make_files(tmp_path, ["m.ckpt.data-00000-of-00001"])
    with pytest.raises(SourceError, match=r"m\.ckpt\.index is missing"):
        with open_source(tmp_path / "m.ckpt.data-00000-of-00001"):
            pass


# ---------------------------------------------------------------------------------------------------
# Archives
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [f"{ZOO_NAME}.tgz", f"{ZOO_NAME}.tar.gz", f"{ZOO_NAME}.tar"])
def test_zoo_tarball_with_top_level_files(tmp_path, private_tempdir, name):
    archive = _archive(tmp_path, _zoo_members(ZOO_FILES), name)
    with open_source(archive) as source:
        assert source.archive == archive and source.origin == archive
        assert source.prefix.name == f"{ZOO_NAME}.ckpt"
        assert [path.name for path in source.files] == ZOO_FILES[:2]
        assert source.frozen_graph.name == ZOO_FILES[3] and source.meta_graph.name == ZOO_FILES[2]
        assert source.files[1].read_bytes() == f"contents of {ZOO_FILES[1]}".encode()
        assert source.prefix.is_relative_to(private_tempdir)
    assert not source.prefix.parent.exists()
    assert list(private_tempdir.iterdir()) == []


@pytest.mark.parametrize("name", ["model.tgz", "model.tar"])
def test_archive_sha256_is_that_of_its_bytes(tmp_path, name):
    archive = _archive(tmp_path, _zoo_members(ZOO_FILES), name)
    with extracted(archive, DEFAULT_MAX_EXTRACT_BYTES, DEFAULT_MAX_MEMBERS) as unpacked:
        assert unpacked.sha256 == hashlib.sha256(archive.read_bytes()).hexdigest()
        assert (unpacked.folder / ZOO_FILES[1]).read_bytes() == f"contents of {ZOO_FILES[1]}".encode()


def test_gzip_of_several_members_with_zero_padding(tmp_path):
    """gzip reads concatenated members, zero bytes between them allowed: so does the unpacking."""
    tar = _tar_bytes([*_zoo_members(ZOO_FILES), _regular("noise.bin", os.urandom(300_000))], compress=False)
    archive = tmp_path / "members.tgz"
    archive.write_bytes(gzip.compress(tar[:100_000]) + bytes(1000) + gzip.compress(tar[100_000:]))
    assert gzip.decompress(archive.read_bytes()) == tar  # the gzip module's reading of the same file
    with open_source(archive) as source:
        assert source.files[1].read_bytes() == f"contents of {ZOO_FILES[1]}".encode()


def test_data_after_the_gzip_stream_is_refused(tmp_path):
    archive = tmp_path / "trailing.tgz"
    archive.write_bytes(_tar_bytes(_zoo_members(ZOO_FILES), compress=True) + b"not gzip")
    with pytest.raises(gzip.BadGzipFile):  # the gzip module refuses it too
        gzip.decompress(archive.read_bytes())
    with pytest.raises(SourceError, match="trailing.tgz is not a valid gzip file"):
        with open_source(archive):
            pass


def test_large_tar_stream_goes_through_a_private_file(tmp_path, private_tempdir, monkeypatch):
    monkeypatch.setattr(files, "_SPOOL_BYTES", 10_000)
    noise = np.random.default_rng(0).bytes(50_000)
    archive = _archive(tmp_path, [*_zoo_members(ZOO_FILES), _regular("noise.bin", noise)])
    with open_source(archive) as source:
        assert (source.prefix.parent / "noise.bin").read_bytes() == noise
    assert list(private_tempdir.iterdir()) == []


def test_deeplab_tarball_layout(tmp_path):
    archive = _archive(tmp_path, [_directory(DEEPLAB_DIR), *_zoo_members(DEEPLAB_FILES)])
    with open_source(archive) as source:
        assert source.prefix.name == "model.ckpt-30000" and source.prefix.parent.name == DEEPLAB_DIR
        assert source.frozen_graph.name == "frozen_inference_graph.pb"


@pytest.mark.parametrize("interruption", [RuntimeError, KeyboardInterrupt])
def test_extraction_folder_removed_when_the_body_raises(tmp_path, private_tempdir, interruption):
    archive = _archive(tmp_path, _zoo_members(ZOO_FILES))
    with pytest.raises(interruption):
        with open_source(archive) as source:
            assert source.prefix.parent.exists()
            raise interruption()
    assert list(private_tempdir.iterdir()) == []


def test_archive_without_checkpoint(tmp_path, private_tempdir):
    archive = _archive(tmp_path, [_regular("readme.txt")])
    with pytest.raises(SourceError, match=f"no checkpoint.*archive {archive}"):
        with open_source(archive):
            pass
    assert list(private_tempdir.iterdir()) == []


def _assert_refused(tmp_path: Path, private_tempdir: Path, members, match: str, name: str = "evil.tgz") -> None:
    archive = _archive(tmp_path, members, name)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(UnsafeArchiveError, match=match):
        with open_source(archive):
            pass
    assert sorted(tmp_path.rglob("*")) == before  # nothing written anywhere, temp folder gone
    assert list(private_tempdir.iterdir()) == []


@pytest.mark.parametrize("name", ["evil.tgz", "evil.tar"])
def test_parent_directory_member_is_refused(tmp_path, private_tempdir, name):
    members = [*_zoo_members(ZOO_FILES), _regular("../evil", b"pwned")]
    _assert_refused(tmp_path, private_tempdir, members, "'../evil' would escape", name)
    assert not (tmp_path.parent / "evil").exists() and not (private_tempdir.parent / "evil").exists()


@pytest.mark.parametrize("member", ["a/../../evil", "a/b/../../../evil", "..\\evil"])
def test_nested_parent_directory_members_are_refused(tmp_path, private_tempdir, member):
    _assert_refused(tmp_path, private_tempdir, [_regular(member)], "would escape")


@pytest.mark.parametrize("member", ["/tmp/evil", "/etc/passwd", "C:/evil", "\\\\server\\share\\evil"])
def test_absolute_member_is_refused(tmp_path, private_tempdir, member):
    _assert_refused(tmp_path, private_tempdir, [*_zoo_members(ZOO_FILES), _regular(member)], "absolute path")


def test_symlink_member_is_refused(tmp_path, private_tempdir):
    members = [_special(ZOO_FILES[0], tarfile.SYMTYPE, "/etc/passwd"), *_zoo_members(ZOO_FILES[1:])]
    _assert_refused(tmp_path, private_tempdir, members, f"'{ZOO_FILES[0]}' is a symbolic link to '/etc/passwd'")


def test_hardlink_member_is_refused(tmp_path, private_tempdir):
    members = [*_zoo_members(ZOO_FILES), _special("copy.index", tarfile.LNKTYPE, ZOO_FILES[0])]
    _assert_refused(tmp_path, private_tempdir, members, "'copy.index' is a hard link")


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
def test_device_and_fifo_members_are_refused(tmp_path, private_tempdir, kind):
    members = [*_zoo_members(ZOO_FILES), _special("dev", kind)]
    _assert_refused(tmp_path, private_tempdir, members, "'dev' is a device, FIFO")


def test_declared_size_cap_applies_before_extraction(tmp_path, private_tempdir):
    archive = _archive(tmp_path, [*_zoo_members(ZOO_FILES), _regular("big.bin", bytes(5000))])
    with pytest.raises(UnsafeArchiveError, match="more than 4096 bytes"):
        with open_source(archive, max_extract_bytes=4096):
            pass
    assert list(private_tempdir.iterdir()) == []


def test_decompression_bomb_is_cut_off_while_streaming(tmp_path, private_tempdir):
    archive = tmp_path / "bomb.tgz"
    archive.write_bytes(gzip.compress(bytes(50_000_000)))  # 50 MB of zeros in ~50 kB
    with pytest.raises(UnsafeArchiveError, match="decompresses to more than"):
        with open_source(archive, max_extract_bytes=1_000_000, max_members=10):
            pass
    assert list(private_tempdir.iterdir()) == []


def test_member_count_cap(tmp_path, private_tempdir):
    archive = _archive(tmp_path, [_regular(f"f{i}") for i in range(30)])
    with pytest.raises(UnsafeArchiveError, match="more than 20 members"):
        with open_source(archive, max_members=20):
            pass


@pytest.mark.parametrize("keep_fraction", [0.1, 0.5, 0.9])
def test_truncated_tgz_names_the_file(tmp_path, private_tempdir, keep_fraction):
    payload = [*_zoo_members(ZOO_FILES), _regular("noise.bin", np.random.default_rng(0).bytes(200_000))]
    complete = _tar_bytes(payload, compress=True)
    archive = tmp_path / "truncated.tgz"
    archive.write_bytes(complete[: int(len(complete) * keep_fraction)])
    with pytest.raises(SourceError, match=f"{archive}.*truncated or corrupted"):
        with open_source(archive):
            pass
    assert list(private_tempdir.iterdir()) == []


def test_truncated_tar_names_the_file(tmp_path):
    complete = _tar_bytes([*_zoo_members(ZOO_FILES), _regular("noise.bin", bytes(20_000))], compress=False)
    archive = tmp_path / "truncated.tar"
    archive.write_bytes(complete[:15_000])
    with pytest.raises(SourceError, match="truncated.tar"):
        with open_source(archive):
            pass


@pytest.mark.parametrize("content", [b"", b"\x1f\x8b", b"not an archive at all" * 100, os.urandom(5000)])
def test_garbage_archives(tmp_path, content):
    archive = tmp_path / "garbage.tgz"
    archive.write_bytes(content)
    with pytest.raises(SourceError, match="garbage.tgz"):
        with open_source(archive):
            pass


def test_real_checkpoint_through_an_archive(tmp_path):
    tf = pytest.importorskip("tensorflow")
    from converter.formats.tf_bundle import read_checkpoint

    prefix = tmp_path / "ckpt" / f"{ZOO_NAME}.ckpt"
    weights = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    tf.raw_ops.SaveV2(
        prefix=str(prefix),
        tensor_names=["MobilenetV2/Conv/weights", "global_step"],
        shape_and_slices=["", ""],
        tensors=[tf.constant(weights), tf.constant(7, tf.int64)],
    )
    archive = tmp_path / f"{ZOO_NAME}.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        for file in sorted(prefix.parent.iterdir()):
            tar.add(file, arcname=file.name)
    with open_source(archive) as source:
        tensors = read_checkpoint(source.prefix)
        np.testing.assert_array_equal(tensors["MobilenetV2/Conv/weights"], weights)
        assert int(tensors["global_step"]) == 7


@pytest.mark.parametrize("name", ["damaged.tar", "damaged.tgz"])
def test_damaged_member_header_is_not_mistaken_for_the_end(tmp_path, name):
    """tarfile quietly stops at a later header with a bad checksum; the archive must not look shorter."""
    tar = bytearray(_tar_bytes(_zoo_members(ZOO_FILES), compress=False))
    second = tarfile.open(fileobj=io.BytesIO(bytes(tar))).getmembers()[1]
    tar[second.offset] ^= 0x01  # first byte of its name: the header checksum no longer matches
    archive = tmp_path / name
    archive.write_bytes(gzip.compress(bytes(tar)) if name.endswith(".tgz") else bytes(tar))
    with pytest.raises(SourceError, match="damaged member header"):
        with open_source(archive):
            pass


# ---------------------------------------------------------------------------------------------------
# Zip archives (Teachable Machine's downloads)
# ---------------------------------------------------------------------------------------------------


def _zip(tmp_path: Path, members: list[tuple[zipfile.ZipInfo | str, bytes]], name: str = "model.zip") -> Path:
    path = tmp_path / name
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for info, data in members:
            archive.writestr(info, data)
    return path


def _zip_zoo(names: list[str]) -> list[tuple[str, bytes]]:
    return [(name, f"contents of {name}".encode()) for name in names]


def _zip_symlink(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16  # how Info-ZIP stores a link: its target as the data
    return info, target.encode()


def _assert_zip_refused(tmp_path: Path, private_tempdir: Path, archive: Path, error, match: str) -> None:
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(error, match=match):
        with open_source(archive):
            pass
    assert sorted(tmp_path.rglob("*")) == before
    assert list(private_tempdir.iterdir()) == []


def test_zip_holding_a_checkpoint(tmp_path, private_tempdir):
    with open_source(_zip(tmp_path, _zip_zoo(ZOO_FILES))) as source:
        assert source.prefix.name == f"{ZOO_NAME}.ckpt"
        assert source.files[0].read_bytes() == f"contents of {ZOO_FILES[0]}".encode()
    assert list(private_tempdir.iterdir()) == []


@pytest.mark.parametrize(
    ("member", "match"),
    [
        ("../evil", "'../evil' would escape"),
        ("a/../../evil", "would escape"),
        ("..\\evil", "would escape"),
        ("/tmp/evil", "absolute path"),
        ("C:/evil", "absolute path"),
    ],
)
def test_zip_member_outside_the_folder_is_refused(tmp_path, private_tempdir, member, match):
    archive = _zip(tmp_path, [*_zip_zoo(ZOO_FILES), (member, b"pwned")])
    _assert_zip_refused(tmp_path, private_tempdir, archive, UnsafeArchiveError, match)
    assert not (tmp_path.parent / "evil").exists() and not (private_tempdir.parent / "evil").exists()


def test_zip_symlink_member_is_refused(tmp_path, private_tempdir):
    archive = _zip(tmp_path, [_zip_symlink(ZOO_FILES[0], "/etc/passwd"), *_zip_zoo(ZOO_FILES[1:])])
    _assert_zip_refused(tmp_path, private_tempdir, archive, UnsafeArchiveError, "is a symbolic link; refused")


def test_zip_special_file_member_is_refused(tmp_path, private_tempdir):
    fifo = zipfile.ZipInfo("pipe")
    fifo.external_attr = (stat.S_IFIFO | 0o644) << 16
    archive = _zip(tmp_path, [*_zip_zoo(ZOO_FILES), (fifo, b"")])
    _assert_zip_refused(tmp_path, private_tempdir, archive, UnsafeArchiveError, "'pipe' is a device, FIFO")


def test_zip_bomb_is_refused_by_its_declared_size(tmp_path, private_tempdir):
    """50 MB of zeros in ~50 kB: refused before a byte is written (the size the central directory declares is
    what zipfile writes at most)."""
    archive = _zip(tmp_path, [*_zip_zoo(ZOO_FILES), ("bomb.bin", bytes(50_000_000))])
    assert archive.stat().st_size < 1_000_000
    _assert_zip_refused_with(tmp_path, private_tempdir, archive, max_extract_bytes=1_000_000)


def test_zip_declaring_less_than_it_holds_is_cut_off(tmp_path, private_tempdir):
    """A member whose declared size is forged small: zipfile stops at the declared size and the CRC fails."""
    archive = _zip(tmp_path, [("bomb.bin", bytes(5_000_000))])
    data = bytearray(archive.read_bytes())
    # The uncompressed size in the local header (offset 22) and in the central directory entry (offset 24).
    data[22:26] = (1000).to_bytes(4, "little")
    central = data.rindex(b"PK\x01\x02")
    data[central + 24 : central + 28] = (1000).to_bytes(4, "little")
    archive.write_bytes(bytes(data))
    _assert_zip_refused(tmp_path, private_tempdir, archive, SourceError, "not a readable zip archive")


def _assert_zip_refused_with(tmp_path: Path, private_tempdir: Path, archive: Path, **caps) -> None:
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(UnsafeArchiveError, match="would extract to more than 1000000 bytes"):
        with open_source(archive, **caps):
            pass
    assert sorted(tmp_path.rglob("*")) == before
    assert list(private_tempdir.iterdir()) == []


def test_zip_member_count_cap(tmp_path, private_tempdir):
    archive = _zip(tmp_path, [(f"f{i}", b"x") for i in range(30)])
    with pytest.raises(UnsafeArchiveError, match="more than 20 members"):
        with open_source(archive, max_members=20):
            pass
    assert list(private_tempdir.iterdir()) == []


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04", b"not a zip at all" * 100, os.urandom(5000)])
def test_not_a_zip_with_a_zip_suffix(tmp_path, private_tempdir, content):
    archive = tmp_path / "garbage.zip"
    archive.write_bytes(content)
    with pytest.raises(SourceError, match="garbage.zip"):
        with open_source(archive):
            pass
    assert list(private_tempdir.iterdir()) == []


def test_hostile_zip_through_the_command_line(tmp_path):
    """One line, a non-zero exit, no output folder."""
    from tests.helpers import assert_one_line_error, run_cli

    archive = _zip(tmp_path, [*_zip_zoo(ZOO_FILES), _zip_symlink("link", "/etc/passwd")], "converted_keras.zip")
    result = run_cli("--checkpoint", archive, "--output", tmp_path / "out")
    assert_one_line_error(result, result.returncode, "member 'link' is a symbolic link; refused")
    assert result.returncode != 0 and not (tmp_path / "out").exists()
