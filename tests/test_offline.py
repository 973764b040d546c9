"""Working without a network: a host that cannot be reached ends its source at once (no retries) and is
not tried again in the same run, a download already in the cache is used before any network source, the
error is one short line naming the model.

Unreachable hosts are a closed port on 127.0.0.1 and names under `.invalid` (reserved, never resolved);
attempts are counted at `urlopen`, which still does the real work."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from converter.app.cli import convert_main
from converter.errors import DownloadError
from converter.zoo import download
from converter.zoo.download import RetryPolicy, fetch
from converter.zoo.table import lookup
from converter.zoo_catalog import entries, source_base_env
from tests.helpers import SHARED
from tests.zoo_server import ZooServer, closed_port, running_zoo_server

ENTRY = lookup("mobilenet_v2", 1.0, 224)  # three sources: official, tfhub, tflite-hosted
SLOW_RETRIES = RetryPolicy(attempts=4, base_delay=30.0, timeout=10)  # a retry would be seen as a sleep


@pytest.fixture(autouse=True)
def _nothing_leaves_this_machine(monkeypatch, tmp_path):
    """Every source's base URL on an unresolvable name; no mirror, no inherited settings."""
    for name in list(os.environ):
        if name.startswith("MOBILENET_CONVERT"):
            monkeypatch.delenv(name)
    for name in {source.name for entry in entries() for source in entry.sources()}:
        monkeypatch.setenv(source_base_env(name), f"http://{name}.invalid")
    monkeypatch.setenv(download.CACHE_ENV, str(tmp_path / "cache"))


@pytest.fixture
def attempts(monkeypatch) -> list[str]:
    """The URLs `urlopen` was asked to open, and `time.sleep` refusing to run (a retry would sleep)."""
    opened: list[str] = []
    real = download.urlopen

    def counting(request, *args, **kwargs):
        opened.append(request.full_url)
        return real(request, *args, **kwargs)

    def no_retry(seconds):
        raise AssertionError(f"a retry was scheduled ({seconds} s) for a host that cannot be reached")

    monkeypatch.setattr(download, "urlopen", counting)
    monkeypatch.setattr(download.time, "sleep", no_retry)
    return opened


@pytest.fixture
def zoo_server() -> Iterator[ZooServer]:
    with running_zoo_server() as server:
        yield server


@pytest.mark.parametrize("where", ["refused", "unresolvable"])
def test_an_unreachable_host_ends_its_source_after_one_attempt(attempts, tmp_path, where):
    host = f"127.0.0.1:{closed_port()}" if where == "refused" else "zoo.invalid"
    with pytest.raises(DownloadError) as caught:
        fetch(ENTRY, source="official", cache_dir=tmp_path, mirror=f"http://{host}", retry=SLOW_RETRIES)
    assert attempts == [f"http://{host}/{ENTRY.filename}"]
    message = str(caught.value)
    assert message.startswith(f"cannot download {ENTRY.name}: no network ({host} unreachable)")
    assert "--checkpoint FILE" in message and "\n" not in message
    (detail,) = caught.value.detail
    assert detail.startswith(f"official: cannot download http://{host}/{ENTRY.filename}: cannot reach {host} (")
    assert not list(tmp_path.iterdir())


def test_a_host_found_unreachable_is_not_tried_again_in_the_same_run(attempts, tmp_path):
    unreachable: dict[str, str] = {}
    other = lookup("mobilenet_v2", 0.35, 96)
    for entry in (ENTRY, other):
        with pytest.raises(DownloadError):
            fetch(entry, source="official", cache_dir=tmp_path, retry=SLOW_RETRIES, unreachable=unreachable)
    assert attempts == [ENTRY.sources()[0].url]
    assert list(unreachable) == ["official.invalid"]


def test_a_server_error_is_still_retried(zoo_server: ZooServer, monkeypatch, tmp_path):
    sleeps: list[float] = []
    monkeypatch.setattr(download.time, "sleep", sleeps.append)
    zoo_server.status[ENTRY.filename] = 503
    policy = RetryPolicy(attempts=3, base_delay=0.5, timeout=10)
    with pytest.raises(DownloadError, match="gave up after 3 attempts"):
        fetch(ENTRY, source="official", cache_dir=tmp_path, mirror=zoo_server.url, retry=policy)
    assert zoo_server.count() == 3 and sleeps == [0.5, 1.0]


def test_every_source_unreachable_is_one_short_line_naming_the_model(attempts, monkeypatch, tmp_path):
    monkeypatch.setenv(source_base_env("tfhub"), f"http://127.0.0.1:{closed_port()}")
    official, tfhub, hosted = ENTRY.sources()
    assert official.url.startswith("http://official.invalid/") and hosted.url.startswith("http://tflite-hosted")
    with pytest.raises(DownloadError) as caught:
        fetch(ENTRY, cache_dir=tmp_path, retry=SLOW_RETRIES)
    assert attempts == [official.url, tfhub.url, hosted.url]  # one each, in order
    message = str(caught.value)
    assert message.startswith(f"cannot download {ENTRY.name}: no network (")
    assert "--checkpoint FILE" in message and "--debug" in message and "\n" not in message
    assert len(message) < 250
    assert [line.split(":", 1)[0] for line in caught.value.detail] == ["official", "tfhub", "tflite-hosted"]
    assert all(source.url in line for source, line in zip(ENTRY.sources(), caught.value.detail, strict=True))


def test_a_download_in_the_cache_is_used_before_any_network_source(zoo_server: ZooServer, monkeypatch, tmp_path):
    for name in ("official", "tfhub", "tflite-hosted"):
        monkeypatch.setenv(source_base_env(name), f"{zoo_server.url}/{name}")
    hosted = ENTRY.sources()[-1]
    (tmp_path / hosted.filename).write_bytes(b"downloaded earlier")
    fetched = fetch(ENTRY, cache_dir=tmp_path)
    assert fetched.source.name == "tflite-hosted" and fetched.path == tmp_path / hosted.filename
    assert zoo_server.count() == 0


def test_a_cached_download_that_fails_its_check_is_not_used(zoo_server: ZooServer, monkeypatch, tmp_path):
    entry = lookup("mobilenet_v2", 1.0, 224, quantized=True)
    coral = entry.sources()[-1]
    monkeypatch.setenv(source_base_env("coral"), zoo_server.url)
    (tmp_path / coral.filename).write_bytes(b"\0" * coral.bytes)  # the right size, not the published bytes
    with pytest.raises(DownloadError):
        fetch(entry, source="coral", cache_dir=tmp_path, retry=RetryPolicy(attempts=1))
    assert zoo_server.count() == 1 and not (tmp_path / coral.filename).exists()


# --------------------------------------------------------------------------------------- convert-mobilenet
def test_cli_offline_error_is_one_line_and_debug_shows_each_source(attempts, tmp_path):
    args = ["--depth", "1.0", "--size", "224", "--output", str(tmp_path / "out")]
    result = CliRunner().invoke(convert_main, args)
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot download {ENTRY.name}: no network (") and len(line) < 250
    assert "official.invalid" in line and "tfhub.invalid" in line and "--checkpoint FILE" in line
    assert len(attempts) == 3 and not (tmp_path / "out").exists()

    result = CliRunner().invoke(convert_main, [*args, "--debug"])
    details = [text for text in result.stderr.splitlines() if text.startswith("detail: ")]
    assert [text.split(":")[1].strip() for text in details] == ["official", "tfhub", "tflite-hosted"]
    assert all(source.url in text for source, text in zip(ENTRY.sources(), details, strict=True))


def test_cli_quantized_uses_the_cached_tflite_without_the_network(attempts, tmp_path):
    real = SHARED / "realdata" / "models" / "mobilenet_v2_1.0_224_quant.tflite"
    if not real.is_file():
        pytest.skip(f"{real} is absent: no real quantized .tflite to put in the cache")
    entry = lookup("mobilenet_v2", 1.0, 224, quantized=True)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / entry.sources()[-1].filename).symlink_to(real)  # where a coral download would be
    args = ["--depth", "1.0", "--size", "224", "--quantized", "--cache-dir", str(cache)]
    result = CliRunner().invoke(convert_main, [*args, "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert attempts == [] and (tmp_path / "out" / "config.json").is_file()


def test_all_offline_tries_each_host_once(attempts, monkeypatch, tmp_path):
    monkeypatch.setenv(source_base_env("tfhub"), f"http://127.0.0.1:{closed_port()}")
    selection = [entry for entry in entries() if entry.depth == 0.35 and not entry.quantized]
    args = ["--all", "--depth", "0.35", "--output", str(tmp_path / "zoo")]
    result = CliRunner().invoke(convert_main, args)
    assert result.exit_code == 1
    assert f"0 of {len(selection)} converted, {len(selection)} failed:" in result.stdout
    assert result.stdout.count(": no network (") == len(selection)
    assert len(attempts) == 2  # official.invalid and the closed port, once each for the whole run


def test_all_offline_with_debug_shows_each_models_source_failures(attempts, monkeypatch, tmp_path):
    """Each failed model's line promises that --debug shows each source's failure: under --all too."""
    selection = [entry for entry in entries() if entry.depth == 0.35 and entry.size == 96 and not entry.quantized]
    args = ["--all", "--depth", "0.35", "--size", "96", "--output", str(tmp_path / "zoo")]
    quiet = CliRunner().invoke(convert_main, args)
    assert quiet.exit_code == 1 and "--debug" in quiet.stdout and "detail: " not in quiet.stdout
    result = CliRunner().invoke(convert_main, [*args, "--debug"])
    assert result.exit_code == 1
    details = [line.strip() for line in result.stdout.splitlines() if line.strip().startswith("detail: ")]
    sources = [source for entry in selection for source in entry.sources()]
    assert len(details) == len(sources)  # one line per source of each failed model, naming it
    assert all(source.name in line for source, line in zip(sources, details, strict=True))
