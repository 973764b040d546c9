"""The reference: the ORIGINAL TensorFlow graph, run on the checkpoint the model was converted from.

Which graph, in order of preference (``prefer`` picks one):

- ``meta_graph``: the checkpoint's ``.meta`` (the slim zoo ships one), its variables restored through a
  ``Saver`` whose ``var_list`` maps checkpoint keys to graph variables under the weights convention the
  model was converted with;
- ``frozen_graph``: a frozen GraphDef next to the checkpoint (DeepLab's ``frozen_inference_graph.pb``, a
  classifier's ``<name>_frozen.pb``) with its weights baked in, so its convention is "as frozen";
- ``builder``: only where neither exists, the project's own graph builder (``fixtures.tf_builder``)
  restored from the checkpoint.

Only the part of a graph that the endpoints depend on is imported, after every op of it has been
checked (:mod:`.safety`); the report counts what was left out. The float image is fed into the tensor
that feeds the first convolution (``MobilenetV2/Conv/Conv2D``): ``input:0``'s identity in a slim graph,
the preprocessed, padded image in DeepLab's export graph (whose own input is uint8). Endpoints that a
graph does not hold (a BatchNorm-folded graph has lost the Identity nodes some endpoints are) are listed
in ``Reference.missing`` with the reason, not refused.

TensorFlow is imported here, lazily: only when a reference is opened.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from converter.errors import VerificationError
from converter.pipeline.conventions import (
    BOOKKEEPING_NAMES,
    EMA_SUFFIX,
    NON_TRAINABLE_SUFFIXES,
    OPTIMIZER_SLOT_SUFFIXES,
)
from converter.verify import REFERENCE_KINDS
from converter.verify.safety import check_graph_def, needed_subgraph

AUTO, META_GRAPH, FROZEN_GRAPH, BUILDER = REFERENCE_KINDS
AS_FROZEN = "as frozen"
FIRST_CONV = "MobilenetV2/Conv/Conv2D"
LAST_BACKBONE_TENSOR = "MobilenetV2/expanded_conv_16/output:0"
IMAGE_POOLING_CONV = "image_pooling/Conv2D"
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
    imported_ops: dict[str, int] = field(default_factory=dict)  # op type -> count, what may run
    left_out_ops: dict[str, int] = field(default_factory=dict)  # op type -> count, never imported
    output_stride: int | None = None  # DeepLab: read off the graph
    crop_size: int | None = None  # DeepLab export graphs: the size every input is padded to

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "file": self.file,
            "convention": self.convention,
            "input_tensor": self.input_tensor,
            "output_stride": self.output_stride,
            "crop_size": self.crop_size,
            "imported_ops": dict(self.imported_ops),
            "left_out_ops": dict(self.left_out_ops),
            "notes": list(self.notes),
        }


class Reference:
    """A TF graph + session, ready to run NHWC float images and fetch tensors by name."""

    def __init__(self, tf, graph, session, input_tensor, info: ReferenceInfo, missing: dict[str, str]) -> None:
        self._tf, self.graph, self.session, self._input, self.info = tf, graph, session, input_tensor, info
        self.missing = missing  # endpoint tensor -> why the graph does not hold it

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
    source,
    *,
    kind: str,
    depth: float,
    convention: str,
    tensors: Sequence[str],
    output_stride: int | None = None,
    threads: int | None = None,
    prefer: str = AUTO,
) -> Reference:
    """The reference for `source` (anything with ``meta_graph``, ``frozen_graph`` and the checkpoint
    prefix; see the module docstring), holding the endpoint `tensors` it can. `kind`, `depth` and
    `output_stride` describe the converted model (the builder uses them); `convention` is the weights
    convention it was converted with. `prefer` forces one kind of reference."""
    tf = import_tensorflow()
    meta, frozen = source.meta_graph, source.frozen_graph
    if prefer == META_GRAPH and meta is None or prefer == FROZEN_GRAPH and frozen is None:
        what = ".meta graph" if prefer == META_GRAPH else "frozen graph"
        raise VerificationError(f"no reference: the checkpoint comes without a {what}")
    if meta is not None and prefer in (AUTO, META_GRAPH):
        reference = _from_meta_graph(tf, source, convention, tensors, threads)
    elif frozen is not None and prefer in (AUTO, FROZEN_GRAPH):
        reference = _from_frozen_graph(tf, frozen, convention, tensors, threads)
    else:
        note = (
            "the builder was asked for (--reference builder)" if prefer == BUILDER
            else "the checkpoint comes with neither a .meta graph nor a frozen graph"
        )  # fmt: skip
        reference = _from_builder(tf, source, kind, depth, convention, tensors, output_stride, threads, note)
    if kind == "deeplab":
        _read_deeplab_geometry(reference)
    return reference


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


def _import_needed(tf, graph_def, tensors: Sequence[str], origin: str, why_missing: str):
    """Import into a new graph only what the endpoint `tensors` present in `graph_def` (and the first
    convolution) depend on. Returns (graph, imported and left-out op counts, {missing tensor: reason})."""
    names = {node.name for node in graph_def.node}
    if FIRST_CONV not in names:
        raise VerificationError(f"{origin} has no op {FIRST_CONV}: is it a MobileNetV2 slim or DeepLab graph?")
    present = [tensor for tensor in tensors if tensor.split(":")[0] in names]
    missing = {t: f"{origin} has no tensor {t} ({why_missing})" for t in tensors if t not in present}
    needed, left_out = needed_subgraph(graph_def, [FIRST_CONV] + [t.split(":")[0] for t in present], origin)
    graph = tf.Graph()
    with graph.as_default():
        try:
            tf.graph_util.import_graph_def(needed, name="")
        except (ValueError, TypeError, KeyError) as error:
            raise VerificationError(f"{origin} cannot be imported ({error})") from None
    imported: dict[str, int] = {}
    for node in needed.node:
        imported[node.op] = imported.get(node.op, 0) + 1
    return graph, dict(sorted(imported.items())), left_out, missing


def _from_meta_graph(tf, source, convention: str, tensors: Sequence[str], threads: int | None) -> Reference:
    from google.protobuf.message import DecodeError
    from tensorflow.core.framework import variable_pb2

    v1 = tf.compat.v1
    path = source.meta_graph
    meta = v1.MetaGraphDef()
    try:
        meta.ParseFromString(_read_graph_file(path))
    except DecodeError as error:
        raise VerificationError(f"{path.name} is not a readable MetaGraphDef ({error})") from None
    why = "it is not a complete MobileNetV2 graph"
    graph, imported, left_out, missing = _import_needed(tf, meta.graph_def, tensors, path.name, why)
    collection = meta.collection_def.get(v1.GraphKeys.TRAINABLE_VARIABLES)
    trainable = set()
    for serialized in collection.bytes_list.value if collection is not None else ():
        trainable.add(variable_pb2.VariableDef.FromString(serialized).variable_name.split(":")[0])
    notes = []
    if not trainable:
        notes.append("the graph has no trainable-variables collection: trainable means not a moving statistic")
    variables = {op.name: op.outputs[0] for op in graph.get_operations() if op.type == "VariableV2"}
    session = _session(tf, graph, threads)
    _restore(tf, graph, session, variables, trainable, source.checkpoint_prefix, convention)
    input_tensor = _first_conv_input(graph, path.name)
    info = ReferenceInfo(META_GRAPH, path.name, convention, input_tensor.name, notes, imported, left_out)
    return Reference(tf, graph, session, input_tensor, info, missing)


def _from_frozen_graph(tf, path: Path, convention: str, tensors: Sequence[str], threads: int | None) -> Reference:
    from google.protobuf.message import DecodeError

    v1 = tf.compat.v1
    graph_def = v1.GraphDef()
    try:
        graph_def.ParseFromString(_read_graph_file(path))
    except DecodeError as error:
        raise VerificationError(f"{path.name} is not a readable GraphDef ({error})") from None
    why = (
        "frozen graphs may be transformed: folding BatchNorms and removing Identity nodes drops the tensors "
        "those endpoints are, see tensorflow/models#10109"
    )
    graph, imported, left_out, missing = _import_needed(tf, graph_def, tensors, path.name, why)
    input_tensor = _first_conv_input(graph, path.name)
    notes = [
        f"weights are baked into {path.name}: the reference uses them as frozen (the model was converted "
        f"with {convention} weights; had the graph been frozen from others, parity would fail)"
    ]
    info = ReferenceInfo(FROZEN_GRAPH, path.name, AS_FROZEN, input_tensor.name, notes, imported, left_out)
    return Reference(tf, graph, _session(tf, graph, threads), input_tensor, info, missing)


def _from_builder(
    tf,
    source,
    kind: str,
    depth: float,
    convention: str,
    tensors: Sequence[str],
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
    check_graph_def(graph.as_graph_def(), "the builder's graph")
    trainable = {name for name, v in built.variables.items() if not name.endswith(NON_TRAINABLE_SUFFIXES)}
    with graph.as_default():
        session = _session(tf, graph, threads)
    _restore(tf, graph, session, dict(built.variables), trainable, source.checkpoint_prefix, convention)
    input_tensor = _first_conv_input(graph, "the builder's graph")
    notes = [note, "the graph was rebuilt by fixtures.tf_builder (the project's own model of the original)"]
    info = ReferenceInfo(BUILDER, None, convention, input_tensor.name, notes)
    return Reference(tf, graph, session, input_tensor, info, {})


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
    tensor = graph.get_operation_by_name(FIRST_CONV).inputs[0]
    if tensor.dtype.name != "float32" or (tensor.shape.rank not in (None, 4)):
        raise VerificationError(f"{origin}: the first convolution's input {tensor.name} is not a float NHWC image")
    return tensor


def _read_deeplab_geometry(reference: Reference) -> None:
    """The output stride a DeepLab graph runs at (from the size of its last backbone feature map) and,
    where image pooling is an AvgPool with a fixed window (a graph built with a crop size, as
    export_model.py's), the crop that window belongs to: inputs must be padded to it."""
    if LAST_BACKBONE_TENSOR in reference.missing:
        return
    batch, height, width = reference.fixed_shape
    h, w = height or 65, width or 65
    zeros = np.zeros((batch or 1, h, w, 3), np.float32)
    feature = reference.run(zeros, [LAST_BACKBONE_TENSOR])[LAST_BACKBONE_TENSOR]
    stride = min((8, 16, 32), key=lambda s: abs(math.ceil(h / s) - feature.shape[1]))
    reference.info.output_stride = stride
    try:
        pool = reference.graph.get_operation_by_name(IMAGE_POOLING_CONV).inputs[0].op
    except KeyError:
        return
    if pool.type == "AvgPool" and pool.get_attr("padding") == b"VALID":
        window = pool.get_attr("ksize")[1]
        reference.info.crop_size = (window - 1) * stride + 1
