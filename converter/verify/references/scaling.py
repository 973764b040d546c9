"""The input scaling a SavedModel applies before its first convolution, read off its graph.

From that convolution (in the main graph, or in a function body reached through call ops) back to the
signature's image input, across element-wise ops with a scalar constant operand and pass-through ops,
composed into one affine map (a TF Hub module takes [0, 1] and scales inside)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from converter.errors import VerificationError
from converter.verify.references.base import FIRST_CONV, InputScaling
from converter.verify.safety import dependencies, node_of

#: Calls into the SavedModel's own functions (whose bodies are checked and walked as well).
CALL_OPS = frozenset({"PartitionedCall", "StatefulPartitionedCall"})
#: Element-wise ops an input scaling is made of, each with a scalar constant as its other operand; and
#: the ops that pass a tensor on unchanged.
SCALING_OPS = frozenset({"Sub", "Mul", "Add", "AddV2", "RealDiv"})
PASS_THROUGH_OPS = frozenset({"Identity"})
MAX_WALK_STEPS = 10_000  # far more than any input scaling; bounds the walks on a malformed graph


def called_functions(node, functions: dict, origin: str) -> list:
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
                (callee,) = called_functions(node, functions, origin)
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


#: Keras' stem convolution: its layer `Conv1`, which a Keras 3 function graph names `Conv1_1`.
KERAS_FIRST_CONV = re.compile(r"(^|/)Conv1(_\d+)?/")


def _first_convolutions(functions: dict, main: _Body, origin: str) -> list[tuple[_Body, Any]]:
    """Every op named as the slim stem's convolution or as Keras' (layer `Conv1`), any scope in front, in
    `main` and in the functions it calls, transitively, each with the body it is in."""
    found, pending, visited = [], [main], 0
    while pending:
        body = pending.pop()
        visited += 1
        if visited > MAX_WALK_STEPS:
            raise VerificationError(f"refusing {origin}: its functions call each other more than a model does")
        for node in body.nodes.values():
            slim = node.name == FIRST_CONV or node.name.endswith("/" + FIRST_CONV)
            if node.op == "Conv2D" and (slim or KERAS_FIRST_CONV.search(node.name)):
                found.append((body, node))
            if node.op in CALL_OPS:
                pending += [_Body.called(callee, body, node) for callee in called_functions(node, functions, origin)]
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
