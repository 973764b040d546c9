"""Graph normalisation for TFLite files: each producer's form of a layer rewritten into one canonical op.

Converters write the same layer in several forms; the topology walk in :mod:`converter.formats.tflite`
knows only the canonical one. Each form is a rule: a function registered with :func:`rule` for the op
type that starts the form, returning a :class:`Rewrite` (or None where the form does not apply). Rules
run in registration order, each over the graph the earlier ones left, so a later rule sees canonical ops.

A rewritten op keeps its arithmetic: its :class:`Part` list holds the ops the file really runs (the conv
first, then the per-channel MUL / ADD of an unfolded BatchNorm, a separate RELU6), so that the float
reader folds them and the integer model reproduces each one as TFLite computes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from converter.errors import MappingError
from converter.formats.tflite_schema import Model, Operator, Tensor
from mobilenet_torch.architecture import bottom_right_padding, same_padding

# The per-channel ops of a BatchNorm a converter leaves after a conv, in the order it writes them, by the
# step-name suffix the integer model knows them by.
BATCH_NORM_OPS = (("mul", "MUL"), ("bias_add", "ADD"))
RELU6_SUFFIX = "relu6"
# A ReLU6 written as a clamp: each op -> the other op of the pair, and the bound each op applies.
CLAMP_PAIR = {"MINIMUM": "MAXIMUM", "MAXIMUM": "MINIMUM"}
CLAMP_BOUND = {"MINIMUM": 6.0, "MAXIMUM": 0.0}
# The canonical padding of a stride-2 conv that pads as Keras' open-size MobileNetV2 does (`bottom_right_padding`).
BOTTOM_RIGHT = "BOTTOM_RIGHT"


@dataclass(frozen=True)
class Part:
    """One op the file runs inside a canonical op."""

    suffix: str | None  # None for the conv itself; else the step-name suffix after the conv's module
    op: Operator
    output: int  # the tensor the part yields (a space-to-batch conv's: after BATCH_TO_SPACE_ND)
    constant: int | None = None  # the constant operand of a per-channel MUL / ADD
    dilation: int | None = None  # a dilation the op does not carry itself (a space-to-batch conv)


@dataclass(frozen=True)
class Rewrite:
    op: Operator  # the canonical op, as if the converter had written one
    parts: tuple[Part, ...]
    replaced: tuple[Operator, ...]  # the ops it stands for


Rule = Callable[["Graph", Operator], Rewrite | None]
RULES: list[tuple[str, Rule]] = []


def rule(op_type: str) -> Callable[[Rule], Rule]:
    """Register a normalisation for forms that start with an op of `op_type`."""

    def register(function: Rule) -> Rule:
        RULES.append((op_type, function))
        return function

    return register


class Graph:
    """The operators of a model in canonical form, with each tensor's consumers."""

    def __init__(self, model: Model) -> None:
        self.model = model
        # A constant that a DEQUANTIZE op widens for a float kernel (float16 weights, or int8 ones where
        # the kernel has no hybrid form): its output tensor -> the tensor holding the data.
        self._dequantized = {
            op.outputs[0]: model.tensors[op.inputs[0]]
            for op in model.operators
            if op.op == "DEQUANTIZE" and model.data(model.tensors[op.inputs[0]]) is not None
        }
        self.operators = list(model.operators)
        self._parts: dict[int, tuple[Part, ...]] = {}
        for op_type, normalise in RULES:
            for op in [op for op in self.operators if op.op == op_type]:
                self._index()
                if op in self.operators and (rewrite := normalise(self, op)) is not None:
                    self._apply(rewrite)
        self._index()

    def _index(self) -> None:
        self.consumers: dict[int, list[Operator]] = {}
        for op in self.operators:
            for tensor in op.inputs:
                self.consumers.setdefault(tensor, []).append(op)

    def _apply(self, rewrite: Rewrite) -> None:
        position = min(self.operators.index(op) for op in rewrite.replaced)
        self.operators = [op for op in self.operators if op not in rewrite.replaced]
        self.operators.insert(position, rewrite.op)
        self._parts[rewrite.op.index] = rewrite.parts

    def stored(self, tensor: int) -> Tensor:
        """The tensor holding the data of a constant operand: the DEQUANTIZE op's input where one feeds it."""
        return self._dequantized.get(tensor, self.model.tensors[tensor])

    def parts(self, op: Operator) -> tuple[Part, ...]:
        """The ops that `op` stands for: itself, unless a rule rewrote them."""
        return self._parts.get(op.index, (Part(None, op, op.outputs[0]),))

    def only_consumer(self, tensor: int, op_type: str) -> Operator | None:
        """The op of `op_type` that is the one consumer of `tensor`, if that is what consumes it."""
        found = self.consumers.get(tensor, [])
        return found[0] if len(found) == 1 and found[0].op == op_type else None

    def per_channel_constant(self, op: Operator, x: int, scope: str) -> int:
        """The constant operand of a per-channel MUL / ADD whose other operand is `x`."""
        others = [tensor for tensor in op.inputs if tensor != x]
        values = self.model.data(self.stored(others[0])) if len(others) == 1 else None
        if values is None:
            raise MappingError(f"{scope}: op {op.index} ({op.op}) is not by a per-channel constant")
        return others[0]


@rule("SPACE_TO_BATCH_ND")
def dilated_depthwise(graph: Graph, to_batch: Operator) -> Rewrite | None:
    """TF1's atrous depthwise conv: SPACE_TO_BATCH_ND -> VALID DEPTHWISE_CONV_2D -> BATCH_TO_SPACE_ND, its
    BatchNorm folded into the conv or left as a per-channel MUL, ADD or both, its ReLU6 fused into the
    last op or a RELU6 op of its own: the SAME depthwise conv dilated by the block size."""
    scope = f"op {to_batch.index}"
    block = graph.model.data(graph.model.tensors[to_batch.inputs[1]])
    rate = int(block[0]) if block is not None and len(set(block.tolist())) == 1 else 0
    conv = graph.only_consumer(to_batch.outputs[0], "DEPTHWISE_CONV_2D")
    to_space = conv and graph.only_consumer(conv.outputs[0], "BATCH_TO_SPACE_ND")
    if not (rate and to_space and conv.options["padding"] == "VALID"):
        return None  # not this form: the walk reports the op where it expects a conv
    parts = [Part(None, conv, to_space.outputs[0], dilation=rate)]
    x, activation = to_space.outputs[0], conv.options["activation"]
    for suffix, op_type in BATCH_NORM_OPS:
        op = graph.only_consumer(x, op_type)
        if op is None:
            continue
        if activation is not None:
            raise MappingError(f"{scope}: the dilated depthwise conv's {op_type} follows its activation")
        parts.append(Part(suffix, op, op.outputs[0], constant=graph.per_channel_constant(op, x, scope)))
        x, activation = op.outputs[0], op.options["activation"]
    relu6 = graph.only_consumer(x, "RELU6")
    if relu6 is not None and activation is None:
        parts.append(Part(RELU6_SUFFIX, relu6, relu6.outputs[0]))
        x, activation = relu6.outputs[0], "relu6"
    options = {**conv.options, "padding": "SAME", "dilation_h": rate, "dilation_w": rate, "activation": activation}
    canonical = replace(conv, inputs=(to_batch.inputs[0], *conv.inputs[1:]), outputs=(x,), options=options)
    return Rewrite(canonical, tuple(parts), (to_batch, to_space, *(part.op for part in parts)))


@rule("PAD")
def explicit_padding(graph: Graph, pad: Operator) -> Rewrite | None:
    """Keras' ZeroPadding2D ahead of a VALID conv (written where the converter could not fold it into the
    conv): the conv padded by the PAD's amounts, SAME where they are TF's SAME padding at this input size,
    BOTTOM_RIGHT where a stride-2 conv pads as Keras' open-size MobileNetV2 pads at every size (the model's
    `strided_padding` "bottom_right"), else EXPLICIT (which the walk refuses)."""
    conv = graph.only_consumer(pad.outputs[0], "DEPTHWISE_CONV_2D") or graph.only_consumer(pad.outputs[0], "CONV_2D")
    amounts = graph.model.data(graph.model.tensors[pad.inputs[1]])
    if conv is None or conv.options["padding"] != "VALID" or amounts is None or amounts.shape != (4, 2):
        return None
    if amounts[0].any() or amounts[3].any():
        raise MappingError(f"op {pad.index} (PAD) pads the batch or channel axis; a conv's padding pads h and w")
    kernel = graph.model.tensors[conv.inputs[1]].shape[1:3]
    size = graph.model.tensors[pad.inputs[0]].shape[1:3]
    padding = tuple(tuple(int(a) for a in amounts[axis]) for axis in (1, 2))
    same = tuple(
        same_padding(size[axis], kernel[axis], conv.options[f"stride_{hw}"], conv.options[f"dilation_{hw}"])
        for axis, hw in enumerate("hw")
    )
    strided = all(conv.options[f"stride_{hw}"] == 2 and conv.options[f"dilation_{hw}"] == 1 for hw in "hw")
    bottom_right = tuple(bottom_right_padding(kernel[axis]) for axis in (0, 1))
    if padding == same:
        kind = "SAME"
    elif padding == bottom_right and strided:
        kind = BOTTOM_RIGHT
    else:
        kind = "EXPLICIT"
    options = {**conv.options, "padding": kind, "explicit_padding": padding}
    canonical = replace(conv, inputs=(pad.inputs[0], *conv.inputs[1:]), options=options)
    return Rewrite(canonical, graph.parts(conv), (pad, conv))


@rule("CONV_2D")
def pointwise_valid(graph: Graph, conv: Operator) -> Rewrite | None:
    """A 1x1 stride-1 VALID conv (Keras' default padding) pads nothing, as SAME does."""
    kernel = graph.model.tensors[conv.inputs[1]].shape[1:3]
    strides = (conv.options["stride_h"], conv.options["stride_w"])
    if conv.options["padding"] != "VALID" or tuple(kernel) != (1, 1) or strides != (1, 1):
        return None
    canonical = replace(conv, options={**conv.options, "padding": "SAME"})
    return Rewrite(canonical, graph.parts(conv), (conv,))


def separate_relu6(graph: Graph, conv: Operator) -> Rewrite | None:
    """A conv without activation followed by the ReLU6 as an op of its own (RELU6), or as a clamp (MINIMUM
    by 6 and MAXIMUM by 0, in either order): the conv with the ReLU6 fused, the clamp kept as its step."""
    if conv.options["activation"] is not None:
        return None
    x = conv.outputs[0]
    relu6 = graph.only_consumer(x, "RELU6")
    if relu6 is not None:
        last, replaced = relu6, (relu6,)
    else:
        first = graph.only_consumer(x, "MINIMUM") or graph.only_consumer(x, "MAXIMUM")
        second = first and graph.only_consumer(first.outputs[0], CLAMP_PAIR[first.op])
        if not (first and second and _clamps_at(graph, first, x) and _clamps_at(graph, second, first.outputs[0])):
            return None
        last, replaced = second, (first, second)
    options = {**conv.options, "activation": "relu6"}
    canonical = replace(conv, outputs=last.outputs, options=options)
    parts = (*graph.parts(conv), Part(RELU6_SUFFIX, last, last.outputs[0]))
    return Rewrite(canonical, parts, (conv, *replaced))


for _conv_type in ("CONV_2D", "DEPTHWISE_CONV_2D"):
    rule(_conv_type)(separate_relu6)


def _clamps_at(graph: Graph, op: Operator, x: int) -> bool:
    """Whether `op` (MINIMUM / MAXIMUM) takes `x` and the scalar constant its ReLU6 bound."""
    others = [tensor for tensor in op.inputs if tensor != x]
    if len(others) != 1:
        return False
    stored = graph.stored(others[0])
    values = graph.model.data(stored)
    if values is None or values.size != 1:
        return False
    quantization = stored.quantization
    bound = float(values.reshape(-1)[0])
    if quantization is not None and values.dtype != "float32":
        bound = float(quantization.scale[0]) * (bound - int(quantization.zero_point[0]))
    return abs(bound - CLAMP_BOUND[op.op]) <= 1e-6 + (float(quantization.scale[0]) if quantization else 0)
