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


@pytest.mark.parametrize(
    ("seed", "case", "message"),
    [
        # Zeros spliced over the global heap holding layer_names leave an object of size 0, on which
        # libhdf5 walks the heap forever.
        (1, 792, "the global heap collection at byte 3400 .* is inconsistent"),
        # A flipped byte in a link name ('add_8' -> 'ad*_8') leaves it listed but out of the sorted order
        # that lookups by name rely on.
        (3, 966, "/layers/ad.*_8 is listed but cannot be opened by its name"),
        # The predictions layer's weight_names attribute message lost its type: the head vanished silently.
        (3, 1625, "layer predictions has no weight_names attribute"),
        # weight_names' string type turned into a variable-length sequence of bytes: h5py crashed reading it.
        (13, 182, "attribute weight_names holds object values, not text"),
    ],
)
def test_damage_found_by_the_fuzzer_gives_a_clear_error(tmp_path, seed, case, message):
    """Each case runs isolated first, so that a regression to a hang or a crash fails instead of stopping
    the tests."""
    report = run_keras_fuzz(cases=0, seed=seed, workdir=tmp_path, only_case=case)
    assert report.failures == [] and report.errors == {"KerasFileError": 1}
    name, damaged, _ = keras_case(build_keras_corpus(), seed=seed, case=case)
    path = tmp_path / name
    path.write_bytes(damaged)
    with pytest.raises(KerasFileError, match=message):
        KerasReader(path)
