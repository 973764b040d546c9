"""A quick run of the mutation fuzzer on Keras files: damaged files give a project error, the clean
result, or (HDF5 having no checksums) changed values under the clean names and shapes; nothing else."""

from __future__ import annotations

import pytest

from fixtures.fuzz_reader import CLEAN, PROJECT_ERROR, VALUES_CHANGED, main, run_keras_fuzz

pytest.importorskip("keras")  # Keras writes the corpus
pytest.importorskip("tf_keras")


def test_300_mutated_keras_files(tmp_path):
    report = run_keras_fuzz(cases=300, seed=2024, workdir=tmp_path)
    assert report.failures == []
    assert report.counts[PROJECT_ERROR] > 150 and report.errors.keys() == {"KerasFileError"}
    assert report.counts[CLEAN] > 0 and report.counts[VALUES_CHANGED] > 0


def test_cli_fuzzes_keras_files(capsys):
    assert main(["--format", "keras", "--cases", "10", "--seed", "3"]) == 0
    output = capsys.readouterr().out
    assert "failure: 0" in output and f"{VALUES_CHANGED}: " in output
