"""Downloading zoo tarballs into the cache, against a real local HTTP server (never the real zoo):
cold and warm cache, resume with Range, servers that ignore Range, 404/500, mirrors, offline; then
`convert-mobilenet` end to end (single variant, --all, --push-to-hub with a stand-in Hub)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from converter import zoo_catalog
from converter.app.cli import convert_main
from converter.zoo import download
from converter.zoo import table as zoo
from converter.zoo.download import DownloadError, RetryPolicy, fetch
from tests.helpers import REPO, SMALL, run_cli
from tests.zoo_server import ZooServer, closed_port, running_zoo_server

FAST = RetryPolicy(attempts=3, base_delay=0.01, timeout=10)
FAST_ENV = {download.ATTEMPTS_ENV: "3", download.RETRY_DELAY_ENV: "0.01", download.TIMEOUT_ENV: "10"}
ENTRY = zoo.lookup("mobilenet_v2", 0.35, 96)
OFFICIAL = zoo_catalog.OFFICIAL_SOURCE
PAYLOAD = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4 bytes: enough for several read chunks


@pytest.fixture
def zoo_server() -> Iterator[ZooServer]:
    with running_zoo_server() as server:
        yield server


@pytest.fixture(autouse=True)
def _never_the_real_zoo(monkeypatch, tmp_path):
    """No inherited settings; a download that names no mirror goes to a dead local port, never out."""
    for name in (download.ATTEMPTS_ENV, download.RETRY_DELAY_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(download.CACHE_ENV, str(tmp_path / "default-cache"))
    monkeypatch.setenv(download.MIRROR_ENV, f"http://127.0.0.1:{closed_port()}")


@pytest.fixture(scope="module")
def fixture_tarball() -> Path:
    from fixtures import ensure_fixture

    return ensure_fixture(SMALL).tarball


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _cache_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ------------------------------------------------------------------------------------------- fetch() from one source
def test_cold_then_warm_cache(zoo_server: ZooServer, tmp_path):
    zoo_server.serve(ENTRY.filename, PAYLOAD)
    path = fetch(ENTRY, source=OFFICIAL, cache_dir=tmp_path, mirror=zoo_server.url, progress=False, retry=FAST).path
    assert path == tmp_path / ENTRY.filename and path.read_bytes() == PAYLOAD
    assert download.recorded_sha256(path) == _sha(PAYLOAD)
    assert Path(f"{path}.sha256").read_text() == f"{_sha(PAYLOAD)}  {ENTRY.filename}\n"
    assert _cache_files(tmp_path) == [ENTRY.filename, f"{ENTRY.filename}.sha256"]
    assert zoo_server.count() == 1

    # Warm: no request at all, even with the server gone from the mirror setting.
    again = fetch(
        ENTRY, source=OFFICIAL, cache_dir=tmp_path, mirror=f"http://127.0.0.1:{closed_port()}", retry=FAST
    ).path
    assert again == path and zoo_server.count() == 1


def test_cache_folder_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(download.CACHE_ENV, str(tmp_path / "explicit"))
    assert download.default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv(download.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert download.default_cache_dir() == tmp_path / "xdg" / "mobilenet-convert"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert download.default_cache_dir() == tmp_path / "home" / ".cache" / "mobilenet-convert"


def test_a_file_put_in_the_cache_by_hand_is_used_and_hashed(zoo_server: ZooServer, tmp_path):
    (tmp_path / ENTRY.filename).write_bytes(b"copied by hand")
    path = fetch(ENTRY, source=OFFICIAL, cache_dir=tmp_path, mirror=zoo_server.url, retry=FAST).path
    assert download.recorded_sha256(path) == _sha(b"copied by hand") and zoo_server.count() == 0


def test_dropped_connection_is_resumed_with_a_range_request(zoo_server: ZooServer, tmp_path):
    zoo_server.serve(ENTRY.filename, PAYLOAD)
    zoo_server.drop_after[ENTRY.filename] = [300_000]
    path = fetch(ENTRY, source=OFFICIAL, cache_dir=tmp_path, mirror=zoo_server.url, progress=False, retry=FAST).path
    assert path.read_bytes() == PAYLOAD
    assert [header for _, header in zoo_server.requests] == [None, "bytes=300000-"]
    assert download.recorded_sha256(path) == _sha(PAYLOAD)
    assert not Path(f"{path}.part").exists()


def test_an_interrupted_run_leaves_a_part_file_that_the_next_run_resumes(zoo_server: ZooServer, tmp_path):
    zoo_server.serve(ENTRY.filename, PAYLOAD)
    zoo_server.drop_after[ENTRY.filename] = [100_000, 0, 0]  # every attempt of the first run breaks
    with pytest.raises(DownloadError, match="gave up after 3 attempts"):
        fetch(ENTRY, source=OFFICIAL, cache_dir=tmp_path, mirror=zoo_server.url, retry=FAST)
    part = tmp_path / f"{ENTRY.filename}.part"
    assert part.stat().st_size == 100_000 and not (tmp_path / ENTRY.filename).exists()

    path = fetch(ENTRY, source=OFFICIAL, cache_dir=tmp_path, mirror=zoo_server.url, retry=FAST).path
    assert path.read_bytes() == PAYLOAD and zoo_server.requests[-1] == (ENTRY.filename, "bytes=100000-")


def test_a_server_ignoring_range_makes_the_download_restart(zoo_server: ZooServer, tmp_path):
    zoo_server.serve(ENTRY.filename, PAYLOAD)
    zoo_server.ignore_range.add(ENTRY.filename)
    (tmp_path / f"{ENTRY.filename}.part").write_bytes(b"\xff" * 5000)  # a stale partial download
    path = fetch(ENTRY, source=OFFICIAL, cache_dir=tmp_path, mirror=zoo_server.url, retry=FAST).path
    assert path.read_bytes() == PAYLOAD  # not 5000 stale bytes + the whole file
    assert zoo_server.requests == [(ENTRY.filename, "bytes=5000-")]


def test_a_stale_part_longer_than_the_file_is_discarded(zoo_server: ZooServer, tmp_path):
    zoo_server.serve(ENTRY.filename, PAYLOAD)
    (tmp_path / f"{ENTRY.filename}.part").write_bytes(b"\0" * (len(PAYLOAD) + 10))  # 416 from the server
    assert (
        fetch(ENTRY, source=OFFICIAL, cache_dir=tmp_path, mirror=zoo_server.url, retry=FAST).path.read_bytes()
        == PAYLOAD
    )


@pytest.mark.parametrize("status", [404, 500])
def test_http_errors_are_one_clean_error_and_leave_nothing(zoo_server: ZooServer, tmp_path, status):
    zoo_server.status[ENTRY.filename] = status
    with pytest.raises(DownloadError) as caught:
        fetch(ENTRY, source=OFFICIAL, cache_dir=tmp_path / "cache", mirror=zoo_server.url, retry=FAST)
    message = str(caught.value)
    assert f"{zoo_server.url}/{ENTRY.filename}" in message and f"HTTP {status}" in message
    assert "--mirror" in message and "--checkpoint" in message and "\n" not in message
    assert zoo_server.count() == (1 if status == 404 else FAST.attempts)  # 404 is final, 500 is retried
    assert _cache_files(tmp_path / "cache") == []


def test_a_transient_500_is_retried(zoo_server: ZooServer, tmp_path):
    zoo_server.serve(ENTRY.filename, PAYLOAD)
    zoo_server.status[ENTRY.filename] = 503
    calls = []

    def sleep(seconds):  # the server recovers during the back-off
        calls.append(seconds)
        zoo_server.status.pop(ENTRY.filename, None)

    import converter.zoo.download as module

    original = module.time.sleep
    module.time.sleep = sleep
    try:
        policy = RetryPolicy(attempts=4, base_delay=0.5, timeout=10)
        assert (
            fetch(ENTRY, source=OFFICIAL, cache_dir=tmp_path, mirror=zoo_server.url, retry=policy).path.read_bytes()
            == PAYLOAD
        )
    finally:
        module.time.sleep = original
    assert calls == [0.5] and zoo_server.count() == 2


def test_offline_is_a_clear_error(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(DownloadError) as caught:
        fetch(ENTRY, source=OFFICIAL, cache_dir=tmp_path, mirror=url, retry=FAST)
    message, (detail,) = str(caught.value), caught.value.detail
    assert message.startswith(f"cannot download {ENTRY.name}: no network (") and "--checkpoint FILE" in message
    assert f"{url}/{ENTRY.filename}" in detail and "refused" in detail.lower() and "--mirror" in detail
    assert _cache_files(tmp_path) == []


def test_mirror_from_the_environment(zoo_server: ZooServer, tmp_path, monkeypatch):
    zoo_server.serve(ENTRY.filename, PAYLOAD)
    monkeypatch.setenv(download.MIRROR_ENV, zoo_server.url + "/")
    assert fetch(ENTRY, source=OFFICIAL, cache_dir=tmp_path, retry=FAST).path.read_bytes() == PAYLOAD
    assert zoo_server.requests == [(ENTRY.filename, None)]


@pytest.mark.parametrize("as_url", [False, True])
def test_mirror_in_a_local_folder(tmp_path, as_url):
    mirror = tmp_path / "air gapped"
    mirror.mkdir()
    (mirror / ENTRY.filename).write_bytes(PAYLOAD)
    base = mirror.as_uri() if as_url else str(mirror)
    path = fetch(ENTRY, source=OFFICIAL, cache_dir=tmp_path / "cache", mirror=base).path
    assert path.read_bytes() == PAYLOAD and download.recorded_sha256(path) == _sha(PAYLOAD)

    other = zoo.lookup("mobilenet_v2", 1.0, 224)
    with pytest.raises(DownloadError, match="not in the mirror"):
        fetch(other, source=OFFICIAL, cache_dir=tmp_path / "cache", mirror=base)
    with pytest.raises(DownloadError, match="neither an http"):
        fetch(other, source=OFFICIAL, cache_dir=tmp_path / "cache", mirror=str(tmp_path / "missing"))


def test_sizes_and_checksums_known_to_the_table_are_enforced(zoo_server: ZooServer, tmp_path):
    zoo_server.serve(ENTRY.filename, PAYLOAD)
    wrong_size = dataclasses.replace(ENTRY, bytes=len(PAYLOAD) + 1)
    with pytest.raises(DownloadError, match="zoo table says"):
        fetch(wrong_size, source=OFFICIAL, cache_dir=tmp_path, mirror=zoo_server.url, retry=FAST)
    wrong_sha = dataclasses.replace(ENTRY, sha256="0" * 64)
    with pytest.raises(DownloadError, match="not the published one"):
        fetch(wrong_sha, source=OFFICIAL, cache_dir=tmp_path, mirror=zoo_server.url, retry=FAST)
    assert _cache_files(tmp_path) == []
    right = dataclasses.replace(ENTRY, bytes=len(PAYLOAD), sha256=_sha(PAYLOAD))
    assert (
        fetch(right, source=OFFICIAL, cache_dir=tmp_path, mirror=zoo_server.url, retry=FAST).path.read_bytes()
        == PAYLOAD
    )


# --------------------------------------------------------------------------------- convert-mobilenet
def cli_env() -> dict[str, str]:
    """The environment as the test has set it (read at call time), with quick retries."""
    return {**os.environ, "PYTHONPATH": str(REPO), **FAST_ENV}


def _front_matter(text: str) -> dict[str, object]:
    """The README's YAML front matter (a tiny parser for `key: value` and `- item` lists)."""
    assert text.startswith("---\n")
    block = text[4 : text.index("\n---\n", 4)]
    data: dict[str, object] = {}
    key = None
    for line in block.splitlines():
        if line.startswith("- "):
            data.setdefault(key, []).append(line[2:])  # type: ignore[union-attr]
        else:
            key, _, value = line.partition(":")
            if value.strip():
                data[key] = value.strip()
    return data


def test_convert_from_the_zoo_end_to_end(zoo_server: ZooServer, fixture_tarball, tmp_path):
    zoo_server.serve(ENTRY.filename, fixture_tarball)
    cache, out = tmp_path / "cache", tmp_path / "out"
    args = ["--depth", "0.35", "--size", "96", "--mirror", zoo_server.url, "--cache-dir", str(cache)]
    result = run_cli(*args, "--output", str(out), env=cli_env())
    assert result.returncode == 0, result.stderr
    assert f"converted {SMALL}" in result.stdout
    assert {"README.md", "config.json", "model.safetensors", "conversion.json"} <= set(os.listdir(out))

    readme = (out / "README.md").read_text()
    front = _front_matter(readme)
    assert front["license"] == "apache-2.0" and front["library_name"] == "transformers"
    assert front["pipeline_tag"] == "image-classification"
    assert front["tags"] == ["vision", "image-classification", "mobilenet_v2"]
    assert front["datasets"] == ["imagenet-1k"]
    digest = hashlib.sha256(fixture_tarball.read_bytes()).hexdigest()
    assert digest in readme and "45.5%" not in readme  # fetched through a mirror: not known to be the zoo file
    try:
        import yaml
    except ImportError:
        pass
    else:
        assert yaml.safe_load(readme.split("---\n")[1]) == {**front}

    conversion = json.loads((out / "conversion.json").read_text())
    expected = {"zoo_name": SMALL, "source": OFFICIAL, "url": ENTRY.url, "sha256": digest, "mirror": zoo_server.url}
    assert conversion["download"] == expected
    assert conversion["source"]["files"][0]["sha256"] == digest
    assert download.recorded_sha256(cache / ENTRY.filename) == digest
    assert zoo_server.count() == 1

    # Second run: from the cache, no request; default output folder = the variant's name.
    result = run_cli(*args, env=cli_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / SMALL / "README.md").is_file() and zoo_server.count() == 1


def test_convert_deeplab_trainval_from_a_local_mirror(tmp_path, monkeypatch):
    from fixtures import ensure_fixture

    entry = zoo.lookup("deeplabv3", 1.0, trainval=True)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    # The trainval twin has the train_aug one's tensors: its fixture stands in for it.
    (mirror / entry.filename).symlink_to(ensure_fixture("deeplabv3_mnv2_pascal_train_aug").tarball)
    monkeypatch.chdir(tmp_path)
    args = ["--model", "deeplabv3", "--depth", "1.0", "--trainval", "--output-stride", "16"]
    result = CliRunner().invoke(convert_main, [*args, "--mirror", str(mirror), "--cache-dir", "cache"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "deeplabv3_mobilenet_v2_1.0_513_os16_trainval"
    assert (tmp_path / "cache" / entry.filename).is_file()
    conversion = json.loads((out / "conversion.json").read_text())
    assert conversion["download"]["url"] == entry.url and conversion["variant"]["output_stride"] == 16
    assert "do not evaluate it on VOC val" in (out / "README.md").read_text()


def test_cli_download_errors_are_one_line_and_exit_1(zoo_server: ZooServer, tmp_path):
    runner = CliRunner()
    for status in (404, 500):
        zoo_server.status[ENTRY.filename] = status
        args = ["--depth", "0.35", "--size", "96", "--source", OFFICIAL, "--mirror", zoo_server.url]
        args += ["--cache-dir", str(tmp_path / "c")]
        result = runner.invoke(convert_main, [*args, "--output", str(tmp_path / "out")], env=FAST_ENV)
        assert result.exit_code == 1, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: cannot download http://127.0.0.1:")
        assert f"HTTP {status}" in lines[0]
        assert _cache_files(tmp_path / "c") == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--depth", "0.9"], "depths: 1.4, 1.3, 1.0, 0.75, 0.5, 0.35"),
        (["--depth", "1.4", "--size", "96"], "sizes at depth 1.4: 224"),
        (["--checkpoint", "x.tgz", "--mirror", "http://127.0.0.1:1"], "--mirror chooses what is downloaded"),
        (["--checkpoint", "x.tgz", "--all"], "--all converts the whole zoo and --checkpoint one local checkpoint"),
        (["--depth", "1.0", "--jobs", "2"], "--jobs applies to --all"),
        (["--model", "mobilenet_v2", "--depth", "1.0", "--trainval"], "--model deeplabv3"),
        (["--all", "--push-to-hub", "me/x"], "--push-to-hub uploads one folder"),
    ],
)
def test_cli_usage_errors(args, message, tmp_path):
    result = CliRunner().invoke(
        convert_main, [*args, "--cache-dir", str(tmp_path)] if "--checkpoint" not in args else args
    )
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_all_converts_a_selection_and_reports_failures(zoo_server: ZooServer, fixture_tarball, tmp_path):
    # Tensor shapes do not depend on the size: one 0.35 fixture stands in for all five sizes.
    names = [f"mobilenet_v2_0.35_{size}" for size in (224, 192, 160, 128, 96)]
    for name in names:
        zoo_server.serve(f"{name}.tgz", fixture_tarball)
    zoo_server.status["mobilenet_v2_0.35_128.tgz"] = 404
    out = tmp_path / "zoo"
    result = run_cli(
        "--all", "--depth", "0.35", "--jobs", "2", "--mirror", zoo_server.url,
        "--cache-dir", str(tmp_path / "cache"), "--output", str(out), env=cli_env(),
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    table = result.stdout.splitlines()
    assert table[0].split() == ["name", "status", "max", "diff", "seconds"]
    rows = {line.split()[0]: line.split() for line in table[2:7]}
    assert list(rows) == names  # zoo order, whatever finished first
    assert all(rows[name][1] == "ok" for name in names if name != "mobilenet_v2_0.35_128")
    assert rows["mobilenet_v2_0.35_128"][1] == "failed"
    assert "4 of 5 converted, 1 failed:" in result.stdout and "HTTP 404" in result.stdout
    assert sorted(os.listdir(out)) == sorted(n for n in names if n != "mobilenet_v2_0.35_128")
    config = json.loads((out / "mobilenet_v2_0.35_160" / "config.json").read_text())
    assert config["image_size"] == 160


def test_all_with_verify_reports_the_parity(zoo_server: ZooServer, fixture_tarball, tmp_path):
    pytest.importorskip("tensorflow")
    zoo_server.serve(ENTRY.filename, fixture_tarball)
    out = tmp_path / "zoo"
    result = run_cli(
        "--all", "--depth", "0.35", "--size", "96", "--verify", "--mirror", zoo_server.url,
        "--cache-dir", str(tmp_path / "cache"), "--output", str(out), env=cli_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    row = result.stdout.splitlines()[2].split()
    assert row[:2] == [SMALL, "verified"] and float(row[2]) < 1e-3
    assert (out / SMALL / "parity" / "parity.json").is_file()
    assert "| **PASS** |" in (out / SMALL / "README.md").read_text()


@pytest.mark.slow
def test_all_converts_the_whole_zoo(zoo_server: ZooServer, tmp_path):
    """Every one of the 26 zoo tarballs, served locally from fixtures (one fixture per depth)."""
    from fixtures import ZOO_CLASSIFICATION, ZOO_DEEPLAB, ensure_fixture

    per_depth = {}
    for variant in ZOO_CLASSIFICATION:
        per_depth.setdefault(variant.depth, ensure_fixture(variant.name).tarball)
    deeplab = {variant.depth: ensure_fixture(variant.name).tarball for variant in ZOO_DEEPLAB}
    for entry in zoo.select():
        zoo_server.serve(entry.filename, deeplab[entry.depth] if entry.is_deeplab else per_depth[entry.depth])
    out = tmp_path / "zoo"
    result = run_cli(
        "--all", "--jobs", "2", "--mirror", zoo_server.url, "--cache-dir", str(tmp_path / "cache"),
        "--output", str(out), env=cli_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "26 of 26 converted" in result.stdout
    assert len(os.listdir(out)) == 26
    for entry in zoo.select():
        assert (out / entry.output_name() / "README.md").is_file()


# ------------------------------------------------------------------------------------- --push-to-hub
def test_push_to_hub_uploads_the_folder(monkeypatch, fixture_tarball, tmp_path):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda *a, **k: calls.append(("create", a, k)))
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **k: calls.append(("upload", (), k)))
    out = tmp_path / "out"
    result = CliRunner().invoke(
        convert_main, ["--checkpoint", str(fixture_tarball), "--output", str(out), "--push-to-hub", "me/mnv2"]
    )
    assert result.exit_code == 0, result.output
    assert [call[0] for call in calls] == ["create", "upload"]
    assert calls[1][2]["repo_id"] == "me/mnv2" and Path(calls[1][2]["folder_path"]) == out
    assert "https://huggingface.co/me/mnv2" in result.stdout


def test_push_to_hub_needs_a_login_and_fails_before_converting(monkeypatch, fixture_tarball, tmp_path):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    out = tmp_path / "out"
    args = ["--checkpoint", str(fixture_tarball), "--output", str(out), "--push-to-hub", "me/mnv2"]
    result = CliRunner().invoke(convert_main, args)
    assert result.exit_code == 1 and "huggingface-cli login" in result.stderr and not out.exists()

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    result = CliRunner().invoke(convert_main, args)
    assert result.exit_code == 1 and "pip install huggingface_hub" in result.stderr and not out.exists()


def test_push_to_hub_failures_are_one_line(monkeypatch, fixture_tarball, tmp_path):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda *a, **k: None)

    def refuse(**kwargs):
        raise RuntimeError("403 Forbidden:\nyou cannot write to me/mnv2")

    monkeypatch.setattr(huggingface_hub, "upload_folder", refuse)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        convert_main, ["--checkpoint", str(fixture_tarball), "--output", str(out), "--push-to-hub", "me/mnv2"]
    )
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"error: cannot upload {out} to me/mnv2: 403 Forbidden: you cannot write to me/mnv2"
    ]
