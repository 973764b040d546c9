"""Fetching zoo tarballs into a local cache: resumable, retried, checked, published by one rename.

The cache folder is `--cache-dir`, else `$MOBILENET_CONVERT_CACHE`, else
`$XDG_CACHE_HOME/mobilenet-convert`, else `~/.cache/mobilenet-convert`. A tarball is downloaded into
`<file>.part` (resumed with an HTTP Range request when one is left from an interrupted run), checked
against the announced size, renamed into place and given a `<file>.sha256` sidecar (`sha256sum` format).
A file found in the cache, from any of a model's sources, is reused before any network access.

Server trouble (a 5xx answer, a broken connection, a timeout) is retried. A host that cannot be reached
at all (no DNS answer, connection refused, no route) is not: retrying cannot help offline, so the source
fails at once, and the host is remembered so that later downloads of the same run skip it.

`--mirror BASE` (or `$MOBILENET_CONVERT_MIRROR`) replaces the official location: `BASE/<file name>`,
where BASE is an http(s) URL, a `file://` URL or a local folder (air-gapped sites).
"""

from __future__ import annotations

import errno
import http.client
import os
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import unquote, urlsplit
from urllib.request import Request, urlopen

from converter.errors import DownloadError, UsageError
from converter.hashing import file_sha256
from converter.version import __version__
from converter.zoo_catalog import ZooEntry, ZooSource

CACHE_ENV = "MOBILENET_CONVERT_CACHE"
MIRROR_ENV = "MOBILENET_CONVERT_MIRROR"
ATTEMPTS_ENV = "MOBILENET_CONVERT_ATTEMPTS"
RETRY_DELAY_ENV = "MOBILENET_CONVERT_RETRY_DELAY"
TIMEOUT_ENV = "MOBILENET_CONVERT_TIMEOUT"
PART_SUFFIX = ".part"
SHA256_SUFFIX = ".sha256"
_CHUNK = 1 << 16
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_RETRIED_STATUS = (408, 429)  # and every 5xx
_UNREACHABLE_ERRNOS = (errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: `attempts` in all, waiting `base_delay * 2**k` seconds before retry k+1."""

    attempts: int = 4
    base_delay: float = 1.0
    timeout: float = 30.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """Defaults, overridden by `$MOBILENET_CONVERT_ATTEMPTS` / `_RETRY_DELAY` / `_TIMEOUT`."""
        default = cls()
        try:
            return cls(
                attempts=max(1, int(os.environ.get(ATTEMPTS_ENV, default.attempts))),
                base_delay=max(0.0, float(os.environ.get(RETRY_DELAY_ENV, default.base_delay))),
                timeout=max(0.1, float(os.environ.get(TIMEOUT_ENV, default.timeout))),
            )
        except ValueError as error:
            raise DownloadError(f"bad retry setting in the environment: {error}") from None

    def delay(self, retry: int) -> float:
        return self.base_delay * 2**retry


class _Transient(Exception):
    """A failure worth another attempt (connection trouble, a short body, a 5xx answer)."""


class _Unreachable(Exception):
    """The host cannot be reached at all (no DNS answer, connection refused, no route): not worth retrying."""


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "mobilenet-convert"


def cached_path(source: ZooSource, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where a source's download lives (or will live) in the cache."""
    return (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / source.filename


def recorded_sha256(path: Path) -> str | None:
    """The sha256 in `path`'s sidecar, if there is one."""
    try:
        text = Path(f"{path}{SHA256_SUFFIX}").read_text().split()
    except OSError:
        return None
    return text[0] if text and re.fullmatch(r"[0-9a-f]{64}", text[0]) else None


@dataclass(frozen=True)
class Download:
    """A zoo model in the cache, and the source it came from."""

    path: Path
    source: ZooSource
    sha256: str | None


def fetch(
    entry: ZooEntry,
    cache_dir: str | os.PathLike | None = None,
    mirror: str | None = None,
    progress: bool = True,
    *,
    source: str | None = None,
    retry: RetryPolicy | None = None,
    unreachable: dict[str, str] | None = None,
) -> Download:
    """`entry`'s download in the cache: the first of its sources (or only `source`) already there, else
    fetched from each source in turn until one works, with a one-line note on stderr for each that failed
    before it. `unreachable` (host -> why) remembers the hosts found unreachable; pass one dict to every
    call of a run so that each host is tried once.

    Raises:
        UsageError: `source` is not one of the entry's.
        DownloadError: every source failed; offline or for several sources, a short line naming the model
            with each source's full error in `detail`, else the one source's own error.
    """
    sources = entry.sources()
    if source is not None:
        names = [candidate.name for candidate in sources]
        if source not in names:
            raise UsageError(f"{entry.name} has no source {source!r}; its sources: {', '.join(names)}")
        sources = [candidate for candidate in sources if candidate.name == source]
    for candidate in sources:  # a checked download in the cache beats any network source
        path = cached_path(candidate, cache_dir)
        if path.is_file() and _reusable(path, candidate):
            return Download(path, candidate, recorded_sha256(path))
    unreachable = {} if unreachable is None else unreachable
    failures: list[tuple[str, DownloadError]] = []
    for candidate in sources:
        try:
            path = fetch_source(candidate, cache_dir, mirror, progress, retry=retry, unreachable=unreachable)
        except DownloadError as error:
            failures.append((candidate.name, error))
            continue
        for name, error in failures:
            print(f"note: {name} source failed ({error.reason}); downloaded from {candidate.name}", file=sys.stderr)
        return Download(path, candidate, recorded_sha256(path))
    raise _every_source_failed(entry, failures, unreachable)


def _every_source_failed(
    entry: ZooEntry, failures: list[tuple[str, DownloadError]], unreachable: dict[str, str]
) -> DownloadError:
    """Offline, or several sources failed: one short line naming the model, each source's full error in
    `detail`. One source failing otherwise: its own error, which names the URL and what to check."""
    detail = tuple(f"{name}: {error}" for name, error in failures)
    offline = [error.reason for _, error in failures if error.reason in unreachable.values()]
    if len(offline) == len(failures):
        hosts = ", ".join(sorted({host for host, why in unreachable.items() if why in offline}))
        return DownloadError(
            f"cannot download {entry.name}: no network ({hosts} unreachable); to convert offline, pass "
            "--checkpoint FILE with a local copy (--debug shows each source's failure)",
            detail=detail,
        )
    if len(failures) == 1:
        return failures[0][1]
    reasons = "; ".join(f"{name}: {error.reason}" for name, error in failures)
    return DownloadError(
        f"cannot download {entry.name} ({reasons}); pass --checkpoint FILE with a local copy, or --mirror BASE "
        "(a server or folder holding one of its files); --debug shows each URL",
        detail=detail,
    )


def fetch_source(
    source: ZooSource,
    cache_dir: str | os.PathLike | None = None,
    mirror: str | None = None,
    progress: bool = True,
    *,
    retry: RetryPolicy | None = None,
    unreachable: dict[str, str] | None = None,
) -> Path:
    """Return the path of one source's download in the cache, downloading it first if it is not there.
    A host in `unreachable` (host -> why) is not contacted; one found unreachable is added to it.

    Raises:
        DownloadError: offline, not found, server errors or retries exhausted, a size or checksum that
            does not match; the message names the URL and suggests `--mirror` or `--checkpoint`.
    """
    target = cached_path(source, cache_dir)
    if target.is_file() and _reusable(target, source):
        return target
    mirror = mirror if mirror is not None else (os.environ.get(MIRROR_ENV) or None)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DownloadError(
            f"cannot create the cache folder {target.parent} ({error.strerror}); choose another with --cache-dir",
            reason=f"cannot create the cache folder ({error.strerror})",
        ) from None
    part = Path(f"{target}{PART_SUFFIX}")
    location = source_location(source, mirror)
    if isinstance(location, Path):
        _copy_local(location, part, mirror)
        where = str(location)
    else:
        policy = retry or RetryPolicy.from_env()
        _download(location, part, source, policy, progress, {} if unreachable is None else unreachable)
        where = location
    digest = file_sha256(part)
    if source.sha256 and digest != source.sha256:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"{where} has sha256 {digest}, but the zoo table says {source.sha256}: the file is not the "
            "published one; pass --checkpoint with a trusted copy",
            reason="not the published file (its sha256 differs from the zoo table's)",
        )
    if source.bytes is not None and part.stat().st_size != source.bytes:
        size = part.stat().st_size
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"{where} is {size} bytes, but the zoo table says {source.bytes}; try again or --mirror",
            reason=f"{size} bytes, not the zoo table's {source.bytes}",
        )
    os.replace(part, target)
    _write_sidecar(target, digest)
    return target


def source_location(source: ZooSource, mirror: str | None) -> str | Path:
    """The URL to download, or the local file to copy when the mirror is a folder / file:// URL."""
    if not mirror:
        return source.url
    if mirror.startswith(("http://", "https://")):
        return f"{mirror.rstrip('/')}/{source.filename}"
    folder = Path(unquote(urlsplit(mirror).path)) if mirror.startswith("file://") else Path(mirror).expanduser()
    if not folder.is_dir():
        raise DownloadError(
            f"the mirror {mirror} is neither an http(s) URL nor an existing folder",
            reason="the mirror is not a folder",
        )
    return folder / source.filename


def _reusable(target: Path, source: ZooSource) -> bool:
    """A file in the cache was published complete; re-check it only against what the table knows."""
    if source.bytes is not None and target.stat().st_size != source.bytes:
        target.unlink(missing_ok=True)
        return False
    digest = recorded_sha256(target)
    if digest is None:  # put there by hand: record what it is
        digest = file_sha256(target)
        _write_sidecar(target, digest)
    if source.sha256 and digest != source.sha256:
        target.unlink(missing_ok=True)
        Path(f"{target}{SHA256_SUFFIX}").unlink(missing_ok=True)
        return False
    return True


def _copy_local(source: Path, part: Path, mirror: str) -> None:
    if not source.is_file():
        raise DownloadError(
            f"{source.name} is not in the mirror {mirror}; put it there or pass --checkpoint with a local copy",
            reason=f"{source.name} is not in the mirror",
        )
    try:
        shutil.copyfile(source, part)
    except OSError as error:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"cannot copy {source} into the cache ({error.strerror})", reason=f"cannot copy ({error.strerror})"
        ) from None


def _download(
    url: str, part: Path, source: ZooSource, policy: RetryPolicy, progress: bool, unreachable: dict[str, str]
) -> None:
    host = urlsplit(url).netloc
    last = "no attempt made"
    for attempt in range(policy.attempts):
        if host in unreachable:
            break
        if attempt:
            time.sleep(policy.delay(attempt - 1))
        try:
            _attempt(url, part, source, policy, progress)
            return
        except _Transient as error:
            last = str(error)
        except _Unreachable as error:
            unreachable.setdefault(host, f"cannot reach {host} ({error})")
    if host in unreachable:
        raise DownloadError(
            f"cannot download {url}: {unreachable[host]}; to convert offline, pass --checkpoint FILE with a local "
            f"copy, or --mirror BASE (a server or folder holding {source.filename})",
            reason=unreachable[host],
        )
    raise DownloadError(
        f"cannot download {url}: {last} (gave up after {policy.attempts} attempts); check the network, "
        f"or pass --mirror BASE (a server or folder holding {source.filename}) or --checkpoint with a local copy",
        reason=f"{last} (after {policy.attempts} attempts)",
    )


def _attempt(url: str, part: Path, source: ZooSource, policy: RetryPolicy, progress: bool) -> None:
    offset = part.stat().st_size if part.is_file() else 0
    request = Request(url, headers={"User-Agent": f"mobilenet-convert/{__version__}"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urlopen(request, timeout=policy.timeout)
    except HTTPError as error:
        error.close()
        if error.code == 416 and offset:  # the .part is not a prefix of this file: start over
            part.unlink(missing_ok=True)
            raise _Transient("the server refused to resume (HTTP 416)") from None
        if error.code >= 500 or error.code in _RETRIED_STATUS:
            raise _Transient(f"HTTP {error.code} {error.reason}") from None
        hint = "check --depth/--size/--mirror" if error.code == 404 else "check the URL or --mirror"
        raise DownloadError(
            f"cannot download {url}: HTTP {error.code} {error.reason}; {hint}, or pass --checkpoint with a local copy",
            reason=f"HTTP {error.code} {error.reason}",
        ) from None
    except URLError as error:
        raise _failure(error.reason) from None
    except (OSError, http.client.HTTPException) as error:
        raise _failure(error) from None

    with response:
        total = _announced_total(response)
        mode = "wb"
        if offset and response.status == 206:
            start = _range_start(response)
            if start != offset:  # an answer for another range than asked: start over
                part.unlink(missing_ok=True)
                raise _Transient(f"the server resumed at byte {start}, not {offset}")
            mode = "ab"
        elif response.status not in (200, 206):
            raise _Transient(f"unexpected HTTP {response.status}")
        else:
            offset = 0  # the server ignored the Range request: the body is the whole file
        if source.bytes is not None and total is not None and total != source.bytes:
            raise DownloadError(
                f"{url} is {total} bytes, but the zoo table says {source.bytes}: not the published file; "
                "check --mirror or pass --checkpoint",
                reason=f"{total} bytes, not the zoo table's {source.bytes}",
            )
        expected = total if total is not None else source.bytes
        _receive(response, part, mode, offset, expected, source.filename, progress)

    received = part.stat().st_size
    if expected is not None and received != expected:
        if received > expected:
            part.unlink(missing_ok=True)
        raise _Transient(f"the connection ended after {received} of {expected} bytes")


def _receive(response, part: Path, mode: str, offset: int, expected: int | None, label: str, progress: bool):
    from tqdm import tqdm

    show = progress and sys.stderr.isatty()
    with (
        open(part, mode) as handle,
        tqdm(
            total=expected,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=label,
            file=sys.stderr,
            disable=not show,
            leave=False,
        ) as bar,
    ):
        try:
            while chunk := response.read(_CHUNK):
                handle.write(chunk)
                bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as error:
            raise _Transient(f"the connection broke ({_reason(error)})") from None


def _announced_total(response) -> int | None:
    """Size of the whole file: from Content-Range on a 206, Content-Length on a 200."""
    if response.status == 206:
        match = _CONTENT_RANGE.fullmatch((response.headers.get("Content-Range") or "").strip())
        return int(match[3]) if match and match[3] != "*" else None
    length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _range_start(response) -> int | None:
    match = _CONTENT_RANGE.fullmatch((response.headers.get("Content-Range") or "").strip())
    return int(match[1]) if match else None


def _failure(error) -> Exception:
    """A connection that could not be opened: unreachable (final) or transient (worth retrying)."""
    if isinstance(error, socket.gaierror) or getattr(error, "errno", None) in _UNREACHABLE_ERRNOS:
        return _Unreachable(_reason(error))
    return _Transient(_reason(error))


def _reason(error) -> str:
    if isinstance(error, BaseException):
        text = getattr(error, "strerror", None) or str(error) or type(error).__name__
    else:
        text = str(error)
    return " ".join(text.split())


def _write_sidecar(path: Path, digest: str) -> None:
    Path(f"{path}{SHA256_SUFFIX}").write_text(f"{digest}  {path.name}\n")
