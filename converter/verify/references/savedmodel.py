"""A SavedModel's or TF1 Hub module's reference: its serving signature, loaded by TensorFlow's SavedModel
loader after :func:`check_saved_model`. The endpoints are the signature's outputs (and, in a TF1 graph,
the slim tensors on its path); its images are fed through the input scaling read off its graph
(:mod:`.scaling`: TF Hub's take [0, 1])."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from converter.errors import VerificationError
from converter.formats.base import References
from converter.verify.references.base import (
    FEATURES_TENSOR,
    GLOBAL_POOL_TENSOR,
    LOGITS_TENSOR,
    SAVED_MODEL,
    Backend,
    BaseReference,
    InputScaling,
    ReferenceInfo,
    ReferenceRequest,
    read_graph_file,
)
from converter.verify.references.scaling import CALL_OPS, called_functions, signature_input_scaling
from converter.verify.safety import COMPUTE_OPS, FILE_OPS, MUTATING_OPS, PYTHON_OPS, check_op, dependencies, node_of
from converter.vocabulary import BACKBONE, CLASSIFICATION
from mobilenet_torch.architecture import final_conv_channels
from mobilenet_torch.configuration import MobileNetV2Config

MAX_OUTPUT_WALK = 64  # identities and calls between a signature's output and the op computing it
SERVING_SIGNATURES = ("serving_default", "default")  # TF2 / TF1 SavedModels, then TF1 Hub modules
SAVED_MODEL_INIT_SIGNATURE = "__saved_model_init_op"
#: A signature whose only output is unnamed (TF2 exports call it output_0) gives the endpoint its rank says
#: (a backbone's, where its channels are the backbone's too): (kind, endpoint tensor) -> (rank, what it is).
#: A no-top Keras model returns its last feature map, or its global average with pooling="avg".
SOLE_OUTPUTS = {
    (CLASSIFICATION, LOGITS_TENSOR): (2, "the logits"),
    (BACKBONE, FEATURES_TENSOR): (4, "the backbone's last feature map (layer_19)"),
    (BACKBONE, GLOBAL_POOL_TENSOR): (2, "the global average of the backbone's last feature map (global_pool)"),
}
INIT_COLLECTIONS = ("saved_model_main_op", "legacy_init_op")
#: What a forward pass may run besides COMPUTE_OPS: variable handles and reads, and calls into the
#: SavedModel's own functions (whose bodies are checked as well).
VARIABLE_READ_OPS = frozenset({"VariableV2", "VarHandleOp", "ReadVariableOp"})
#: The file and assignment ops of a SavedModel's saver: its restore, which the loader runs to read variables/
#: into the variables, and its save half, which nothing runs. Held elsewhere, such ops are refused.
SAVER_OPS = frozenset({"RestoreV2", "Assign", "AssignVariableOp", "ShardedFilename", "SaveV2", "MergeV2Checkpoints"})


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
        out = {name: results[self._outputs[name]].numpy() for name in names}
        if GLOBAL_POOL_TENSOR in out and out[GLOBAL_POOL_TENSOR].ndim == 2:  # slim keeps [batch, 1, 1, channels]
            out[GLOBAL_POOL_TENSOR] = out[GLOBAL_POOL_TENSOR].reshape(len(images), 1, 1, -1)
        return out


def check_saved_model(meta_graph, signature, origin: str) -> tuple[dict[str, int], dict[str, int], set[str]]:
    """Refuse a SavedModel whose loading or serving would do more than compute, by the rule the `.meta`
    path applies: what runs is checked, what never runs is left out and counted.

    - What runs: the nodes the signature's outputs depend on and, in every function they call
      (transitively), the nodes its outputs and control outputs depend on (TensorFlow runs no other node
      of a function body), with the initialization the loader runs (its main / init op). Only
      `COMPUTE_OPS`, variable handles and reads, and calls into the SavedModel's own functions.
    - Everything else it holds (the training graph's losses, the variables' initializers, its saver, the
      rest of a function body) never runs but for the saver's restore, which the loader runs to read
      variables/. It is left out, and refused only where it reads or writes files beyond that restore,
      calls Python or assigns variables otherwise than the restore does.

    Returns the op counts of what runs and of what was left out, for the report, and the names of the
    main graph's nodes that run."""
    functions = {function.signature.name: function for function in meta_graph.graph_def.library.function}
    nodes = {node.name: node for node in meta_graph.graph_def.node}
    forward_ops = COMPUTE_OPS | VARIABLE_READ_OPS | CALL_OPS
    outputs = [node_of(info.name) for info in signature.outputs.values()]
    init = [node_of(name) for key in INIT_COLLECTIONS for name in _collection_nodes(meta_graph, key)]
    init_signature = meta_graph.signature_def.get(SAVED_MODEL_INIT_SIGNATURE)
    init += [node_of(info.name) for info in init_signature.outputs.values()] if init_signature else []
    runs = _closure(nodes, functions, outputs + init, origin)
    counts: dict[str, int] = {}
    for node in runs.values():
        if node.op not in forward_ops:
            check_op(node.op, node.name, origin)
        counts[node.op] = counts.get(node.op, 0) + 1
    left_out: dict[str, int] = {}
    held = [(None, node) for node in meta_graph.graph_def.node]
    held += [(name, node) for name, function in functions.items() for node in function.node_def]
    for scope, node in held:
        if (scope, node.name) in runs:
            continue
        if node.op in FILE_OPS | PYTHON_OPS | MUTATING_OPS and node.op not in SAVER_OPS:
            _refuse_held(node.op, node.name, origin)
        left_out[node.op] = left_out.get(node.op, 0) + 1
    main = {name for scope, name in runs if scope is None}
    return dict(sorted(counts.items())), dict(sorted(left_out.items())), main


def _collection_nodes(meta_graph, key: str) -> list[str]:
    collection = meta_graph.collection_def.get(key)
    return list(collection.node_list.value) if collection is not None else []


def _closure(nodes: dict, functions: dict, roots: Sequence[str], origin: str) -> dict[tuple[str | None, str], Any]:
    """(function name or None for the main graph, node name) -> node, for every node that running `roots`
    runs: their dependencies (data and control inputs) and, in each function they call, transitively, the
    dependencies of the function's outputs and control outputs."""
    runs: dict[tuple[str | None, str], Any] = {}
    pending = [(None, node) for node in dependencies(nodes, roots, origin).values()]
    called: set[str] = set()
    while pending:
        scope, node = pending.pop()
        runs[(scope, node.name)] = node
        for function in called_functions(node, functions, origin):
            name = function.signature.name
            if name in called:
                continue
            called.add(name)
            body = {inner.name: inner for inner in function.node_def}
            arguments = {argument.name for argument in function.signature.input_arg}
            ends = [node_of(tensor) for tensor in function.ret.values()] + list(function.control_ret.values())
            needed = dependencies(body, [end for end in ends if end not in arguments], origin, leaves=arguments)
            pending += [(name, inner) for inner in needed.values()]
    return runs


def _refuse_held(op: str, node: str, origin: str) -> None:
    what = "reads or writes files" if op in FILE_OPS else "calls Python" if op in PYTHON_OPS else "assigns a variable"
    raise VerificationError(
        f"refusing {origin}: it holds op {op} (node {node!r}), which {what} beyond restoring its variables; "
        "TensorFlow's loader would load it, so the SavedModel is refused as a whole (see "
        "converter/verify/references/savedmodel.py, check_saved_model)"
    )


def open_saved_model(tf, source: References, request: ReferenceRequest) -> SignatureReference:
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import saved_model_pb2

    from converter.pipeline.table import endpoints_for

    folder, kind, tensors = source["saved_model"], request.kind, request.tensors
    origin = f"the SavedModel {folder.name}"
    saved_model = saved_model_pb2.SavedModel()
    try:
        saved_model.ParseFromString(read_graph_file(folder / "saved_model.pb"))
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
        if not found and (kind, tensor) in SOLE_OUTPUTS:
            channels = (
                final_conv_channels(MobileNetV2Config(depth_multiplier=request.depth)) if kind == BACKBONE else None
            )
            found = _sole_output(signature, key, *SOLE_OUTPUTS[kind, tensor], channels, notes)
        if found:
            outputs[tensor] = found
        else:
            missing[tensor] = (
                f"the SavedModel's {key} signature exposes only {', '.join(sorted(signature.outputs))}, "
                "and TensorFlow runs it as a whole"
            )
    softmax = (
        _final_softmax(meta_graph, signature.outputs[outputs[LOGITS_TENSOR]]) if LOGITS_TENSOR in outputs else None
    )
    try:  # the exact tags: a Hub module's served graph has none, which the loader would take as "the only one"
        with tempfile.TemporaryDirectory() as scratch:
            if softmax is not None:  # the same SavedModel, its final Softmax an Identity: it returns the logits
                _as_identity(*softmax)
                (Path(scratch) / "saved_model.pb").write_bytes(saved_model.SerializeToString())
                (Path(scratch) / "variables").symlink_to((folder / "variables").resolve())
                notes.append(
                    f"the {key} signature ends in a Softmax ({softmax[1].name}); it was run with that op as an "
                    "Identity, so that it returns the logits"
                )
            loaded = tf.saved_model.load(scratch if softmax else str(folder), tags=list(meta_graph.meta_info_def.tags))
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


def _final_softmax(meta_graph, output) -> Any:
    """The Softmax node that computes the signature output `output` (a TensorInfo), through identities and
    calls into the SavedModel's functions (as Keras' classifier ends), or None."""
    functions = {function.signature.name: function for function in meta_graph.graph_def.library.function}
    body, (name, index) = None, _tensor_parts(output.name, None)
    for _ in range(MAX_OUTPUT_WALK):
        nodes = {node.name: node for node in (body.node_def if body else meta_graph.graph_def.node)}
        node = nodes.get(name)
        if node is None or not node.input and node.op != "Softmax":
            return None
        if node.op == "Softmax":
            return body, node
        if node.op in CALL_OPS and "f" in node.attr and node.attr["f"].func.name in functions:
            body = functions[node.attr["f"].func.name]
            outputs = body.signature.output_arg
            if index >= len(outputs) or outputs[index].name not in body.ret:
                return None
            name, index = _tensor_parts(body.ret[outputs[index].name], body)
        elif node.op == "Identity":
            name, index = _tensor_parts(node.input[0], body)
        else:
            return None
    return None


def _as_identity(body, node) -> None:
    """Make `node` (a Softmax) an Identity, renaming its output where a function body refers to it by name."""
    node.op = "Identity"
    if body is None:
        return
    old, new = f"{node.name}:softmax:", f"{node.name}:output:"
    for inner in body.node_def:
        for i, source in enumerate(inner.input):
            if source.startswith(old):
                inner.input[i] = new + source[len(old) :]
    for key, tensor in body.ret.items():
        if tensor.startswith(old):
            body.ret[key] = new + tensor[len(old) :]


def _tensor_parts(tensor: str, body) -> tuple[str, int]:
    """(node name, output index) of a tensor named in the main graph (`node:0`) or in a function body
    (`node:output:0`)."""
    parts = tensor.split(":")
    return parts[0], int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 0


def _sole_output(signature, key: str, rank: int, what: str, channels: int | None, notes: list[str]) -> str | None:
    """The signature's only output where it has `rank` dimensions and (given) `channels` last (see `SOLE_OUTPUTS`)."""
    if len(signature.outputs) != 1:
        return None
    ((name, info),) = signature.outputs.items()
    dims = info.tensor_shape.dim
    if info.tensor_shape.unknown_rank or len(dims) != rank or channels not in (None, dims[-1].size):
        return None
    shape = ", ".join(["batch"] + [str(d.size) if d.size >= 0 else "?" for d in dims[1:]])
    notes.append(f"the {key} signature's only output, {name} ([{shape}]), is taken as {what}")
    return name


BACKENDS = (
    Backend(
        SAVED_MODEL,
        "saved_model",
        open_saved_model,
        "the source is not a SavedModel",
        "the SavedModel's signature, run by TensorFlow",
    ),
)
