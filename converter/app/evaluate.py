"""`eval-mobilenet --model FOLDER DATA [--reference SOURCE]`: accuracy on the user's own data, side by side
for the converted float model, the emulated integer model (where the folder has one) and the source run
by its own framework (the verifier's reference backends).

Classifiers: top-1, top-5 and a per-class table. DeepLab: mIoU, per-class IoU and pixel accuracy over a
confusion matrix (the ignore label 255 left out). With a reference, each model's agreement with it: the
share of images with the same top-1, or of image pixels (padding aside) with the same label.

Batches stream through a DataLoader whose workers decode and prepare the images; the figures are running
counts and one confusion matrix, so memory stays flat whatever the data set's size. A sample that cannot be
read is skipped, counted and listed in eval.json; it never stops the run.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np

from converter.app.cli import report_errors
from converter.app.datasets import (
    IGNORE_LABEL,
    PREPROCESSINGS,
    PreparedSamples,
    open_data_set,
)
from converter.errors import DataSetError, OutputError, UsageError
from converter.output import layout
from converter.version import __version__
from converter.vocabulary import BACKBONE, DEEPLAB, kind_of_architecture

FLOAT, INTEGER, REFERENCE = "float", "integer", "reference"
TOP_K = 5
DECODING_NICENESS = 10


@dataclass
class ModelScore:
    """One model's figures. Classification: top1, top5 (shares of the scored images); segmentation: miou,
    pixel_accuracy. `per_class`: class name -> its figures. `agreement`: the share of images (pixels) on
    which this model's top-1 (label) is the reference's; None without a reference."""

    model: str
    runs: str
    top1: float | None = None
    top5: float | None = None
    miou: float | None = None
    pixel_accuracy: float | None = None
    agreement: float | None = None
    per_class: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class EvaluationResult:
    kind: str
    model_folder: str
    data: dict[str, Any]  # count, files_sha256, layout, ...
    preprocessing: dict[str, Any]
    scores: list[ModelScore]
    scored: int  # images that were run
    skipped: list[dict[str, str]]  # {"image", "reason"}
    seconds: float
    written: str | None = None  # where eval.json went

    @property
    def images_per_second(self) -> float:
        return self.scored / self.seconds if self.seconds else 0.0

    def score(self, model: str) -> ModelScore | None:
        return next((score for score in self.scores if score.model == model), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "toolkit": f"{layout.TOOLKIT_PREFIX} {__version__}",
            "evaluation": {
                "kind": self.kind,
                "model_folder": self.model_folder,
                "data": self.data,
                "preprocessing": self.preprocessing,
                "scored": self.scored,
                "skipped": self.skipped,
                "models": [asdict(score) for score in self.scores],
                "seconds": round(self.seconds, 3),
            },
        }


# ------------------------------------------------------------------------------------------------ models
class Runner:
    """One model of the comparison: `predict(pixels NCHW)` gives classifier logits [N, classes] or label
    maps [N, H, W]."""

    def __init__(self, name: str, runs: str, predict) -> None:
        self.name, self.runs, self.predict = name, runs, predict


def _float_runner(folder: Path, segmentation: bool) -> Runner:
    import torch

    from mobilenet_torch import load_pretrained

    model = load_pretrained(folder).eval()

    def predict(pixels):
        with torch.inference_mode():
            if segmentation:
                return model.predict_labels(pixels)
            logits = model(pixels).logits
            return logits.mean(dim=(2, 3)) if logits.ndim == 4 else logits

    return Runner(FLOAT, f"the converted float model ({layout.WEIGHTS}), mobilenet_torch", predict)


def _integer_runner(folder: Path, segmentation: bool) -> Runner:
    from mobilenet_torch.quantized import QuantizedMobileNetV2
    from mobilenet_torch.quantized_files import INTEGER_WEIGHTS_FILE

    model = QuantizedMobileNetV2.from_pretrained(folder)

    def predict(pixels):
        output = model(pixels)
        return output.labels if segmentation else output.logits

    return Runner(INTEGER, f"the emulated integer model ({INTEGER_WEIGHTS_FILE}), mobilenet_torch.quantized", predict)


def _reference_runner(source: str, folder: Path, config, segmentation: bool, kind: str, stack) -> Runner:
    """The source run by its own framework, through the verifier's reference backends."""
    import torch
    import torch.nn.functional as F

    from converter.formats import open_reader
    from converter.output.records import ConversionRecord
    from converter.verify.references import open_reference
    from converter.verify.references.base import DEEPLAB_LOGITS_TENSOR, LOGITS_TENSOR

    record = ConversionRecord.read(folder)
    recorded = record and Path(source).name == record.source.get("name")
    reader = stack.enter_context(open_reader(source, record.source.get("format") if recorded else None))
    tensor = DEEPLAB_LOGITS_TENSOR if segmentation else LOGITS_TENSOR
    reference = stack.enter_context(
        open_reference(
            reader.references,
            kind=kind,
            depth=config.depth_multiplier,
            convention=record.weights if record else "ema",
            tensors=[tensor],
            output_stride=config.output_stride if segmentation else None,
            image_size=config.image_size,
        )  # fmt: skip
    )
    if tensor in reference.missing:
        raise UsageError(f"the reference cannot give the model's output: {reference.missing[tensor]}")
    if not reference.accepts(config.image_size, config.image_size):
        _, height, width = reference.fixed_shape
        raise UsageError(
            f"the reference takes {height}x{width} images, the converted model is evaluated at "
            f"{config.image_size}x{config.image_size}; pass the source this folder was converted from"
        )
    classes = config.num_labels

    def predict(pixels):
        with warnings.catch_warnings():  # the framework's notices (Keras' about its input structure)
            warnings.simplefilter("ignore")
            out = reference.run(np.ascontiguousarray(pixels.numpy().transpose(0, 2, 3, 1)), [tensor])[tensor]
        if segmentation:  # the graph's own rule: logits resized bilinearly (align_corners), then arg max
            logits = torch.from_numpy(np.ascontiguousarray(out.transpose(0, 3, 1, 2)))
            logits = F.interpolate(logits, size=pixels.shape[-2:], mode="bilinear", align_corners=True)
            return logits.argmax(dim=1)
        return torch.from_numpy(np.array(_aligned_classes(out.reshape(len(out), -1), classes)))  # a copy: writable

    runs = reference.info.description + (f" (`{reference.info.file}`)" if reference.info.file else "")
    return Runner(REFERENCE, runs, predict)


def _aligned_classes(logits: np.ndarray, classes: int) -> np.ndarray:
    """The reference's logits indexed as the converted model's classes: a background class the converted
    model dropped is dropped, one it added (index 0) is added, never chosen."""
    if logits.shape[1] == classes + 1:
        return logits[:, 1:]
    if logits.shape[1] + 1 == classes:
        return np.concatenate([np.full((len(logits), 1), -np.inf, logits.dtype), logits], axis=1)
    if logits.shape[1] != classes:
        raise UsageError(f"the reference has {logits.shape[1]} classes, the converted model {classes}")
    return logits


# ------------------------------------------------------------------------------------------------ tallies
class ClassificationTally:
    def __init__(self, classes: int) -> None:
        self.top1 = self.top5 = self.agree = self.count = 0
        self.per_class_count = np.zeros(classes, np.int64)
        self.per_class_top1 = np.zeros(classes, np.int64)
        self.per_class_top5 = np.zeros(classes, np.int64)

    def add(self, logits, targets: np.ndarray, reference_top1: np.ndarray | None) -> np.ndarray:
        ranked = logits.float().topk(min(TOP_K, logits.shape[1]), dim=1).indices.numpy()
        hit1 = ranked[:, 0] == targets
        hit5 = (ranked == targets[:, None]).any(axis=1)
        self.count += len(targets)
        self.top1 += int(hit1.sum())
        self.top5 += int(hit5.sum())
        np.add.at(self.per_class_count, targets, 1)
        np.add.at(self.per_class_top1, targets, hit1)
        np.add.at(self.per_class_top5, targets, hit5)
        if reference_top1 is not None:
            self.agree += int((ranked[:, 0] == reference_top1).sum())
        return ranked[:, 0]

    def score(self, runner: Runner, names: dict[int, str], with_reference: bool) -> ModelScore:
        per_class = {
            names.get(index, str(index)): {
                "index": index,
                "images": int(self.per_class_count[index]),
                "top1": self.per_class_top1[index] / self.per_class_count[index],
                "top5": self.per_class_top5[index] / self.per_class_count[index],
            }
            for index in np.flatnonzero(self.per_class_count).tolist()
        }
        return ModelScore(runner.name, runner.runs, top1=_share(self.top1, self.count),
                          top5=_share(self.top5, self.count),
                          agreement=_share(self.agree, self.count) if with_reference else None,
                          per_class=per_class)  # fmt: skip


class SegmentationTally:
    def __init__(self, classes: int) -> None:
        self.classes = classes
        self.confusion = np.zeros((classes, classes), np.int64)  # ground truth rows, predictions columns
        self.agree = self.pixels = 0

    def add(self, labels, targets: np.ndarray, regions: np.ndarray, reference_labels: np.ndarray | None) -> np.ndarray:
        predicted = labels.numpy().astype(np.int64)
        for i, (height, width) in enumerate(regions):
            truth = targets[i, :height, :width].astype(np.int64).ravel()
            mine = predicted[i, :height, :width].ravel()
            valid = (truth != IGNORE_LABEL) & (truth < self.classes)
            self.confusion += np.bincount(truth[valid] * self.classes + mine[valid].clip(0, self.classes - 1),
                                          minlength=self.classes**2).reshape(self.classes, self.classes)  # fmt: skip
            self.pixels += mine.size
            if reference_labels is not None:
                self.agree += int((mine == reference_labels[i, :height, :width].ravel()).sum())
        return predicted

    def score(self, runner: Runner, names: dict[int, str], with_reference: bool) -> ModelScore:
        truth, predicted, correct = self.confusion.sum(1), self.confusion.sum(0), np.diag(self.confusion)
        union = truth + predicted - correct
        present = truth > 0  # classes the data set holds: the mean is taken over them, as VOC's is
        per_class = {
            names.get(index, str(index)): {
                "index": index,
                "pixels": int(truth[index]),
                "iou": correct[index] / union[index],
            }
            for index in np.flatnonzero(present).tolist()
        }
        ious = correct[present] / union[present]
        return ModelScore(runner.name, runner.runs, miou=float(ious.mean()) if len(ious) else None,
                          pixel_accuracy=_share(int(correct.sum()), int(truth.sum())),
                          agreement=_share(self.agree, self.pixels) if with_reference else None,
                          per_class=per_class)  # fmt: skip


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


# ------------------------------------------------------------------------------------------------ evaluate
def evaluate(
    model_folder: str | os.PathLike,
    data: str | os.PathLike,
    reference: str | os.PathLike | None = None,
    *,
    limit: int | None = None,
    batch_size: int = 32,
    workers: int = 2,
    preprocessing: str | None = None,
    class_map: str | os.PathLike | None = None,
    split: str | None = None,
    output: str | os.PathLike | None = None,
    write: bool = True,
    progress: bool | None = None,
) -> EvaluationResult:
    """Evaluate a converted folder on `data` (see :mod:`converter.app.datasets`): its float model, its
    integer model where it has one, and with `reference` the source run by its own framework. Writes
    eval.json into the folder (or to `output`, a file or folder) unless `write` is false, and, when it lands
    in the folder, the model card's Evaluation section."""
    from contextlib import ExitStack

    import torch

    from converter.app.predict import check_converted
    from mobilenet_torch import MobileNetV2Config
    from mobilenet_torch.quantized_files import QUANTIZATION_FILE

    folder = Path(model_folder)
    check_converted(folder)
    if not (folder / layout.CONFIG).is_file():
        raise UsageError(f"{folder} is not a converted model folder (it has no {layout.CONFIG}); convert a model first")
    target = _output_path(folder, output) if write else None
    config = MobileNetV2Config.from_pretrained(folder)
    kind = kind_of_architecture(config.architectures or [])
    if kind == BACKBONE:
        raise UsageError(f"{folder} holds a backbone without a head: it has no classes to evaluate")
    segmentation = kind == DEEPLAB
    data_set = open_data_set(data, dict(config.id2label), segmentation, class_map, split).limited(limit)
    chosen = _preprocessing(folder, segmentation, preprocessing)
    with ExitStack() as stack:
        runners = [_float_runner(folder, segmentation)]
        if (folder / QUANTIZATION_FILE).is_file():
            runners.append(_integer_runner(folder, segmentation))
        settings = _settings(folder)
        size = config.image_size
        if reference is not None:
            runners.append(_reference_runner(str(reference), folder, config, segmentation, kind, stack))
        names = {**{int(k): str(v) for k, v in config.id2label.items()}, **data_set.class_names}
        tallies = {
            runner.name: (SegmentationTally if segmentation else ClassificationTally)(config.num_labels)
            for runner in runners
        }
        loader = torch.utils.data.DataLoader(
            PreparedSamples(data_set, chosen, size, settings), batch_size=batch_size, num_workers=workers,
            worker_init_fn=_decoding_worker if workers else None, persistent_workers=False,
        )  # fmt: skip
        skipped: list[dict[str, str]] = []
        scored = 0
        bar = _progress_bar(len(data_set.samples), progress)
        started = time.perf_counter()  # the images' time: loading the models and the reference is not counted
        for batch in loader:
            problems = batch["problem"]
            good = [i for i, problem in enumerate(problems) if not problem]
            for i, problem in enumerate(problems):
                if problem:
                    skipped.append({"image": str(data_set.samples[int(batch["index"][i])].image), "reason": problem})
            if good:
                _score_batch(runners, tallies, batch, good, segmentation)
                scored += len(good)
            bar.update(len(problems))
        bar.close()
        seconds = time.perf_counter() - started
    with_reference = reference is not None
    scores = [tallies[runner.name].score(runner, names, with_reference) for runner in runners]
    if not scored:
        raise DataSetError(
            f"none of the {len(data_set.samples)} images of {data} could be read: {skipped[0]['reason']}"
        )
    result = EvaluationResult(
        kind=kind,
        model_folder=str(folder),
        data=data_set.describe(),
        preprocessing={"name": chosen, "description": PREPROCESSINGS[chosen], "size": size,
                       "scaling": {key: settings.get(key) for key in ("rescale_factor", "image_mean", "image_std")}},
        scores=scores, scored=scored, skipped=skipped, seconds=seconds,
    )  # fmt: skip
    if target is not None:
        write_evaluation(result, target)
        result.written = str(target)
        if target.parent.resolve() == folder.resolve():
            _update_card(folder)
    return result


def _score_batch(runners, tallies, batch, good: list[int], segmentation: bool) -> None:
    # A batch every image of which was read (the usual case) is taken as it is, not copied by the indexing.
    rows = slice(None) if len(good) == len(batch["pixels"]) else good
    pixels = batch["pixels"][rows]
    targets = batch["target"][rows].numpy()
    outputs = {runner.name: runner.predict(pixels) for runner in runners}
    reference = outputs.get(REFERENCE)
    if segmentation:
        regions = batch["region"][rows].numpy()
        reference_labels = reference.numpy() if reference is not None else None
        for runner in runners:
            tallies[runner.name].add(outputs[runner.name], targets, regions, reference_labels)
    else:
        reference_top1 = reference.float().argmax(dim=1).numpy() if reference is not None else None
        for runner in runners:
            tallies[runner.name].add(outputs[runner.name], targets, reference_top1)


def _decoding_worker(_worker: int) -> None:
    """A decoding worker computes on one thread, at a lower priority: the model's threads (the main
    process's) wait for one another at every layer, so a worker that preempts one stalls them all."""
    import torch

    torch.set_num_threads(1)
    try:
        os.nice(DECODING_NICENESS)
    except OSError:  # not permitted here: the worker runs at the priority it has
        pass


def _progress_bar(total: int, shown: bool | None):
    from tqdm import tqdm

    return tqdm(total=total, desc="evaluating", unit="img", file=sys.stderr, leave=False,
                disable=not (sys.stderr.isatty() if shown is None else shown))  # fmt: skip


def _preprocessing(folder: Path, segmentation: bool, asked: str | None) -> str:
    """The source's own evaluation preprocessing: DeepLab's for a segmenter, the folder's record for a Keras
    source (its own input preparation, Teachable Machine's included), slim's for the rest."""
    from converter.output.records import ConversionRecord

    if asked is not None:
        if asked not in PREPROCESSINGS:
            raise UsageError(f"unknown preprocessing {asked!r}; use one of {', '.join(PREPROCESSINGS)}")
        if (asked == "deeplab") != segmentation:
            raise UsageError(
                f"--preprocessing {asked} does not fit a {'segmentation' if segmentation else 'classification'} model"
            )
        return asked
    if segmentation:
        return "deeplab"
    record = ConversionRecord.read(folder)
    return "processor" if record is not None and record.source.get("format") == "keras" else "slim"


def _settings(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / layout.PREPROCESSOR).read_text())
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------------------------------------ output
def _output_path(folder: Path, output: str | os.PathLike | None) -> Path:
    target = Path(output) if output is not None else folder / layout.EVALUATION
    if target.is_dir():
        target = target / layout.EVALUATION
    _check_ours(target)
    if not target.parent.is_dir():
        raise OutputError(f"cannot write {target}: {target.parent} is not a folder; choose another --output")
    return target


def _check_ours(target: Path) -> None:
    """Refuse to replace a file that is not an eval.json of this tool."""
    if not target.exists():
        return
    try:
        data = json.loads(target.read_text())
    except (OSError, ValueError):
        data = None
    if not (isinstance(data, dict) and str(data.get("toolkit", "")).startswith(layout.TOOLKIT_PREFIX)
            and "evaluation" in data):  # fmt: skip
        raise OutputError(
            f"{target} exists and was not written by eval-mobilenet; move it away or choose another --output"
        )


def write_evaluation(result: EvaluationResult, target: Path) -> None:
    """Write eval.json atomically: a private temporary (created as a plain open would, its mode following
    the umask), renamed over the target."""
    _check_ours(target)
    text = json.dumps(result.to_json(), indent=2) + "\n"
    temporary = target.parent / f".{target.name}.{secrets.token_hex(8)}.partial"
    try:
        with open(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666), "w") as file:
            file.write(text)
        os.replace(temporary, target)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise OutputError(f"cannot write {target} ({error.strerror or error}); choose another --output") from None


def _update_card(folder: Path) -> None:
    """Re-render the card where this toolkit wrote the folder (it never touches a card it did not write)."""
    from converter.output.card import write_model_card
    from converter.output.records import ConversionRecord

    if ConversionRecord.read(folder) is not None:
        write_model_card(folder)


# ------------------------------------------------------------------------------------------------ report
def summary_lines(result: EvaluationResult, per_class: bool = True) -> list[str]:
    """The tables the command prints: one row per model, then (per_class) the per-class figures."""
    data = result.data
    lines = [
        f"{data['layout']} {data['root']}: {result.scored} images scored, {len(result.skipped)} skipped "
        f"({result.images_per_second:.1f} images/s); preprocessing: {result.preprocessing['name']}"
    ]
    segmentation = result.kind == DEEPLAB
    head = ("mIoU", "pixel acc") if segmentation else ("top-1", "top-5")
    lines += [f"{'model':<10} {head[0]:>9} {head[1]:>9} {'agreement':>9}  runs"]
    for score in result.scores:
        first, second = (score.miou, score.pixel_accuracy) if segmentation else (score.top1, score.top5)
        lines.append(f"{score.model:<10} {_pct(first):>9} {_pct(second):>9} {_pct(score.agreement):>9}  {score.runs}")
    if per_class:
        figure = "iou" if segmentation else "top1"
        lines += ["", f"per class ({'IoU' if segmentation else 'top-1'}): " + ", ".join(s.model for s in result.scores)]
        classes = result.scores[0].per_class
        for name, row in classes.items():
            count = row.get("pixels", row.get("images"))
            values = " ".join(f"{_pct(score.per_class.get(name, {}).get(figure)):>8}" for score in result.scores)
            lines.append(f"  {name[:40]:<40} {count:>9}  {values}")
    for entry in result.skipped:
        lines.append(f"skipped {entry['image']}: {entry['reason']}")
    return lines


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("data", type=click.Path(path_type=str))
@click.option("--model", "model", required=True, type=click.Path(path_type=str),
              help="A folder written by convert-mobilenet.")  # fmt: skip
@click.option(
    "--reference",
    default=None,
    type=click.Path(path_type=str),
    help="The source the folder was converted from (a .tflite, Keras file, SavedModel, checkpoint): run by its "
    "own framework next to the converted models, with each model's agreement with it.",
)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate the first N samples only.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="DataLoader worker processes decoding the images (0: in the main process).")  # fmt: skip
@click.option(
    "--preprocessing",
    type=click.Choice(sorted(PREPROCESSINGS)),
    default=None,
    help="How images are prepared (default: the source's own evaluation: deeplab for DeepLab, the folder's "
    "record for a Keras source, slim for the rest).",
)
@click.option("--class-map", type=click.Path(path_type=str), default=None,
              help="A file of `name label` lines: a data set's class names (a folder name) to the "
              "model's labels or indices.")  # fmt: skip
@click.option("--split", default=None, help="PASCAL VOC: the ImageSets/Segmentation split (default: val).")
@click.option("--output", type=click.Path(path_type=str), default=None,
              help="Where eval.json goes (a file or folder; default: the model folder, whose card gets an "
              "Evaluation section).")  # fmt: skip
@report_errors
def eval_main(data, model, reference, limit, batch_size, workers, preprocessing, class_map, split, output):
    """Evaluate a converted model folder on DATA: a folder of class subfolders, a file of `path label`
    lines, or a PASCAL VOC folder. Prints top-1/top-5 (mIoU, pixel accuracy) for the float model, the
    integer model where the folder has one, and the --reference source; writes eval.json."""
    result = evaluate(model, data, reference, limit=limit, batch_size=batch_size, workers=workers,
                      preprocessing=preprocessing, class_map=class_map, split=split, output=output)  # fmt: skip
    for line in summary_lines(result):
        click.echo(line)
    click.echo(f"wrote {result.written}", err=True)


if __name__ == "__main__":
    eval_main()
