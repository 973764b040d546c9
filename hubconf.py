"""torch.hub entry points: `torch.hub.load("<clone>", "mobilenet_v2", "<folder or Hub id>", source="local")`.

The weights are those of a converted folder (convert-mobilenet) or a Hub id; without one, the entry
points build an untrained model from config keywords (`depth_multiplier=0.5`, `num_labels=10`, ...).
"""

dependencies = ["torch", "safetensors"]


def mobilenet_v2(name_or_path=None, **options):
    """The model the folder's config.json names (classification or DeepLab segmentation), or an untrained
    classifier. `options` as `from_pretrained` takes them (`dtype`, `device`, config overrides)."""
    from mobilenet_torch import MobileNetV2Config, MobileNetV2ForImageClassification, load_pretrained

    if name_or_path is None:
        return MobileNetV2ForImageClassification(MobileNetV2Config(**options)).eval()
    return load_pretrained(name_or_path, **options)


def mobilenet_v2_backbone(name_or_path=None, **options):
    """The backbone alone (`MobileNetV2Model`); a folder's head is dropped."""
    from mobilenet_torch import MobileNetV2Config, MobileNetV2Model

    if name_or_path is None:
        return MobileNetV2Model(MobileNetV2Config(**options)).eval()
    return MobileNetV2Model.from_pretrained(name_or_path, **options)
