"""A quick run of the mutation fuzzer: damaged checkpoints and archives give a project error or the
clean result, never anything else."""

from __future__ import annotations

import pytest

pytest.importorskip("tensorflow")  # the fuzz corpus is written by TensorFlow

from fixtures.fuzz_reader import CLEAN, FAILURE, PROJECT_ERROR, main, run_fuzz  # noqa: E402


def test_300_mutated_cases(tmp_path):
    report = run_fuzz(cases=300, seed=2024, workdir=tmp_path)
    assert report.failures == []
    assert report.counts[PROJECT_ERROR] > 150  # most damage is detected...
    assert report.counts[CLEAN] > 0  # ...and harmless damage (gzip header, footer padding) is allowed
    assert {"ChecksumError", "CheckpointFormatError", "SourceError"} <= set(report.errors)


def test_cli_prints_counts_and_exit_status(capsys):
    assert main(["--cases", "20", "--seed", "3"]) == 0
    output = capsys.readouterr().out
    for outcome in (CLEAN, PROJECT_ERROR, FAILURE):
        assert f"{outcome}: " in output
    assert f"{FAILURE}: 0" in output
