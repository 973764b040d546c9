"""Convert Google's original TF MobileNetV2 checkpoints to PyTorch (no TensorFlow needed).

`from converter import convert_checkpoint` is resolved lazily so that `convert-mobilenet --help`
does not pay for importing torch.
"""

from converter.version import __version__

__all__ = ["__version__", "convert_checkpoint"]


def __getattr__(name: str):
    if name == "convert_checkpoint":
        from converter.pipeline.convert import convert_checkpoint

        return convert_checkpoint
    raise AttributeError(f"module 'converter' has no attribute {name!r}")
