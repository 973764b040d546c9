"""`convert_checkpoint`: source -> tensors -> chosen weights -> state dict -> output folder.

Nothing here knows the source's format (the reader does) or imports torch: shapes come from
`mobilenet_torch.architecture`, safetensors are written through their numpy API.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from converter.errors import NonFiniteWeightsError, UsageError
from converter.formats import Reader, SourceFile, open_reader
from converter.output.records import ConversionRecord
from converter.output.writer import check_output, staged_output, write_model_folder
from converter.pipeline.conventions import WeightsPlan, plan_weights
from converter.pipeline.fake_quantization import fake_quantization_files
from converter.pipeline.table import apply_rules
from converter.slim import SIZE_ASSUMED, Variant, detect_variant, expected_shapes, rules_for
from converter.version import __version__
from converter.vocabulary import CLASSIFICATION, DEEPLAB
from converter.zoo_catalog import recorded_sha256
from mobilenet_torch.architecture import PLACEHOLDER_PREFIX, pads_as_same, placeholder_arrays

IMAGENET_WITH_BACKGROUND = 1001
HIDDEN_HEAD_NOTE = (
    "the head has {count} Dense layers (config classifier_layers), which transformers' single Linear cannot "
    "hold: transformers loads this folder as MobileNetV2Model (the backbone) only; mobilenet_torch loads it whole"
)
STRIDED_PADDING_NOTE = (
    "the stride-2 convs pad as the source does at every input size (config strided_padding {paddings}); "
    "transformers ignores that field and pads TF's SAME everywhere, which gives the same outputs only at input "
    "sizes where each conv padding bottom_right has an even input ({verdict} at the image size {size})"
)


@dataclass(frozen=True)
class ConversionSummary:
    """What `convert_checkpoint` did (its record is the folder's `conversion.json`)."""

    output: Path
    variant: Variant
    weights: str
    mapped: int
    ignored: int
    seconds: float
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ConversionOptions:
    """Every choice a conversion offers, defined once: the command line, the zoo batch and the Python API
    pass this one object through."""

    format: str | None = None  # force a format by its registry name instead of recognising it
    # Checked against the source (size sets `image_size`; inferred where the source says).
    depth: float | None = None
    size: int | None = None
    weights: str | None = None  # "ema", "raw" or "ema-all"; default "ema" where the source has shadows, else "raw"
    # DeepLab only, 8 or 16; default: the source's own where its graph fixes one (a .tflite), else 8 (the zoo's
    # frozen graphs).
    output_stride: int | None = None
    drop_background: bool = False  # write a 1000-class head without the background class
    # Give a 1000-class head (Keras') the background class at index 0, with zero weights and a bias of
    # -10000 so that it never wins (`table.BACKGROUND_BIAS`).
    add_background: bool = False
    backbone_only: bool = False  # convert the backbone alone (a MobileNetV2Model folder), setting the head aside
    # "global" (transformers' pooling) or "fixed7x7" (slim's fixed 7x7 window, giving a logits map for inputs
    # larger than the native size; transformers ignores this option).
    avg_pool: str = "global"
    allow_non_finite: bool = False  # accept NaN/Inf weights instead of refusing them
    # Replace an output folder this toolkit wrote (atomically); never one holding other files or the source.
    force: bool = False


def convert_checkpoint(
    src: str | os.PathLike,
    output: str | os.PathLike | None = None,
    options: ConversionOptions | None = None,
    *,
    download: dict[str, Any] | None = None,
    **choices: Any,
) -> ConversionSummary:
    """Convert a MobileNetV2 source (checkpoint, zoo archive, SavedModel, ...) into a model folder.

    Args:
        src: a checkpoint prefix, a folder, a model file or an archive of them (see `converter.formats`).
        output: folder to write; defaults to the variant's name in the current folder.
        options: how to convert (`ConversionOptions`); `choices` (its field names, e.g. `weights="raw"`)
            override single fields.
        download: where the source came from (zoo source, URL, sha256), recorded in conversion.json.

    Raises:
        converter.errors.ConverterError: for every problem with the inputs, with a message saying what to do.
    """
    started = time.perf_counter()
    options = replace(options or ConversionOptions(), **choices)
    if output is not None:
        check_output(Path(output), options.force, [Path(src)])
    with open_reader(src, options.format, backbone_only=options.backbone_only) as reader:
        names, head = _set_head_aside(reader.names(), options.backbone_only)
        variant = detect_variant(
            {name: reader.shape(name) for name in names},
            depth=options.depth,
            size=options.size,
            output_stride=options.output_stride or reader.hints.output_stride,
            source_name=reader.source_name,
            source_size=reader.hints.image_size,
            hidden_activations=reader.hints.hidden_activations,
            strided_padding=reader.hints.strided_padding,
        )
        if variant.kind != CLASSIFICATION and (
            options.drop_background or options.add_background or options.avg_pool != "global"
        ):
            raise UsageError("--drop-background, --add-background and --avg-pool apply to classifiers only")
        background = _background_edit(variant, options.drop_background, options.add_background)
        plan = plan_weights(names, options.weights)
        if head:
            plan.ignored["head_set_aside"] = head
        variables = {variable: reader.read(tensor) for variable, tensor in plan.sources.items()}
        if not options.allow_non_finite:
            _check_finite(variables)
        config = variant.config(background, options.avg_pool, reader.hints.labels)
        state = apply_rules(
            variables, variant.kind, expected_shapes(variant, background), background, len(variant.hidden_layers)
        )
        if variant.kind == DEEPLAB:
            state.update(placeholder_arrays(config))
        output = Path(output) if output is not None else Path(variant.name)
        record = _record(reader, variant, plan, background, download)
        record.notes.extend(_output_stride_notes(variant, reader.hints.output_stride))
        fake_quantization, notes = fake_quantization_files(plan.ignored["quantization"], reader.read, variant.kind)
        extra_files, extra_notes = reader.extra_files(background)
        record.notes.extend([*notes, *extra_notes])
        summary = ConversionSummary(
            output,
            variant,
            record.weights,
            record.tensors["mapped"],
            _count(plan.ignored),
            0.0,
            tuple(record.notes),
        )
        with staged_output(output, options.force, [Path(src), *reader.source_files()]) as staging:
            write_model_folder(
                staging,
                state,
                config,
                variant.architecture,
                record,
                {**extra_files, **fake_quantization},
                reader.hints.preprocessing,
            )
    return replace(summary, seconds=time.perf_counter() - started)


def _set_head_aside(names: list[str], backbone_only: bool) -> tuple[list[str], list[str]]:
    """(the tensors to convert, the classifier's tensors, with their shadows and slots, set aside by
    --backbone-only)."""
    if not backbone_only:
        return names, []
    classifier = tuple(rule.tf_name for rule in rules_for(CLASSIFICATION) if rule.is_classifier)
    head = [name for name in names if name.startswith(classifier)]
    return [name for name in names if not name.startswith(classifier)], head


def _background_edit(variant: Variant, drop: bool, add: bool) -> str | None:
    """ "drop", "add" or None, checked against the head's number of classes."""
    if drop and add:
        raise UsageError("--drop-background and --add-background contradict each other; pass one")
    expected = IMAGENET_WITH_BACKGROUND if drop else IMAGENET_WITH_BACKGROUND - 1
    if (drop or add) and variant.num_labels != expected:
        flag = "--drop-background" if drop else "--add-background"
        raise UsageError(
            f"{flag} applies to a {expected}-class ImageNet head; this one has {variant.num_labels} classes"
        )
    return "drop" if drop else "add" if add else None


def _output_stride_notes(variant: Variant, source_stride: int | None) -> list[str]:
    """Where the source's graph fixes the output stride: that it was kept, or that the model was re-dilated."""
    if source_stride is None:
        return []
    if variant.output_stride == source_stride:
        return [f"output stride {source_stride}, as the source's graph fixes it by its dilations"]
    return [
        f"output stride {variant.output_stride} as asked: the model was re-dilated from the source's output stride "
        f"{source_stride} (fixed by its graph's dilations), so its outputs differ from the source graph's"
    ]


def _not_the_zoo_file(files: list[SourceFile]) -> list[str]:
    """A file named as a zoo download but without its recorded sha256 is not that model, whatever its name
    says (the name alone would pass it off as the zoo's)."""
    recorded = recorded_sha256()
    return [
        f"{file.name} is named like the zoo's file but is not it: its sha256 is {file.sha256[:16]}..., the zoo "
        f"records {recorded[file.name][:16]}..."
        for file in files
        if file.name in recorded and file.sha256 != recorded[file.name]
    ]


def _count(ignored: dict[str, list[str]]) -> int:
    return sum(len(names) for names in ignored.values())


def _check_finite(variables: dict[str, np.ndarray]) -> None:
    bad = sorted(name for name, array in variables.items() if not np.isfinite(array).all())
    if bad:
        raise NonFiniteWeightsError(
            f"{len(bad)} weight tensors hold NaN or Inf: {', '.join(bad[:4])}; "
            "the checkpoint is damaged (pass --allow-non-finite to convert it anyway)"
        )


def _record(
    reader: Reader, variant: Variant, plan: WeightsPlan, background: str | None, download: dict[str, Any] | None
) -> ConversionRecord:
    hints = reader.hints
    provenance = reader.provenance()
    notes = [*reader.notes, *_not_the_zoo_file(provenance)]
    if variant.hidden_layers:
        notes.append(HIDDEN_HEAD_NOTE.format(count=len(variant.hidden_layers) + 1))
    if variant.strided_padding:
        verdict = "true" if pads_as_same(variant.config(), variant.size, variant.size) else "not"
        paddings = ", ".join(variant.strided_padding)
        notes.append(STRIDED_PADDING_NOTE.format(paddings=f"[{paddings}]", verdict=verdict, size=variant.size))
    if variant.size_from == SIZE_ASSUMED:
        notes.append(
            f"image_size {variant.size} is assumed: neither the source nor its file name says the size the "
            "model was trained at; pass --size to set it"
        )
    record = ConversionRecord(
        toolkit=f"mobilenet-convert {__version__}",
        source={
            "name": reader.source_name,
            "format": reader.format,
            "files": [asdict(file) for file in provenance],
        },
        variant={**asdict(variant), "name": variant.name},
        weights=hints.convention or plan.convention,
        drop_background=background == "drop",
        add_background=background == "add",
        tensors={
            "mapped": len(rules_for(variant.kind, len(variant.hidden_layers))),
            "ignored": {k: len(v) for k, v in plan.ignored.items()},
        },
        notes=notes,
        download=dict(download) if download else None,
    )
    if hints.preprocessing:
        record.notes.append(f"the source scales its inputs itself; preprocessor_config.json has {hints.preprocessing}")
    if variant.kind == DEEPLAB:
        record.placeholders = {
            "tensors": f"{PLACEHOLDER_PREFIX}*",
            "why": "transformers' MobileNetV2ForSemanticSegmentation builds a final 1x1 conv that the original "
            "DeepLab graph does not have and whose output it never uses; it is written with zero weights and "
            "identity BatchNorm statistics so the folder loads there. mobilenet_torch does not load it.",
        }
    return record
