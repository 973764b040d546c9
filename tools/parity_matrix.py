"""CI parity matrix: convert every fixture zoo tarball and prove it matches its original graphs.

    python -m tools.parity_matrix --out reports [--jobs N] [--only NAME ...] [--kind KIND]

For the 22 slim classifiers and the DeepLab models of `fixtures` (built on demand into the fixtures cache,
see `fixtures.cache`), each tarball is converted into a temporary folder and verified against every graph
family it carries, in the original code's form: a classifier against its training-scope ``.meta`` and
against its BatchNorm-folded ``_frozen.pb``, a DeepLab model against its export graph (padded to the 513
crop). The reports go to `<out>/<name>/<family>/parity.{json,md,xml,png}`, with `<out>/summary.md` (fit
for a CI step summary) and `<out>/summary.json` over all of them. Exit status 1 when any check fails or
cannot be made. A CI tool beside the library (it runs the fixture builders), not part of the wheel.

The quantized zoo entries are left out, each with its reason in both summaries (`left_out`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from converter.output.markdown import table_row
from converter.vocabulary import FROZEN_GRAPH, META_GRAPH

_THREADS: int | None = None


#: The graph families each kind of fixture is verified against.
FAMILIES = {"classification": (META_GRAPH, FROZEN_GRAPH), "deeplab": (FROZEN_GRAPH,)}
QUANTIZED_LEFT_OUT = (
    "quantized models: their reference is the TFLite interpreter, not the TF graphs this matrix runs, and the "
    "fixtures have no integer model of them; the test suite checks the real files against the interpreter's "
    "reference kernels instead"
)


def left_out() -> dict[str, str]:
    """Zoo entries the matrix does not run, with the reason."""
    from converter.zoo_catalog import entries

    return {entry.name: QUANTIZED_LEFT_OUT for entry in entries() if entry.quantized}


@dataclass
class MatrixRow:
    name: str
    kind: str
    family: str
    passed: bool
    status: str  # "pass", "fail" or "error"
    max_abs_diff: float | None
    first_divergence: str | None
    reference: str | None
    seconds: float
    error: str | None = None
    worst_ratio: float | None = None  # max over endpoints and inputs of diff / tolerance


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.parity_matrix", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("reports"), help="report folder (default: reports)")
    parser.add_argument("--jobs", type=int, default=None, help="models verified at once (default: CPU count, max 4)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="zoo names to run (default: all)")
    parser.add_argument("--kind", choices=("classification", "deeplab"), help="run one family only")
    args = parser.parse_args(argv)

    from converter.app.batch import run_batch
    from fixtures import ZOO_CLASSIFICATION, ZOO_DEEPLAB, ensure_fixtures

    variants = [v for v in ZOO_CLASSIFICATION + ZOO_DEEPLAB if args.kind in (None, v.kind)]
    if args.only:
        unknown = sorted(set(args.only) - {v.name for v in variants})
        if unknown:
            parser.error(f"unknown zoo names: {', '.join(unknown)}")
        variants = [v for v in variants if v.name in args.only]
    started = time.perf_counter()
    fixtures = ensure_fixtures(variants)
    built = time.perf_counter() - started
    print(f"{len(fixtures)} fixtures ready in {built:.1f} s", flush=True)

    jobs = max(1, args.jobs or min(4, os.cpu_count() or 1))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    args.out.mkdir(parents=True, exist_ok=True)
    tasks = [
        (f.variant.name, f.variant.kind, family, str(f.tarball), str(args.out / f.variant.name / family))
        for f in fixtures
        for family in FAMILIES[f.variant.kind]
    ]

    def show(row: MatrixRow) -> None:
        detail = f"max abs diff {_fmt(row.max_abs_diff)}" if row.status != "error" else row.error
        if row.status == "fail":
            detail += f"; first divergence {row.first_divergence or 'none'}"
        print(f"{row.status.upper():5} {row.name:40} {row.family:13} {detail} ({row.seconds:.1f} s)", flush=True)

    rows = run_batch(_run_one, tasks, jobs=jobs, processes=True, initializer=_init, initargs=(threads,), on_result=show)
    total = time.perf_counter() - started
    write_summary(rows, args.out, total, built, jobs)
    failed = [f"{row.name} ({row.family})" for row in rows if not row.passed]
    print(f"{len(rows) - len(failed)}/{len(rows)} passed; total {total:.1f} s ({built:.1f} s fixtures, {jobs} jobs)")
    print(f"reports: {args.out}/summary.md")
    return 1 if failed else 0


def _init(threads: int) -> None:
    global _THREADS
    _THREADS = threads
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import torch

    torch.set_num_threads(threads)


def _run_one(task: tuple[str, str, str, str, str]) -> MatrixRow:
    from converter.errors import USER_ERRORS
    from converter.pipeline.convert import convert_checkpoint
    from converter.verify.report import check_parity

    name, kind, family, tarball, report_dir = task
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="mnv2-matrix-") as tmp:
            folder = Path(tmp) / name
            convert_checkpoint(tarball, folder)
            check = check_parity(
                tarball,
                folder,
                report_dir=report_dir,
                threads=_THREADS,
                reference_kind=family,
                update_card=False,
                graph_builder=fixture_graph,
            )
    except USER_ERRORS as error:
        seconds = time.perf_counter() - started
        return MatrixRow(name, kind, family, False, "error", None, None, None, seconds, str(error))
    except Exception as error:  # a bug in one model must not hide the others
        message = f"internal error: {type(error).__name__}: {error}"
        return MatrixRow(name, kind, family, False, "error", None, None, None, time.perf_counter() - started, message)
    result = check.result
    divergence = result.first_divergence
    return MatrixRow(
        name=name,
        kind=kind,
        family=family,
        passed=result.passed,
        status="pass" if result.passed else "fail",
        max_abs_diff=result.to_json()["max_abs_diff"],
        first_divergence=_divergence(divergence) if divergence else result.logits_problem,
        reference=result.reference["kind"],
        seconds=time.perf_counter() - started,
        worst_ratio=(result.to_json()["worst"] or {}).get("ratio"),
    )


def fixture_graph(kind: str, depth: float, output_stride: int | None):
    """The fixtures' slim graph of a converted model (a `GraphBuilder`), for checkpoints that ship none."""
    from fixtures.spec import as_variant
    from fixtures.tf_builder import build_graph

    return build_graph(as_variant((kind, depth)), output_stride=output_stride).graph


def _divergence(divergence: dict[str, Any]) -> str:
    where = f"{divergence['endpoint']} ({divergence['module']})"
    return f"{where}: {divergence['error']}" if divergence.get("error") else where


def write_summary(rows: list[MatrixRow], out: Path, total: float, fixtures_seconds: float, jobs: int) -> None:
    passed = sum(row.passed for row in rows)
    verdict = "✅ all passed" if passed == len(rows) else f"❌ {len(rows) - passed} failed"
    lines = [
        f"### MobileNetV2 parity matrix: {passed}/{len(rows)} checks ({verdict})",
        "",
        f"Total {total:.1f} s ({fixtures_seconds:.1f} s building fixtures, {jobs} jobs). Each check: random "
        "inputs (a batch of 2 at its size, one odd size, one non-square) through every slim endpoint the "
        "graph holds, each against its calibrated tolerance.",
        "",
        "| model | graph | passed | max abs diff | worst diff / tolerance | first divergence | seconds | report |",
        "| --- | --- | --- | ---: | ---: | --- | ---: | --- |",
    ]
    for row in rows:
        mark = "yes" if row.passed else ("**error**" if row.status == "error" else "**no**")
        divergence = row.first_divergence or (row.error or "")
        ratio = "" if row.worst_ratio is None else f"{row.worst_ratio:.2g}"
        report = f"[parity.md]({row.name}/{row.family}/parity.md)"
        lines.append(
            table_row([f"`{row.name}`", row.family, mark, _fmt(row.max_abs_diff), ratio, divergence,
                       f"{row.seconds:.1f}", report])
        )  # fmt: skip
    skipped = left_out()
    if skipped:
        lines += ["", f"Left out: {', '.join(f'`{name}`' for name in skipped)} ({QUANTIZED_LEFT_OUT})."]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    data: dict[str, Any] = {
        "passed": passed == len(rows),
        "models": len(rows),
        "failed": [f"{row.name} ({row.family})" for row in rows if not row.passed],
        "seconds": round(total, 1),
        "fixtures_seconds": round(fixtures_seconds, 1),
        "jobs": jobs,
        "rows": [asdict(row) | {"seconds": round(row.seconds, 2)} for row in rows],
        "left_out": skipped,
    }
    (out / "summary.json").write_text(json.dumps(data, indent=2) + "\n")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


if __name__ == "__main__":
    sys.exit(main())
