"""`convert_checkpoint`: source -> tensors -> chosen weights -> state dict -> output folder."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from converter import __version__
from converter.errors import NonFiniteWeightsError, UsageError
from converter.formats.files import CheckpointSource, file_sha256, open_source
from converter.formats.tf_bundle import TensorBundle
from converter.output.writer import check_output, staged_output, write_model_folder
from converter.pipeline.conventions import plan_weights
from converter.pipeline.table import CLASSIFICATION, apply_rules, rules_for
from converter.pipeline.variants import Variant, detect_variant, expected_shapes

ARCHITECTURES = {
    CLASSIFICATION: "MobileNetV2ForImageClassification",
    "deeplab": "MobileNetV2ForSemanticSegmentation",
}


@dataclass(frozen=True)
class ConversionSummary:
    """What `convert_checkpoint` did, also written to `conversion.json`."""

    output: Path
    variant: Variant
    weights: str
    mapped: int
    ignored: int
    seconds: float


def convert_checkpoint(
    src: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    depth: float | None = None,
    size: int | None = None,
    weights: str | None = None,
    output_stride: int | None = None,
    drop_background: bool = False,
    avg_pool: str = "global",
    allow_non_finite: bool = False,
    force: bool = False,
    download: dict[str, Any] | None = None,
) -> ConversionSummary:
    """Convert a TF MobileNetV2 checkpoint (prefix, folder or zoo archive) into a model folder.

    Args:
        src: checkpoint prefix, a folder holding one checkpoint, or the zoo `.tgz`.
        output: folder to write; defaults to the variant's name in the current folder.
        depth, size: checked against the checkpoint (size sets `image_size`; default from the zoo name).
        weights: "ema", "raw" or "ema-all"; default "ema" when the checkpoint has shadows, else "raw".
        output_stride: DeepLab only, 8 or 16 (default 8, as the zoo's frozen graphs).
        drop_background: write a 1000-class head without the background class.
        avg_pool: "global" (transformers' pooling) or "fixed7x7" (slim's fixed 7x7 window, giving a logits
            map for inputs larger than the native size; transformers ignores this option).
        allow_non_finite: accept NaN/Inf weights instead of refusing them.
        force: replace an output folder this toolkit wrote (atomically); never one holding other files
            or the source.
        download: where the tarball came from (zoo URL, ...), recorded as `download` in conversion.json.

    Raises:
        converter.errors.ConverterError: for every problem with the inputs, with a message saying what to do.
    """
    started = time.perf_counter()
    if output is not None:
        check_output(Path(output), force, [Path(src)])
    with open_source(src) as source, TensorBundle(source.prefix) as bundle:
        names = bundle.names()
        shapes = {name: bundle.info(name).shape for name in names}
        variant = detect_variant(
            shapes, depth=depth, size=size, output_stride=output_stride, source_name=_source_name(source)
        )
        if variant.kind != CLASSIFICATION and (drop_background or avg_pool != "global"):
            raise UsageError("--drop-background and --avg-pool apply to ImageNet classifiers, not DeepLab models")
        plan = plan_weights(names, weights)
        variables = {variable: bundle.read(tensor) for variable, tensor in plan.sources.items()}
        if not allow_non_finite:
            _check_finite(variables)
        config = variant.config(drop_background, avg_pool)
        state = apply_rules(variables, variant.kind, expected_shapes(variant, drop_background), drop_background)
        state.update(_placeholders(variant, config))
        output = Path(output) if output is not None else Path(variant.name)
        ignored = sum(len(names) for names in plan.ignored.values())
        summary = ConversionSummary(output, variant, plan.convention, len(rules_for(variant.kind)), ignored, 0.0)
        conversion = _provenance(source, summary, plan.ignored, drop_background)
        if download:
            conversion["download"] = dict(download)
        with staged_output(output, force, [Path(src), *source.files]) as staging:
            write_model_folder(staging, state, config, ARCHITECTURES[variant.kind], conversion)
    return replace(summary, seconds=time.perf_counter() - started)


def _source_name(source: CheckpointSource) -> str:
    return (source.archive or source.prefix).name


def _check_finite(variables: dict[str, np.ndarray]) -> None:
    bad = sorted(name for name, array in variables.items() if not np.isfinite(array).all())
    if bad:
        raise NonFiniteWeightsError(
            f"{len(bad)} weight tensors hold NaN or Inf: {', '.join(bad[:4])}; "
            "the checkpoint is damaged (pass --allow-non-finite to convert it anyway)"
        )


def _placeholders(variant: Variant, config) -> dict[str, np.ndarray]:
    """transformers' segmentation model has a final 1x1 conv the original lacks: write it inert."""
    if variant.kind == CLASSIFICATION:
        return {}
    from mobilenet_torch.modeling import final_conv_placeholders

    return {name: tensor.numpy() for name, tensor in final_conv_placeholders(config).items()}


def _provenance(
    source: CheckpointSource, summary: ConversionSummary, ignored: dict[str, list[str]], drop_background: bool
) -> dict[str, Any]:
    files = [source.archive] if source.archive else list(source.files)
    variant = summary.variant
    record: dict[str, Any] = {
        "toolkit": f"mobilenet-convert {__version__}",
        "source": {
            "name": _source_name(source),
            "files": [{"name": p.name, "sha256": file_sha256(p), "bytes": p.stat().st_size} for p in files],
        },
        "variant": {**asdict(variant), "name": variant.name},
        "weights": summary.weights,
        "drop_background": drop_background,
        "tensors": {
            "mapped": summary.mapped,
            "ignored": {reason: len(names) for reason, names in ignored.items()},
        },
    }
    if variant.kind != CLASSIFICATION:
        record["placeholders"] = {
            "tensors": "mobilenet_v2.conv_1x1.*",
            "why": "transformers' MobileNetV2ForSemanticSegmentation builds a final 1x1 conv that the original "
            "DeepLab graph does not have and whose output it never uses; it is written with zero weights and "
            "identity BatchNorm statistics so the folder loads there. mobilenet_torch does not load it.",
        }
    return record
