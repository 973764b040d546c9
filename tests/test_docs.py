"""The README and docs/ as a reader meets them: every Python example runs, every link leads to a page,
and the measured tables are filled from the reports, never typed in.

The Python blocks of one page run in order in one namespace, as a reader pastes them, in a fresh folder
holding what the examples name: the 0.35_96 fixture's zoo tarball (`mobilenet_v2_0.35_96.tgz`) and its
converted folder (`mobilenet_v2_0.35_96`), and, for the pages that name them, the DeepLab 0.5 folder, the
folders converted from an int8 `.tflite` and from a QAT checkpoint, and `mobilenet-convert`, this clone.
A block fenced as ```python no-run is shown and compiled but not run: it needs what a test may not use
(the network, the Hugging Face Hub, a GPU), and its first line is a comment saying so.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.helpers import REPO, SMALL, python_blocks
from tools.docs_tables import TABLES, fill

pytestmark = pytest.mark.usefixtures("one_thread")

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NO_RUN = "no-run"


def _page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


def _deeplab(folder: Path) -> None:
    from converter import convert_checkpoint
    from fixtures import ensure_fixture

    convert_checkpoint(ensure_fixture("deeplabv3_mnv2_dm05_pascal_trainaug").tarball, folder, output_stride=16)


def _int8(folder: Path) -> None:
    pytest.importorskip("tensorflow", reason="the int8 .tflite of the example is built by TensorFlow's converter")
    from converter import convert_checkpoint
    from fixtures.tflite_builder import build_tflite

    convert_checkpoint(build_tflite(SMALL, "int8"), folder)


def _qat(folder: Path) -> None:
    pytest.importorskip("tensorflow", reason="the QAT checkpoint of the example is written by TensorFlow")
    from converter import convert_checkpoint
    from fixtures.qat_builder import ensure_qat_fixture

    convert_checkpoint(ensure_qat_fixture(SMALL).checkpoint_prefix, folder, size=96)


# What a page's examples may name, beyond the tarball and the converted folder every page gets.
ON_DEMAND = {
    "deeplabv3_mobilenet_v2_0.5_513_os16": _deeplab,
    f"{SMALL}_int8": _int8,
    f"{SMALL}_qat": _qat,
    "mobilenet-convert": lambda path: path.symlink_to(REPO, target_is_directory=True),
}


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_python_example_runs(page: Path, small, classifier_folder, tmp_path, monkeypatch):
    blocks = python_blocks(page.read_text())
    for line, marker, code in blocks:
        assert marker in ("", NO_RUN), f"{_page_id(page)}:{line}: unknown marker {marker!r} (python or python {NO_RUN})"
        compile(code, f"{_page_id(page)}:{line}", "exec")  # a block that is not run still parses
    runnable = [(line, code) for line, marker, code in blocks if marker != NO_RUN]
    if not runnable:
        pytest.skip(f"{_page_id(page)} has no Python example to run")
    shutil.copy(small.tarball, tmp_path / f"{SMALL}.tgz")
    shutil.copytree(classifier_folder, tmp_path / SMALL)
    named = "\n".join(code for _, code in runnable)
    for name, prepare in ON_DEMAND.items():
        if f'"{name}"' in named:
            prepare(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__main__"}
    for line, code in runnable:
        exec(compile(code, f"{_page_id(page)}:{line}", "exec"), namespace)


def test_no_run_blocks_say_why():
    for page in PAGES:
        for line, marker, code in python_blocks(page.read_text()):
            if marker == NO_RUN:
                assert code.lstrip().startswith("#"), f"{_page_id(page)}:{line}: say in a first-line comment why"


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_link_leads_to_a_file(page: Path):
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
    local = [link for link in links if "://" not in link]
    missing = [link for link in local if not (page.parent / link).exists()]
    assert not missing, f"{_page_id(page)} links to what does not exist: {missing}"


def test_readme_keeps_the_two_commands_and_stays_a_front_door():
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert len(readme.splitlines()) <= 200


def test_every_generated_section_is_one_the_tool_fills():
    sections = [
        (page, name)
        for page in PAGES
        for name in re.findall(r"<!-- generated: ([\w-]+) -->", page.read_text())
    ]  # fmt: skip
    assert {name for _, name in sections} == set(TABLES), sections
    for page in PAGES:
        text = page.read_text()
        assert text.count("<!-- generated: ") == text.count("<!-- end -->"), _page_id(page)


def _summary_row(name: str, kind: str, family: str, ratio: float | None, diff: float | None, passed: bool) -> dict:
    """One row of the parity matrix's summary.json."""
    return {
        "name": name, "kind": kind, "family": family, "passed": passed,
        "status": "pass" if passed else ("fail" if ratio is not None else "error"),
        "max_abs_diff": diff, "first_divergence": None if passed else "layer_9 (mobilenet_v2.layer.6)",
        "reference": family, "seconds": 1.5, "error": None if ratio is not None else "no TensorFlow",
        "worst_ratio": ratio,
    }  # fmt: skip


def test_the_tables_are_filled_from_the_reports_and_only_from_them(tmp_path):
    docs = tmp_path / "docs"
    shutil.copytree(REPO / "docs", docs)
    reports = tmp_path / "reports"
    reports.mkdir()
    before = {page.name: page.read_text() for page in docs.glob("*.md")}

    # No report yet: the pages keep saying which command produces the numbers.
    for text in before.values():
        assert fill(text, reports) == (text, [])

    bench = "# Benchmark\n\nMachine: a test machine.\n\n| target | value |\n|---|---:|\n| eager | 1.23x |\n"
    (reports / "bench.md").write_text(bench)
    rows = [
        _summary_row("mobilenet_v2_0.35_96", "classification", "meta_graph", 0.25, 3.0e-5, True),
        _summary_row("mobilenet_v2_1.0_224", "classification", "meta_graph", 0.375, 1.0e-4, True),
        _summary_row("mobilenet_v2_0.35_96", "classification", "frozen_graph", 0.125, 2.0e-5, True),
        _summary_row("deeplabv3_mnv2_pascal_train_aug", "deeplab", "frozen_graph", None, None, False),
    ]
    summary = {
        "passed": False, "models": 4, "failed": ["deeplabv3_mnv2_pascal_train_aug (frozen_graph)"], "seconds": 59.4,
        "fixtures_seconds": 3.2, "jobs": 2, "rows": rows, "left_out": {"mobilenet_v2_1.0_224_quant": "no graph"},
    }  # fmt: skip
    (reports / "summary.json").write_text(json.dumps(summary))
    from tools.docs_tables import main

    assert main([str(reports), "--docs", str(docs)]) == 0
    after = {page.name: page.read_text() for page in docs.glob("*.md")}

    performance = after["performance.md"]
    assert "Machine: a test machine." in performance and "| eager | 1.23x |" in performance
    assert "# Benchmark" not in performance and "Not measured" not in performance
    verification = after["verification.md"]
    assert "3/4 checks passed in 59 s (2 jobs, 3 s of it building fixtures)." in verification
    assert "| classification | meta_graph | 2 | 2 | 0.38 | 1.00e-04 |" in verification
    assert "| classification | frozen_graph | 1 | 1 | 0.12 | 2.00e-05 |" in verification
    assert "| deeplab | frozen_graph | 1 | 0 | - | - |" in verification
    assert "Failed: deeplabv3_mnv2_pascal_train_aug (frozen_graph)." in verification
    assert "`mobilenet_v2_1.0_224_quant` (no graph)" in verification
    # Only the generated sections changed, and filling again from the same reports changes nothing.
    for name, text in after.items():
        outside = re.sub(r"<!-- generated: .*?<!-- end -->", "", text, flags=re.S)
        assert outside == re.sub(r"<!-- generated: .*?<!-- end -->", "", before[name], flags=re.S), name
        assert fill(text, reports)[0] == text
