"""`predict-mobilenet`: top-k labels for classifiers, a label-map PNG for DeepLab, on the real images of
../shared/realdata with converted fixture models (random weights: the format is checked, not the labels),
and with the real quantized TFLite models converted, against the TFLite interpreter (the labels too)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from converter.app.predict import LABELS_SUFFIX, OVERLAY_SUFFIX, load_model, palette, predict_main
from converter.images import preprocess
from tests.realdata_tflite import IMAGES, LABELS, MODELS

CLASSIFICATION_IMAGES = ("cat.bmp", "grace_hopper.bmp", "missvickie_potato_chips.bmp")
LINE = re.compile(r"^  +(\d\.\d{4})  (.+)$")


@pytest.fixture(scope="module")
def images() -> Path:
    if not IMAGES.is_dir():
        pytest.skip(f"{IMAGES} is absent: the real test images (../shared/realdata) are not available")
    return IMAGES


def test_classifier_prints_top5_per_image(classifier_folder: Path, images: Path):
    paths = [str(images / name) for name in CLASSIFICATION_IMAGES]
    result = CliRunner().invoke(predict_main, [*paths, "--model", str(classifier_folder)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 6 * len(paths)
    labels = set(load_model(classifier_folder).labels.values())
    for k, path in enumerate(paths):
        assert lines[6 * k] == path
        rows = [LINE.match(line) for line in lines[6 * k + 1 : 6 * k + 6]]
        assert all(rows), lines[6 * k : 6 * k + 6]
        probabilities = [float(row[1]) for row in rows]
        assert probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1 + 1e-3
        assert all(row[2] in labels for row in rows)


def test_top_k_option(classifier_folder: Path, images: Path):
    result = CliRunner().invoke(
        predict_main, [str(images / "cat.bmp"), "--model", str(classifier_folder), "--top", "2"]
    )
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 3


def test_preprocessing_matches_transformers_image_processor(classifier_folder: Path, images: Path):
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    processor = transformers.AutoImageProcessor.from_pretrained(classifier_folder)
    image = Image.open(images / "grace_hopper.bmp").convert("RGB")  # not square
    ours = preprocess(image, load_model(classifier_folder).preprocessing)[None]
    theirs = processor(images=image, return_tensors="np")["pixel_values"]
    assert ours.shape == theirs.shape == (1, 3, 96, 96)
    assert np.abs(ours - theirs).max() < 1e-5


def test_segmentation_writes_the_label_map_and_an_overlay(segmenter_folder: Path, images: Path, tmp_path):
    from PIL import Image

    image = images / "bird_segmentation.bmp"
    out = tmp_path / "seg"
    result = CliRunner().invoke(predict_main, [str(image), "--model", str(segmenter_folder), "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    labels_png, overlay_png = out / "bird_segmentation_labels.png", out / "bird_segmentation_overlay.png"
    lines = result.stdout.splitlines()
    assert lines[:3] == [str(image), f"  wrote {labels_png}", f"  wrote {overlay_png}"]
    with Image.open(labels_png) as written, Image.open(image) as original:
        assert written.mode == "P" and written.size == original.size
        labels = np.asarray(written)
        colours = np.asarray(written.getpalette()[: 3 * 21], np.uint8).reshape(21, 3)
        picture = np.asarray(original.convert("RGB"))
    # VOC colours of background, aeroplane and person
    assert colours[[0, 1, 15]].tolist() == [[0, 0, 0], [128, 0, 0], [192, 128, 128]]
    with Image.open(overlay_png) as written:
        assert written.mode == "RGB" and written.size == original.size
        blended = np.asarray(written)
    background = labels == 0
    assert (blended[background] == picture[background]).all()  # the overlay tints only the classes found
    voc = load_model(segmenter_folder).labels
    rows = [re.match(r"^ +(\d+\.\d\d)% +(\d+) px  (\S+)$", line) for line in lines[3:]]
    assert rows and all(rows), lines
    values, counts = np.unique(labels, return_counts=True)  # the label map holds the class ids it reports
    assert {row[3]: int(row[2]) for row in rows} == {voc[int(v)]: int(c) for v, c in zip(values, counts, strict=True)}


def test_palette_is_the_pascal_colour_map():
    colours = palette(21)
    assert colours[0].tolist() == [0, 0, 0] and colours[1].tolist() == [128, 0, 0]
    assert colours[15].tolist() == [192, 128, 128]  # person
    assert len({tuple(c) for c in colours}) == 21


def test_errors_are_one_line(classifier_folder: Path, tmp_path):
    runner = CliRunner()
    result = runner.invoke(predict_main, [str(tmp_path / "missing.jpg"), "--model", str(classifier_folder)])
    assert result.exit_code == 1 and result.stderr == f"error: {tmp_path / 'missing.jpg'} does not exist\n"

    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    result = runner.invoke(predict_main, [str(tmp_path / "broken.jpg"), "--model", str(classifier_folder)])
    assert result.exit_code == 1 and result.stderr.startswith("error: cannot read the image")

    result = runner.invoke(predict_main, [str(tmp_path / "broken.jpg"), "--model", str(tmp_path)])
    assert result.exit_code == 1 and "pass a folder written by convert-mobilenet" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def _picture(path: Path) -> Path:
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 120, 3), dtype=np.uint8)).save(path)
    return path


def test_every_image_is_processed_and_failures_come_at_the_end(classifier_folder: Path, tmp_path):
    good, other = _picture(tmp_path / "good.png"), _picture(tmp_path / "other.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    args = [good, tmp_path / "missing.jpg", tmp_path / "broken.jpg", other]
    result = CliRunner().invoke(predict_main, [*map(str, args), "--model", str(classifier_folder)])
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert [lines[0], lines[6]] == [str(good), str(other)] and len(lines) == 12  # both good images, top 5 each
    assert result.stderr.splitlines() == [
        f"error: {tmp_path / 'missing.jpg'} does not exist",
        f"error: cannot read the image {tmp_path / 'broken.jpg'} (cannot identify image file "
        f"'{tmp_path / 'broken.jpg'}')",
    ]
    assert result.output.splitlines()[-2:] == result.stderr.splitlines()  # after every result


def test_a_closed_pipe_ends_quietly(classifier_folder: Path, tmp_path):
    """`predict-mobilenet ... | head -n 1`: no traceback, no "internal error", the SIGPIPE status."""
    import subprocess
    import sys

    image = str(_picture(tmp_path / "image.png"))
    command = [sys.executable, "-c", "from converter.app.predict import predict_main; predict_main()"]
    process = subprocess.Popen(
        [*command, *[image] * 20, "--model", str(classifier_folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
    )
    assert process.stdout.readline() == f"{image}\n".encode()
    process.stdout.close()  # as `head -n 1` does after its line
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=300) == 141 and stderr == ""


# --- a folder converted from a quantized .tflite: the integer model by default, --float its float twin ----


@pytest.fixture(scope="module")
def quantized_folder(tmp_path_factory, images: Path):
    """model name -> the real quantized .tflite converted (each once)."""
    from converter import convert_checkpoint

    folders = {}

    def convert(name: str) -> Path:
        source = MODELS / f"{name}.tflite"
        if not source.is_file():
            pytest.skip(f"{source} is absent: the real quantized models (../shared/realdata) are not available")
        if name not in folders:
            folders[name] = tmp_path_factory.mktemp(name) / "out"
            convert_checkpoint(source, folders[name])
        return folders[name]

    return convert


def reference_interpreter(model: str):
    """The real model in TFLite's reference kernels, the specification of its integer arithmetic."""
    pytest.importorskip("tensorflow", reason="TensorFlow (tf.lite) is needed to run the real TFLite models")
    from tests.realdata_tflite import interpreter

    return interpreter(MODELS / f"{model}.tflite", reference_kernels=True)


def interpreter_output(interp, pixel_values: np.ndarray) -> np.ndarray:
    """The output for NCHW pixel values in [-1, 1], quantized as the model's input says."""
    detail = interp.get_input_details()[0]
    scale, zero_point = detail["quantization"]
    limits = np.iinfo(detail["dtype"])
    values = np.round(pixel_values.transpose(0, 2, 3, 1) / scale) + zero_point
    interp.set_tensor(detail["index"], np.clip(values, limits.min, limits.max).astype(detail["dtype"]))
    interp.invoke()
    return interp.get_tensor(interp.get_output_details()[0]["index"])[0]


def top1_lines(stdout: str) -> dict[str, str]:
    """image path -> the label printed first (with --top 1)."""
    lines = stdout.splitlines()
    return {path: LINE.match(line)[2] for path, line in zip(lines[::2], lines[1::2], strict=True)}


CLASSIFIER = "mobilenet_v2_1.0_224_quant"


def test_a_quantized_folder_runs_its_integer_model_as_tflite_does(quantized_folder, images: Path):
    """Reproduced on grace_hopper: the float twin answered "mortarboard", TFLite "military uniform"."""
    from PIL import Image

    folder = quantized_folder(CLASSIFIER)
    paths = [str(images / name) for name in CLASSIFICATION_IMAGES]
    result = CliRunner().invoke(predict_main, [*paths, "--model", str(folder), "--top", "1"])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [result.stderr.strip()] and "running the integer model" in result.stderr
    ours = top1_lines(result.stdout)
    names = (LABELS / "imagenet_labels.txt").read_text().splitlines()  # background first, as the model's 1001
    preprocessing = load_model(folder, use_float=True).preprocessing
    interp = reference_interpreter(CLASSIFIER)
    for path in paths:
        with Image.open(path) as image:
            probabilities = interpreter_output(interp, preprocess(image.convert("RGB"), preprocessing)[None])
        best = {names[i] for i in np.flatnonzero(probabilities == probabilities.max())}  # quantized: ties happen
        print(f"\n{Path(path).name}: TFLite {sorted(best)}, predict-mobilenet {ours[path]!r}")
        assert ours[path] in best


def test_float_runs_the_float_twin(quantized_folder, images: Path):
    transformers = pytest.importorskip("transformers")
    import torch

    folder = quantized_folder(CLASSIFIER)
    paths = [str(images / name) for name in CLASSIFICATION_IMAGES]
    result = CliRunner().invoke(predict_main, [*paths, "--model", str(folder), "--top", "1", "--float"])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [result.stderr.strip()] and "running the float twin" in result.stderr
    theirs = transformers.MobileNetV2ForImageClassification.from_pretrained(folder).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    from PIL import Image

    for path, label in top1_lines(result.stdout).items():
        with Image.open(path) as image, torch.no_grad():
            pixel_values = processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
            logits = theirs(pixel_values=pixel_values).logits[0]
        assert label == theirs.config.id2label[int(logits.argmax())]


def test_a_quantized_segmenter_writes_the_interpreter_label_map(quantized_folder, images: Path, tmp_path):
    from PIL import Image

    name = "deeplabv3_mnv2_dm05_pascal_quant"
    folder = quantized_folder(name)
    image = images / "bird_segmentation.bmp"  # 513 x 513, the model's input size: fed as is to both
    result = CliRunner().invoke(predict_main, [str(image), "--model", str(folder), "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "running the integer model" in result.stderr
    with Image.open(tmp_path / "bird_segmentation_labels.png") as written, Image.open(image) as original:
        ours = np.asarray(written)
        pixels = preprocess(original.convert("RGB"), load_model(folder, use_float=True).preprocessing, crop=False)
    theirs = interpreter_output(reference_interpreter(name), pixels[None])
    equal = float((ours == theirs).mean())
    print(f"\nlabel map: {equal:.4%} of the pixels as TFLite's")
    assert equal >= 0.995  # the bar the integer model meets against the reference kernels


# --- arguments: folders of images, a source given as --model -------------------------------------


def test_a_folder_stands_for_its_images_sorted(classifier_folder: Path, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("b.png", "a.JPG", "c.bmp"):
        _picture(folder / name)
    (folder / "notes.txt").write_text("not an image")
    (folder / "nested").mkdir()
    result = CliRunner().invoke(predict_main, [str(folder), "--model", str(classifier_folder), "--top", "1"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[::2] == [str(folder / name) for name in ("a.JPG", "b.png", "c.bmp")]
    assert result.stderr == f"note: skipped 2 entries of {folder} that are not images\n"


def test_a_folder_without_images_is_a_failure(classifier_folder: Path, tmp_path):
    (tmp_path / "empty").mkdir()
    good = _picture(tmp_path / "good.png")
    result = CliRunner().invoke(predict_main, [str(tmp_path / "empty"), str(good), "--model", str(classifier_folder)])
    assert result.exit_code == 1 and result.stdout.splitlines()[0] == str(good)
    assert (
        result.stderr
        == f"error: the folder {tmp_path / 'empty'} holds no images; pass image files or a folder of them\n"
    )


@pytest.mark.parametrize(
    ("source", "output"),
    [("mobilenet_v2_1.0_224_quant.tflite", "mobilenet_v2_1.0_224_quant"), ("model.tgz", "model"),
     ("model.tar.gz", "model"), ("exported", "exported_converted"), ("model.ckpt", "model.ckpt_converted")],
)  # fmt: skip
def test_a_source_as_model_says_to_convert_it_first(tmp_path, source: str, output: str):
    """Any file, a SavedModel folder or a checkpoint prefix is a source, not a converted folder."""
    (tmp_path / "exported").mkdir()
    (tmp_path / "exported" / "saved_model.pb").write_bytes(b"")
    (tmp_path / "model.ckpt.index").write_bytes(b"")
    for name in ("mobilenet_v2_1.0_224_quant.tflite", "model.tgz", "model.tar.gz"):
        (tmp_path / name).write_bytes(b"")
    image = _picture(tmp_path / "image.png")
    result = CliRunner().invoke(predict_main, [str(image), "--model", str(tmp_path / source)])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == (
        f"error: {tmp_path / source} is not a converted model folder: convert it first with "
        f"`convert-mobilenet --checkpoint {tmp_path / source} --output {output}`, then pass --model {output}\n"
    )


def test_help_says_what_model_takes():
    result = CliRunner().invoke(predict_main, ["--help"])
    text = " ".join(result.stdout.split())
    assert result.exit_code == 0 and "--model PATH A folder written by convert-mobilenet" in text
    assert "--float" in text


def test_the_overlays_are_written_when_stdout_closes(segmenter_folder: Path, tmp_path):
    """`predict-mobilenet A B --model DEEPLAB | head -n 1`: every image's PNGs are written all the same."""
    import subprocess
    import sys

    stems = ("a", "b")
    pictures = [str(_picture(tmp_path / f"{stem}.png")) for stem in stems]
    out = tmp_path / "out"
    command = [sys.executable, "-c", "from converter.app.predict import predict_main; predict_main()"]
    process = subprocess.Popen(
        [*command, *pictures, "--model", str(segmenter_folder), "--output-dir", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
    )
    assert process.stdout.readline() == f"{pictures[0]}\n".encode()
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=300) == 141 and stderr == ""
    written = sorted(path.name for path in out.iterdir())
    assert written == sorted(f"{stem}{suffix}" for stem in stems for suffix in (LABELS_SUFFIX, OVERLAY_SUFFIX))


def test_dir_lists_the_public_api():
    """`dir(mobilenet_torch)` (and tab completion) shows the lazily imported public names."""
    import importlib

    import mobilenet_torch

    names = set(dir(mobilenet_torch))
    assert set(mobilenet_torch.__all__) <= names
    star: dict = {}
    exec("from mobilenet_torch import *", star)
    assert set(mobilenet_torch.__all__) <= set(star)
    quantized = importlib.import_module("mobilenet_torch.quantized")
    assert mobilenet_torch.QuantizedMobileNetV2 is quantized.QuantizedMobileNetV2
