"""The reference: the ORIGINAL TensorFlow graph, run on the checkpoint the model was converted from.

Which graph, in order of preference:

- ``meta_graph``: the checkpoint's ``.meta`` (the slim zoo ships one), imported with
  ``tf.compat.v1.train.import_meta_graph`` and restored through a ``Saver`` whose ``var_list`` maps
  checkpoint keys to graph variables under the weights convention the model was converted with;
- ``frozen_graph``: a frozen GraphDef next to the checkpoint (DeepLab's ``frozen_inference_graph.pb``, a
  classifier's ``<name>_frozen.pb``) with its weights baked in, so its convention is "as frozen";
- ``builder``: only where neither exists (or the frozen graph has another output stride than the model),
  the project's own graph builder (``fixtures.tf_builder``) restored from the checkpoint.

Every imported graph is checked op by op first (:mod:`.safety`). The float image is fed into the tensor
that feeds the first convolution (``MobilenetV2/Conv/Conv2D``), which is ``input:0``'s identity in a slim
graph and the preprocessed, padded image in DeepLab's exported graph (whose own input is uint8).

TensorFlow is imported here, lazily: only when a reference is opened.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from converter.errors import VerificationError
from converter.formats.files import CheckpointSource
from converter.pipeline.conventions import (
    BOOKKEEPING_NAMES,
    EMA_SUFFIX,
    NON_TRAINABLE_SUFFIXES,
    OPTIMIZER_SLOT_SUFFIXES,
)
from converter.verify.safety import check_closure, check_graph_def

META_GRAPH, FROZEN_GRAPH, BUILDER = "meta_graph", "frozen_graph", "builder"
AS_FROZEN = "as frozen"
FIRST_CONV = "MobilenetV2/Conv/Conv2D"
LAST_BACKBONE_TENSOR = "MobilenetV2/expanded_conv_16/output:0"
MAX_GRAPH_BYTES = 512 << 20  # the largest zoo graph is ~30 MB
INSTALL_HINT = "pip install -e '.[verify]' (in a clone of the project)"


def import_tensorflow():
    """TensorFlow, quietly; a VerificationError saying how to install it when it is missing."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError as error:
        raise VerificationError(
            f"verifying needs TensorFlow to run the original graph ({error}); install it with: {INSTALL_HINT}"
        ) from None
    tf.get_logger().setLevel("ERROR")
    return tf


@dataclass
class ReferenceInfo:
    """What the report says about the reference."""

    kind: str  # META_GRAPH | FROZEN_GRAPH | BUILDER
    file: str | None  # graph file name (no folder)
    convention: str  # raw | ema | ema-all | "as frozen"
    input_tensor: str  # the tensor the images are fed into
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "file": self.file,
            "convention": self.convention,
            "input_tensor": self.input_tensor,
            "notes": list(self.notes),
        }


class Reference:
    """A TF graph + session, ready to run NHWC float images and fetch tensors by name."""

    def __init__(self, tf, graph, session, input_tensor, info: ReferenceInfo) -> None:
        self._tf, self.graph, self.session, self._input, self.info = tf, graph, session, input_tensor, info

    def __enter__(self) -> Reference:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.session.close()

    @property
    def fixed_shape(self) -> tuple[int | None, int | None, int | None]:
        """(batch, height, width) the graph fixes for its input (None where it accepts any)."""
        dims = self._input.shape.as_list() if self._input.shape.rank is not None else [None] * 4
        return dims[0], dims[1], dims[2]

    def accepts(self, height: int, width: int) -> bool:
        _, h, w = self.fixed_shape
        return (h is None or h == height) and (w is None or w == width)

    def check_tensors(self, names: Iterable[str]) -> None:
        """Every tensor must exist, and computing them must not run anything but the forward pass."""
        missing = []
        for name in names:
            try:
                self.graph.get_tensor_by_name(name)
            except (KeyError, ValueError):
                missing.append(name)
        if missing:
            raise VerificationError(
                f"the reference graph ({self.info.kind}) lacks {len(missing)} endpoint tensor(s): "
                f"{', '.join(missing[:4])}; is it a MobileNetV2 slim or DeepLab graph?"
            )
        nodes = {node.name: node for node in self.graph.as_graph_def().node}
        check_closure(nodes, names, [self._input.name], self.info.file or self.info.kind)

    def run(self, images: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Run NHWC float32 images; one image at a time where the graph fixes the batch size."""
        fetches = {name: self.graph.get_tensor_by_name(name) for name in names}
        batch = self.fixed_shape[0]
        if batch is None or batch == len(images):
            return self._run(fetches, images)
        if batch != 1:
            raise VerificationError(f"the reference graph takes batches of exactly {batch} images")
        parts = [self._run(fetches, image[None]) for image in images]
        return {name: np.concatenate([part[name] for part in parts]) for name in names}

    def _run(self, fetches, images: np.ndarray) -> dict[str, np.ndarray]:
        try:
            return self.session.run(fetches, feed_dict={self._input: images})
        except self._tf.errors.OpError as error:
            shape = "x".join(map(str, images.shape))
            raise VerificationError(
                f"the reference graph ({self.info.kind}) failed on a {shape} input: {error.message}"
            ) from None


def open_reference(
    source: CheckpointSource,
    *,
    kind: str,
    depth: float,
    convention: str,
    output_stride: int | None = None,
    threads: int | None = None,
) -> Reference:
    """The best available reference for `source` (see the module docstring). `kind`, `depth` and
    `output_stride` describe the converted model; `convention` is the weights convention it used."""
    tf = import_tensorflow()
    if source.meta_graph is not None:
        return _from_meta_graph(tf, source, convention, threads)
    if source.frozen_graph is not None:
        reference = _from_frozen_graph(tf, source.frozen_graph, convention, threads)
        stride = _probe_output_stride(reference) if kind == "deeplab" else 32
        if kind != "deeplab" or output_stride in (None, stride):
            return reference
        reference.close()
        note = (
            f"the frozen graph {source.frozen_graph.name} has output stride {stride} and the model "
            f"{output_stride}: the project's builder was used at output stride {output_stride} instead"
        )
        return _from_builder(tf, source, kind, depth, convention, output_stride, threads, note)
    note = "the checkpoint comes with neither a .meta graph nor a frozen graph"
    return _from_builder(tf, source, kind, depth, convention, output_stride, threads, note)


# --------------------------------------------------------------------------------------------- graphs
def _read_graph_file(path: Path) -> bytes:
    size = path.stat().st_size
    if size > MAX_GRAPH_BYTES:
        raise VerificationError(f"refusing {path.name}: {size} bytes is far more than a MobileNetV2 graph")
    return path.read_bytes()


def _session(tf, graph, threads: int | None):
    v1 = tf.compat.v1
    threads = threads or 0
    config = v1.ConfigProto(
        device_count={"GPU": 0}, intra_op_parallelism_threads=threads, inter_op_parallelism_threads=threads
    )
    return v1.Session(graph=graph, config=config)


def _from_meta_graph(tf, source: CheckpointSource, convention: str, threads: int | None) -> Reference:
    from google.protobuf.message import DecodeError

    v1 = tf.compat.v1
    path = source.meta_graph
    meta = v1.MetaGraphDef()
    try:
        meta.ParseFromString(_read_graph_file(path))
    except DecodeError as error:
        raise VerificationError(f"{path.name} is not a readable MetaGraphDef ({error})") from None
    check_graph_def(meta.graph_def, path.name)
    graph = tf.Graph()
    with graph.as_default():
        try:
            v1.train.import_meta_graph(meta, clear_devices=True)
        except (ValueError, TypeError, KeyError) as error:
            raise VerificationError(f"{path.name} cannot be imported ({error})") from None
        variables = _graph_variables(tf, graph)
        trainable = {v.op.name for v in graph.get_collection(v1.GraphKeys.TRAINABLE_VARIABLES)}
        notes = []
        if not trainable:
            notes.append("the graph has no trainable-variables collection: trainable means not a moving statistic")
        session = _session(tf, graph, threads)
        _restore(tf, graph, session, variables, trainable, source.prefix, convention)
        input_tensor = _first_conv_input(graph, path.name)
    info = ReferenceInfo(META_GRAPH, path.name, convention, input_tensor.name, notes)
    return Reference(tf, graph, session, input_tensor, info)


def _from_frozen_graph(tf, path: Path, convention: str, threads: int | None) -> Reference:
    from google.protobuf.message import DecodeError

    v1 = tf.compat.v1
    graph_def = v1.GraphDef()
    try:
        graph_def.ParseFromString(_read_graph_file(path))
    except DecodeError as error:
        raise VerificationError(f"{path.name} is not a readable GraphDef ({error})") from None
    check_graph_def(graph_def, path.name)
    graph = tf.Graph()
    with graph.as_default():
        try:
            tf.graph_util.import_graph_def(graph_def, name="")
        except (ValueError, TypeError, KeyError) as error:
            raise VerificationError(f"{path.name} cannot be imported ({error})") from None
        input_tensor = _first_conv_input(graph, path.name)
    notes = [
        f"weights are baked into {path.name}: the reference uses them as frozen (the model was converted "
        f"with {convention} weights; had the graph been frozen from others, parity would fail)"
    ]
    info = ReferenceInfo(FROZEN_GRAPH, path.name, AS_FROZEN, input_tensor.name, notes)
    return Reference(tf, graph, _session(tf, graph, threads), input_tensor, info)


def _from_builder(
    tf,
    source: CheckpointSource,
    kind: str,
    depth: float,
    convention: str,
    output_stride: int | None,
    threads: int | None,
    note: str,
) -> Reference:
    try:
        from fixtures.spec import as_variant
        from fixtures.tf_builder import build_graph
    except ImportError as error:
        raise VerificationError(
            f"no reference graph: {note}, and the project's graph builder cannot be imported ({error})"
        ) from None

    variant = as_variant((kind, depth))
    stride = None if kind != "deeplab" else output_stride
    built = build_graph(variant, output_stride=stride)
    graph = built.graph
    trainable = {name for name, v in built.variables.items() if not name.endswith(NON_TRAINABLE_SUFFIXES)}
    with graph.as_default():
        session = _session(tf, graph, threads)
        _restore(tf, graph, session, dict(built.variables), trainable, source.prefix, convention)
        input_tensor = _first_conv_input(graph, "the builder's graph")
    notes = [note, "the graph was rebuilt by fixtures.tf_builder (the project's own model of the original)"]
    info = ReferenceInfo(BUILDER, None, convention, input_tensor.name, notes)
    return Reference(tf, graph, session, input_tensor, info)


def _graph_variables(tf, graph) -> dict[str, Any]:
    """Graph variable name -> what a Saver can restore (Variable objects, else the variable ops' outputs)."""
    v1 = tf.compat.v1
    found = {v.op.name: v for v in graph.get_collection(v1.GraphKeys.GLOBAL_VARIABLES)}
    for op in graph.get_operations():
        if op.type == "VariableV2" and op.name not in found:
            found[op.name] = op.outputs[0]
    return found


def _is_model_variable(name: str) -> bool:
    return not (name.endswith(EMA_SUFFIX) or name.endswith(OPTIMIZER_SLOT_SUFFIXES) or name in BOOKKEEPING_NAMES)


def _restore(tf, graph, session, variables: dict, trainable: set[str], prefix: Path, convention: str) -> None:
    """Restore the graph's model variables from `prefix` under `convention` with a Saver var_list."""
    from converter.formats.tf_bundle import TensorBundle

    v1 = tf.compat.v1
    with TensorBundle(prefix) as bundle:
        stored = set(bundle.names())
    var_list, lacking = {}, []
    for name, variable in sorted(variables.items()):
        if not _is_model_variable(name):
            continue
        is_trainable = name in trainable if trainable else not name.endswith(NON_TRAINABLE_SUFFIXES)
        shadow = convention == "ema-all" or (convention == "ema" and is_trainable)
        key = name + EMA_SUFFIX if shadow else name
        if key not in stored:
            lacking.append(key)
        var_list[key] = variable
    if lacking:
        raise VerificationError(
            f"the checkpoint lacks {len(lacking)} tensor(s) the reference graph needs under --weights "
            f"{convention}: {', '.join(lacking[:3])}"
        )
    if not var_list:
        raise VerificationError("the reference graph has no model variables to restore")
    with graph.as_default():
        saver = v1.train.Saver(var_list=var_list, name="parity_restore")
        try:
            saver.restore(session, str(prefix))
        except tf.errors.OpError as error:
            raise VerificationError(
                f"restoring the checkpoint into the reference graph failed: {error.message}"
            ) from None


def _first_conv_input(graph, origin: str):
    """The tensor feeding the first convolution: where the float image in [-1, 1] goes."""
    ops = [op for op in graph.get_operations() if op.type == "Conv2D" and op.name.endswith(FIRST_CONV)]
    if len(ops) != 1:
        raise VerificationError(
            f"{origin} has {len(ops)} ops named {FIRST_CONV} (expected one): is it a MobileNetV2 graph?"
        )
    tensor = ops[0].inputs[0]
    if tensor.dtype.name != "float32" or (tensor.shape.rank not in (None, 4)):
        raise VerificationError(f"{origin}: the first convolution's input {tensor.name} is not a float NHWC image")
    return tensor


def _probe_output_stride(reference: Reference) -> int:
    """The output stride a DeepLab graph runs at, read off the size of its last backbone feature map."""
    batch, height, width = reference.fixed_shape
    h, w = height or 65, width or 65
    reference.check_tensors([LAST_BACKBONE_TENSOR])
    zeros = np.zeros((batch or 1, h, w, 3), np.float32)
    feature = reference.run(zeros, [LAST_BACKBONE_TENSOR])[LAST_BACKBONE_TENSOR]
    return min((8, 16, 32), key=lambda stride: abs(math.ceil(h / stride) - feature.shape[1]))
