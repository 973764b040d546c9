"""A quick run of the mutation fuzzer on Keras files: damaged files give a project error, the clean
result, or (HDF5 having no checksums) changed values under the clean names and shapes; nothing else."""

from __future__ import annotations

import pytest

from converter.errors import KerasFileError
from converter.formats.keras import KerasReader
from fixtures.fuzz_reader import (
    CLEAN,
    PROJECT_ERROR,
    VALUES_CHANGED,
    build_keras_corpus,
    keras_case,
    main,
    run_keras_fuzz,
)

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


def test_zeroed_global_heap_objects_are_refused_not_looped_on(tmp_path):
    """Seed 1, case 792: zeros spliced over the global heap holding layer_names leave an object of size 0,
    on which libhdf5 walks the heap forever. Run isolated first, so that a regression fails instead of hanging."""
    report = run_keras_fuzz(cases=0, seed=1, workdir=tmp_path, only_case=792)
    assert report.failures == [] and report.errors == {"KerasFileError": 1}
    name, damaged, _ = keras_case(build_keras_corpus(), seed=1, case=792)
    path = tmp_path / name
    path.write_bytes(damaged)
    with pytest.raises(KerasFileError, match=f"{name} is damaged: the global heap collection at byte"):
        KerasReader(path)
