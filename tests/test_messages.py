"""The wording of errors, notes and help texts that misled users (each reproduced first): one test per
message, through the entry point that shows it."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from converter import convert_checkpoint
from converter.app.cli import convert_main, verify_main
from converter.errors import OutputError, SourceError, UsageError, VariantError
from tests.helpers import assert_one_line_error, run_cli
from tests.realdata_tflite import MODELS

IMAGENET = MODELS / "mobilenet_v2_1.0_224_quant.tflite"
DEEPLAB = MODELS / "deeplabv3_mnv2_pascal_quant.tflite"  # 513x513 input, output stride 16
DEEPLAB_DM05 = MODELS / "deeplabv3_mnv2_dm05_pascal_quant.tflite"
needs_real_models = pytest.mark.skipif(
    not (IMAGENET.is_file() and DEEPLAB.is_file() and DEEPLAB_DM05.is_file()),
    reason=f"{MODELS} is absent: no real .tflite models",
)


# --- errors -----------------------------------------------------------------------------------------


@needs_real_models
def test_a_size_from_the_input_tensor_is_named_so_without_doubled_words(tmp_path):
    with pytest.raises(VariantError) as error:
        convert_checkpoint(DEEPLAB, tmp_path / "out", size=257)
    assert "does not match the source's input shape, which says 513" in str(error.value)
    assert "the source's the source" not in str(error.value)
    summary = convert_checkpoint(IMAGENET, tmp_path / "classifier")
    assert summary.variant.size == 224 and summary.variant.size_from == "source's input shape"


def test_a_size_from_the_zoo_file_name_is_named_so(small, tmp_path):
    with pytest.raises(VariantError, match="does not match the zoo file name, which says 96; leave --size out"):
        convert_checkpoint(small.tarball, tmp_path / "out", size=128)


@needs_real_models
def test_format_keras_on_a_tflite_says_what_the_file_is(tmp_path):
    result = run_cli("--checkpoint", IMAGENET, "--format", "keras", "--output", tmp_path / "out")
    assert_one_line_error(result, UsageError.exit_code, "is not a keras file", "TensorFlow Lite", "--format tflite")
    assert "HDF5" not in result.stderr and "damaged" not in result.stderr


def test_an_empty_file_is_called_empty(tmp_path):
    empty = tmp_path / "mobilenet_v2_1.0_224.tflite"
    empty.touch()
    with pytest.raises(SourceError, match="is empty"):
        convert_checkpoint(empty, tmp_path / "out")
    result = run_cli("--checkpoint", empty, "--output", tmp_path / "out")
    assert_one_line_error(result, 1, "is empty (0 bytes)")
    assert "known formats" not in result.stderr


def test_the_force_message_spells_the_option_as_each_entry_point_takes_it(small, tmp_path):
    occupied = tmp_path / "out"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    source = small.tarball
    with pytest.raises(OutputError) as error:
        convert_checkpoint(source, occupied)
    assert "pass force=True" in str(error.value) and "--force" not in str(error.value)
    with pytest.raises(OutputError) as error:
        convert_checkpoint(source, occupied, force=True)
    assert str(error.value).startswith("force=True replaces only") and "--" not in str(error.value)
    result = run_cli("--checkpoint", source, "--output", occupied)
    assert_one_line_error(result, 1, "pass --force to replace it")
    assert "force=True" not in result.stderr
    result = run_cli("--checkpoint", source, "--output", occupied, "--force")
    assert_one_line_error(result, 1, "--force replaces only", "choose another --output")
    assert (occupied / "notes.txt").read_text() == "mine"


# --- notes ------------------------------------------------------------------------------------------


@needs_real_models
def test_the_output_stride_note_says_when_the_model_was_re_dilated(tmp_path):
    kept = convert_checkpoint(DEEPLAB, tmp_path / "os16")
    assert kept.variant.output_stride == 16
    assert [note for note in kept.notes if "output stride" in note] == [
        "output stride 16, as the source's graph fixes it by its dilations"
    ]
    changed = convert_checkpoint(DEEPLAB, tmp_path / "os8", output_stride=8)
    notes = [note for note in changed.notes if "output stride" in note]
    assert changed.variant.output_stride == 8 and len(notes) == 1
    assert "output stride 8" in notes[0] and "re-dilated" in notes[0] and "output stride 16" in notes[0]
    assert notes[0] in json.loads((tmp_path / "os8" / "conversion.json").read_text())["notes"]


@needs_real_models
def test_a_file_named_like_a_zoo_file_but_with_other_content_is_noted(tmp_path):
    impostor = tmp_path / DEEPLAB.name  # the depth-0.5 model under the depth-1.0 model's zoo name
    shutil.copyfile(DEEPLAB_DM05, impostor)
    summary = convert_checkpoint(impostor, tmp_path / "impostor")
    notes = [note for note in summary.notes if "zoo" in note]
    assert len(notes) == 1 and notes[0].startswith(f"{DEEPLAB.name} is named like the zoo's file but is not it")
    assert notes[0] in json.loads((tmp_path / "impostor" / "conversion.json").read_text())["notes"]
    result = run_cli("--checkpoint", impostor, "--output", tmp_path / "printed")
    assert result.returncode == 0 and f"note: {notes[0]}" in result.stderr
    genuine = convert_checkpoint(DEEPLAB, tmp_path / "genuine")
    assert not [note for note in genuine.notes if "zoo" in note]


def test_a_keras_head_dropout_is_noted_as_left_out(tmp_path):
    keras = pytest.importorskip("keras", reason="Keras is needed to build a model with a Dropout head")
    base = keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, include_top=False, weights=None)
    pixels = keras.Input((96, 96, 3))
    features = keras.layers.GlobalAveragePooling2D()(base(pixels))
    logits = keras.layers.Dense(5, name="flowers")(keras.layers.Dropout(0.2, name="head_dropout")(features))
    keras.Model(pixels, logits).save(tmp_path / "flowers.keras")
    summary = convert_checkpoint(tmp_path / "flowers.keras", tmp_path / "out")
    assert summary.variant.num_labels == 5
    assert "The Keras model's Dropout layer (head_dropout) is inactive at inference and was left out." in summary.notes


# --- help texts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [convert_main, verify_main])
def test_checkpoint_help_names_every_source_format(command):
    help_text = " ".join(CliRunner().invoke(command, ["--help"]).output.split())
    described = help_text.split("--checkpoint PATH", 1)[1].split(" --", 1)[0]
    for kind in ("checkpoint", "SavedModel", "Keras", ".tflite", "archive"):
        assert kind in described, described


def test_output_stride_help_states_the_real_default():
    help_text = " ".join(CliRunner().invoke(convert_main, ["--help"]).output.split())
    described = help_text.split("--output-stride [8|16]", 1)[1].split(" --", 1)[0]
    assert "(default 8)" not in described and "the source's own" in described, described
