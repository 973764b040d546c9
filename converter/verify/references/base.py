"""What every reference shares: the request it is opened for, what the report says about it, the run
interface the comparison uses, and TensorFlow imported lazily (only when a reference is opened)."""

from __future__ import annotations

import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from converter.errors import VerificationError
from converter.vocabulary import AUTO, FRAMEWORK_LOGS_ENV

SAVED_MODEL, TFLITE, KERAS = "saved_model", "tflite", "keras"

FIRST_CONV = "MobilenetV2/Conv/Conv2D"
LOGITS_TENSOR = "MobilenetV2/Logits/output:0"  # a classifier's logits: [batch, classes], as slim's Squeeze
DEEPLAB_LOGITS_TENSOR = "logits/semantic/BiasAdd:0"
FEATURES_TENSOR = "MobilenetV2/Conv_1/Relu6:0"  # a backbone's last feature map, [batch, h, w, channels]
GLOBAL_POOL_TENSOR = "MobilenetV2/Logits/AvgPool:0"  # slim keeps [batch, 1, 1, channels]; Keras [batch, channels]
MAX_GRAPH_BYTES = 512 << 20  # the largest zoo graph is ~30 MB
INSTALL_HINT = "pip install -e '.[verify]' (in a clone of the project)"

#: Builds the slim graph of a converted model where a checkpoint ships none: called with (kind, depth
#: multiplier, output stride or None), it returns a TF1 ``tf.Graph`` whose ref variables are named as the
#: checkpoint's. The library holds no builder of its own.
GraphBuilder = Callable[[str, float, int | None], Any]


@dataclass(frozen=True)
class Backend:
    """One reference backend, declared by its module as ``BACKENDS`` (see :mod:`converter.verify.references`)."""

    kind: str  # the ReferenceInfo kind (and --reference's name for a checkpoint's graphs)
    carried_by: str  # the name under which a reader's References hold the original
    open: Callable[..., BaseReference]  # (tf, source References, ReferenceRequest) -> the reference
    lacking: str  # why there is none when the source does not carry it
    runs: str  # what the reports and the model card say was run


def framework_logs_shown() -> bool:
    return os.environ.get(FRAMEWORK_LOGS_ENV, "") not in ("", "0")


@contextmanager
def quiet_framework() -> Iterator[None]:
    """Silence what TensorFlow's native code prints while loading (CUDA probing, absl's "log messages
    before InitializeLog" notice, the oneDNN and XNNPACK notices): it writes to file descriptor 2 before
    any log level applies, so that descriptor points at /dev/null meanwhile. Errors still arrive as Python
    exceptions. Everything is let through where `FRAMEWORK_LOGS_ENV` is set (`--debug`)."""
    if framework_logs_shown():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def import_tensorflow():
    """TensorFlow, quietly (see `quiet_framework`); a VerificationError saying how to install it when it is
    missing."""
    shown = framework_logs_shown()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if shown else "3")
    try:
        with quiet_framework():
            import tensorflow as tf
    except ImportError as error:
        raise VerificationError(
            f"verifying needs TensorFlow to run the original graph ({error}); install it with: {INSTALL_HINT}"
        ) from None
    if not shown:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
        tf.get_logger().setLevel("ERROR")
    return tf


def read_graph_file(path: Path) -> bytes:
    size = path.stat().st_size
    if size > MAX_GRAPH_BYTES:
        raise VerificationError(f"refusing {path.name}: {size} bytes is far more than a MobileNetV2 graph")
    return path.read_bytes()


@dataclass(frozen=True)
class ReferenceRequest:
    """What the comparison asks of a reference. `kind`, `depth` and `output_stride` describe the converted
    model; `convention` is the weights convention it was converted with; `tensors` the endpoints wanted;
    `image_size` the size a Keras model is built at when the file holds only weights; `prefer` the
    reference kind asked for; `graph_builder` the fallback graph where a checkpoint ships none."""

    kind: str
    depth: float
    convention: str
    tensors: Sequence[str]
    output_stride: int | None = None
    threads: int | None = None
    prefer: str = AUTO
    image_size: int = 224
    graph_builder: GraphBuilder | None = None


@dataclass(frozen=True)
class InputScaling:
    """The affine map ``scale * x + offset`` a reference applies to its input before its first convolution
    (a Keras Rescaling layer, a TF Hub module's ``hub_input`` scope). The converted model takes images in
    [-1, 1] at that convolution, so the reference is fed ``(x - offset) / scale`` of them."""

    scale: float = 1.0
    offset: float = 0.0

    def __str__(self) -> str:
        return f"x * {self.scale:g} {'-' if self.offset < 0 else '+'} {abs(self.offset):g}"

    def feed(self, images: np.ndarray) -> np.ndarray:
        return ((images - self.offset) / self.scale).astype(np.float32)

    @property
    def input_range(self) -> list[float]:
        """What [-1, 1] at the first convolution is at the reference's input."""
        return sorted([(-1.0 - self.offset) / self.scale, (1.0 - self.offset) / self.scale])


@dataclass
class ReferenceInfo:
    """What the report says about the reference."""

    kind: str  # one of the kinds above
    file: str | None  # graph file name (no folder)
    convention: str  # raw | ema | ema-all | "as frozen"
    input_tensor: str  # the tensor the images are fed into
    notes: list[str] = field(default_factory=list)
    imported_ops: dict[str, int] = field(default_factory=dict)  # op type -> count, what may run
    left_out_ops: dict[str, int] = field(default_factory=dict)  # op type -> count, never imported
    output_stride: int | None = None  # DeepLab: read off the graph
    crop_size: int | None = None  # DeepLab export graphs: the size every input is padded to
    input_range: list[float] = field(default_factory=lambda: [-1.0, 1.0])  # what the images were fed as
    description: str = ""  # what was run, in words (the `REFERENCES` row's)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "description": self.description,
            "file": self.file,
            "convention": self.convention,
            "input_tensor": self.input_tensor,
            "input_range": list(self.input_range),
            "output_stride": self.output_stride,
            "crop_size": self.crop_size,
            "imported_ops": dict(self.imported_ops),
            "left_out_ops": dict(self.left_out_ops),
            "notes": list(self.notes),
        }


class BaseReference(ABC):
    """What every reference offers the comparison: `info`, `missing` (endpoint tensor -> why it is not
    held), the input size it fixes, and `run(images, tensor names)` on NHWC float32 images."""

    info: ReferenceInfo
    missing: dict[str, str]

    def __enter__(self) -> BaseReference:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:  # noqa: B027 (an optional hook: only a session needs closing)
        """Release what the reference holds."""

    @property
    def fixed_shape(self) -> tuple[int | None, int | None, int | None]:
        """(batch, height, width) the reference fixes for its input (None where it accepts any)."""
        return None, None, None

    def accepts(self, height: int, width: int) -> bool:
        _, h, w = self.fixed_shape
        return (h is None or h == height) and (w is None or w == width)

    def run(self, images: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Run NHWC float32 images; one image at a time where the reference fixes the batch size."""
        batch = self.fixed_shape[0]
        if batch is None or batch == len(images):
            return self._run(images, names)
        if batch != 1:
            raise VerificationError(f"the reference ({self.info.kind}) takes batches of exactly {batch} images")
        parts = [self._run(image[None], names) for image in images]
        return {name: np.concatenate([part[name] for part in parts]) for name in names}

    @abstractmethod
    def _run(self, images: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        """The named endpoint tensors for one batch the reference takes."""
