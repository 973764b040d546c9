"""Fill the measured tables of docs/ from the reports that `make bench` and `make parity` write.

    python -m tools.docs_tables REPORTS [--docs DOCS]

A page marks a generated section as `<!-- generated: NAME -->` ... `<!-- end -->`, NAME one of `TABLES`:
`bench` copies `REPORTS/bench.md` (benchmarks/bench.py's verdicts and timings), `eval-bench`
`REPORTS/eval_bench.md` (benchmarks/eval_bench.py's), `parity` sums up
`REPORTS/summary.json` (the parity matrix) per graph family. A section whose report is absent keeps what
it holds, which says the command that produces it; numbers are never typed into the docs by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from converter.output.markdown import table_row

DOCS = Path(__file__).resolve().parents[1] / "docs"
SECTION = re.compile(r"(?P<start><!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(?P<end><!-- end -->)", re.S)


def bench_section(reports: Path) -> str | None:
    """The benchmark report as bench.py wrote it, less its title."""
    path = reports / "bench.md"
    if not path.is_file():
        return None
    return "\n".join(line for line in path.read_text().splitlines() if not line.startswith("# ")).strip() + "\n"


def eval_bench_section(reports: Path) -> str | None:
    """benchmarks/eval_bench.py's verdict and throughputs, as it wrote them."""
    path = reports / "eval_bench.md"
    return path.read_text() if path.is_file() else None


def parity_section(reports: Path) -> str | None:
    """The matrix's verdict, then one row per (model kind, graph family): checks, passes, the worst
    difference / tolerance ratio and the largest max abs difference over its models."""
    path = reports / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    rows = summary["rows"]
    passed = sum(row["passed"] for row in rows)
    lines = [
        f"{passed}/{len(rows)} checks passed in {summary['seconds']:.0f} s ({summary['jobs']} jobs, "
        f"{summary['fixtures_seconds']:.0f} s of it building fixtures).",
        "",
        "| models | graph | checks | passed | worst diff / tolerance | largest max abs diff |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["kind"], row["family"]), []).append(row)
    for (kind, family), group in groups.items():
        ratios = [row["worst_ratio"] for row in group if row["worst_ratio"] is not None]
        diffs = [row["max_abs_diff"] for row in group if row["max_abs_diff"] is not None]
        worst = f"{max(ratios):.2g}" if ratios else "-"
        largest = f"{max(diffs):.2e}" if diffs else "-"
        group_passed = sum(row["passed"] for row in group)
        lines.append(table_row([kind, family, len(group), group_passed, worst, largest]))
    failed = summary.get("failed") or []
    if failed:
        lines += ["", f"Failed: {', '.join(failed)}."]
    left_out = summary.get("left_out") or {}
    if left_out:
        lines += ["", f"Left out: {', '.join(f'`{name}`' for name in left_out)} ({next(iter(left_out.values()))})."]
    return "\n".join(lines) + "\n"


TABLES: dict[str, Callable[[Path], str | None]] = {
    "bench": bench_section,
    "eval-bench": eval_bench_section,
    "parity": parity_section,
}


def fill(text: str, reports: Path) -> tuple[str, list[str]]:
    """`text` with every generated section whose report exists replaced; and the names filled."""
    filled: list[str] = []

    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in TABLES:
            raise SystemExit(f"error: unknown generated section {name!r}: known are {', '.join(TABLES)}")
        body = TABLES[name](reports)
        if body is None:
            return match[0]
        filled.append(name)
        return match["start"] + body + match["end"]

    return SECTION.sub(replace, text), filled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.docs_tables", description=__doc__.split("\n")[0])
    parser.add_argument("reports", type=Path, help="the folder make bench / make parity wrote (reports)")
    parser.add_argument("--docs", type=Path, default=DOCS, help="the Markdown pages to fill (default: docs/)")
    args = parser.parse_args(argv)
    if not args.reports.is_dir():
        parser.error(f"{args.reports} is not a folder: run make bench or make parity first")
    for page in sorted(args.docs.glob("*.md")):
        text = page.read_text()
        new, filled = fill(text, args.reports)
        if new != text:
            page.write_text(new)
        for name in filled:
            print(f"{page.name}: {name} filled from {args.reports}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
