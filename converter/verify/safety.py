"""Graphs are untrusted input: check every op of a `.meta` or frozen graph before TensorFlow imports it.

A TensorFlow graph is a program. Besides arithmetic it can read and write files (ReadFile, WriteFile,
SaveV2, PrintV2 to a file), list folders (MatchingFiles), call Python (PyFunc) or run functions and loops
that hide further ops. These models need none of that, so an op is accepted only if it is on
`COMPUTE_OPS` (side-effect-free tensor arithmetic, variables and their initializers: what the slim and
DeepLab MobileNetV2 graphs are made of) or is one of the `SAVER_OPS` that `tf.train.Saver` puts in a
graph, and then only inside a top-level `save` scope (`save/`, `save_1/`, ...). A second check makes
sure that nothing a comparison runs (the backward closure of the fetched tensors, including control
dependencies) reaches a saver op or an assignment, so running the reference can neither touch a file
nor change a weight. The function library must be empty: nothing here needs one.

The op lists are the ones the project's own fixture graphs (checkpoint `.meta`, classification and
DeepLab frozen graphs) contain, plus harmless ops that the zoo's exported graphs use for their
preprocessing (padding, shape arithmetic, assertions) and variable initializers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from converter.errors import VerificationError

# Side-effect-free ops: arithmetic on tensors, shapes, variables (reading; the initializers and
# Assign nodes that every variable carries are allowed to exist but never run, see `check_closure`).
COMPUTE_OPS = frozenset(
    {
        # the network
        "Conv2D", "DepthwiseConv2dNative", "BiasAdd",
        "FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3",
        "Relu", "Relu6", "Add", "AddV2", "AvgPool", "Mean", "Squeeze", "Reshape", "Softmax",
        "ResizeBilinear", "ConcatV2", "SpaceToBatchND", "BatchToSpaceND", "ArgMax",
        # constants, inputs, plumbing
        "Const", "Identity", "IdentityN", "Placeholder", "PlaceholderWithDefault", "NoOp", "StopGradient",
        # dtype, shape and index arithmetic (DeepLab's dilation and preprocessing, slim's predictions)
        "Cast", "Mul", "Sub", "RealDiv", "FloorDiv", "FloorMod", "Maximum", "Minimum", "Neg", "Floor", "Ceil",
        "Shape", "ShapeN", "Size", "Rank", "StridedSlice", "Slice", "Pack", "Unpack", "ExpandDims",
        "Fill", "Range", "Pad", "PadV2", "Transpose", "ZerosLike", "OnesLike",
        "Equal", "NotEqual", "Greater", "GreaterEqual", "Less", "LessEqual", "LogicalAnd", "LogicalOr",
        "LogicalNot", "Select", "SelectV2", "Assert",
        # variables: reading them, and what creates or restores them
        "VariableV2", "VarHandleOp", "ReadVariableOp", "VarIsInitializedOp", "IsVariableInitialized",
        "Assign", "AssignVariableOp",
        # variable initializers
        "TruncatedNormal", "RandomStandardNormal", "RandomUniform",
    }
)  # fmt: skip

# What tf.train.Saver adds to a graph; they read or write checkpoint files, so they are accepted only
# inside a top-level `save` scope and must never be reachable from what the comparison runs.
SAVER_OPS = frozenset({"RestoreV2", "SaveV2", "MergeV2Checkpoints", "ShardedFilename", "ShardedFilespec", "StringJoin"})
# Ops that change state: allowed in a graph (restoring needs them) but never in what a comparison runs.
MUTATING_OPS = frozenset({"Assign", "AssignVariableOp"})
SAVER_SCOPE = re.compile(r"^save(_\d+)?/")


def check_graph_def(graph_def, origin: str) -> None:
    """Refuse a GraphDef whose ops are not all allowed (see the module docstring)."""
    library = getattr(graph_def, "library", None)
    if library is not None and (len(library.function) or len(library.gradient)):
        names = ", ".join(f.signature.name for f in list(library.function)[:3])
        raise VerificationError(
            f"refusing {origin}: its graph defines {len(library.function)} function(s) ({names}); the "
            "MobileNetV2 graphs define none, and functions can hide arbitrary ops"
        )
    for node in graph_def.node:
        check_op(node.op, node.name, origin)


def check_op(op: str, node: str, origin: str) -> None:
    if op in COMPUTE_OPS:
        return
    if op in SAVER_OPS:
        if SAVER_SCOPE.match(node):
            return
        raise VerificationError(
            f"refusing {origin}: op {op} (node {node!r}) reads or writes files and is only accepted inside "
            "the Saver's save/ scope; graphs are untrusted input"
        )
    raise VerificationError(
        f"refusing {origin}: op {op} (node {node!r}) is not one the MobileNetV2 graphs use; graphs are "
        "untrusted input and may only hold the allowed tensor ops (see converter/verify/safety.py)"
    )


def check_closure(nodes: Mapping[str, object], fetches: Iterable[str], fed: Iterable[str], origin: str) -> None:
    """Walk back from the fetched tensors (data and control inputs), stopping at fed tensors, and refuse
    if any op on the way is a saver op or an assignment.

    `nodes` maps node name -> NodeDef; `fetches`/`fed` are tensor names ("node:0").
    """
    fed_tensors = set(fed)
    stack = [_node_of(name) for name in fetches]
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        node = nodes.get(name)
        if node is None:
            raise VerificationError(f"refusing {origin}: it references a node {name!r} that it does not define")
        if node.op in SAVER_OPS or node.op in MUTATING_OPS:
            raise VerificationError(
                f"refusing {origin}: computing its endpoints would run op {node.op} (node {name!r}); a "
                "forward pass must not read files or assign variables"
            )
        for source in node.input:
            control = source.startswith("^")
            tensor = source[1:] if control else source
            if not control and _tensor_name(tensor) in fed_tensors:
                continue
            stack.append(_node_of(tensor))


def _node_of(tensor: str) -> str:
    return tensor.lstrip("^").split(":")[0]


def _tensor_name(tensor: str) -> str:
    return tensor if ":" in tensor else f"{tensor}:0"
