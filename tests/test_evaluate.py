"""`eval-mobilenet` on real images: the converted float model, the emulated integer model and the source run
by its own framework, side by side, scored against truths the code under test does not produce (the TFLite
interpreter's own top-1, Keras' own predictions, the real segmentation masks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from converter.app.datasets import ClassNames
from converter.app.evaluate import evaluate
from converter.errors import DataSetError, OutputError
from converter.slim import class_names, imagenet_wnids
from tests.helpers import assert_one_line_error
from tests.realdata_tflite import IMAGES, MODELS, REALDATA

if not REALDATA.is_dir():
    pytest.skip(f"{REALDATA} is absent: no real models or images to evaluate on", allow_module_level=True)
tf = pytest.importorskip("tensorflow", reason="TensorFlow runs the sources (TFLite interpreter, Keras)")
Image = pytest.importorskip("PIL.Image", reason="Pillow reads the images")

PHOTOS = ("bird", "cat", "dragonfly", "grace_hopper", "missvickie_potato_chips")
CLASSIFIER, DEEPLAB = "mobilenet_v2_1.0_224_quant", "deeplabv3_mnv2_dm05_pascal_quant"
# The real masks' values as PASCAL VOC class ids: the bird's mask holds PASCAL ids; the dog's is an
# Oxford-IIIT Pet trimap (0 pet, 1 background, 2 the uncertain border, which VOC marks void).
# A user's own classes, none of them a label of the model (numbered in sorted order, as Keras does).
USER_CLASS_OF = {"bird": "animals", "cat": "animals", "dragonfly": "animals", "grace_hopper": "people",
                 "missvickie_potato_chips": "things"}  # fmt: skip
USER_CLASSES = sorted(set(USER_CLASS_OF.values()))
FINE_TUNED_SIZE = 97
MASK_CLASSES = {"bird": {0: 0, 1: 1, 2: 2, 3: 3}, "dog": {0: 12, 1: 0, 2: 255}}


def eval_cli(*args) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", "from converter.app.evaluate import eval_main; eval_main()", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def _convert(source: Path, output: Path) -> Path:
    from converter.pipeline.convert import convert_checkpoint

    convert_checkpoint(source, output)
    return output


def _voc_palette() -> list[int]:
    colours = []
    for index in range(256):
        value, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r, g, b = r | (value & 1) << shift, g | ((value >> 1) & 1) << shift, b | ((value >> 2) & 1) << shift
            value >>= 3
        colours += [r, g, b]
    return colours


def _interpreter_top1(image: Image.Image) -> int:
    """The TFLite interpreter's own top-1 on slim's evaluation crop of the image (TF's own ops)."""
    interpreter = tf.lite.Interpreter(model_path=str(MODELS / f"{CLASSIFIER}.tflite"))
    interpreter.allocate_tensors()
    pixels = tf.image.central_crop(tf.constant(np.asarray(image, np.float32)), 0.875)
    pixels = tf.image.resize(pixels[None], (224, 224)).numpy() / 127.5 - 1
    detail = interpreter.get_input_details()[0]
    scale, zero_point = detail["quantization"]
    interpreter.set_tensor(detail["index"], np.clip(np.round(pixels / scale + zero_point), 0, 255).astype(np.uint8))
    interpreter.invoke()
    return int(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).argmax())


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    return _convert(MODELS / f"{CLASSIFIER}.tflite", tmp_path_factory.mktemp("eval") / CLASSIFIER)


@pytest.fixture(scope="module")
def imagenet_set(tmp_path_factory, classifier) -> tuple[Path, dict[str, int]]:
    """ImageNet's layout: class folders named by WordNet id, each photo in the folder of the class the
    TFLite interpreter gives it (class i of the 1001-class head is the (i - 1)-th wnid)."""
    root = tmp_path_factory.mktemp("imagenet")
    truth = {}
    for name in PHOTOS:
        with Image.open(IMAGES / f"{name}.bmp") as image:
            image = image.convert("RGB")
            truth[name] = _interpreter_top1(image)
            folder = root / imagenet_wnids()[truth[name] - 1]
            folder.mkdir(exist_ok=True)
            image.save(folder / f"{name}.jpg", quality=95)
    return root, truth


def test_classifier_float_integer_and_tflite_side_by_side(classifier, imagenet_set, tmp_path):
    root, truth = imagenet_set
    result = evaluate(classifier, root, MODELS / f"{CLASSIFIER}.tflite", workers=0, output=tmp_path)
    assert [score.model for score in result.scores] == ["float", "integer", "reference"]
    assert result.scored == len(PHOTOS) and not result.skipped
    reference, integer = result.score("reference"), result.score("integer")
    # The interpreter's own top-1 is the truth; run through the evaluation it must find it again.
    assert reference.top1 == 1.0 and reference.agreement == 1.0
    assert integer.agreement >= 0.99
    assert integer.top1 == pytest.approx(integer.agreement)  # every image's truth is the reference's top-1
    assert sum(row["images"] for row in integer.per_class.values()) == len(PHOTOS)
    assert len(integer.per_class) == len(set(truth.values()))
    written = json.loads((tmp_path / "eval.json").read_text())["evaluation"]
    assert written["data"]["count"] == len(PHOTOS) and len(written["data"]["files_sha256"]) == 64
    assert written["preprocessing"]["name"] == "slim"
    assert not (classifier / "eval.json").exists()  # --output elsewhere leaves the folder alone


# Facts of ILSVRC's synset list: a WordNet id and the ImageNet class it names.
KNOWN_WNIDS = {"n01440764": "tench, Tinca tinca", "n02123045": "tabby, tabby cat", "n03000134": "chainlink fence",
               "n15075141": "toilet tissue, toilet paper, bathroom tissue"}  # fmt: skip


@pytest.mark.parametrize("classes", [1001, 1000])
def test_imagenet_folders_are_found_by_wordnet_id(classes):
    labels = dict(enumerate(class_names("classification", classes)))
    names = ClassNames(labels, {})
    assert {wnid: labels[names.find(wnid)] for wnid in KNOWN_WNIDS} == KNOWN_WNIDS
    other = ClassNames({0: "cat", 1: "dog"}, {})  # a model of other classes takes no wnid
    assert other.find("n02123045") is None


def test_deeplab_voc_float_integer_and_tflite(tmp_path_factory):
    folder = _convert(MODELS / f"{DEEPLAB}.tflite", tmp_path_factory.mktemp("eval") / DEEPLAB)
    root = tmp_path_factory.mktemp("voc")
    for part in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / part).mkdir(parents=True)
    masks = {}
    for name, classes in MASK_CLASSES.items():
        with Image.open(IMAGES / f"{name}_segmentation.bmp") as image:
            image.convert("RGB").save(root / "JPEGImages" / f"{name}.jpg", quality=95)
        mask = np.asarray(Image.open(IMAGES / f"{name}_segmentation_mask.bmp"))
        ids = np.zeros_like(mask)
        for value, class_id in classes.items():
            ids[mask == value] = class_id
        label = Image.frombytes("P", mask.shape[::-1], ids.tobytes())
        label.putpalette(_voc_palette())
        label.save(root / "SegmentationClass" / f"{name}.png")
        masks[name] = ids
    (root / "ImageSets/Segmentation/val.txt").write_text("".join(f"{name}\n" for name in MASK_CLASSES))
    result = evaluate(folder, root, MODELS / f"{DEEPLAB}.tflite", workers=2)
    integer, reference = result.score("integer"), result.score("reference")
    assert integer.agreement >= 0.99 and reference.agreement == 1.0
    # Pixel accuracy and IoU from the masks: the class pixel counts are the masks' own (255 left out).
    counted = {row["index"]: row["pixels"] for row in integer.per_class.values()}
    values, counts = np.unique(np.concatenate([m.ravel() for m in masks.values()]), return_counts=True)
    assert counted == {int(v): int(c) for v, c in zip(values, counts, strict=True) if v != 255}
    assert 0 < integer.miou <= integer.pixel_accuracy <= 1
    (root / "SegmentationClass").rename(root / "labels")
    with pytest.raises(DataSetError, match="lacks SegmentationClass/"):
        evaluate(folder, root, workers=0, write=False)
    eval_json = json.loads((folder / "eval.json").read_text())["evaluation"]
    assert eval_json["preprocessing"]["name"] == "deeplab" and eval_json["data"]["split"] == "val"
    card = (folder / "README.md").read_text()
    assert "## Evaluation (measured)" in card and "not a published figure" in card
    assert "## Published accuracy" in card  # the published section stays, apart and labelled as such
    assert "| integer | " in card and f"{100 * integer.miou:.2f}%" in card


def _square(photo, size: int) -> np.ndarray:
    """Teachable Machine's preparation: the center square, resized."""
    side = min(photo.size)
    left, top = (photo.width - side) // 2, (photo.height - side) // 2
    return np.asarray(photo.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR), np.float32)


def _shortest_edge(photo, size: int) -> np.ndarray:
    """The shortest edge resized to size + 32, then the center crop: MobileNetV2ImageProcessor's way."""
    scale = (size + 32) / min(photo.size)
    resized = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.BILINEAR)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)), np.float32)


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory):
    """A Keras model fine-tuned on the user's own classes: a MobileNetV2 0.35 at the odd size 97 (the
    fixtures' seeded weights), a Rescaling layer and a Dense head fitted by least squares to the photos'
    features (two preparations of each) so that Keras classifies every photo as its real class; saved by
    Keras; and the user's class folders of those photos."""
    import keras

    from fixtures.keras_builder import _set_weights

    photos = []
    for name in PHOTOS:
        with Image.open(IMAGES / f"{name}.bmp") as image:
            photos.append(image.convert("RGB"))
    shape = (FINE_TUNED_SIZE, FINE_TUNED_SIZE, 3)
    base = keras.applications.MobileNetV2(input_shape=shape, alpha=0.35, include_top=False, weights=None)
    pixels = keras.Input(shape)
    features = keras.layers.GlobalAveragePooling2D()(base(keras.layers.Rescaling(1 / 127.5, offset=-1)(pixels)))
    backbone = keras.Model(pixels, features)
    _set_weights(backbone)
    inputs = np.stack([prepare(photo, FINE_TUNED_SIZE) for prepare in (_square, _shortest_edge) for photo in photos])
    found = backbone.predict(inputs, verbose=0)
    truth = np.array([USER_CLASSES.index(USER_CLASS_OF[name]) for name in PHOTOS] * 2)
    targets = 8.0 * np.eye(len(USER_CLASSES))[truth]
    solution = np.linalg.lstsq(np.hstack([found, np.ones((len(found), 1))]), targets, rcond=None)[0]
    head = keras.layers.Dense(len(USER_CLASSES))
    model = keras.Model(pixels, head(features))
    head.set_weights([solution[:-1].astype(np.float32), solution[-1].astype(np.float32)])
    assert (model.predict(inputs, verbose=0).argmax(axis=1) == truth).all(), "the head does not fit the photos"
    work = tmp_path_factory.mktemp("fine_tuned")
    source = work / "fine_tuned.keras"
    model.save(source)
    folder = _convert(source, work / "converted")
    root = work / "classes"  # its parent holds the list file of the list test
    for name, photo in zip(PHOTOS, photos, strict=True):
        (root / USER_CLASS_OF[name]).mkdir(parents=True, exist_ok=True)
        photo.save(root / USER_CLASS_OF[name] / f"{name}.png")
    return folder, source, root


def test_list_file_class_map_and_limit(fine_tuned, tmp_path):
    """A `path label` list whose labels are the data set's own names (wnid-like), mapped to the model's
    labels by a class map."""
    folder, source, root = fine_tuned
    images = sorted(root.rglob("*.png"))
    labels = json.loads((folder / "config.json").read_text())["id2label"]
    names = {name: f"n{index:08d}" for index, name in enumerate(USER_CLASSES)}
    (tmp_path / "classes.txt").write_text("".join(f"{names[n]} {labels[str(i)]}\n" for i, n in enumerate(USER_CLASSES)))
    listing = root.parent / "list.txt"  # paths relative to the list's folder
    listing.write_text("".join(f"{p.relative_to(root.parent)} {names[p.parent.name]}\n" for p in images))
    arguments = {"class_map": tmp_path / "classes.txt", "workers": 0, "write": False}
    whole = evaluate(folder, listing, source, **arguments)
    assert whole.scored == len(images) and whole.data["layout"] == "list file"
    assert whole.score("float").agreement == 1.0 and whole.score("float").top1 == 1.0
    limited = evaluate(folder, listing, limit=2, **arguments)
    assert limited.scored == 2 and limited.data["count"] == 2
    assert limited.data["files_sha256"] != whole.data["files_sha256"]


def test_fine_tuned_keras_user_classes_agree_with_keras(fine_tuned):
    folder, source, root = fine_tuned
    result = evaluate(folder, root, source, workers=0, write=False)
    assert [score.model for score in result.scores] == ["float", "reference"]
    float_score, keras = result.score("float"), result.score("reference")
    assert float_score.agreement == 1.0
    assert float_score.top1 == keras.top1 == 1.0  # every photo in its real class
    assert {name: row["images"] for name, row in float_score.per_class.items()} == {
        name: list(USER_CLASS_OF.values()).count(name) for name in USER_CLASSES
    }
    assert "image_dataset_from_directory" in result.data["classes_matched"]
    assert result.preprocessing["name"] == "processor"


def test_the_command_prints_the_tables_and_writes_eval_json(fine_tuned, tmp_path):
    from click.testing import CliRunner

    from converter.app.evaluate import eval_main

    folder, _, root = fine_tuned
    result = CliRunner().invoke(
        eval_main, ["--model", str(folder), str(root), "--workers", "0", "--output", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[1].split()[:4] == ["model", "top-1", "top-5", "agreement"]
    assert lines[2].split()[:4] == ["float", "100.00%", "100.00%", "-"]  # no reference: no agreement
    assert {line.split()[0] for line in lines[5:8]} == set(USER_CLASSES)
    assert json.loads((tmp_path / "eval.json").read_text())["evaluation"]["scored"] == len(PHOTOS)


def test_bad_images_are_converted_or_skipped(fine_tuned, tmp_path):
    from converter.images import open_image

    folder, _, _ = fine_tuned
    with Image.open(IMAGES / "cat.bmp") as image:
        photo = image.convert("RGB").resize((160, 120))
    good = tmp_path / "data" / "0"  # a folder may name the class by its index
    good.mkdir(parents=True)
    photo.convert("CMYK").save(good / "cmyk.jpg")
    photo.convert("L").save(good / "grey.png")
    photo.convert("RGBA").save(good / "alpha.png")
    Image.fromarray(np.asarray(photo.convert("L"), np.uint16) * 257).save(good / "sixteen.png")
    exif = photo.transpose(Image.Transpose.ROTATE_90).getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view": the stored pixels are the photo turned left
    photo.transpose(Image.Transpose.ROTATE_90).save(good / "exif.jpg", exif=exif, quality=95)
    (good / "corrupt.jpg").write_bytes((good / "exif.jpg").read_bytes()[:200])
    (good / "empty.png").write_bytes(b"")
    result = evaluate(folder, tmp_path / "data", workers=2, batch_size=3)
    assert result.scored == 5
    assert sorted(Path(entry["image"]).name for entry in result.skipped) == ["corrupt.jpg", "empty.png"]
    written = json.loads((folder / "eval.json").read_text())["evaluation"]
    assert len(written["skipped"]) == 2 and all(entry["reason"] for entry in written["skipped"])
    assert open_image(good / "exif.jpg").size == photo.size  # upright again
    sixteen = np.asarray(open_image(good / "sixteen.png"))[..., 0].astype(int)
    assert np.abs(sixteen - np.asarray(photo.convert("L"), int)).max() <= 1


def test_foreign_eval_json_is_never_replaced(fine_tuned, tmp_path):
    folder, _, root = fine_tuned
    foreign = tmp_path / "eval.json"
    foreign.write_text('{"mine": true}')
    with pytest.raises(OutputError, match="not written by eval-mobilenet"):
        evaluate(folder, root, output=foreign, workers=0)
    assert foreign.read_text() == '{"mine": true}'


def test_bad_data_sets_are_one_line_errors(classifier, fine_tuned, tmp_path):
    folder, _, _ = fine_tuned
    (tmp_path / "empty" / "0").mkdir(parents=True)
    with pytest.raises(DataSetError, match="hold no images"):
        evaluate(folder, tmp_path / "empty", workers=0, write=False)
    (tmp_path / "unknown" / "0").mkdir(parents=True)
    (tmp_path / "unknown" / "zebras").mkdir()
    result = eval_cli("--model", folder, tmp_path / "unknown")
    assert_one_line_error(result, 2, "no class named zebras")
    (tmp_path / "voc" / "JPEGImages").mkdir(parents=True)
    deeplab = eval_cli("--model", MODELS / f"{DEEPLAB}.tflite", tmp_path / "voc")
    assert_one_line_error(deeplab, 2, "is not a converted model folder", "convert-mobilenet")
    with pytest.raises(DataSetError, match="PASCAL VOC folder, but the model is a classifier"):
        evaluate(classifier, tmp_path / "voc", workers=0, write=False)
