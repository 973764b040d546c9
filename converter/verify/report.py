"""The parity reports: parity.json (the source of truth), parity.md (a CI step summary), parity.xml
(JUnit: one testcase per endpoint and input) and parity.png (per-layer error on a log scale).

`check_parity` is what the command-line tools run: verify, write the four reports, refresh the folder's
model card.
"""

from __future__ import annotations

import importlib.util
import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from converter.output import layout
from converter.output.markdown import table_row
from converter.output.records import ParityRecord
from converter.verify.compare import ParityResult, verify_model
from converter.verify.inputs import RANDOM
from converter.verify.references.base import GraphBuilder

DEFAULT_REPORT_FOLDER = "parity"
# parity.png stays readable on a screen and in a CI summary: at most 16 in x 100 dpi = 1600 px wide.
MAX_PLOT_INCHES, PLOT_DPI = 16.0, 100


@dataclass(frozen=True)
class ParityCheck:
    result: ParityResult
    report_dir: Path
    written: tuple[Path, ...]


def check_parity(
    checkpoint: str | os.PathLike,
    model_dir: str | os.PathLike,
    *,
    report_dir: str | os.PathLike | None = None,
    inputs=(RANDOM,),
    size: int | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    threads: int | None = None,
    reference_kind: str = "auto",
    update_card: bool = True,
    format: str | None = None,
    graph_builder: GraphBuilder | None = None,
) -> ParityCheck:
    """Verify `model_dir` against `checkpoint`'s original graph and write the reports into `report_dir`
    (default `model_dir/parity`). The model card is re-rendered when the reports land in the folder.
    `atol` / `rtol` replace the calibrated tolerance; `reference_kind` forces a reference (see
    `verify_model`, which `graph_builder` is passed to), `format` the format `checkpoint` is read as."""
    model_dir = Path(model_dir)
    report_dir = Path(report_dir) if report_dir is not None else model_dir / DEFAULT_REPORT_FOLDER
    result = verify_model(
        checkpoint, model_dir, inputs=inputs, size=size, atol=atol, rtol=rtol, threads=threads,
        reference_kind=reference_kind, format=format, graph_builder=graph_builder,
    )  # fmt: skip
    written = write_reports(result, report_dir)
    if update_card and report_dir.resolve() == (model_dir / DEFAULT_REPORT_FOLDER).resolve():
        from converter.output.card import write_model_card

        write_model_card(model_dir)
    return ParityCheck(result, report_dir, tuple(written))


def write_reports(result: ParityResult, report_dir: str | os.PathLike) -> list[Path]:
    """Write parity.json, parity.md, parity.xml and (with matplotlib) parity.png; return their paths."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    paths = [ParityRecord.from_json(result.to_json()).write(report_dir)]
    paths += [report_dir / name for name in layout.PARITY_REPORTS[1:3]]
    paths[1].write_text(render_markdown(result))
    write_junit(result, paths[2])
    png = write_plot(result, report_dir / layout.PARITY_REPORTS[3])
    return paths + ([png] if png else [])


# -------------------------------------------------------------------------------------------- markdown
def verdict_line(result: ParityResult, why_not_compared: bool = True) -> str:
    """One line: the verdict, what was compared against what, and, when it is not a PASS, where and why
    (why endpoints were not compared only with `why_not_compared`: parity.md lists the reasons below)."""
    verdict = "PASS" if result.passed else "FAIL"
    reference = result.reference
    where = f"{reference['kind']}" + (f" `{reference['file']}`" if reference.get("file") else "")
    compared = {row.endpoint for row in result.compared_rows}
    if result.against_integer_model:
        tolerance = "one output quantization step per layer and integer step"
    elif result.atol is None:
        tolerance = "calibrated tolerance per endpoint"
    else:
        tolerance = f"tolerance atol {result.atol:g} + rtol {result.rtol:g} x max|ref|"
    line = (
        f"**Parity {verdict}** `{result.variant}` vs the original ({where}, weights "
        f"{reference['convention']}): max abs diff {_fmt(result.max_abs_diff)} (at most "
        f"{_fmt(result.max_rel_diff)} of the reference's max |value|) over {len(compared)} endpoints x "
        f"{_count(result.images, 'image')}; {tolerance}"
    )
    skipped = result.not_compared()
    if skipped:
        names = ", ".join(entry["endpoint"] for entry in skipped[:4]) + (" ..." if len(skipped) > 4 else "")
        why = f": {skipped[0]['reason']}" if why_not_compared else ""
        line += f"; {len(skipped)} endpoint(s) not compared ({names}{why})"
    divergence = result.first_divergence
    if divergence:
        line += f". First divergence: `{divergence['endpoint']}` (`{divergence['module']}`) on {divergence['input']}"
        if divergence.get("error"):
            line += f": {divergence['error']}"
        else:
            line += (
                f", max abs diff {_fmt(divergence['max_abs_diff'])} > {_fmt(divergence['tolerance'])} "
                f"({_ratio(divergence['ratio'])} x the tolerance)"
            )
    if not compared:
        line += ". Not a PASS: no endpoint was compared"
    if result.logits_problem:
        line += f". Not a PASS: {result.logits_problem}"
    if result.weak_signal:
        line += f". Weak check: {result.weak_signal}"
    return line + "."


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def render_markdown(result: ParityResult) -> str:
    lines = [
        f"### {'✅' if result.passed else '❌'} MobileNetV2 parity: {result.variant}",
        "",
        verdict_line(result, why_not_compared=False),
        "",
        "Inputs: " + "; ".join(f"`{case['name']}` ({case['description']})" for case in result.inputs) + ".",
        "",
        f"Tolerance: {result.tolerance_rule}.",
        "",
        "| # | endpoint | module | worst abs diff | float64 distance | tolerance | diff / tolerance | result |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    first = (result.first_divergence or {}).get("endpoint")
    reasons: dict[str, list[str]] = {}  # why -> the endpoints left out for that reason, said once below the table
    for number, entry in enumerate(result.summary(), start=1):
        if not entry["compared"]:
            reasons.setdefault(entry["reason"], []).append(entry["endpoint"])
            lines.append(table_row([number, f"`{entry['endpoint']}`", f"`{entry['module']}`", "", "", "", "",
                                    f"not compared ({len(reasons)})"]))  # fmt: skip
            continue
        mark = "pass" if entry["passed"] else ("**FAIL (first)**" if entry["endpoint"] == first else "FAIL")
        if entry.get("error"):
            mark += f": {entry['error']}"
        lines.append(
            table_row(
                [number, f"`{entry['endpoint']}`", f"`{entry['module']}`", _fmt(entry["max_abs_diff"]),
                 _fmt(entry["float64_distance"]), _fmt(entry["tolerance"]), _ratio(entry["worst_ratio"]), mark]
            )
        )  # fmt: skip
    if reasons:
        lines += ["", "Not compared:"]
        lines += [
            f"{i}. {reason}: " + ", ".join(f"`{endpoint}`" for endpoint in endpoints)
            for i, (reason, endpoints) in enumerate(reasons.items(), start=1)
        ]
    left_out = result.reference.get("left_out_ops") or {}
    if left_out:
        counts = ", ".join(f"{count} {op}" for op, count in sorted(left_out.items(), key=lambda item: -item[1]))
        lines += [
            "",
            f"Left out of the reference graph (not on the path to the endpoints, never imported): {counts}.",
        ]
    if result.notes:
        lines += ["", "Notes:", *[f"- {note}" for note in result.notes]]
    versions = ", ".join(f"{name} {version}" for name, version in result.versions.items())
    lines += ["", f"<sub>{versions}; {result.seconds:.1f} s</sub>", ""]
    return "\n".join(lines)


def _ratio(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.2g}"


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.2e}"


# ----------------------------------------------------------------------------------------------- JUnit
def write_junit(result: ParityResult, path: Path) -> None:
    failures = sum(not row.passed for row in result.rows)
    skipped = sum(not row.compared for row in result.rows)
    suite = ET.Element(
        "testsuite",
        name=f"parity.{result.variant}",
        tests=str(len(result.rows)),
        failures=str(failures),
        errors="0",
        skipped=str(skipped),
        time=f"{result.seconds:.3f}",
    )
    properties = ET.SubElement(suite, "properties")
    for name, value in (
        ("reference", result.reference["kind"]),
        ("weights", result.reference["convention"]),
        ("tolerance", result.tolerance_rule),
        *result.versions.items(),
    ):
        ET.SubElement(properties, "property", name=name, value=str(value))
    for row in result.rows:
        case = ET.SubElement(
            suite, "testcase", classname=f"parity.{result.variant}.{row.input}", name=row.endpoint, time="0"
        )
        if not row.compared:
            ET.SubElement(case, "skipped", message=row.error or "not compared")
            continue
        detail = (
            f"{row.endpoint} ({row.module}, {row.tensor}) on {row.input}: max abs diff "
            f"{_fmt(row.max_abs_diff)}, tolerance {_fmt(row.tolerance)}, max|ref| {_fmt(row.max_abs_reference)}"
            + (f": {row.error}" if row.error else "")
        )
        if not row.passed:
            failure = ET.SubElement(case, "failure", message=row.error or "max abs diff over tolerance")
            failure.set("type", "ParityError")
            failure.text = detail
        else:
            ET.SubElement(case, "system-out").text = detail
    root = ET.Element("testsuites", name="mobilenet parity", tests=suite.get("tests"), failures=str(failures))
    root.append(suite)
    ET.indent(root)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


# ------------------------------------------------------------------------------------------------ plot
@dataclass(frozen=True)
class PlotSeries:
    """One input's line in parity.png: per compared endpoint, the difference and its tolerance as drawn."""

    input: str
    endpoints: list[str]
    diffs: list[float]
    tolerances: list[float]


def plot_series(result: ParityResult) -> list[PlotSeries]:
    """What parity.png draws, on a log scale. Differences and tolerances share one floor, below every
    positive value of either, so that an exact match is drawn at the bottom and a difference within its
    tolerance never above it (weak signals have tolerances far below 1e-12); NaN and Inf are drawn at the
    top."""
    rows = result.compared_rows
    values = [value for row in rows for value in (row.max_abs_diff, row.tolerance) if math.isfinite(value)]
    floor = min((value for value in values if value > 0), default=1.0) / 10
    top = max(values, default=1.0) * 10

    def drawn(value: float) -> float:
        return max(value, floor) if math.isfinite(value) else top

    out = []
    for case in result.inputs:
        mine = [row for row in rows if row.input == case["name"]]
        diffs, tolerances = [drawn(row.max_abs_diff) for row in mine], [drawn(row.tolerance) for row in mine]
        out.append(PlotSeries(case["name"], [row.endpoint for row in mine], diffs, tolerances))
    return out


def write_plot(result: ParityResult, path: Path) -> Path | None:
    """parity.png: max abs error per endpoint (one line per input) and each endpoint's tolerance, log
    scale. Returns None without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    names = [endpoint for endpoint, _, _ in result.endpoints]
    positions = {name: i for i, name in enumerate(names)}
    width = min(MAX_PLOT_INCHES, max(8.0, 0.28 * len(names)))
    figure, axes = plt.subplots(figsize=(width, 4.5), dpi=PLOT_DPI)
    for i, series in enumerate(plot_series(result)):
        color = f"C{i % 10}"
        xs = [positions[endpoint] for endpoint in series.endpoints]
        axes.plot(xs, series.diffs, marker="o", markersize=3, linewidth=1, color=color, label=series.input)
        label = "tolerance (dashed, per input)" if i == 0 else None
        axes.step(xs, series.tolerances, where="mid", color=color, linestyle="--", linewidth=1, label=label)
    divergence = result.first_divergence
    if divergence:
        axes.axvline(positions[divergence["endpoint"]], color="red", alpha=0.3, linewidth=6)
    axes.set_yscale("log")
    # A label is ~11 px high at 7 pt: past what the width holds, every n-th endpoint is named.
    every = max(1, math.ceil(len(names) * 11 / (width * PLOT_DPI)))
    axes.set_xticks(range(0, len(names), every))
    axes.set_xticklabels(names[::every], rotation=90, fontsize=7)
    axes.set_ylabel("max |ours - reference|")
    verdict = "PASS" if result.passed else f"FAIL at {divergence['endpoint']}" if divergence else "FAIL"
    weak = " - weak check: the output signal is tiny" if result.weak_signal else ""
    axes.set_title(f"{result.variant}: parity {verdict} ({result.reference['kind']}){weak}", fontsize=10)
    axes.grid(True, which="major", axis="y", alpha=0.3)
    axes.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
