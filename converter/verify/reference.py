"""The reference: the ORIGINAL the model was converted from, run by its own runtime.

A source that is not a TF checkpoint is its own reference (``prefer`` "auto"):

- a SavedModel or TF1 Hub module: its serving signature, loaded by TensorFlow's SavedModel loader after
  :func:`check_saved_model`; the endpoints are the signature's outputs; its images are fed through the
  input scaling read off its graph (:func:`signature_input_scaling`: TF Hub's take [0, 1]);
- a ``.tflite``: TFLite's interpreter with its reference kernels and no delegates, every intermediate tensor
  kept, endpoints read off the ops that the TFLite reader's walk names (:class:`TFLiteReference`);
- a Keras file: Keras' own model, loaded from the file or built by ``keras.applications.MobileNetV2`` with
  the inferred alpha, after :func:`check_keras_config`; endpoints by Keras layer name.

A TF checkpoint's reference is its graph, in order of preference (``prefer`` picks one):

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

TensorFlow (and Keras) are imported here, lazily: only when a reference is opened.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
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
from converter.verify.safety import (
    COMPUTE_OPS,
    FILE_OPS,
    MUTATING_OPS,
    PYTHON_OPS,
    check_graph_def,
    check_op,
    dependencies,
    needed_subgraph,
    node_of,
)

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

    kind: str  # META_GRAPH | FROZEN_GRAPH | BUILDER
    file: str | None  # graph file name (no folder)
    convention: str  # raw | ema | ema-all | "as frozen"
    input_tensor: str  # the tensor the images are fed into
    notes: list[str] = field(default_factory=list)
    imported_ops: dict[str, int] = field(default_factory=dict)  # op type -> count, what may run
    left_out_ops: dict[str, int] = field(default_factory=dict)  # op type -> count, never imported
    output_stride: int | None = None  # DeepLab: read off the graph
    crop_size: int | None = None  # DeepLab export graphs: the size every input is padded to
    input_range: list[float] = field(default_factory=lambda: [-1.0, 1.0])  # what the images were fed as

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
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


class Reference(BaseReference):
    """A TF graph + session, ready to run NHWC float images and fetch tensors by name."""

    def __init__(self, tf, graph, session, input_tensor, info: ReferenceInfo, missing: dict[str, str]) -> None:
        self._tf, self.graph, self.session, self._input, self.info = tf, graph, session, input_tensor, info
        self.missing = missing

    def close(self) -> None:
        self.session.close()

    @property
    def fixed_shape(self) -> tuple[int | None, int | None, int | None]:
        dims = self._input.shape.as_list() if self._input.shape.rank is not None else [None] * 4
        return dims[0], dims[1], dims[2]

    def _run(self, images: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        fetches = {name: self.graph.get_tensor_by_name(name) for name in names}
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
    image_size: int = 224,
) -> BaseReference:
    """The reference for `source` (anything with ``meta_graph``, ``frozen_graph`` and the checkpoint
    prefix; see the module docstring), holding the endpoint `tensors` it can. `kind`, `depth` and
    `output_stride` describe the converted model (the builder uses them); `convention` is the weights
    convention it was converted with. `prefer` forces one kind of reference; `image_size` is the input
    size a Keras model is built at when the file holds only weights."""
    tf = import_tensorflow()
    if prefer == AUTO and source.saved_model is not None:
        return _from_saved_model(tf, source.saved_model, kind, tensors)
    if prefer == AUTO and source.tflite_file is not None:
        return _from_tflite(tf, source.tflite_file, kind, tensors, threads)
    if prefer == AUTO and source.keras_file is not None:
        return _from_keras(source.keras_file, kind, depth, tensors, image_size)
    meta, frozen = source.meta_graph, source.frozen_graph
    if prefer == META_GRAPH and meta is None or prefer == FROZEN_GRAPH and frozen is None:
        what = ".meta graph" if prefer == META_GRAPH else "frozen graph"
        raise VerificationError(f"no reference: the checkpoint comes without a {what}")
    if meta is not None and prefer in (AUTO, META_GRAPH):
        reference = _from_meta_graph(tf, source, convention, tensors, threads)
    elif frozen is not None and prefer in (AUTO, FROZEN_GRAPH):
        reference = _from_frozen_graph(tf, frozen, convention, tensors, threads)
    elif source.checkpoint_prefix is None:
        raise VerificationError(
            f"no reference for --reference {prefer}: the source is not a TF checkpoint; use --reference auto"
        )
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


# ----------------------------------------------------------------------------------------- SavedModels
SAVED_MODEL = "saved_model"
SERVING_SIGNATURES = ("serving_default", "default")  # TF2 / TF1 SavedModels, then TF1 Hub modules
SAVED_MODEL_INIT_SIGNATURE = "__saved_model_init_op"
INIT_COLLECTIONS = ("saved_model_main_op", "legacy_init_op")
#: What a forward pass may run besides COMPUTE_OPS: variable handles and reads, and calls into the
#: SavedModel's own functions (whose bodies are checked as well).
VARIABLE_READ_OPS = frozenset({"VariableV2", "VarHandleOp", "ReadVariableOp"})
CALL_OPS = frozenset({"PartitionedCall", "StatefulPartitionedCall"})
#: What a SavedModel holds besides its forward pass: its saver (run by the loader only to restore
#: variables/, the save half never) and its variables' initial values (never run: they are restored).
SAVER_OPS = frozenset(
    {
        "RestoreV2", "Assign", "AssignVariableOp", "DisableCopyOnRead", "StringJoin", "ShardedFilename",
        "StaticRegexFullMatch", "SaveV2", "MergeV2Checkpoints",
        "TruncatedNormal", "RandomUniform", "RandomStandardNormal",
    }
)  # fmt: skip


#: Element-wise ops an input scaling is made of, each with a scalar constant as its other operand; and
#: the ops that pass a tensor on unchanged.
SCALING_OPS = frozenset({"Sub", "Mul", "Add", "AddV2", "RealDiv"})
PASS_THROUGH_OPS = frozenset({"Identity"})
MAX_WALK_STEPS = 10_000  # far more than any input scaling; bounds the walks on a malformed graph


class SignatureReference(BaseReference):
    """A SavedModel loaded by TensorFlow's own loader, run through its serving signature: the endpoints
    are the signature's outputs (matched by output name or tensor name). Its images are fed through the
    input scaling read off its graph (a TF Hub model takes [0, 1] and scales inside)."""

    def __init__(self, tf, call, shape, outputs: dict[str, str], info, missing, scaling: InputScaling) -> None:
        self._tf, self._call, self._shape = tf, call, shape  # call: NHWC images -> {output key: tensor}
        self._outputs, self.info, self.missing, self._scaling = outputs, info, missing, scaling

    @property
    def fixed_shape(self) -> tuple[int | None, int | None, int | None]:
        return self._shape

    def _run(self, images: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        try:
            results = self._call(self._tf.constant(self._scaling.feed(images)))
        except (self._tf.errors.OpError, ValueError, TypeError) as error:
            shape = "x".join(map(str, images.shape))
            raise VerificationError(f"the SavedModel's signature failed on a {shape} input: {error}") from None
        return {name: results[self._outputs[name]].numpy() for name in names}


def check_saved_model(meta_graph, signature, origin: str) -> tuple[dict[str, int], dict[str, int], set[str]]:
    """Refuse a SavedModel whose loading or serving could do more than compute. Checked:

    - the forward pass (the nodes the signature's outputs depend on, and the whole body of every
      function they call, transitively) and the initialization the loader runs (its main / init op):
      only `COMPUTE_OPS`, variable handles and reads, and calls into the SavedModel's own functions;
    - everything else it holds, nodes and functions: besides those, only its saver (the restore the
      loader runs, reading variables/ and assigning what it read; the save half, which nothing runs) and
      initial values of variables (never run: the variables are restored).

    So no file is read but by the restore, no Python is called, nothing is written and no variable is
    assigned but by the restore; any other op is refused as unknown. Returns the op counts of the
    forward pass and of the rest, for the report, and the names of the forward pass's graph nodes."""
    functions = {function.signature.name: function for function in meta_graph.graph_def.library.function}
    nodes = {node.name: node for node in meta_graph.graph_def.node}
    forward_ops = COMPUTE_OPS | VARIABLE_READ_OPS | CALL_OPS
    outputs = [node_of(info.name) for info in signature.outputs.values()]
    init = [node_of(name) for key in INIT_COLLECTIONS for name in _collection_nodes(meta_graph, key)]
    init_signature = meta_graph.signature_def.get(SAVED_MODEL_INIT_SIGNATURE)
    init += [node_of(info.name) for info in init_signature.outputs.values()] if init_signature else []
    forward, called = _closure(nodes, functions, outputs + init, origin)
    counts: dict[str, int] = {}
    for node in forward:
        if node.op not in forward_ops:
            check_op(node.op, node.name, origin)
        counts[node.op] = counts.get(node.op, 0) + 1
    rest: dict[str, int] = {}
    held = [node for node in meta_graph.graph_def.node if node.name not in {n.name for n in forward}]
    held += [node for name, function in functions.items() if name not in called for node in function.node_def]
    for node in held:
        if node.op not in forward_ops | SAVER_OPS:
            _refuse_held(node.op, node.name, origin)
        rest[node.op] = rest.get(node.op, 0) + 1
    return dict(sorted(counts.items())), dict(sorted(rest.items())), {node.name for node in forward}


def _collection_nodes(meta_graph, key: str) -> list[str]:
    collection = meta_graph.collection_def.get(key)
    return list(collection.node_list.value) if collection is not None else []


def _closure(nodes: dict, functions: dict, roots: Sequence[str], origin: str):
    """The nodes `roots` depend on (data and control inputs) with every node of each function they call,
    transitively; and the names of those functions."""
    seen = dependencies(nodes, roots, origin)
    body: list[Any] = []
    called: set[str] = set()
    for node in seen.values():
        pending = [node]
        while pending:
            for function in _called_functions(pending.pop(), functions, origin):
                if function.signature.name not in called:
                    called.add(function.signature.name)
                    body += list(function.node_def)
                    pending += list(function.node_def)
    return list(seen.values()) + body, called


def _called_functions(node, functions: dict, origin: str) -> list:
    names = [value.func.name for value in node.attr.values() if value.HasField("func")]
    missing = [name for name in names if name not in functions]
    if missing:
        raise VerificationError(f"refusing {origin}: node {node.name!r} calls a function {missing[0]!r} it lacks")
    return [functions[name] for name in names]


@dataclass
class _Body:
    """A graph body on the signature's call path: the main graph, or a function's body as one call node
    calls it (so that the walk can go back from the function's arguments to what the caller passed)."""

    nodes: dict[str, Any]
    function: Any = None  # the FunctionDef; None: the main graph
    caller: _Body | None = None
    call: Any = None  # the caller's node that calls `function`

    @classmethod
    def called(cls, function, caller: _Body, call) -> _Body:
        return cls({node.name: node for node in function.node_def}, function, caller, call)


def _data_inputs(node) -> list[str]:
    return [name for name in node.input if not name.startswith("^")]


def _producer(functions: dict, body: _Body, tensor: str, origin: str) -> tuple[_Body, Any]:
    """The node that computes `tensor` of `body` (a main graph's "node:k", a function body's "node:out:k"
    or argument name), across function arguments (to what the caller passed), calls (into the callee's
    return value) and pass-through ops; with the body it is in."""
    for _ in range(MAX_WALK_STEPS):
        parts = tensor.split(":")
        try:
            if body.function is not None and len(parts) == 1:
                arguments = [argument.name for argument in body.function.signature.input_arg]
                if parts[0] in arguments:
                    tensor, body = _data_inputs(body.call)[arguments.index(parts[0])], body.caller
                    continue
            node = body.nodes.get(parts[0])
            if node is None:
                raise VerificationError(f"refusing {origin}: it references a node {parts[0]!r} it does not define")
            if node.op in CALL_OPS:
                (callee,) = _called_functions(node, functions, origin)
                output = callee.signature.output_arg[int(parts[-1]) if len(parts) > 1 else 0].name
                tensor, body = callee.ret[output], _Body.called(callee, body, node)
            elif node.op in PASS_THROUGH_OPS:
                tensor = _data_inputs(node)[0]
            else:
                return body, node
        except (IndexError, KeyError, ValueError):
            raise VerificationError(f"refusing {origin}: its graph is malformed where it uses {tensor!r}") from None
    raise VerificationError(f"refusing {origin}: its graph loops back on itself")


def _scalar_constant(tf, functions: dict, body: _Body, tensor: str, origin: str) -> float | None:
    """The value of `tensor` where it is a float constant of one element, else None."""
    _, node = _producer(functions, body, tensor, origin)
    if node.op != "Const" or node.attr["dtype"].type not in (tf.float32.as_datatype_enum, tf.float64.as_datatype_enum):
        return None
    value = tf.make_ndarray(node.attr["value"].tensor)
    return float(value.reshape(-1)[0]) if value.size == 1 else None


def _first_convolutions(functions: dict, main: _Body, origin: str) -> list[tuple[_Body, Any]]:
    """Every op named as the slim stem's convolution (any scope in front) in `main` and in the functions it
    calls, transitively, each with the body it is in."""
    found, pending, visited = [], [main], 0
    while pending:
        body = pending.pop()
        visited += 1
        if visited > MAX_WALK_STEPS:
            raise VerificationError(f"refusing {origin}: its functions call each other more than a model does")
        for node in body.nodes.values():
            if node.op == "Conv2D" and (node.name == FIRST_CONV or node.name.endswith("/" + FIRST_CONV)):
                found.append((body, node))
            if node.op in CALL_OPS:
                pending += [_Body.called(callee, body, node) for callee in _called_functions(node, functions, origin)]
    return found


def signature_input_scaling(tf, meta_graph, signature, input_key: str, origin: str) -> tuple[InputScaling, str]:
    """The affine map from the signature's image input to the first convolution's input, read off the
    SavedModel's graph: from that convolution (in the main graph, or in a function body reached through
    the call ops) back to the input, across element-wise ops with a scalar constant operand (SCALING_OPS)
    and pass-through ops, composed. Returns it and the scaling ops' names; a VerificationError where the
    path is not such a scaling or the convolution is not found."""
    functions = {function.signature.name: function for function in meta_graph.graph_def.library.function}
    nodes = {node.name: node for node in meta_graph.graph_def.node}
    main = _Body(dependencies(nodes, [node_of(info.name) for info in signature.outputs.values()], origin))
    convolutions = _first_convolutions(functions, main, origin)
    advice = "verify the conversion against the slim checkpoint the SavedModel was exported from instead"
    if len(convolutions) != 1:
        raise VerificationError(
            f"{origin}: {len(convolutions) or 'no'} op(s) named {FIRST_CONV} on its signature's path, so the "
            f"range its input {input_key} takes cannot be read off its graph; {advice}"
        )
    (body, node) = convolutions[0]
    tensor, steps = (_data_inputs(node) or [""])[0], []
    image = node_of(signature.inputs[input_key].name)
    for _ in range(MAX_WALK_STEPS):
        body, node = _producer(functions, body, tensor, origin)
        if body.function is None and node.name == image:
            break
        operands = _data_inputs(node) if node.op in SCALING_OPS else []
        constants = [_scalar_constant(tf, functions, body, operand, origin) for operand in operands]
        if len(operands) == 2 and constants[1] is not None and constants[0] is None:
            steps.append((node, constants[1], True))
            tensor = operands[0]
        elif len(operands) == 2 and constants[0] is not None and constants[1] is None and node.op != "RealDiv":
            steps.append((node, constants[0], False))
            tensor = operands[1]
        else:
            raise VerificationError(
                f"{origin}: between its input {input_key} and its first convolution it computes {node.op} (node "
                f"{node.name!r}), which is not a scaling by a constant, so the range its input takes cannot be "
                f"read off its graph; {advice}"
            )
    else:
        raise VerificationError(f"{origin}: its first convolution's input is too far from its input {input_key}")
    scale, offset = 1.0, 0.0
    for node, constant, input_first in reversed(steps):  # from the input on
        if node.op == "Mul":
            scale, offset = scale * constant, offset * constant
        elif node.op == "RealDiv":
            scale, offset = scale / constant, offset / constant
        elif node.op == "Sub":
            scale, offset = (scale, offset - constant) if input_first else (-scale, constant - offset)
        else:
            offset += constant
    if not (math.isfinite(scale) and math.isfinite(offset)) or scale == 0:
        raise VerificationError(f"{origin}: its input scaling (x * {scale:g} + {offset:g}) maps every image to one")
    return InputScaling(scale, offset), ", ".join(node.name for node, _, _ in reversed(steps))


def _refuse_held(op: str, node: str, origin: str) -> None:
    what = (
        "reads or writes files" if op in FILE_OPS
        else "calls Python" if op in PYTHON_OPS
        else "assigns a variable" if op in MUTATING_OPS
        else "is not one a MobileNetV2 SavedModel holds"
    )  # fmt: skip
    raise VerificationError(
        f"refusing {origin}: it holds op {op} (node {node!r}), which {what}; TensorFlow's loader would load "
        "it, so the SavedModel is refused as a whole (see converter/verify/reference.py, check_saved_model)"
    )


def _from_saved_model(tf, folder: Path, kind: str, tensors: Sequence[str]) -> SignatureReference:
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import saved_model_pb2

    from converter.pipeline.table import endpoints_for

    origin = f"the SavedModel {folder.name}"
    saved_model = saved_model_pb2.SavedModel()
    try:
        saved_model.ParseFromString(_read_graph_file(folder / "saved_model.pb"))
    except DecodeError as error:
        raise VerificationError(f"{origin}: saved_model.pb is not readable ({error})") from None
    if not saved_model.meta_graphs:
        raise VerificationError(f"{origin} holds no meta graph")
    graphs = list(saved_model.meta_graphs)
    # A TF1 Hub module serves its untagged graph (its "train" one is for fine-tuning).
    untagged = next((graph for graph in graphs if not graph.meta_info_def.tags), graphs[0])
    meta_graph = next((graph for graph in graphs if "serve" in graph.meta_info_def.tags), untagged)
    key = next((key for key in SERVING_SIGNATURES if key in meta_graph.signature_def), None)
    if key is None:
        raise VerificationError(
            f"{origin} has no serving signature ({' or '.join(SERVING_SIGNATURES)}); it has "
            f"{', '.join(sorted(meta_graph.signature_def)) or 'none'}"
        )
    signature = meta_graph.signature_def[key]
    images = [(name, info) for name, info in signature.inputs.items() if info.dtype == tf.float32.as_datatype_enum]
    if len(signature.inputs) != 1 or not images:
        raise VerificationError(f"{origin}: signature {key} must take one float image input, not {len(images)}")
    forward_ops, rest_ops, forward_nodes = check_saved_model(meta_graph, signature, origin)
    input_key, input_info = images[0]
    scaling, scaling_ops = signature_input_scaling(tf, meta_graph, signature, input_key, origin)
    dims = [None if d.size < 0 else int(d.size) for d in input_info.tensor_shape.dim]
    shape = (dims[0], dims[1], dims[2]) if len(dims) == 4 else (None, None, None)
    by_tensor = {info.name: name for name, info in signature.outputs.items()}
    outputs, missing = {}, {}
    notes = [
        f"the reference is the SavedModel's own {key} signature, loaded by TensorFlow's loader (which restores "
        "variables/ with the SavedModel's own saver); its weights are the exported ones"
    ]
    for endpoint, tensor, _ in endpoints_for(kind):
        if tensor not in tensors:
            continue
        aliases = (endpoint, "default") if endpoint == "logits" else (endpoint,)
        found = by_tensor.get(tensor) or next((a for a in aliases if a in signature.outputs), None)
        if not found and endpoint == "logits":
            found = _sole_logits_output(signature, key, notes)
        if found:
            outputs[tensor] = found
        else:
            missing[tensor] = (
                f"the SavedModel's {key} signature exposes only {', '.join(sorted(signature.outputs))}, "
                "and TensorFlow runs it as a whole"
            )
    try:  # the exact tags: a Hub module's served graph has none, which the loader would take as "the only one"
        loaded = tf.saved_model.load(str(folder), tags=list(meta_graph.meta_info_def.tags))
        function = loaded.signatures[key]
    except (tf.errors.OpError, ValueError, KeyError, OSError) as error:
        raise VerificationError(f"{origin} cannot be loaded by TensorFlow ({error})") from None
    if scaling != InputScaling():
        low, high = scaling.input_range
        notes.append(
            f"the SavedModel scales its input {input_key} by {scaling} before its first convolution "
            f"({scaling_ops}, read off its graph): it was fed the images mapped from [-1, 1] to [{low:g}, {high:g}]"
        )
    # A TF1 SavedModel is one graph: the slim endpoints on the signature's path can be fetched from it.
    inside = [tensor for tensor in missing if node_of(tensor) in forward_nodes]
    if inside and hasattr(loaded, "prune"):
        fetches = {tensor: signature.outputs[output].name for tensor, output in outputs.items()}
        fetches.update({tensor: tensor for tensor in inside})
        pruned = loaded.prune(input_info.name, fetches)
        outputs = {tensor: tensor for tensor in fetches}
        missing = {tensor: why for tensor, why in missing.items() if tensor not in inside}
        notes.append(f"{len(inside)} endpoints on the signature's path were fetched from its graph as well")
        call = pruned
    else:
        call = lambda images: function(**{input_key: images})  # noqa: E731
    info = ReferenceInfo(
        SAVED_MODEL, folder.name, "as exported", f"{key}:{input_key}", notes, forward_ops, rest_ops,
        input_range=scaling.input_range,
    )  # fmt: skip
    return SignatureReference(tf, call, shape, outputs, info, missing, scaling)


def _sole_logits_output(signature, key: str, notes: list[str]) -> str | None:
    """The signature's only output where it is [batch, classes] (TF2 exports name a bare one output_0)."""
    if len(signature.outputs) != 1:
        return None
    ((name, info),) = signature.outputs.items()
    dims = info.tensor_shape.dim
    if info.tensor_shape.unknown_rank or len(dims) != 2:
        return None
    classes = dims[1].size if dims[1].size >= 0 else "classes"
    notes.append(f"the {key} signature's only output, {name} ([batch, {classes}]), is taken as the logits")
    return name


# ---------------------------------------------------------------------------------------------- TFLite
TFLITE = "tflite"
#: The builtin ops of the MobileNetV2 and DeepLab exports (TOCO's and today's converter). Anything else,
#: custom and TF ("Flex") ops above all, which can run any TensorFlow kernel, is refused.
TFLITE_OPS = frozenset(
    {
        "CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "MUL", "AVERAGE_POOL_2D", "MEAN", "RESHAPE",
        "SQUEEZE", "SOFTMAX", "QUANTIZE", "DEQUANTIZE", "RESIZE_BILINEAR", "CONCATENATION", "ARG_MAX", "PAD",
        "SPACE_TO_BATCH_ND", "BATCH_TO_SPACE_ND", "RELU6", "RELU", "CAST",
        "BUILTIN_77",  # SHAPE (the reshape's target shape), which the schema module leaves unnamed
    }
)  # fmt: skip
#: Slim endpoint module -> the step whose output it is, where that step is not named by the module itself.
STEP_OF_MODULE = {"mobilenet_v2 (pooling)": "mobilenet_v2.pool"}


class TFLiteReference(BaseReference):
    """A `.tflite` model run by TensorFlow Lite's interpreter with its reference kernels (the
    specification of its arithmetic) and no delegates, every intermediate tensor kept. Its ops are named
    by the TFLite reader's walk (`steps`), so endpoints are read off the tensors of those steps."""

    def __init__(self, interpreter, reader, tensors: dict[str, int], info: ReferenceInfo, missing) -> None:
        self.interpreter, self.steps, self.quantized = interpreter, reader.steps, reader.quantized
        self._tensors, self.info, self.missing = tensors, info, missing
        self._details = {detail["index"]: detail for detail in interpreter.get_tensor_details()}
        self._input = interpreter.get_input_details()[0]

    @property
    def fixed_shape(self) -> tuple[int | None, int | None, int | None]:
        batch, height, width = (int(d) for d in self._input["shape"][:3])
        return batch, height, width

    def quantization(self, tensor: int) -> tuple[float, int]:
        """(scale, zero point) of a tensor; scale 0 where it is float."""
        scale, zero_point = self._details[tensor]["quantization"]
        return float(scale), int(zero_point)

    def representable(self, tensor: int) -> tuple[float, float]:
        """The real range a quantized tensor's integer type can hold (what its kernel saturates to)."""
        scale, zero_point = self.quantization(tensor)
        info = np.iinfo(self._details[tensor]["dtype"])
        return scale * (info.min - zero_point), scale * (info.max - zero_point)

    def invoke(self, image: np.ndarray) -> None:
        """Run one NHWC float image in [-1, 1] (quantized with round half away from zero where the model
        takes integers, as TFLite's own quantize does)."""
        value = image
        if self._input["dtype"] != np.float32:
            scale, zero_point = self.quantization(self._input["index"])
            info = np.iinfo(self._input["dtype"])
            quotient = image.astype(np.float32) / np.float32(scale)
            rounded = np.sign(quotient) * np.floor(np.abs(quotient) + 0.5)
            value = np.clip(rounded + zero_point, info.min, info.max).astype(self._input["dtype"])
        self.interpreter.set_tensor(self._input["index"], value)
        self.interpreter.invoke()

    def integers(self, tensor: int) -> np.ndarray:
        return self.interpreter.get_tensor(tensor)

    def real(self, tensor: int) -> np.ndarray:
        values = self.interpreter.get_tensor(tensor)
        scale, zero_point = self.quantization(tensor)
        if not scale:
            return values.astype(np.float32)
        return ((values.astype(np.float64) - zero_point) * scale).astype(np.float32)

    def _run(self, images: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        self.invoke(images)
        out = {}
        for name in names:
            value = self.real(self._tensors[name])
            out[name] = value.reshape(len(images), -1) if name == LOGITS_TENSOR else value
        return out


LOGITS_TENSOR = "MobilenetV2/Logits/output:0"  # a classifier's logits: [batch, classes], as slim's Squeeze
DEEPLAB_LOGITS_TENSOR = "logits/semantic/BiasAdd:0"


def _from_tflite(tf, path: Path, kind: str, tensors: Sequence[str], threads: int | None) -> TFLiteReference:
    import warnings

    from converter.formats.tflite import TFLiteReader
    from converter.pipeline.table import endpoints_for

    reader = TFLiteReader(path)
    unknown = sorted({op.op for op in reader.model.operators} - TFLITE_OPS)
    if unknown:
        raise VerificationError(
            f"refusing {path.name}: it holds op(s) {', '.join(unknown)}, which the MobileNetV2 exports do not use; "
            "custom and TF (Flex) ops can run arbitrary code, so the model is not run"
        )
    if reader.hybrid:
        raise VerificationError(
            f"cannot verify against {path.name}: it is a dynamic-range model, whose hybrid kernels quantize each "
            "layer's float input to int8 on the fly, so no float model matches it to float precision; verify "
            "against the float .tflite or the checkpoint it was converted from"
        )
    resolver = tf.lite.experimental.OpResolverType.BUILTIN_REF
    with warnings.catch_warnings():  # the interpreter's notice in favour of the separate LiteRT package
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(
            model_path=str(path), num_threads=threads or 1, experimental_op_resolver_type=resolver,
            experimental_preserve_all_tensors=True,
        )  # fmt: skip
    interpreter.allocate_tensors()
    by_step = {step.name: step.output_tensor for step in reader.steps}
    found, missing = {}, {}
    for _, tensor, module in endpoints_for(kind):
        if tensor not in tensors:
            continue
        candidates = [STEP_OF_MODULE.get(module, module), f"{module}.add", f"{module}.reduce_1x1"]
        step = next((candidate for candidate in candidates if candidate in by_step), None)
        if step is None:
            missing[tensor] = f"{path.name} has no op that computes {module}"
        else:
            found[tensor] = by_step[step]
    notes = [
        f"the reference is {path.name} run by TensorFlow Lite's interpreter with its reference kernels "
        f"(BUILTIN_REF) and no delegates; it is {reader.hints.notes[0].split('(')[-1].rstrip(')')}"
    ]
    ops: dict[str, int] = {}
    for op in reader.model.operators:
        ops[op.op] = ops.get(op.op, 0) + 1
    info = ReferenceInfo(TFLITE, path.name, "as converted", "input", notes, dict(sorted(ops.items())))
    if reader.quantized:
        why = (
            "the reference is an integer model, whose rounding accumulates over the network: the float model's "
            "layers are compared one by one on the interpreter's own inputs instead (float/... rows)"
        )
        missing = {tensor: why for tensor in tensors if tensor not in (LOGITS_TENSOR, DEEPLAB_LOGITS_TENSOR)}
    return TFLiteReference(interpreter, reader, found, info, missing)


# ----------------------------------------------------------------------------------------------- Keras
KERAS = "keras"
#: The layer classes of keras.applications.MobileNetV2 and of the usual fine-tuning recipe. A model file's
#: config naming any other (Lambda and custom layers above all, which run code of the file's) is refused.
KERAS_LAYER_CLASSES = frozenset(
    {
        "Functional", "Model", "Sequential", "InputLayer", "Conv2D", "DepthwiseConv2D", "BatchNormalization",
        "ReLU", "ZeroPadding2D", "Add", "GlobalAveragePooling2D", "Dense", "Dropout", "Rescaling", "Activation",
        # augmentation of the fine-tuning recipe: the identity at inference
        "RandomFlip", "RandomRotation", "RandomZoom", "RandomTranslation", "RandomContrast", "RandomBrightness",
    }
)  # fmt: skip
#: The packages a model config may take its layers from: Keras 3's and tf.keras 2.x's (tf_keras).
KERAS_MODULES = ("keras", "tf_keras")
#: Slim endpoint -> the Keras layer (of keras.applications.MobileNetV2) whose output it is.
KERAS_ENDPOINT_LAYERS = {"layer_1": "Conv1_relu", "layer_2": "expanded_conv_project_BN", "layer_19": "out_relu"}


class KerasReference(BaseReference):
    """Keras' own model, built from the file, run on NHWC float images at its fixed input size."""

    def __init__(self, model, outputs: dict[str, int], info, missing, fixed_shape, scaling: InputScaling) -> None:
        self._model, self._outputs, self.info, self.missing = model, outputs, info, missing
        self._fixed, self._scaling = fixed_shape, scaling

    @property
    def fixed_shape(self) -> tuple[int | None, int | None, int | None]:
        return self._fixed

    def _run(self, images: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        try:
            results = self._model([self._scaling.feed(images)], training=False)
        except (ValueError, TypeError) as error:
            shape = "x".join(map(str, images.shape))
            raise VerificationError(f"Keras' model failed on a {shape} input ({error})") from None
        results = results if isinstance(results, (list, tuple)) else [results]
        out = {}
        for name in names:
            value = np.asarray(results[self._outputs[name]])
            out[name] = value.reshape(len(images), 1, 1, -1) if name == GLOBAL_POOL_TENSOR else value
        return out


GLOBAL_POOL_TENSOR = "MobilenetV2/Logits/AvgPool:0"  # slim keeps [batch, 1, 1, channels]; Keras [batch, channels]


def keras_model_config(path: Path) -> dict | None:
    """The model config a Keras file carries (a .keras archive's config.json, a full-model .h5's
    model_config attribute), None for weights-only files."""
    import json
    import zipfile

    try:
        if path.suffix == ".keras":
            with zipfile.ZipFile(path) as archive:
                return json.loads(archive.read("config.json"))
        if path.suffix == ".h5":
            import h5py

            with h5py.File(path, "r") as handle:
                text = handle.attrs.get("model_config")
                if text is None:
                    return None
                return json.loads(text.decode() if isinstance(text, bytes) else text)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as error:
        raise VerificationError(f"{path.name}: its model config is not readable ({error})") from None
    return None


def check_keras_config(config: dict, origin: str) -> None:
    """Refuse a Keras model config with a layer outside `KERAS_LAYER_CLASSES` (at any depth of nesting),
    or one that Keras would take from another module than its own or from a registered custom object."""
    stack = [config]
    while stack:
        layer = stack.pop()
        name, module = layer.get("class_name"), layer.get("module")
        custom = layer.get("registered_name") not in (None, name)
        if name not in KERAS_LAYER_CLASSES or custom or (module and not str(module).startswith(KERAS_MODULES)):
            raise VerificationError(
                f"refusing {origin}: its model holds a {name} layer ({module or 'no module'}); only the layers "
                "of keras.applications.MobileNetV2 and a Dense head may be loaded, as others can run the file's code"
            )
        stack += list((layer.get("config") or {}).get("layers") or [])


def _from_keras(path: Path, kind: str, depth: float, tensors: Sequence[str], size: int) -> KerasReference:
    import importlib
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from converter.formats import open_reader
    from converter.pipeline.table import endpoints_for

    config = keras_model_config(path)
    library = _keras_library(path, config)
    try:
        keras = importlib.import_module(library)
    except ImportError as error:
        raise VerificationError(f"verifying against {path.name} needs {library} ({error}); {INSTALL_HINT}") from None
    notes, model = [], None
    if config is not None:
        check_keras_config(config, path.name)
        try:
            model = keras.saving.load_model(path, compile=False, safe_mode=True)
            notes.append(f"the reference is Keras' own model loaded from {path.name} ({library}.saving.load_model)")
        except Exception as error:  # noqa: BLE001 (Keras raises many kinds; each means it cannot rebuild it)
            if path.suffix != ".h5":
                raise VerificationError(f"Keras cannot load {path.name} ({_first_line(error)})") from None
            notes.append(f"Keras cannot rebuild the model from {path.name}'s config ({_first_line(error)})")
    if model is None:
        with open_reader(path) as reader:
            head = "MobilenetV2/Logits/Conv2d_1c_1x1/weights"
            classes = reader.shape(head)[-1] if head in reader.names() else None
        try:
            model = keras.applications.MobileNetV2(
                input_shape=(size, size, 3), alpha=depth, include_top=classes is not None, weights=None,
                classes=classes or 1000, classifier_activation=None,
            )  # fmt: skip
            model.load_weights(path)
        except Exception as error:  # noqa: BLE001 (as above)
            raise VerificationError(
                f"keras.applications.MobileNetV2(alpha={depth:g}) cannot load {path.name} ({_first_line(error)})"
            ) from None
        notes.append(
            f"the reference is keras.applications.MobileNetV2(alpha={depth:g}) at {size}x{size}, loading "
            f"{path.name} with Keras' own load_weights"
        )
    scaling = _input_scaling(model, notes)
    _, height, width, _ = model.inputs[0].shape
    fixed = (None, height, width) if height and width else (None, size, size)
    if not (height and width):
        notes.append(
            f"the Keras model takes any input size and then pads stride-2 convolutions (0, 1) at every size, "
            f"which differs from TF's SAME at odd sizes: it is compared at {size}x{size}"
        )
    dense = _dense_layers(model)
    if dense and getattr(dense[-1], "activation", None) is not keras.activations.linear:
        dense[-1].activation = keras.activations.linear  # the logits, not the probabilities
        notes.append(f"the classifier's activation was set to linear to compare logits ({dense[-1].name})")
    # The logits are the model's output when its last layer ends in the classifier (itself, or a nested
    # head such as Teachable Machine's Sequential).
    logits = [model.layers[-1]] if dense and _ends_in(model.layers[-1], dense[-1]) else []
    layers = {layer.name: layer for layer in model.layers}
    pools = [layer for layer in model.layers if type(layer).__name__ == "GlobalAveragePooling2D"]
    wanted, missing = [], {}
    for endpoint, tensor, _ in endpoints_for(kind):
        if tensor not in tensors:
            continue
        layer = _keras_layer(endpoint, layers, pools, logits)
        if layer is None:
            missing[tensor] = (
                f"Keras' model has no top-level layer named as {endpoint}'s is in keras.applications.MobileNetV2 "
                "(a nested base runs as one layer)"
            )
        else:
            wanted.append((tensor, layer))
    outputs = {tensor: i for i, (tensor, _) in enumerate(wanted)}
    if len(wanted) > 1 or (wanted and wanted[0][1] is not model.layers[-1]):
        model = keras.Model(model.inputs, [layer.output for _, layer in wanted])
    info = ReferenceInfo(KERAS, path.name, "raw", "input", notes, input_range=scaling.input_range)
    return KerasReference(model, outputs, info, missing, fixed, scaling)


def _keras_library(path: Path, config: dict | None) -> str:
    """ "tf_keras" for a file Keras 2 (tf.keras) wrote, whose layer configs Keras 3 does not load (its
    modules, or a full-model .h5's keras_version 2.x, say so); "keras" otherwise."""
    if config is not None and '"tf_keras.' in json.dumps(config):
        return "tf_keras"
    if path.suffix == ".h5" and config is not None:
        import h5py

        with h5py.File(path, "r") as handle:
            version = handle.attrs.get("keras_version", b"")
        if str(version.decode() if isinstance(version, bytes) else version).startswith("2."):
            return "tf_keras"
    return "keras"


def _dense_layers(model) -> list:
    """The Dense layers of a (possibly nested) Keras model, in order."""
    found = []
    for layer in model.layers:
        found += _dense_layers(layer) if hasattr(layer, "layers") else [layer] * (type(layer).__name__ == "Dense")
    return found


def _ends_in(layer, dense) -> bool:
    """Whether `layer`'s output is `dense`'s: it is `dense`, or a nested model whose last layer ends in it."""
    return layer is dense or (hasattr(layer, "layers") and bool(layer.layers) and _ends_in(layer.layers[-1], dense))


def _input_scaling(model, notes: list[str]) -> InputScaling:
    """The Rescaling layer the model applies to its input (the fine-tuning recipe's x / 127.5 - 1);
    images in [-1, 1] are fed as (x - offset) / scale so that it gets them back."""
    rescaling = [layer for layer in model.layers if type(layer).__name__ == "Rescaling"]
    if not rescaling:
        return InputScaling()
    if len(rescaling) > 1 or np.size(rescaling[0].scale) != 1 or np.size(rescaling[0].offset) != 1:
        raise VerificationError("the Keras model rescales its input more than once or per channel")
    scaling = InputScaling(float(np.ravel(rescaling[0].scale)[0]), float(np.ravel(rescaling[0].offset)[0]))
    notes.append(f"the Keras model rescales its input ({scaling}): images were fed to it unscaled")
    return scaling


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def _keras_layer(endpoint: str, layers: dict, pools: list, dense: list):
    if endpoint == "logits":
        return dense[-1] if dense else None
    if endpoint == "global_pool":
        return pools[0] if len(pools) == 1 else None
    if endpoint in KERAS_ENDPOINT_LAYERS:
        return layers.get(KERAS_ENDPOINT_LAYERS[endpoint])
    number, _, part = endpoint.removeprefix("layer_").partition("/")
    block = f"block_{int(number) - 2}"
    if part == "expansion_output":
        return layers.get(f"{block}_expand_relu")
    return layers.get(f"{block}_add") or layers.get(f"{block}_project_BN")
