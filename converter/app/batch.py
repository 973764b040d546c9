"""Converting straight from the zoo: one variant (`convert-mobilenet --depth 1.0 --size 224`) or the
whole zoo (`--all`), downloading through the cache (`converter.zoo.download`)."""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from converter.errors import USER_ERRORS, command_line_message
from converter.output import layout
from converter.output.records import ParityRecord
from converter.output.writer import check_output
from converter.zoo.download import MIRROR_ENV, fetch
from converter.zoo_catalog import ZooEntry

if TYPE_CHECKING:  # the pipeline is imported when a conversion runs, not when the command line starts
    from converter.pipeline.convert import ConversionOptions

Item = TypeVar("Item")
Result = TypeVar("Result")

# verify(folder, tarball) -> None: runs the verifier on a converted folder (writes parity/ there).
Verifier = Callable[[Path, Path], Any]


@dataclass(frozen=True)
class BatchResult:
    """One row of the `--all` summary."""

    name: str
    output: Path
    status: str  # "ok", "verified", "parity failed" or "failed"
    seconds: float
    max_abs_diff: float | None = None
    error: str | None = None
    detail: tuple[str, ...] = ()  # what the one-line error leaves out (each download source's failure)

    @property
    def failed(self) -> bool:
        return self.status in ("failed", "parity failed")


def default_output(entry: ZooEntry, output_stride: int | None = None, size: int | None = None) -> Path:
    return Path(entry.output_name(output_stride, size if entry.is_deeplab else None))


def convert_entry(
    entry: ZooEntry,
    output: Path | None,
    options: ConversionOptions,
    *,
    cache_dir: str | None = None,
    mirror: str | None = None,
    progress: bool = True,
    source: str | None = None,
    unreachable: dict[str, str] | None = None,
):
    """Fetch `entry` through the cache (from `source`, else its first source that works; hosts in
    `unreachable` are skipped, see `fetch`) and convert it, reading the download as `options.format`, else
    as its source says (see `ZooSource.format`); the entry fixes depth and a classifier's size, and a
    DeepLab entry alone takes `options.output_stride`. Returns the `ConversionSummary`."""
    from converter.pipeline.convert import convert_checkpoint

    output = Path(output) if output is not None else default_output(entry, options.output_stride, options.size)
    check_output(output, options.force)  # before a download that could take minutes
    mirror = mirror if mirror is not None else (os.environ.get(MIRROR_ENV) or None)
    fetched = fetch(
        entry, cache_dir=cache_dir, mirror=mirror, progress=progress, source=source, unreachable=unreachable
    )
    download = {
        "zoo_name": entry.name,
        "source": fetched.source.name,
        "url": fetched.source.url,
        "sha256": fetched.sha256,
    }
    if mirror:  # the bytes came from elsewhere: the model card does not vouch for them as the zoo's file
        download["mirror"] = mirror
    return convert_checkpoint(
        fetched.path,
        output,
        replace(
            options,
            format=options.format or fetched.source.format,
            depth=entry.depth,
            size=options.size if entry.is_deeplab else entry.size,
            output_stride=options.output_stride if entry.is_deeplab else None,
        ),
        download=download,
    )


def convert_all(
    entries: Sequence[ZooEntry],
    parent: Path,
    options: ConversionOptions,
    *,
    jobs: int = 1,
    verify: Verifier | None = None,
    cache_dir: str | None = None,
    mirror: str | None = None,
    source: str | None = None,
    progress: bool = True,
) -> list[BatchResult]:
    """Convert (and verify, when `verify` is given) every entry into `parent/<name>`, continuing past
    failures. Classifier-only options (`drop_background`, `avg_pool`) skip the DeepLab entries and
    `output_stride` the classifiers. Results come back in the order of `entries`. A host found unreachable
    is not tried again by the other entries, so that a whole zoo fails fast offline."""
    from tqdm import tqdm

    parent.mkdir(parents=True, exist_ok=True)
    unreachable: dict[str, str] = {}  # shared by the threads: dict updates are atomic

    def one(entry: ZooEntry) -> BatchResult:
        started = time.perf_counter()
        output = parent / default_output(entry, options.output_stride)
        # Classifier-only options apply to the classifiers of the batch.
        chosen = replace(options, avg_pool="global", drop_background=False) if entry.is_deeplab else options
        try:
            summary = convert_entry(
                entry,
                output,
                chosen,
                cache_dir=cache_dir,
                mirror=mirror,
                source=source,
                progress=False,
                unreachable=unreachable,
            )
            status = "ok"
            if verify is not None:
                verify(
                    summary.output, fetch(entry, cache_dir=cache_dir, mirror=mirror, progress=False, source=source).path
                )
                status = "verified"
        except USER_ERRORS as error:
            detail = tuple(getattr(error, "detail", ()))
            message = command_line_message(error)  # the summary table of the --all command
            return BatchResult(
                entry.name, output, "failed", time.perf_counter() - started, error=message, detail=detail
            )
        except Exception as error:  # a bug in one conversion must not stop the others
            message = f"internal error: {type(error).__name__}: {error}"
            return BatchResult(entry.name, output, "failed", time.perf_counter() - started, error=message)
        passed, diff = read_parity(output)
        if passed is False:
            status = "parity failed"
        return BatchResult(entry.name, output, status, time.perf_counter() - started, diff)

    show = progress and sys.stderr.isatty()
    with tqdm(total=len(entries), desc="zoo", unit="model", file=sys.stderr, disable=not show) as bar:

        def advance(result: BatchResult) -> None:
            bar.set_postfix_str(f"{result.name}: {result.status}")
            bar.update()

        return run_batch(one, entries, jobs=jobs, on_result=advance)


def run_batch(
    work: Callable[[Item], Result],
    items: Sequence[Item],
    *,
    jobs: int = 1,
    processes: bool = False,
    initializer: Callable[..., None] | None = None,
    initargs: tuple = (),
    on_result: Callable[[Result], None] | None = None,
) -> list[Result]:
    """`work(item)` for every item, `jobs` at a time, results in the order of `items`; `on_result` sees each
    as it finishes. The one runner of `--all` (threads) and of the CI parity matrix (`processes`: spawned
    processes, each set up by `initializer`, because TensorFlow and torch threads do not survive a fork).
    `work` must not raise: it reports its failures in its result. Ctrl-C starts nothing new."""
    if processes:
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=initializer, initargs=initargs)
    else:
        pool = ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="batch")
    try:
        futures = [pool.submit(work, item) for item in items]
        for future in as_completed(futures):
            if on_result is not None:
                on_result(future.result())
    except BaseException:  # Ctrl-C: cancel what has not started; what runs finishes into its staging
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return [future.result() for future in futures]


def read_parity(folder: Path) -> tuple[bool | None, float | None]:
    """(passed, max_abs_diff) from `folder`'s parity record, (None, None) when there is none."""
    record = ParityRecord.read(folder / layout.PARITY_FOLDER)
    return (None, None) if record is None else (record.passed, record.max_abs_diff)


def summary_table(results: Sequence[BatchResult], details: bool = False) -> str:
    """A plain-text table: name, status, max diff, seconds; then one line per failure, followed by its
    detail lines with `details` (--debug)."""
    rows = [("name", "status", "max diff", "seconds")]
    for r in results:
        diff = f"{r.max_abs_diff:.3g}" if r.max_abs_diff is not None else "-"
        rows.append((r.name, r.status, diff, f"{r.seconds:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    failed = [r for r in results if r.failed]
    ok = len(results) - len(failed)
    lines.append(f"{ok} of {len(results)} converted" + (f", {len(failed)} failed:" if failed else ""))
    for r in failed:
        lines.append(f"  {r.name}: {r.error or 'the converted model does not match the original graph'}")
        lines += [f"    detail: {line}" for line in r.detail] if details else []
    return "\n".join(lines)
