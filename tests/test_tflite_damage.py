"""Damaged copies of the real .tflite models (../shared/realdata/models) convert with an honest note or
fail with a one-line project error; never a traceback, an internal error or a hang."""

from __future__ import annotations

import json
import re
import resource
import struct
import subprocess
import sys
import zipfile

import pytest

from converter.formats import tflite_schema
from fixtures.fuzz_reader import FAILURE, PROJECT_ERROR, main
from fixtures.fuzz_tflite import CONVERTED, LABELS_NOTED, build_tflite_corpus, run_tflite_fuzz, tflite_case
from tests.helpers import SHARED

MODELS = SHARED / "realdata" / "models"
INAT = MODELS / "mobilenet_v2_1.0_224_inat_bird_quant.tflite"
IMAGENET = MODELS / "mobilenet_v2_1.0_224_quant.tflite"
DEEPLAB = MODELS / "deeplabv3_mnv2_dm05_pascal_quant.tflite"
LABEL_FILE = "inat_bird_labels.txt"
# A regression to following a cyclic graph loops while its list of steps grows: bound both.
HANG_TIMEOUT_S = 60
MEMORY_LIMIT = 4 << 30

pytestmark = pytest.mark.skipif(
    not INAT.is_file(), reason=f"{MODELS} is absent: the real .tflite models (../shared/realdata) are not available"
)


def convert(source, output) -> subprocess.CompletedProcess:
    """The command line, as a user runs it, in a process whose time and memory are bounded."""
    command = [sys.executable, "-c", "from converter.app.cli import convert_main; convert_main()"]
    return subprocess.run(
        [*command, "--checkpoint", str(source), "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT_S,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT)),
    )


def packed_label_file() -> tuple[zipfile.ZipInfo, list[str]]:
    """The label file that TFLite metadata packed into the iNat model, as Python's zipfile reads it."""
    with zipfile.ZipFile(INAT) as archive:
        member = archive.getinfo(LABEL_FILE)
        return member, archive.read(member).decode().splitlines()


def converted_labels(folder) -> list[str]:
    id2label = json.loads((folder / "config.json").read_text())["id2label"]
    return [id2label[str(i)] for i in range(len(id2label))]


def label_notes(folder) -> list[str]:
    return [note for note in json.loads((folder / "conversion.json").read_text())["notes"] if LABEL_FILE in note]


def test_the_clean_model_gets_its_packed_class_names(tmp_path):
    result = convert(INAT, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    _, names = packed_label_file()
    assert converted_labels(tmp_path / "out") == names and len(names) == 965
    assert label_notes(tmp_path / "out") == []


def test_truncated_by_one_byte_converts_with_a_note_on_the_label_file(tmp_path):
    """The user's reproduction: the zip's end record loses its last byte, so no archive is found; the
    metadata still names the label file, so the names lost are reported, not silently replaced."""
    damaged = tmp_path / INAT.name
    damaged.write_bytes(INAT.read_bytes()[:-1])
    with pytest.raises(zipfile.BadZipFile):  # the independent reader agrees that the archive is gone
        zipfile.ZipFile(damaged)
    result = convert(damaged, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    (note,) = label_notes(tmp_path / "out")
    assert "cannot be read" in note and "damaged or truncated" in note
    assert f"note: {note}" in result.stderr
    assert converted_labels(tmp_path / "out") == [f"LABEL_{i}" for i in range(965)]


@pytest.mark.parametrize("where", ["label text", "local header", "central directory"])
def test_a_byte_flipped_inside_the_label_zip_converts_with_a_note(tmp_path, where):
    """The user's reproduction (a byte inside the label zip flipped) ended in 'internal error: BadZipFile'."""
    member, _ = packed_label_file()
    data = bytearray(INAT.read_bytes())
    central = data.rfind(b"PK\x01\x02")
    position = {
        "label text": member.header_offset + 30 + len(LABEL_FILE) + 1000,
        "local header": member.header_offset + 1,  # its signature
        "central directory": central + 46,  # the file name's first byte
    }[where]
    data[position] ^= 0x20
    damaged = tmp_path / INAT.name
    damaged.write_bytes(bytes(data))
    with pytest.raises(zipfile.BadZipFile), zipfile.ZipFile(damaged) as archive:
        archive.read(archive.infolist()[0])
    result = convert(damaged, tmp_path / "out")
    assert result.returncode == 0 and "internal error" not in result.stderr, result.stderr
    (note,) = label_notes(tmp_path / "out")
    assert "label file is not used" in note and f"note: {note}" in result.stderr
    assert converted_labels(tmp_path / "out") == [f"LABEL_{i}" for i in range(965)]


def test_an_op_writing_its_own_input_is_refused_not_followed_forever(tmp_path):
    """One 4-byte change found by aiming at the operators' tensor vectors: the first of the DeepLab
    logits' two RESIZE_BILINEAR ops writes tensor 182, which it reads. Following the data flow then
    looped forever, its list of steps growing."""
    data = bytearray(DEEPLAB.read_bytes())
    outputs = struct.pack("<Ii", 1, 183)  # the outputs vector of op 69, RESIZE_BILINEAR 182 -> 183
    assert data.count(outputs) == 1
    position = data.find(outputs)
    data[position : position + 8] = struct.pack("<Ii", 1, 182)
    damaged = tmp_path / DEEPLAB.name
    damaged.write_bytes(bytes(data))
    result = convert(damaged, tmp_path / "out")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: tensor 182 is written by operators 68 and 69: corrupted file")


def test_an_op_missing_an_input_the_reader_takes_is_refused(tmp_path):
    """One operator code turned from AVERAGE_POOL_2D (1) into MEAN (40): the pool's one input was then
    indexed for MEAN's axes, and the conversion ended in 'internal error: IndexError'."""
    data = bytearray(IMAGENET.read_bytes())
    buf = tflite_schema._Buffer(bytes(data))
    for code in tflite_schema._Table(buf, buf.indirect(0)).tables(1):  # the model's operator codes
        if max(code.scalar(0, "b"), code.scalar(3, "i")) == 1:
            for field, size in ((0, 1), (3, 4)):  # the deprecated int8 code and the int32 one
                if (position := code._field(field)) is not None:
                    data[position : position + size] = (40).to_bytes(size, "little")
    damaged = tmp_path / IMAGENET.name
    damaged.write_bytes(bytes(data))
    result = convert(damaged, tmp_path / "out")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: operator 62 (MEAN) has inputs (168,); it takes 2: corrupted file")


@pytest.mark.parametrize(
    ("seed", "case", "message"),
    [
        # A DEPTHWISE_CONV_2D filter's shape vector lost its length (4 -> 0), in the DeepLab and the iNat
        # models: the channels were read from its last dimension, an internal IndexError.
        (3, 328, r"operator 18 \(DEPTHWISE_CONV_2D\) has a filter of shape \(\); it takes 4 dimensions"),
        (4, 743, r"operator 55 \(DEPTHWISE_CONV_2D\) has a filter of shape \(\); it takes 4 dimensions"),
    ],
)
def test_damage_found_by_the_fuzzer_gives_a_clear_error(tmp_path, seed, case, message):
    report = run_tflite_fuzz(cases=0, seed=seed, workdir=tmp_path, only_case=case, models=MODELS)
    assert report.failures == [] and report.errors == {"TFLiteFormatError": 1}
    model, damaged, _ = tflite_case(build_tflite_corpus(MODELS, tmp_path), seed=seed, case=case)
    (tmp_path / model.name).write_bytes(damaged)
    result = convert(tmp_path / model.name, tmp_path / "converted")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert re.match(f"error: {message}", result.stderr)


def test_a_short_fuzz_run_on_the_real_models(tmp_path):
    report = run_tflite_fuzz(cases=150, seed=7, workdir=tmp_path, models=MODELS)
    assert report.failures == []
    assert report.counts[PROJECT_ERROR] > 30 and report.counts[CONVERTED] > 30 and report.counts[LABELS_NOTED] > 0
    assert "TFLiteFormatError" in report.errors


def test_the_fuzzer_has_a_tflite_mode(capsys):
    assert main(["--format", "tflite", "--cases", "5", "--seed", "3", "--models", str(MODELS)]) == 0
    output = capsys.readouterr().out
    assert f"{FAILURE}: 0" in output and f"{CONVERTED}: " in output
