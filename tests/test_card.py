"""The model card (README.md) of a converted folder: Hub front matter, provenance, published accuracy,
parity, and usage snippets that actually run."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from converter.output.card import render_card, write_model_card
from converter.output.records import ConversionRecord
from tests.helpers import SMALL, python_blocks


def _front_matter(text: str) -> str:
    assert text.startswith("---\n")
    return text[4 : text.index("\n---\n", 4) + 1]


def card_of(conversion: dict, config: dict) -> str:
    """The card of a conversion record given as `conversion.json` holds it."""
    return render_card(ConversionRecord.from_json(conversion), config)


def _python_blocks(text: str) -> list[str]:
    return [code for _, _, code in python_blocks(text)]


def test_every_converted_folder_gets_a_card(classifier_folder: Path):
    text = (classifier_folder / "README.md").read_text()
    assert _front_matter(text) == (
        "license: apache-2.0\nlibrary_name: transformers\npipeline_tag: image-classification\n"
        "tags:\n- vision\n- image-classification\n- mobilenet_v2\ndatasets:\n- imagenet-1k\n"
    )
    conversion = json.loads((classifier_folder / "conversion.json").read_text())
    source = conversion["source"]["files"][0]
    assert f"`{source['name']}`" in text and source["sha256"] in text
    assert "`ema`: trainable variables restored from their exponential moving averages" in text
    assert "1.66 M parameters" in text  # an architecture figure: true of any weights of this depth
    assert "No parity report in this folder yet" in text
    assert "MobileNetV2ForImageClassification.from_pretrained" in text
    assert "AutoModelForImageClassification.from_pretrained" in text and "AutoImageProcessor" in text
    assert "huggingface-cli upload" in text and "upload_folder(" in text
    assert str(classifier_folder.parent) not in text  # no machine-specific paths in a card meant for the Hub


def test_card_snippets_run(classifier_folder: Path, tmp_path, monkeypatch):
    from PIL import Image

    Image.new("RGB", (130, 100), (200, 30, 60)).save(tmp_path / "image.jpg")
    shutil.copytree(classifier_folder, tmp_path / SMALL)
    monkeypatch.chdir(tmp_path)  # the snippets name the folder as the variant, relative
    blocks = _python_blocks((classifier_folder / "README.md").read_text())
    assert len(blocks) == 3  # mobilenet_torch, transformers, upload (not run: it would contact the Hub)
    for block in blocks[:2]:
        exec(compile(block, "README.md", "exec"), {})


def test_deeplab_card(segmenter_folder: Path):
    text = (segmenter_folder / "README.md").read_text()
    front = _front_matter(text)
    assert "pipeline_tag: image-segmentation\n" in front and "- pascal-voc\n" in front
    assert "- image-segmentation\n" in front and "- mobilenet_v2\n" in front
    assert "output stride 16" in text and "MobileNetV2ForSemanticSegmentation.from_pretrained" in text
    assert "AutoModelForSemanticSegmentation" in text and "inert (zero) weights" in text
    assert "`raw`: the values exactly as stored" in text
    assert "trained on PASCAL VOC train_aug (as the source's name says)" in text  # the zoo tarball's name


def test_trainval_and_drop_background_notes(segmenter_folder: Path, classifier_folder: Path):
    conversion = json.loads((segmenter_folder / "conversion.json").read_text())
    conversion["source"]["name"] = "deeplabv3_mnv2_pascal_trainval_2018_01_29.tar.gz"
    text = card_of(conversion, json.loads((segmenter_folder / "config.json").read_text()))
    assert "train + val" in text and "do not evaluate it on VOC val" in text

    conversion = json.loads((classifier_folder / "conversion.json").read_text())
    conversion["drop_background"] = True
    config = json.loads((classifier_folder / "config.json").read_text())
    imagenet = [config["id2label"][str(i)] for i in range(1, 1001)]  # the fixture's, without its background
    config["id2label"] = dict(enumerate(imagenet))
    assert "1000: the ImageNet classes (the background class was dropped)" in card_of(conversion, config)


def test_a_fixture_with_a_zoo_name_gets_no_published_accuracy(classifier_folder: Path):
    """The fixture tarball is named mobilenet_v2_0.35_96.tgz but holds seeded random weights."""
    text = (classifier_folder / "README.md").read_text()
    section = text[text.index("## Published accuracy") : text.index("## Parity")]
    assert "%" not in section and "top-1" not in section
    assert "None shown: this conversion cannot tell that its source is a file of the original model zoo" in section


def _zoo_conversion(classifier_folder: Path, **download) -> dict:
    """The fixture's conversion record, as if it had been downloaded from the zoo (how is in `download`)."""
    conversion = json.loads((classifier_folder / "conversion.json").read_text())
    digest = conversion["source"]["files"][0]["sha256"]
    conversion["download"] = {"zoo_name": SMALL, "sha256": digest, **download}
    return conversion


def test_published_accuracy_only_for_a_file_known_to_be_the_zoos(classifier_folder: Path, monkeypatch):
    from converter import zoo_catalog as zoo

    entry = zoo.find(SMALL)
    figure = "ImageNet top-1 **45.5%** at 96x96: the published figure of the original `mobilenet_v2_0.35_96.tgz`"
    config = json.loads((classifier_folder / "config.json").read_text())
    # Downloaded under its zoo name from the zoo's own URL: known by name.
    assert figure in card_of(_zoo_conversion(classifier_folder, url=entry.url), config)
    # Through a mirror, or from another URL, the bytes may be anything.
    mirrored = _zoo_conversion(classifier_folder, url=entry.url, mirror="http://127.0.0.1:1")
    assert "%" not in card_of(mirrored, config).split("## Published accuracy")[1].split("##")[0]
    assert figure not in card_of(_zoo_conversion(classifier_folder, url="https://example.com/x.tgz"), config)
    # A renamed checkpoint, or a local file with a zoo-like name: nothing known.
    conversion = json.loads((classifier_folder / "conversion.json").read_text())
    assert figure not in card_of(conversion, config)
    conversion["source"]["name"] = "my_model.ckpt"
    assert figure not in card_of(conversion, config)
    # Known by sha256 where the zoo table records it, whatever the file is called.
    digest = conversion["source"]["files"][0]["sha256"]
    known = tuple(replace(e, sha256=digest) if e.name == SMALL else e for e in zoo.entries())
    monkeypatch.setattr(zoo, "entries", lambda: known)
    assert figure in card_of(conversion, config)


def test_a_known_file_without_a_published_figure_says_so(classifier_folder: Path):
    from converter import zoo_catalog as zoo

    entry = zoo.find("mobilenet_v2_1.0_160")
    conversion = _zoo_conversion(classifier_folder, url=entry.url)
    conversion["download"]["zoo_name"] = entry.name
    conversion["variant"].update(depth=1.0, size=160)
    text = card_of(conversion, {})
    assert "The authors publish no top-1 figure for the original `mobilenet_v2_1.0_160.tgz`." in text
    assert "%" not in text.split("## Published accuracy")[1].split("##")[0]
    assert "3.47 M parameters" in text and "multiply-adds" not in text


@pytest.mark.parametrize("kind", ["classifier", "segmenter"])
def test_the_usage_instructions_do_what_they_say(kind, classifier_folder, segmenter_folder, tmp_path, monkeypatch):
    """Following the card literally, "Replace <name> by this folder's path", the Python snippets and the
    command line run and write what they say; the Hub id is offered to transformers only, not to mobilenet_torch."""
    from click.testing import CliRunner
    from PIL import Image

    from converter.app.predict import predict_main

    folder = classifier_folder if kind == "classifier" else segmenter_folder
    text = (folder / "README.md").read_text()
    usage = text[text.index("## Usage") : text.index("## Uploading")]
    instruction = re.search(r"Replace `([^`]+)` by this folder's path\.", usage)
    assert instruction, usage
    assert "Hub" not in usage[: usage.index("With transformers")]
    Image.new("RGB", (130, 100), (200, 30, 60)).save(tmp_path / "image.jpg")
    monkeypatch.chdir(tmp_path)  # the snippets name image.jpg, relative
    for block in _python_blocks(usage):
        exec(compile(block.replace(f'"{instruction[1]}"', repr(str(folder))), "README.md", "exec"), {})
    (command,) = re.findall(r"```bash\n(.*?)\n```", usage, flags=re.S)
    words, _, comment = command.partition("#")
    args = [str(folder) if word == instruction[1] else word for word in words.split()[1:]]
    result = CliRunner().invoke(predict_main, args)
    assert result.exit_code == 0, result.output
    for written in re.findall(r"\S+\.png", comment):
        assert (tmp_path / written).is_file()


def _parity(passed: bool) -> dict:
    logits = {"endpoint": "logits", "max_abs_diff": 2.5e-6 if passed else 1.7, "tolerance": 1.1e-4}
    return {
        "passed": passed,
        "verdict": "PASS" if passed else "FAIL",
        "atol": 1e-4,
        "rtol": 1e-4,
        "tolerance": "atol 0.0001 + rtol 0.0001 x max abs reference, per endpoint and input",
        "max_abs_diff": 3.1e-6 if passed else 1.7,
        "first_divergence": None if passed else {"endpoint": "layer_1", "max_abs_diff": 0.9, "tolerance": 1e-4},
        "endpoints": [
            {"endpoint": "layer_1", "max_abs_diff": 1e-7, "tolerance": 1e-4, "passed": passed},
            {**logits, "passed": passed},
        ],
    }


@pytest.mark.parametrize("passed", [True, False])
def test_parity_section(classifier_folder: Path, tmp_path, passed):
    folder = tmp_path / "model"
    shutil.copytree(classifier_folder, folder)
    (folder / "parity").mkdir()
    (folder / "parity" / "parity.json").write_text(json.dumps(_parity(passed)))
    write_model_card(folder)
    text = (folder / "README.md").read_text()
    section = text[text.index("## Parity") : text.index("## Usage")]
    if passed:
        rule = "atol 0.0001 + rtol 0.0001 x max abs reference, per endpoint and input"  # as the verifier wrote it
        assert f"| **PASS** | 3.1e-06 | {rule} | none |" in section
        assert "| logits | 2.5e-06 | 0.00011 | yes |" in section
    else:
        assert "| **FAIL** | 1.7 |" in section and "`layer_1` (max abs diff 0.9)" in section
        assert "| logits | 1.7 | 0.00011 | no |" in section
    assert "[parity/parity.md](parity/parity.md)" in section


def test_the_verifier_refreshes_the_card(classifier_folder: Path, tmp_path):
    pytest.importorskip("tensorflow")
    from converter.verify import check_parity
    from fixtures import ensure_fixture

    folder = tmp_path / "model"
    shutil.copytree(classifier_folder, folder)
    check = check_parity(ensure_fixture(SMALL).tarball, folder)
    assert check.result.passed
    text = (folder / "README.md").read_text()
    assert "| **PASS** |" in text and re.search(r"\| logits \| [0-9.e+-]+ \| [0-9.e+-]+ \| yes \|", text)


# --- the card of sources that are not slim checkpoints, checked against their conversion records ---------
def _converted(source: Path, tmp_path: Path) -> tuple[str, ConversionRecord, dict]:
    from converter.pipeline.convert import convert_checkpoint

    folder = tmp_path / source.stem
    convert_checkpoint(source, folder)
    config = json.loads((folder / "config.json").read_text())
    return (folder / "README.md").read_text(), ConversionRecord.read(folder), config


def _real_model(name: str) -> Path:
    from tests.realdata_tflite import MODELS

    path = MODELS / name
    if not path.is_file():
        pytest.skip(f"{path} is absent: the real Coral models are needed")
    return path


def _real_labels(name: str) -> list[str]:
    from tests.realdata_tflite import LABELS

    return (LABELS / name).read_text().splitlines()


def _says_what_the_record_says(text: str, record: ConversionRecord) -> None:
    assert f"`{record.source['name']}` (read as `{record.source['format']}`" in text
    for note in record.notes:  # the scheme, dequantization, folded BatchNorm: each fact the reader recorded
        assert f"- {note}\n" in text
    assert "TensorFlow-slim checkpoint" not in text and "original float32 values" not in text
    assert "re-quantized" not in text


def test_card_of_a_quantized_imagenet_tflite(tmp_path):
    text, record, config = _converted(_real_model("mobilenet_v2_1.0_224_quant.tflite"), tmp_path)
    _says_what_the_record_says(text, record)
    assert any("uint8" in note for note in record.notes) and "dequantized" in text
    labels = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    assert labels == _real_labels("imagenet_labels.txt")  # Coral's ImageNet labels, background first
    assert "- imagenet-1k\n" in _front_matter(text) and "# MobileNetV2 1.0 / 224 (ImageNet)" in text
    assert "| classes | 1001: index 0 is `background`, then the 1000 ImageNet classes |" in text


def test_card_of_a_model_with_other_labels_names_no_dataset(tmp_path):
    """The iNat birds model shares ImageNet's backbone but not its labels."""
    text, record, config = _converted(_real_model("mobilenet_v2_1.0_224_inat_bird_quant.tflite"), tmp_path)
    _says_what_the_record_says(text, record)
    birds = _real_labels("inat_bird_labels.txt")
    assert len(config["id2label"]) == len(birds) == 965
    assert "datasets" not in _front_matter(text) and "imagenet" not in text.lower()
    assert f"| classes | 965, named by the source (`{birds[0]}`, `{birds[1]}`, ...) |" in text


def test_card_of_a_deeplab_of_unknown_split(tmp_path):
    text, record, _ = _converted(_real_model("deeplabv3_mnv2_pascal_quant.tflite"), tmp_path)
    _says_what_the_record_says(text, record)
    assert "train_aug" not in text and "trained on a split its source does not record" in text
    assert "- pascal-voc\n" in _front_matter(text)  # its 21 labels are PASCAL VOC's


def test_card_of_a_fine_tuned_keras_model(tmp_path):
    pytest.importorskip("keras")
    from fixtures.keras_builder import FINE_TUNED_ALPHA, FINE_TUNED_CLASSES, ensure_keras_fixture

    text, record, config = _converted(ensure_keras_fixture(FINE_TUNED_ALPHA).file("fine_tuned_archive"), tmp_path)
    _says_what_the_record_says(text, record)
    assert len(config["id2label"]) == FINE_TUNED_CLASSES
    assert "datasets" not in _front_matter(text) and "imagenet" not in text.lower()
    assert f"| classes | {FINE_TUNED_CLASSES}, " in text


def test_table_cells_escape_the_pipe(classifier_folder: Path, tmp_path):
    """A `|` in a cell (the calibrated rule's max|reference|) must not split the row: each row of the card's
    tables has as many cells as its header."""
    folder = tmp_path / "model"
    shutil.copytree(classifier_folder, folder)
    (folder / "parity").mkdir()
    parity = {**_parity(True), "tolerance": "max(16 x max|ours32 - ours64| / max|ours32|, 1.9e-06) x max|reference|"}
    (folder / "parity" / "parity.json").write_text(json.dumps(parity))
    write_model_card(folder)
    text = (folder / "README.md").read_text()
    for table in re.findall(r"(?:^\|.*\|\n)+", text, flags=re.M):
        rows = [re.split(r"(?<!\\)\|", row)[1:-1] for row in table.splitlines()]
        assert {len(row) for row in rows} == {len(rows[0])}, table
    assert r"max\|ours32 - ours64\|" in text
