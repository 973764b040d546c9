"""MobileNetV2 in PyTorch with TensorFlow-exact semantics; state dicts and config.json as transformers'.

Names are resolved lazily (PEP 562) so that importing a torch-free part, such as
`mobilenet_torch.errors` or the config, does not pay for importing torch.
"""

from importlib import import_module

_EXPORTS = {
    "MobileNetV2Config": "configuration",
    "ModelFolderError": "errors",
    "UnsupportedConfigError": "errors",
    "ENDPOINTS": "modeling",
    "FeatureInfo": "architecture",
    "MobileNetV2Backbone": "backbone",
    "MobileNetV2ForImageClassification": "modeling",
    "MobileNetV2ForSemanticSegmentation": "modeling",
    "MobileNetV2Model": "modeling",
    "MobileNetV2PreTrainedModel": "modeling",
    "load_pretrained": "modeling",
    "QuantizedMobileNetV2": "quantized",
    "FakeQuantMobileNetV2": "fakequant",
}
__all__ = sorted(_EXPORTS)


def __dir__() -> list[str]:
    """The public names too, which `dir()` and tab completion cannot find in a lazy module's namespace."""
    return sorted({*globals(), *__all__})


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'mobilenet_torch' has no attribute {name!r}")
