"""The toolkit's vocabulary, defined once: model kinds, weights conventions, output folder names.

(Output file names are in :mod:`converter.output.layout`.)
"""

from __future__ import annotations

# Model kinds: what a source holds.
CLASSIFICATION = "classification"  # slim ImageNet classifier (or a fine-tuned one)
DEEPLAB = "deeplab"  # DeepLab v3 on MobileNetV2 (PASCAL VOC)
BACKBONE = "backbone"  # the backbone alone (Keras include_top=False, ..._no_top files)
KINDS = (CLASSIFICATION, DEEPLAB, BACKBONE)
# The model class a converted folder of each kind is loaded with (config.json's `architectures`).
ARCHITECTURE_OF_KIND = {
    CLASSIFICATION: "MobileNetV2ForImageClassification",
    DEEPLAB: "MobileNetV2ForSemanticSegmentation",
    BACKBONE: "MobileNetV2Model",
}

# Set (to anything but "" or "0") to let TensorFlow's own logs through: what `--debug` does.
FRAMEWORK_LOGS_ENV = "MOBILENET_CONVERT_FRAMEWORK_LOGS"

# What a comparison can be forced to run against (``--reference``): the best there is ("auto"), or one kind
# of TF checkpoint graph (see converter.verify.references).
AUTO, META_GRAPH, FROZEN_GRAPH, BUILDER = REFERENCE_KINDS = ("auto", "meta_graph", "frozen_graph", "builder")

# Weights conventions of checkpoints with exponential moving averages (see converter.pipeline.conventions).
EMA, RAW, EMA_ALL = "ema", "raw", "ema-all"
CONVENTIONS = (EMA, RAW, EMA_ALL)


def kind_of_architecture(architectures: list[str] | None) -> str:
    """The kind of a converted folder, from `config.json`'s `architectures`."""
    for kind, name in ARCHITECTURE_OF_KIND.items():
        if architectures and name in architectures:
            return kind
    return CLASSIFICATION


def folder_name(
    kind: str, depth: float, size: int, output_stride: int = 32, trainval: bool = False, quantized: bool = False
) -> str:
    """The default output folder of a converted model, e.g. `mobilenet_v2_1.0_224` (`..._quant` for the
    zoo's quantized forms)."""
    if kind == DEEPLAB:
        name = f"deeplabv3_mobilenet_v2_{depth}_{size}_os{output_stride}"
        name = f"{name}_trainval" if trainval else name
    else:
        name = f"mobilenet_v2_{depth}_{size}" + ("_backbone" if kind == BACKBONE else "")
    return f"{name}_quant" if quantized else name
