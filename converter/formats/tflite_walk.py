"""The topology walk of a TFLite MobileNetV2: from the input, each op is named by its place in the network.

Tensor names differ between converters, so ops are matched to slim scopes by the data flow alone: each
conv must consume the previous layer's output, and its kind, padding and activation are checked here
(strides, dilations and channels by the reader against the variant). The walk sees the graph in canonical
form (:mod:`converter.formats.tflite_graph`). Its result is the list of `Step`s in network order, each
under the name the emulator (:mod:`mobilenet_torch.quantized`) knows it by, and the model kind, decided
from the topology (a global pool beside the backbone's output is DeepLab's ASPP).
"""

from __future__ import annotations

from dataclasses import dataclass

from converter.errors import MappingError, TFLiteFormatError
from converter.formats.tflite_graph import BOTTOM_RIGHT, Graph
from converter.formats.tflite_schema import Model, Operator
from converter.slim import HEADS, HIDDEN_HEAD_WEIGHTS, HIDDEN_HEADS, MAX_HEAD_LAYERS, NUM_BLOCKS, conv_layers
from converter.vocabulary import CLASSIFICATION, DEEPLAB
from mobilenet_torch.configuration import BOTTOM_RIGHT_PADDING, SAME_PADDING

POOL_OPS = ("AVERAGE_POOL_2D", "MEAN")
KINDS = (CLASSIFICATION, DEEPLAB)
# What the graph returns, as the conversion notes say it.
OUTPUT_FORMS = {
    "softmax": "class probabilities (SOFTMAX)",
    "logits": "logits",
    "logits resized": "logits resized to the input (RESIZE_BILINEAR)",
    "labels": "per-pixel labels (ARG_MAX)",
}
# Classifier scope -> PyTorch module, from the mapping table's heads.
HEAD_MODULES = {
    tf.rsplit("/", 1)[0]: pt.removesuffix(".weight").removesuffix(".convolution")
    for tf, pt, _, _ in HEADS
    if tf.endswith("/weights")
}
# A hidden Dense layer's scope ("{j}" its place in the head), and the activations it may have: TFLite's fused
# ones -> the config's names (`MobileNetV2Config.classifier_layers`).
HIDDEN_SCOPE = HIDDEN_HEADS[0][0].rsplit("/", 1)[0]
DENSE_ACTIVATIONS = {"relu": "relu", None: "linear"}


@dataclass
class Step:
    """One op of the integer graph in network order, under the name the emulator knows it by."""

    name: str  # the PyTorch module path for convs, else a step name (``mobilenet_v2.layer.3.add``, ...)
    op: Operator
    scope: str | None = None  # the slim scope of a conv
    output: int | None = None  # the step's output tensor, where it is not the op's (a space-to-batch conv)
    dilation: int | None = None  # a dilation the op does not carry itself (a space-to-batch conv)
    constant: int | None = None  # the constant operand of a per-channel MUL / ADD (an unfolded BatchNorm)
    padding: str = SAME_PADDING  # a conv's padding rule, as the model's config names it (`strided_padding`)

    @property
    def output_tensor(self) -> int:
        return self.op.outputs[0] if self.output is None else self.output

    @property
    def stride_dilation(self) -> tuple[int, int]:
        options = self.op.options
        if options["stride_h"] != options["stride_w"] or options["dilation_h"] != options["dilation_w"]:
            raise MappingError(f"{self.scope}: op {self.op.index} has different strides or dilations along h and w")
        return options["stride_h"], self.dilation or options["dilation_h"]


class Walk:
    """Follow the data flow from the input and name every op by its place in MobileNetV2."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.graph = Graph(model)
        self.consumers = self.graph.consumers
        self.stored = self.graph.stored
        self.steps: list[Step] = []
        self.output_form = ""
        self.hidden_activations: list[str] = []  # of the head's Dense layers ahead of the classifier

    def run(self) -> tuple[list[Step], str]:
        if len(self.model.inputs) != 1 or len(self.model.outputs) != 1:
            raise TFLiteFormatError(
                f"the graph has {len(self.model.inputs)} inputs and {len(self.model.outputs)} outputs; "
                "a MobileNetV2 export has one image input and one output"
            )
        x = self.model.inputs[0]
        quantize = self._optional(x, ("QUANTIZE",))
        if quantize is not None:
            self.steps.append(Step("input", quantize))
            x = quantize.outputs[0]
        # The backbone's modules are those of either kind; the head decides the kind.
        self.modules = {scope: module for kind in KINDS for scope, module, _, _ in conv_layers(kind)}
        x = self._conv(x, "MobilenetV2/Conv", "CONV_2D", "relu6")
        x = self._block(x, "MobilenetV2/expanded_conv", "mobilenet_v2.conv_stem", expand=False)
        for k in range(1, NUM_BLOCKS + 1):
            x = self._block(x, f"MobilenetV2/expanded_conv_{k}", f"mobilenet_v2.layer.{k - 1}", expand=True)
        # DeepLab's ASPP pools the features globally beside its 1x1 branch; a classifier runs its final conv.
        kind = DEEPLAB if self._optional(x, POOL_OPS) is not None else CLASSIFICATION
        if kind == CLASSIFICATION:
            self._classification_head(x)
        else:
            self._deeplab_head(x)
        return self.steps, kind

    def _block(self, x: int, scope: str, module: str, expand: bool) -> int:
        block_input = x
        if expand:
            x = self._conv(x, f"{scope}/expand", "CONV_2D", "relu6")
        x = self._conv(x, f"{scope}/depthwise", "DEPTHWISE_CONV_2D", "relu6")
        x = self._conv(x, f"{scope}/project", "CONV_2D", None)
        # The residual joins this projection and the block's input (the next block's ADD takes it too).
        adds = [op for op in self.consumers.get(x, []) if op.op == "ADD" and block_input in op.inputs]
        if not adds:
            return x
        add = adds[0]
        if sorted(add.inputs) != sorted((block_input, x)) or add.options["activation"] is not None:
            raise MappingError(f"op {add.index} (ADD) after {scope}/project does not add the block's input to it")
        self.steps.append(Step(f"{module}.add", add))
        return add.outputs[0]

    def _classification_head(self, x: int) -> None:
        x = self._conv(x, "MobilenetV2/Conv_1", "CONV_2D", "relu6")
        x = self._pool(x, "mobilenet_v2.pool")
        # A Keras head's Dense layers: every FULLY_CONNECTED that feeds another is a hidden layer (ReLU or
        # linear); the last one is the classifier. Dropout leaves nothing in the graph.
        while (dense := self._optional(x, ("FULLY_CONNECTED",))) is not None and self._optional(
            dense.outputs[0], ("FULLY_CONNECTED",)
        ):
            j = len(self.hidden_activations)
            if j + 1 >= MAX_HEAD_LAYERS:
                raise MappingError(
                    f"op {dense.index}: the head has more than {MAX_HEAD_LAYERS} Dense layers (FULLY_CONNECTED ops); "
                    "a MobileNetV2 classifier has a short stack of them"
                )
            x = self._conv(x, HIDDEN_SCOPE.format(j=j), "FULLY_CONNECTED", tuple(DENSE_ACTIVATIONS))
            self.hidden_activations.append(DENSE_ACTIVATIONS[dense.options["activation"]])
        x = self._conv(x, "MobilenetV2/Logits/Conv2d_1c_1x1", ("CONV_2D", "FULLY_CONNECTED"), None)
        # Then squeezes and reshapes (no arithmetic) around an optional softmax, which is an output detail.
        reshapes = 0
        while (op := self._optional(x, ("RESHAPE", "SQUEEZE", "SOFTMAX"))) is not None:
            if op.op == "SOFTMAX" and any(step.name == "softmax" for step in self.steps):
                raise MappingError(f"op {op.index}: a second SOFTMAX after the logits")
            self.steps.append(Step("softmax" if op.op == "SOFTMAX" else f"reshape.{reshapes}", op))
            reshapes += op.op != "SOFTMAX"
            x = op.outputs[0]
        self.output_form = OUTPUT_FORMS["softmax" if any(step.name == "softmax" for step in self.steps) else "logits"]
        self._end(x)

    def _deeplab_head(self, features: int) -> None:
        pooled = self._pool(features, "segmentation_head.pool")
        x = self._conv(pooled, "image_pooling", "CONV_2D", "relu")
        x = self._next(x, ("RESIZE_BILINEAR",), "segmentation_head.pool_resize")
        requantize = self._optional(x, ("QUANTIZE",))
        if requantize is not None:
            self.steps.append(Step("segmentation_head.pool_requantize", requantize))
            x = requantize.outputs[0]
        aspp = self._conv(features, "aspp0", "CONV_2D", "relu")
        concat = self._next(x, ("CONCATENATION",), "segmentation_head.concat")
        concat_op = self.steps[-1].op
        if concat_op.inputs != (x, aspp) or concat_op.options["axis"] not in (3, -1):
            raise MappingError("the DeepLab head does not concatenate [image_pooling, aspp0] along channels")
        x = self._conv(concat, "concat_projection", "CONV_2D", "relu")
        x = self._conv(x, "logits/semantic", "CONV_2D", None)
        resizes = 0
        while (op := self._optional(x, ("RESIZE_BILINEAR",))) is not None:
            self.steps.append(Step(f"segmentation_head.logits_resize.{resizes}", op))
            x, resizes = op.outputs[0], resizes + 1
        # The output form is recorded, never used to decide the kind.
        form = "logits resized" if resizes else "logits"
        if self._optional(x, ("ARG_MAX",)) is not None:
            x, form = self._next(x, ("ARG_MAX",), "labels"), "labels"
        self.output_form = OUTPUT_FORMS[form]
        self._end(x)

    def _pool(self, x: int, name: str) -> int:
        """A global pool: an AVERAGE_POOL_2D whose window is the whole map, or a MEAN over h and w."""
        pooled = self._next(x, POOL_OPS, name)
        op, shape = self.steps[-1].op, self.model.tensors[x].shape
        if op.op == "AVERAGE_POOL_2D":
            is_global = (op.options["filter_height"], op.options["filter_width"]) == tuple(shape[1:3])
        else:  # the classifier's may drop h and w (Keras' GlobalAveragePooling2D)
            axes = self.model.data(self.model.tensors[op.inputs[1]])
            keeps = op.options["keep_dims"] or name == "mobilenet_v2.pool"
            is_global = axes is not None and sorted(axes.reshape(-1).tolist()) == [1, 2] and keeps
        if not is_global:
            raise MappingError(f"op {op.index} ({op.op}) for {name} does not pool the whole {shape[1:3]} map")
        return pooled

    def _next(self, x: int, ops: tuple[str, ...], name: str) -> int:
        op = self._optional(x, ops)
        if op is None:
            found = sorted(c.op for c in self.consumers.get(x, []))
            raise MappingError(f"expected {' or '.join(ops)} for {name} after tensor {x}, found {found}")
        self.steps.append(Step(name, op))
        return op.outputs[0]

    def _optional(self, x: int, ops: tuple[str, ...]) -> Operator | None:
        found = [op for op in self.consumers.get(x, []) if op.op in ops]
        if len(found) > 1:
            raise MappingError(f"tensor {x} feeds {len(found)} {'/'.join(ops)} ops; expected one")
        return found[0] if found else None

    def _conv(
        self, x: int, scope: str, ops: str | tuple[str, ...], activation: str | None | tuple[str | None, ...]
    ) -> int:
        """The one conv of `ops` after `x`, named `scope`; `activation` is its fused one, or those it may have."""
        ops = (ops,) if isinstance(ops, str) else ops
        candidates = [op for op in self.consumers.get(x, []) if op.op in ops]
        if len(candidates) != 1:
            found = sorted(c.op for c in self.consumers.get(x, []))
            raise MappingError(f"expected one {' or '.join(ops)} for {scope} after tensor {x}, found {found}")
        op = candidates[0]
        if (len(op.inputs) < 3 or op.inputs[2] < 0) and op.op != "FULLY_CONNECTED":
            raise MappingError(f"{scope}: op {op.index} ({op.op}) has no bias; TFLite folds BatchNorm into one")
        padding = op.options.get("padding", "SAME")
        if padding == "EXPLICIT":
            size = self.model.tensors[op.inputs[0]].shape[1:3]
            raise MappingError(
                f"{scope}: op {op.index} pads {op.options['explicit_padding']} (h, w: before, after) at size "
                f"{tuple(size)}, which is neither TF's SAME padding there nor Keras' (0, 1) of a stride-2 conv"
            )
        if padding not in ("SAME", BOTTOM_RIGHT):
            raise MappingError(f"{scope}: op {op.index} uses {padding} padding; MobileNetV2 uses SAME")
        allowed = activation if isinstance(activation, tuple) else (activation,)
        if op.options.get("activation") not in allowed:
            expected = " or ".join(str(a) for a in allowed)
            raise MappingError(
                f"{scope}: op {op.index} ({op.op}) has activation {op.options.get('activation')}, expected {expected}"
            )
        weight = self.model.tensors[op.inputs[1]]
        bias_shape = self.model.tensors[op.inputs[2]].shape if has_bias(op) else None
        rank = 2 if op.op == "FULLY_CONNECTED" else 4
        out_channels = weight.shape[-1] if op.op == "DEPTHWISE_CONV_2D" else (weight.shape or (0,))[0]
        if len(weight.shape) != rank or bias_shape not in (None, (out_channels,)):
            raise TFLiteFormatError(f"{scope}: op {op.index} has weights {weight.shape} and bias {bias_shape}")
        if op.op == "DEPTHWISE_CONV_2D" and self.model.tensors[op.inputs[1]].shape[0] != 1:
            raise MappingError(f"{scope}: a depthwise conv with a channel multiplier; MobileNetV2 uses 1")
        module = self.modules.get(scope) or HEAD_MODULES.get(scope) or hidden_module(scope)
        if module is None:
            raise MappingError(f"{scope} has no place in the model table")
        conv, *after = self.graph.parts(op)
        output = None if conv.output == conv.op.outputs[0] else conv.output  # Step.output: only where it differs
        rule = BOTTOM_RIGHT_PADDING if padding == BOTTOM_RIGHT else SAME_PADDING
        self.steps.append(Step(module, conv.op, scope, output=output, dilation=conv.dilation, padding=rule))
        self.steps += [Step(f"{module}.{part.suffix}", part.op, constant=part.constant) for part in after]
        return op.outputs[0]

    def _end(self, x: int) -> None:
        while (op := self._optional(x, ("DEQUANTIZE", "CAST"))) is not None:
            self.steps.append(Step("output" if op.op == "DEQUANTIZE" else "cast", op))
            x = op.outputs[0]
        if x != self.model.outputs[0]:
            raise MappingError(f"the walk ended at tensor {x}, but the graph's output is {self.model.outputs[0]}")


def has_bias(op: Operator) -> bool:
    """Whether a conv has a bias operand (a Dense layer's all-zero bias the converter leaves out)."""
    return len(op.inputs) > 2 and op.inputs[2] >= 0


def hidden_module(scope: str) -> str | None:
    """The PyTorch module of a hidden Dense layer's scope (`converter.slim.HIDDEN_HEADS`), None for another scope."""
    match = HIDDEN_HEAD_WEIGHTS.match(f"{scope}/weights")
    return HIDDEN_HEADS[0][1].format(j=match[1]).removesuffix(".weight") if match else None
