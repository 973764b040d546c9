"""`README.md` for a converted model folder: Hub front matter, provenance, published accuracy, parity,
usage and upload instructions, rendered from `conversion.json`, `config.json` and (when the verifier has
run) `parity/parity.json`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from converter import zoo_catalog
from converter.output import layout
from converter.output.markdown import table_row
from converter.output.records import ConversionRecord, ParityRecord
from converter.slim import IMAGENET, PASCAL_VOC, labels_dataset

# What a card says where the folder holds no conversion record of this toolkit.
UNRECORDED = ConversionRecord(toolkit="", source={}, variant={}, weights="?")

WEIGHT_MEANINGS = {
    "ema": "trainable variables restored from their exponential moving averages, BatchNorm moving "
    "statistics as stored (what the authors' example notebook and the Hugging Face port do)",
    "ema-all": "every model variable restored from its exponential moving average (what slim's evaluation script does)",
    "raw": "the values exactly as stored, without moving averages",
    "as exported": "the one value per weight that the export stores",
}
#: The DeepLab zoo names its tarballs by the PASCAL VOC split they were trained on.
FEW_CLASSES = 10  # a card lists the names of this many classes or fewer, else the first two
TRAINING_SPLITS = {"trainval": "train + val", "train_aug": "train_aug", "trainaug": "train_aug"}


def write_model_card(folder: Path) -> None:
    """Render `folder/README.md` from the folder's `conversion.json`, `config.json` and parity report."""
    folder = Path(folder)
    record = ConversionRecord.read(folder)
    config = _read_json(folder / "config.json") or {}
    parity = ParityRecord.read(folder / layout.PARITY_FOLDER)
    preprocessor = _read_json(folder / layout.PREPROCESSOR)
    evaluation = (_read_json(folder / layout.EVALUATION) or {}).get("evaluation")
    (folder / layout.CARD).write_text(render_card(record, config, parity, preprocessor, evaluation))


def render_card(
    record: ConversionRecord | None,
    config: dict[str, Any],
    parity: ParityRecord | None = None,
    preprocessor: dict[str, Any] | None = None,
    evaluation: dict[str, Any] | None = None,
) -> str:
    """The card of a folder converted as `record` says (None: a folder without one, described from its
    config alone and, where given, its preprocessor config); `evaluation`: what eval-mobilenet measured."""
    record = record or UNRECORDED
    variant = record.variant
    kind = variant.get("kind", "classification")
    segmentation = kind != "classification"
    depth = variant.get("depth", config.get("depth_multiplier"))
    size = variant.get("size", config.get("image_size"))
    name = variant.get("name") or "mobilenet_v2"
    labels = _labels(config)
    dataset = labels_dataset(labels) if labels else None
    parts = [
        _front_matter(segmentation, dataset),
        _title(record, segmentation, depth, size, variant, dataset, len(labels)),
        _provenance(record, config, labels, dataset, preprocessor),
        _published(record, kind, depth, size, segmentation),
        _parity(parity),
        _evaluation(evaluation),
        _usage(name, segmentation, size or (513 if segmentation else 224)),
        _upload(name),
        _license(segmentation),
    ]
    return "\n".join(part.rstrip("\n") + "\n" for part in parts if part)


def _labels(config: dict[str, Any]) -> list[str]:
    """The class names in index order, as config.json's `id2label` holds them."""
    id2label = config.get("id2label") or {}
    try:
        return [str(id2label[key]) for key in sorted(id2label, key=int)]
    except (TypeError, ValueError):
        return [str(value) for value in id2label.values()]


def _front_matter(segmentation: bool, dataset: str | None) -> str:
    task = "image-segmentation" if segmentation else "image-classification"
    datasets = f"datasets:\n- {dataset}\n" if dataset else ""  # only a dataset whose very labels the model has
    return (
        "---\n"
        "license: apache-2.0\n"
        "library_name: transformers\n"
        f"pipeline_tag: {task}\n"
        "tags:\n"
        "- vision\n"
        f"- {task}\n"
        "- mobilenet_v2\n"
        f"{datasets}"
        "---\n"
    )


def _origin(record: ConversionRecord) -> str:
    """What the model was converted from, saying no more than the record knows."""
    original = zoo_file(record)
    if original is not None:
        return f"the original `{original.filename}` of the TensorFlow model zoo (tensorflow/models)"
    source = record.source
    if not source.get("name"):
        return "a source this folder does not record"
    return f"`{source['name']}` (read as `{source.get('format', '?')}`; what that involved is under Provenance)"


def _title(record: ConversionRecord, segmentation: bool, depth, size, variant, dataset, classes: int) -> str:
    origin = _origin(record)
    if segmentation:
        stride = variant.get("output_stride", 8)
        voc = dataset == PASCAL_VOC
        into = f"the {classes} PASCAL VOC classes (0 = background)" if voc else f"{classes} classes"
        return (
            f"# DeepLabV3 MobileNetV2 (depth {depth}, output stride {stride}){', PASCAL VOC 2012' if voc else ''}\n\n"
            f"Semantic segmentation into {into} with DeepLab v3 on a MobileNetV2 backbone of depth multiplier "
            f"{depth}, {_split(record)}, converted from {origin}. Inputs are scaled to [-1, 1], at "
            f"{size}x{size}.\n"
        )
    return (
        f"# MobileNetV2 {depth} / {size}{' (ImageNet)' if dataset == IMAGENET else ''}\n\n"
        f"Image classification with MobileNetV2 at depth multiplier {depth} and {size}x{size} input, "
        f"converted from {origin}. Inputs are RGB scaled to [-1, 1].\n"
    )


def _split(record: ConversionRecord) -> str:
    """The training split of a DeepLab model, where its source's name says it (the zoo names its tarballs
    by it); other sources do not record it."""
    name = str(record.source.get("name", ""))
    for marker, split in TRAINING_SPLITS.items():
        if marker in name:
            return f"trained on PASCAL VOC {split} (as the source's name says)"
    return "trained on a split its source does not record"


def _provenance(
    record: ConversionRecord,
    config: dict[str, Any],
    labels: list[str],
    dataset: str | None,
    preprocessor: dict[str, Any] | None = None,
) -> str:
    source = record.source
    files = source.get("files") or []
    download = record.download or {}
    weights = record.weights
    rows = [("source", f"`{source.get('name', '?')}`")]
    if source.get("format"):
        rows.append(("read as", f"`{source['format']}`"))
    if download.get("url"):
        rows.append(("published at", download["url"]))
    for item in files:
        rows.append((f"sha256 of `{item.get('name')}`", f"`{item.get('sha256')}` ({item.get('bytes')} bytes)"))
    rows.append(("weights convention", f"`{weights}`: {WEIGHT_MEANINGS.get(weights, 'see conversion.json')}"))
    tensors = record.tensors
    if tensors:
        ignored = ", ".join(
            f"{count} {reason.replace('_', ' ')}"
            for reason, count in sorted((tensors.get("ignored") or {}).items())
            if count
        )
        rows.append(("tensors", f"{tensors.get('mapped')} mapped; ignored by rule: {ignored or 'none'}"))
    if labels:
        rows.append(("classes", _classes(record, labels, dataset)))
    if preprocessor:
        rows.append(("preprocessing", _preprocessing(preprocessor)))
    if config.get("avg_pool") == "fixed7x7":
        rows.append(("pooling", "slim's fixed 7x7 window (mobilenet_torch; transformers always pools globally)"))
    if record.toolkit:
        rows.append(("converted with", record.toolkit))
    otherwise = ", and otherwise as listed below" if record.notes else ""
    notes = [
        f"The weights are the source's own values, renamed and transposed to PyTorch layouts{otherwise}; "
        "nothing was trained. Full provenance is in `conversion.json`."
    ]
    if record.placeholders:
        notes.append(
            "transformers' segmentation class builds a final 1x1 convolution that the original DeepLab graph "
            "does not have; it is stored with inert (zero) weights so the folder loads there."
        )
    if "trainval" in str(source.get("name", "")):
        notes.append("This checkpoint was trained on PASCAL VOC val as well: do not evaluate it on VOC val.")
    if config.get("classifier_layers"):
        notes.append(
            f"The head has {len(config['classifier_layers']) + 1} Dense layers (`classifier_layers`), which "
            "transformers' single `Linear` cannot hold: transformers loads this folder as `MobileNetV2Model` "
            "(the backbone) only; `mobilenet_torch` loads it whole."
        )
    if config.get("strided_padding"):
        notes.append(
            "Some stride-2 convolutions pad one row and column after and none before at every input size, as "
            "the source does (`strided_padding`), which `mobilenet_torch` computes; transformers ignores that "
            "field and pads TF's SAME, which gives the same outputs only where each such convolution's input is "
            "even (input sides that are multiples of 32 are)."
        )
    table = "\n".join(table_row(row) for row in rows)
    text = f"## Provenance\n\n| | |\n| --- | --- |\n{table}\n\n" + " ".join(notes) + "\n"
    if record.notes:
        text += "\nWhat the conversion read from the source and did (as `conversion.json` records it):\n\n"
        text += "".join(f"- {note}\n" for note in record.notes)
    return text


def _classes(record: ConversionRecord, labels: list[str], dataset: str | None) -> str:
    """What the classes are: a known dataset's only where the labels are its very names."""
    count = len(labels)
    if dataset == PASCAL_VOC:
        return f"{count}: PASCAL VOC, 0 = background"
    if dataset == IMAGENET and labels[0] == "background":
        added = " (added by the conversion)" if record.add_background else ""
        return f"{count}: index 0 is `background`{added}, then the 1000 ImageNet classes"
    if dataset == IMAGENET:
        dropped = "the background class was dropped" if record.drop_background else "without a background class"
        return f"{count}: the ImageNet classes ({dropped})"
    if labels == [f"LABEL_{i}" for i in range(count)]:
        return f"{count}, which the source does not name (`LABEL_0` to `LABEL_{count - 1}`)"
    shown = labels if count <= FEW_CLASSES else [*labels[:2], "..."]
    return f"{count}, named by the source ({', '.join(name if name == '...' else f'`{name}`' for name in shown)})"


def _preprocessing(settings: dict[str, Any]) -> str:
    """What preprocessor_config.json does to an image, in words."""
    crop = settings.get("crop_size") or {}
    shortest = (settings.get("size") or {}).get("shortest_edge")
    height, width = crop.get("height"), crop.get("width")
    if settings.get("do_center_crop") and shortest == height == width:
        steps = [f"the center square of the image, resized to {height}x{width}"]
    elif settings.get("do_center_crop"):
        steps = [f"shorter side resized to {shortest}", f"center crop to {height}x{width}"]
    else:
        steps = [f"resized to {shortest or '?'} on the shorter side"]
    mean, std = settings.get("image_mean"), settings.get("image_std")
    if mean == [0.5, 0.5, 0.5] and std == [0.5, 0.5, 0.5]:
        steps.append("RGB scaled as x / 127.5 - 1")
    else:
        steps.append(f"RGB scaled as (x / 255 - {mean}) / {std}")
    return ", ".join(steps) + " (`preprocessor_config.json`)"


def zoo_file(record: ConversionRecord) -> zoo_catalog.ZooEntry | None:
    """The zoo entry whose very file was converted, or None where that is not known.

    Known by sha256 where the zoo table records the file's, or by name where the tool downloaded it under
    its zoo name from the zoo's own URL (not a mirror). A local file named like a zoo tarball proves
    nothing: fixtures and renamed or fine-tuned checkpoints carry such names too."""
    digests = {item.get("sha256") for item in record.source.get("files") or [] if isinstance(item, dict)} - {None}
    for entry in zoo_catalog.entries():
        if entry.sha256 and entry.sha256 in digests:
            return entry
    download = record.download or {}
    entry = zoo_catalog.find(str(download.get("zoo_name", "")))
    if entry is None or download.get("mirror") or download.get("url") != entry.url:
        return None
    if download.get("sha256") not in digests or entry.sha256 not in (None, download.get("sha256")):
        return None
    return entry


def _published(record: ConversionRecord, kind: str, depth, size, segmentation: bool) -> str:
    if segmentation:
        return (
            "## Published accuracy\n\nThis project carries no published mIOU for this checkpoint; see the "
            "DeepLab model zoo (tensorflow/models research/deeplab/g3doc/model_zoo.md).\n"
        )
    original = zoo_file(record)
    if original is None:
        lines = [
            "None shown: this conversion cannot tell that its source is a file of the original model zoo (it "
            "knows one by the sha256 the zoo table records, or by a download from the zoo's own URL), and a "
            "published figure says nothing about other weights."
        ]
    elif original.top1 is not None:
        lines = [
            f"ImageNet top-1 **{original.top1}%** at {original.size}x{original.size}: the published figure of "
            f"the original `{original.filename}`, not re-measured by this conversion."
        ]
    else:
        lines = [f"The authors publish no top-1 figure for the original `{original.filename}`."]
    entry = zoo_catalog.published_for(kind, depth, size) if depth is not None and size is not None else None
    reference = entry or (zoo_catalog.published_for(kind, depth, 224) if depth is not None else None)
    facts = []
    if reference is not None and reference.params_millions is not None:
        facts.append(f"{reference.params_millions} M parameters (BatchNorm scale/offset not counted)")
    if entry is not None and entry.macs_millions is not None:
        facts.append(f"{entry.macs_millions} M multiply-adds at {size}x{size}")
    if facts:
        lines.append(
            "Model size, as published for this architecture (tensorflow/models research/slim/nets/mobilenet/"
            "README.md): " + ", ".join(facts) + "."
        )
    return "## Published accuracy\n\n" + "\n\n".join(lines) + "\n"


def _parity(parity: ParityRecord | None) -> str:
    if parity is None:
        return (
            "## Parity with the source\n\nNo parity report in this folder yet: the verifier "
            f"(`convert-mobilenet --verify`, `verify-mobilenet`) writes `{layout.PARITY_JSON}`.\n"
        )
    reference = parity.detail.get("reference") or {}
    ran = reference.get("description") or f"the reference `{reference.get('kind', '?')}`"
    if reference.get("file"):
        ran += f" (`{reference['file']}`)"
    lines = [
        "## Parity with the source\n",
        f"This model and {ran} were run on the same inputs and compared endpoint by endpoint.\n",
        "| verdict | worst abs diff | tolerance | first divergence |",
        "| --- | --- | --- | --- |",
        table_row(
            [f"**{'PASS' if parity.passed else 'FAIL'}**", _number(parity.max_abs_diff), parity.tolerance or "?",
             _divergence(parity.first_divergence)]
        ),
    ]  # fmt: skip
    logits = parity.endpoint("logits")
    if logits:
        passed = {True: "yes", False: "no"}.get(logits.get("passed"), "")
        lines += [
            "",
            "| endpoint | max abs diff | tolerance | passed |",
            "| --- | --- | --- | --- |",
            table_row(["logits", _number(logits.get("max_abs_diff")), _number(logits.get("tolerance")), passed]),
        ]
    if parity.detail.get("weak_signal"):
        lines += ["", f"**A weak check**: {parity.detail['weak_signal']}."]
    lines += ["", f"Every endpoint is listed in [{layout.PARITY_MD}]({layout.PARITY_MD})."]
    return "\n".join(lines) + "\n"


def _evaluation(evaluation: dict[str, Any] | None) -> str:
    """What `eval-mobilenet` measured (eval.json), labelled as measured: never a published figure."""
    if not evaluation:
        return ""
    data, preprocessing = evaluation.get("data") or {}, evaluation.get("preprocessing") or {}
    segmentation = evaluation.get("kind") == "deeplab"
    figures = (
        ("miou", "pixel_accuracy", "mIoU", "pixel accuracy") if segmentation else ("top1", "top5", "top-1", "top-5")
    )
    lines = [
        "## Evaluation (measured)\n",
        f"Measured by `eval-mobilenet` on the user's data set below, not a published figure"
        f"{'' if segmentation else ' (the published one, if any, is under Published accuracy)'}: "
        f"{evaluation.get('scored', '?')} images of `{data.get('root', '?')}` ({data.get('layout', '?')}"
        f"{', split ' + str(data['split']) if data.get('split') else ''}; file list sha256 "
        f"`{str(data.get('files_sha256', '?'))[:16]}`), {len(evaluation.get('skipped') or [])} skipped; "
        f"preprocessing: {preprocessing.get('description', '?')}.\n",
        f"| model | {figures[2]} | {figures[3]} | agreement with the reference | what ran |",
        "| --- | --- | --- | --- | --- |",
    ]
    for score in evaluation.get("models") or []:
        lines.append(
            table_row(
                [
                    score.get("model", "?"),
                    _percent(score.get(figures[0])),
                    _percent(score.get(figures[1])),
                    _percent(score.get("agreement")),
                    score.get("runs", ""),
                ]
            )  # fmt: skip
        )
    lines += ["", f"Per-class figures and the skipped images are in `{layout.EVALUATION}`."]
    return "\n".join(lines) + "\n"


def _percent(value) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, (int, float)) else "-"


def _divergence(value: dict[str, Any] | None) -> str:
    if not value:
        return "none"
    detail = f" (max abs diff {_number(value['max_abs_diff'])})" if value.get("max_abs_diff") is not None else ""
    return f"`{value.get('endpoint', '?')}`{detail}"


def _number(value) -> str:
    if isinstance(value, (int, float)):
        return f"{value:.3g}"
    return "?" if value is None else str(value)


def _usage(name: str, segmentation: bool, size: int) -> str:
    folder = name
    if segmentation:
        torch_snippet = f"""```python
import torch
from mobilenet_torch import MobileNetV2ForSemanticSegmentation

model = MobileNetV2ForSemanticSegmentation.from_pretrained("{folder}")
pixel_values = torch.rand(1, 3, {size}, {size}) * 2 - 1   # RGB, NCHW, scaled to [-1, 1]
labels = model.predict_labels(pixel_values)   # [1, {size}, {size}], PASCAL VOC class ids
```"""
        hf_snippet = f"""```python
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

processor = AutoImageProcessor.from_pretrained("{folder}")
model = AutoModelForSemanticSegmentation.from_pretrained("{folder}")
image = Image.open("image.jpg").convert("RGB")
outputs = model(**processor(images=image, return_tensors="pt"))
labels = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]
```"""
        cli = f"predict-mobilenet image.jpg --model {folder}   # writes image_labels.png and image_overlay.png"
    else:
        torch_snippet = f"""```python
import torch
from mobilenet_torch import MobileNetV2ForImageClassification

model = MobileNetV2ForImageClassification.from_pretrained("{folder}")
pixel_values = torch.rand(1, 3, {size}, {size}) * 2 - 1   # RGB, NCHW, scaled to [-1, 1]
probabilities = model(pixel_values).logits.softmax(-1)
print(model.config.id2label[int(probabilities.argmax())])
```"""
        hf_snippet = f"""```python
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

processor = AutoImageProcessor.from_pretrained("{folder}")
model = AutoModelForImageClassification.from_pretrained("{folder}")
inputs = processor(images=Image.open("image.jpg").convert("RGB"), return_tensors="pt")
logits = model(**inputs).logits
print(model.config.id2label[logits.argmax(-1).item()])
```"""
        cli = f"predict-mobilenet image.jpg --model {folder} --top 5"
    return (
        "## Usage\n\n"
        f"Replace `{folder}` by this folder's path.\n\n"
        "With `mobilenet_torch` (this project's model, TensorFlow-exact padding and pooling):\n\n"
        f"{torch_snippet}\n\n"
        "With transformers (which also takes the Hub repository id once the folder is uploaded):\n\n"
        f"{hf_snippet}\n\n"
        f"From the command line:\n\n```bash\n{cli}\n```\n"
    )


def _upload(name: str) -> str:
    return f"""## Uploading to the Hugging Face Hub

```bash
huggingface-cli upload <user>/{name} <folder>   # "hf upload" with recent huggingface_hub
# or, while converting: convert-mobilenet ... --push-to-hub <user>/{name}
```

```python
from huggingface_hub import upload_folder
upload_folder(repo_id="<user>/{name}", folder_path="<folder>")
```
"""


def _license(segmentation: bool) -> str:
    paper = (
        "DeepLab v3 (arXiv:1706.05587) with a MobileNetV2 backbone (arXiv:1801.04381)"
        if segmentation
        else "MobileNetV2: Inverted Residuals and Linear Bottlenecks (arXiv:1801.04381)"
    )
    return (
        "## License and reference\n\n"
        "The weights keep their source's license: the TensorFlow model zoo (tensorflow/models) and the Coral "
        "models (google-coral/test_data) publish theirs under the Apache License 2.0, which the front matter "
        f"states; change it where the source's license differs. Model: {paper}.\n"
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
