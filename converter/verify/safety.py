"""Graphs are untrusted input: import only what the comparison needs, and check every op of that.

A TensorFlow graph is a program. Besides arithmetic it can read and write files (ReadFile, WriteFile,
SaveV2, MatchingFiles), call Python (PyFunc), assign variables or run functions that hide further ops.
The original graphs also hold much that a comparison never runs: regularization losses, initializers,
the Saver, label post-processing. So the verifier works by what runs, in two steps:

- :func:`needed_subgraph` keeps only the nodes that the fetched endpoints depend on (data and control
  inputs, transitively); everything else is left out, never imported and never run, and is counted by op
  type for the report. Restoring the weights is done by a Saver the verifier builds itself afterwards.
- :func:`check_graph_def` then accepts the kept nodes only if every op is on `COMPUTE_OPS`:
  side-effect-free tensor arithmetic, shape and index arithmetic, resizes, space-to-batch, assertions,
  constants and reading variables. What a comparison would run must never read or write a file, call
  Python or change a variable: such ops are refused by name (`FILE_OPS`, `PYTHON_OPS`, `MUTATING_OPS`),
  any other op as unknown. A graph that defines functions is refused as a whole: none of these models
  needs one, and a function can hide any op.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from converter.errors import VerificationError

COMPUTE_OPS = frozenset(
    {
        # the network
        "Conv2D", "DepthwiseConv2dNative", "BiasAdd", "BiasAddV1",
        "FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3", "BatchNormWithGlobalNormalization",
        "Relu", "Relu6", "Add", "AddV2", "AddN", "AvgPool", "MaxPool", "Mean", "Sum", "Max", "Min", "Prod",
        "Squeeze", "Reshape", "Softmax", "ConcatV2", "ArgMax", "MatMul",
        "Rsqrt", "Sqrt", "Square", "Reciprocal",
        # resizes and dilation (DeepLab)
        "ResizeBilinear", "ResizeNearestNeighbor", "SpaceToBatchND", "BatchToSpaceND",
        # constants, inputs, plumbing
        "Const", "Identity", "IdentityN", "Placeholder", "PlaceholderWithDefault", "NoOp", "StopGradient",
        # dtype, shape and index arithmetic (preprocessing, padding to the crop, predictions)
        "Cast", "Mul", "Sub", "RealDiv", "FloorDiv", "FloorMod", "Maximum", "Minimum", "Neg", "Floor", "Ceil",
        "Shape", "ShapeN", "Size", "Rank", "StridedSlice", "Slice", "Pack", "Unpack", "ExpandDims", "Tile",
        "BroadcastTo", "Fill", "Range", "Pad", "PadV2", "Transpose", "ZerosLike", "OnesLike",
        "Equal", "NotEqual", "Greater", "GreaterEqual", "Less", "LessEqual", "LogicalAnd", "LogicalOr",
        "LogicalNot", "Select", "SelectV2", "Assert",
        # variables: reading them (restoring is done by the verifier's own Saver)
        "VariableV2",
    }
)  # fmt: skip
#: Ops that read, write or list files (the Saver's included: the verifier restores with its own).
FILE_OPS = frozenset(
    {
        "ReadFile", "WriteFile", "MatchingFiles", "DeleteFile", "RestoreV2", "SaveV2", "Restore", "RestoreSlice",
        "Save", "SaveSlices", "MergeV2Checkpoints", "ShardedFilename", "ShardedFilespec", "PrintV2",
        "ImmutableConst", "FixedLengthRecordReaderV2", "TextLineReaderV2", "WholeFileReaderV2",
    }
)  # fmt: skip
PYTHON_OPS = frozenset({"PyFunc", "PyFuncStateless", "EagerPyFunc"})
MUTATING_OPS = frozenset(
    {"Assign", "AssignAdd", "AssignSub", "AssignVariableOp", "ScatterUpdate", "ScatterAdd", "ScatterNdUpdate"}
)


def needed_subgraph(graph_def, fetch_nodes: Iterable[str], origin: str):
    """The nodes `fetch_nodes` depend on (data and control inputs), checked op by op, as a new GraphDef;
    and what was left out, as {op type: count}."""
    _refuse_functions(graph_def, origin)
    needed = dependencies({node.name: node for node in graph_def.node}, fetch_nodes, origin)
    kept = type(graph_def)()
    kept.versions.CopyFrom(graph_def.versions)
    kept.node.extend(node for node in graph_def.node if node.name in needed)
    check_graph_def(kept, origin)
    left_out = Counter(node.op for node in graph_def.node if node.name not in needed)
    return kept, dict(sorted(left_out.items()))


def dependencies(
    nodes: Mapping[str, Any], roots: Iterable[str], origin: str, leaves: Iterable[str] = ()
) -> dict[str, Any]:
    """Name -> node of every node `roots` depend on (data and control inputs), in the order found; `leaves`
    (a function's arguments) are where the walk stops."""
    found: dict[str, Any] = {}
    stack, stops = list(roots), set(leaves)
    while stack:
        name = stack.pop()
        if name in found or name in stops:
            continue
        node = nodes.get(name)
        if node is None:
            raise VerificationError(f"refusing {origin}: it references a node {name!r} that it does not define")
        found[name] = node
        stack += [node_of(source) for source in node.input]
    return found


def check_graph_def(graph_def, origin: str) -> None:
    """Refuse a GraphDef that defines functions or holds an op that is not allowed (see the module
    docstring); `graph_def` is what will be imported and may run."""
    _refuse_functions(graph_def, origin)
    for node in graph_def.node:
        check_op(node.op, node.name, origin)


def check_op(op: str, node: str, origin: str) -> None:
    if op in COMPUTE_OPS:
        return
    what = (
        "reads or writes files" if op in FILE_OPS
        else "calls Python" if op in PYTHON_OPS
        else "assigns a variable" if op in MUTATING_OPS
        else None
    )  # fmt: skip
    if what:
        raise VerificationError(
            f"refusing {origin}: computing its endpoints would run op {op} (node {node!r}), which {what}; a "
            "forward pass must not read files, call Python or assign variables"
        )
    raise VerificationError(
        f"refusing {origin}: op {op} (node {node!r}) is on the path to the endpoints but is not one the "
        "MobileNetV2 graphs use there; graphs are untrusted input and may only compute with the allowed "
        "tensor ops (see converter/verify/safety.py)"
    )


def _refuse_functions(graph_def, origin: str) -> None:
    library = getattr(graph_def, "library", None)
    if library is not None and (len(library.function) or len(library.gradient)):
        names = ", ".join(f.signature.name for f in list(library.function)[:3])
        raise VerificationError(
            f"refusing {origin}: its graph defines {len(library.function)} function(s) ({names}); the "
            "MobileNetV2 graphs define none, and functions can hide arbitrary ops"
        )


def node_of(tensor: str) -> str:
    return tensor.lstrip("^").split(":")[0]
