"""A TF checkpoint's reference: its graph, run in a TF1 session, in order of preference (``prefer`` picks one):

- ``meta_graph``: the checkpoint's ``.meta`` (the slim zoo ships one), its variables restored through a
  ``Saver`` whose ``var_list`` maps checkpoint keys to graph variables under the weights convention the
  model was converted with (the pipeline's one rule, :func:`converter.pipeline.conventions.takes_shadow`);
- ``frozen_graph``: a frozen GraphDef next to the checkpoint (DeepLab's ``frozen_inference_graph.pb``, a
  classifier's ``<name>_frozen.pb``) with its weights baked in, so its convention is "as frozen";
- ``builder``: only where neither exists, a graph built by the caller's `GraphBuilder` (the library has
  none: the tests and the parity matrix pass the fixtures' builder) restored from the checkpoint.

Only the part of a graph that the endpoints depend on is imported, after every op of it has been
checked (:mod:`converter.verify.safety`); the report counts what was left out. The float image is fed into
the tensor that feeds the first convolution (``MobilenetV2/Conv/Conv2D``): ``input:0``'s identity in a
slim graph, the preprocessed, padded image in DeepLab's export graph (whose own input is uint8). Endpoints
that a graph does not hold (a BatchNorm-folded graph has lost the Identity nodes some endpoints are) are
listed in ``Reference.missing`` with the reason, not refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from converter.errors import VerificationError
from converter.formats.base import References
from converter.pipeline.conventions import (
    BOOKKEEPING_NAMES,
    EMA_SUFFIX,
    OPTIMIZER_SLOT_SUFFIXES,
    takes_shadow,
)
from converter.verify.references.base import (
    FIRST_CONV,
    Backend,
    BaseReference,
    ReferenceInfo,
    ReferenceRequest,
    read_graph_file,
)
from converter.verify.safety import needed_subgraph
from converter.vocabulary import BUILDER, FROZEN_GRAPH, META_GRAPH

AS_FROZEN = "as frozen"
LAST_BACKBONE_TENSOR = "MobilenetV2/expanded_conv_16/output:0"
IMAGE_POOLING_CONV = "image_pooling/Conv2D"


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


def open_meta_graph(tf, source: References, request: ReferenceRequest) -> Reference:
    from google.protobuf.message import DecodeError

    path = source["meta_graph"]
    meta = tf.compat.v1.MetaGraphDef()
    try:
        meta.ParseFromString(read_graph_file(path))
    except DecodeError as error:
        raise VerificationError(f"{path.name} is not a readable MetaGraphDef ({error})") from None
    why = "it is not a complete MobileNetV2 graph"
    return _restored(tf, meta.graph_def, source, request, META_GRAPH, path.name, [], why)


def open_frozen_graph(tf, source: References, request: ReferenceRequest) -> Reference:
    from google.protobuf.message import DecodeError

    v1 = tf.compat.v1
    path = source["frozen_graph"]
    graph_def = v1.GraphDef()
    try:
        graph_def.ParseFromString(read_graph_file(path))
    except DecodeError as error:
        raise VerificationError(f"{path.name} is not a readable GraphDef ({error})") from None
    why = (
        "frozen graphs may be transformed: folding BatchNorms and removing Identity nodes drops the tensors "
        "those endpoints are, see tensorflow/models#10109"
    )
    graph, imported, left_out, missing = _import_needed(tf, graph_def, request.tensors, path.name, why)
    input_tensor = _first_conv_input(graph, path.name)
    notes = [
        f"weights are baked into {path.name}: the reference uses them as frozen (the model was converted "
        f"with {request.convention} weights; had the graph been frozen from others, parity would fail)"
    ]
    info = ReferenceInfo(FROZEN_GRAPH, path.name, AS_FROZEN, input_tensor.name, notes, imported, left_out)
    session = _session(tf, graph, request.threads)
    return _with_geometry(Reference(tf, graph, session, input_tensor, info, missing), request)


def open_builder(tf, source: References, request: ReferenceRequest) -> Reference:
    note = (
        "the builder was asked for (--reference builder)" if request.prefer == BUILDER
        else "the checkpoint comes with neither a .meta graph nor a frozen graph"
    )  # fmt: skip
    if request.graph_builder is None:
        raise VerificationError(
            f"no reference graph: {note}, and no graph builder was passed in; verify against a source that "
            "carries its graph, or pass graph_builder to check_parity"
        )
    stride = request.output_stride if request.kind == "deeplab" else None
    graph_def = request.graph_builder(request.kind, request.depth, stride).as_graph_def()
    notes = [note, "the graph was built by the graph builder passed in (a model of the original, not the original)"]
    why = "the graph builder does not build it"
    return _restored(tf, graph_def, source, request, BUILDER, None, notes, why)


def _restored(
    tf,
    graph_def,
    source: References,
    request: ReferenceRequest,
    kind: str,
    file: str | None,
    notes: list[str],
    why: str,
) -> Reference:
    """The part of `graph_def` the endpoints need, its variables restored from the checkpoint."""
    origin = file or "the builder's graph"
    graph, imported, left_out, missing = _import_needed(tf, graph_def, request.tensors, origin, why)
    variables = {op.name: op.outputs[0] for op in graph.get_operations() if op.type == "VariableV2"}
    session = _session(tf, graph, request.threads)
    _restore(tf, graph, session, variables, source["checkpoint_prefix"], request.convention)
    input_tensor = _first_conv_input(graph, origin)
    info = ReferenceInfo(kind, file, request.convention, input_tensor.name, notes, imported, left_out)
    return _with_geometry(Reference(tf, graph, session, input_tensor, info, missing), request)


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


def _is_model_variable(name: str) -> bool:
    return not (name.endswith(EMA_SUFFIX) or name.endswith(OPTIMIZER_SLOT_SUFFIXES) or name in BOOKKEEPING_NAMES)


def _restore(tf, graph, session, variables: dict, prefix: Path, convention: str) -> None:
    """Restore the graph's model variables from `prefix` under `convention` with a Saver var_list."""
    from converter.formats.tf_bundle import TensorBundle

    v1 = tf.compat.v1
    with TensorBundle(prefix) as bundle:
        stored = set(bundle.names())
    var_list, lacking = {}, []
    for name, variable in sorted(variables.items()):
        if not _is_model_variable(name):
            continue
        key = name + EMA_SUFFIX if takes_shadow(name, convention) else name
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


def _with_geometry(reference: Reference, request: ReferenceRequest) -> Reference:
    if request.kind == "deeplab":
        _read_deeplab_geometry(reference)
    return reference


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


#: In the order ``auto`` prefers them: the graph shipped with the checkpoint, else its frozen graph, else
#: the caller's builder.
BACKENDS = (
    Backend(
        META_GRAPH,
        "meta_graph",
        open_meta_graph,
        "the checkpoint comes without a .meta graph",
        "the checkpoint's own .meta graph, run by TensorFlow",
    ),
    Backend(
        FROZEN_GRAPH,
        "frozen_graph",
        open_frozen_graph,
        "the checkpoint comes without a frozen graph",
        "the checkpoint's frozen graph, run by TensorFlow",
    ),
    Backend(
        BUILDER,
        "checkpoint_prefix",
        open_builder,
        "the source is not a TF checkpoint",
        "the checkpoint restored into a slim graph built for it, run by TensorFlow",
    ),
)
