"""Edits of .tflite files through TensorFlow's flatbuffer object model, for the tests: the forms a converter
may write for a dilated depthwise conv and its BatchNorm (``tests/test_tflite_forms.py``), the forms other
producers write for a conv's padding and ReLU6 (``tests/test_producers_tflite.py``), and the float
model a quantized file stands for (every constant dequantized, every activation float32), which the
interpreter then runs in float: the truth for a float model read from a quantized file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FORM_SEED = 2020
# The intermediate tensors a form adds span this many times the ReLU6 output's range on either side of 0.
INTERMEDIATE_RANGE = 4


def schema():
    from tensorflow.lite.python import schema_py_generated

    return schema_py_generated


class TFLiteEditor:
    """A .tflite as TensorFlow's flatbuffer object model, with the edits that make each form."""

    def __init__(self, data: bytes) -> None:
        self.model = schema().ModelT.InitFromPackedBuf(data, 0)
        self.graph = self.model.subgraphs[0]
        self.names = {code: name for name, code in vars(schema().BuiltinOperator).items() if not name.startswith("_")}
        self.rng = np.random.default_rng(FORM_SEED)

    def to_bytes(self) -> bytes:
        import flatbuffers

        builder = flatbuffers.Builder(0)
        builder.Finish(self.model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())

    def op_name(self, op) -> str:
        return self.names[self.model.operatorCodes[op.opcodeIndex].builtinCode]

    def consumer(self, tensor: int):
        found = [op for op in self.graph.operators if tensor in list(op.inputs)]
        return found[0] if len(found) == 1 else None

    def dilated_convs(self) -> list[tuple[object, object]]:
        """(DEPTHWISE_CONV_2D, BATCH_TO_SPACE_ND) of each space-to-batch conv."""
        chains = []
        for op in self.graph.operators:
            if self.op_name(op) == "SPACE_TO_BATCH_ND":
                conv = self.consumer(op.outputs[0])
                chains.append((conv, self.consumer(conv.outputs[0])))
        return chains

    # --- tensors ---

    def tensor(self, index: int):
        return self.graph.tensors[index]

    def values(self, index: int) -> np.ndarray:
        tensor = self.tensor(index)
        dtype = {schema().TensorType.INT8: "<i1", schema().TensorType.INT32: "<i4"}[tensor.type]
        return np.frombuffer(bytes(self.model.buffers[tensor.buffer].data), dtype=dtype).reshape(tensor.shape)

    def set_values(self, index: int, values: np.ndarray) -> None:
        """New data in a buffer of its own (the converter shares equal buffers between tensors)."""
        buffer = schema().BufferT()
        buffer.data = np.frombuffer(values.tobytes(), dtype=np.uint8)
        self.model.buffers.append(buffer)
        self.tensor(index).buffer = len(self.model.buffers) - 1

    def real(self, index: int) -> np.ndarray:
        values, quantization = self.values(index), self.tensor(index).quantization
        shape = [1] * values.ndim
        if len(quantization.scale) > 1:
            shape[quantization.quantizedDimension] = -1
        scale, zero_point = (np.asarray(v).reshape(shape) for v in (quantization.scale, quantization.zeroPoint))
        return scale * (values.astype(np.float64) - zero_point)

    def dequantize(self) -> None:
        """The float model the quantized file stands for: every quantized constant (weights, int32 biases,
        BatchNorm constants) replaced by its real values in float32, every activation float32. The op
        versions stay: each version's kernel also runs float."""
        types = schema().TensorType
        for index, tensor in enumerate(self.graph.tensors):
            if tensor.quantization is None or tensor.quantization.scale is None or len(tensor.quantization.scale) == 0:
                continue
            if self.model.buffers[tensor.buffer].data is not None and len(self.model.buffers[tensor.buffer].data):
                self.set_values(index, self.real(index).astype("<f4"))
            tensor.type, tensor.quantization = types.FLOAT32, None

    def set_quantization(self, index: int, scale, zero_point) -> None:
        quantization = self.tensor(index).quantization
        quantization.scale = [float(s) for s in np.atleast_1d(scale)]
        quantization.zeroPoint = [int(z) for z in np.atleast_1d(zero_point)]

    def new_tensor(self, like: int, name: str, values: np.ndarray | None = None, scale=None, zero_point=0) -> int:
        """An int8 tensor shaped as `like` (or as `values`, a constant), quantized per tensor."""
        tensor = schema().TensorT()
        source = self.tensor(like)
        tensor.shape = list(source.shape) if values is None else list(values.shape)
        tensor.type, tensor.name, tensor.buffer = schema().TensorType.INT8, name.encode(), 0
        tensor.quantization = schema().QuantizationParametersT()
        self.graph.tensors.append(tensor)
        index = len(self.graph.tensors) - 1
        self.set_quantization(index, scale, zero_point)
        if values is not None:
            self.set_values(index, values.astype("<i1"))
        return index

    def plain_tensor(self, shape, name: str, dtype: str, values: np.ndarray | None = None) -> int:
        """A float32 activation or an int32 / float32 constant (`values`), without quantization."""
        tensor = schema().TensorT()
        tensor.shape, tensor.name, tensor.buffer = list(shape), name.encode(), 0
        tensor.type = {"float32": schema().TensorType.FLOAT32, "int32": schema().TensorType.INT32}[dtype]
        self.graph.tensors.append(tensor)
        index = len(self.graph.tensors) - 1
        if values is not None:
            self.set_values(index, np.asarray(values, dtype={"float32": "<f4", "int32": "<i4"}[dtype]))
        return index

    def convs(self, *names: str) -> list:
        return [op for op in self.graph.operators if self.op_name(op) in names]

    # --- ops ---

    def new_op(self, name: str, inputs: list[int], output: int, relu6: bool, after):
        code = getattr(schema().BuiltinOperator, name)
        codes = [c.builtinCode for c in self.model.operatorCodes]
        if code not in codes:
            entry = schema().OperatorCodeT()
            entry.builtinCode, entry.deprecatedBuiltinCode, entry.version = code, min(code, 127), 2
            self.model.operatorCodes.append(entry)
            codes.append(code)
        op = schema().OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = codes.index(code), inputs, [output]
        if name in ("MUL", "ADD"):
            options = getattr(schema(), f"{name.title()}OptionsT")()
            options.fusedActivationFunction = self.activation(relu6)
            op.builtinOptionsType = getattr(schema().BuiltinOptions, f"{name.title()}Options")
            op.builtinOptions = options
        self.graph.operators.insert(self.graph.operators.index(after) + 1, op)
        return op

    @staticmethod
    def activation(relu6: bool) -> int:
        types = schema().ActivationFunctionType
        return types.RELU6 if relu6 else types.NONE

    # --- the forms ---

    def fold(self, conv, to_space) -> None:
        """The converter's BatchNorm ops and separate ReLU6 folded into the conv: y = conv * gamma + beta."""
        weight, bias = conv.inputs[1], conv.inputs[2]
        gamma, beta = np.ones(self.tensor(bias).shape), np.zeros(self.tensor(bias).shape)
        output, removed = to_space.outputs[0], []
        while (op := self.consumer(output)) is not None and self.op_name(op) in ("MUL", "ADD", "RELU6"):
            if self.op_name(op) != "RELU6":
                constant = next(t for t in op.inputs if t != output)
                values = self.real(constant).reshape(-1)
                gamma, beta = (gamma * values, beta * values) if self.op_name(op) == "MUL" else (gamma, beta + values)
            output = op.outputs[0]
            removed.append(op)
        assert (gamma > 0).all(), "a negative BatchNorm scale cannot fold into the weight scales"
        real_bias = self.real(bias) * gamma + beta
        weight_scale = np.asarray(self.tensor(weight).quantization.scale) * gamma
        self.set_quantization(weight, weight_scale, np.zeros(len(weight_scale)))
        self.set_bias(conv, real_bias, weight_scale)
        for op in removed:
            self.graph.operators.remove(op)
        final = self.tensor(output).quantization
        for tensor in (conv.outputs[0], to_space.outputs[0]):
            self.set_quantization(tensor, final.scale, final.zeroPoint)
        to_space.outputs = [output]
        conv.builtinOptions.fusedActivationFunction = self.activation(True)

    def set_bias(self, conv, real_bias: np.ndarray, weight_scale: np.ndarray) -> None:
        input_scale = self.tensor(conv.inputs[0]).quantization.scale[0]
        bias_scale = input_scale * weight_scale
        self.set_quantization(conv.inputs[2], bias_scale, np.zeros(len(bias_scale)))
        self.set_values(conv.inputs[2], np.round(real_bias / bias_scale).astype("<i4"))

    def make_form(self, conv, to_space, ops: tuple[str, ...], separate_relu6: bool) -> None:
        """A folded conv given `ops` (seeded per-channel constants that the conv's weights and bias give
        back) and its ReLU6 fused into the last op or as an op of its own."""
        if not ops and not separate_relu6:
            return
        weight, bias = conv.inputs[1], conv.inputs[2]
        channels = self.tensor(bias).shape[0]
        output = to_space.outputs[0]
        final = self.tensor(output).quantization
        wide = INTERMEDIATE_RANGE * final.scale[0]  # intermediates signed, around 0
        gamma, beta = np.ones(channels), np.zeros(channels)
        constants = {}
        if "MUL" in ops:
            gamma_scale = 2 / 127
            levels = self.rng.integers(64, 128, channels)  # gamma in [1, 2)
            gamma = levels * gamma_scale
            constants["MUL"] = self.new_tensor(bias, "form/gamma", levels, gamma_scale)
        if "ADD" in ops:
            real_bias = self.real(bias)
            beta_scale = float(np.abs(real_bias).max()) / 127
            levels = np.round(real_bias / beta_scale)
            beta = levels * beta_scale
            constants["ADD"] = self.new_tensor(bias, "form/beta", levels, beta_scale)
        # conv' = (conv - beta) / gamma, so that conv' * gamma + beta = conv.
        weight_scale = np.asarray(self.tensor(weight).quantization.scale) / gamma
        real_bias = (self.real(bias) - beta) / gamma
        self.set_quantization(weight, weight_scale, np.zeros(channels))
        self.set_bias(conv, real_bias, weight_scale)
        conv.builtinOptions.fusedActivationFunction = self.activation(False)
        x = self.new_tensor(output, "form/conv", scale=wide)
        for tensor in (conv.outputs[0], x):
            self.set_quantization(tensor, wide, 0)
        to_space.outputs = [x]
        previous = to_space
        steps = [*ops, "RELU6"] if separate_relu6 else list(ops)
        for i, name in enumerate(steps):
            last = i == len(steps) - 1
            y = output if last else self.new_tensor(output, f"form/{name.lower()}", scale=wide)
            inputs = [x] if name == "RELU6" else [x, constants[name]]
            previous = self.new_op(name, inputs, y, relu6=last and name != "RELU6", after=previous)
            x = y


def unfuse_relu6(editor: TFLiteEditor, conv, form: str, order: int = 0, widen: float = INTERMEDIATE_RANGE) -> None:
    """`conv`'s fused ReLU6 as an op of its own: ``"RELU6"``, or ``"clamp"`` (float models: MINIMUM by 6
    then MAXIMUM by 0, or the other way round for an odd `order`). An int8 conv's own output takes the
    ReLU6 output's scale times `widen`, around 0 (the RELU6 op rescales it)."""
    output = conv.outputs[0]
    quantized = (
        editor.tensor(output).quantization is not None and editor.tensor(output).type != schema().TensorType.FLOAT32
    )
    if quantized:
        x = editor.new_tensor(output, "unfused/conv", scale=widen * editor.tensor(output).quantization.scale[0])
    else:
        x = editor.plain_tensor(editor.tensor(output).shape, "unfused/conv", "float32")
    conv.outputs, previous = [x], conv
    conv.builtinOptions.fusedActivationFunction = editor.activation(False)
    if form == "RELU6":
        editor.new_op("RELU6", [x], output, relu6=False, after=conv)
        return
    bounds = [("MINIMUM", 6.0), ("MAXIMUM", 0.0)][:: -1 if order % 2 else 1]
    for i, (name, bound) in enumerate(bounds):
        constant = editor.plain_tensor([], f"unfused/{name.lower()}", "float32", np.float32(bound))
        y = (
            output
            if i == len(bounds) - 1
            else editor.plain_tensor(editor.tensor(output).shape, "unfused/min", "float32")
        )
        previous = editor.new_op(name, [x, constant], y, relu6=False, after=previous)
        x = y


def explicit_pad(editor: TFLiteEditor, conv, amounts: tuple[tuple[int, int], tuple[int, int]]) -> None:
    """A PAD by `amounts` ((top, bottom), (left, right)) ahead of `conv`, which then pads VALID (a float model)."""
    source = conv.inputs[0]
    shape = list(editor.tensor(source).shape)
    padded = [shape[0], shape[1] + sum(amounts[0]), shape[2] + sum(amounts[1]), shape[3]]
    paddings = editor.plain_tensor([4, 2], "explicit/paddings", "int32", [[0, 0], *amounts, [0, 0]])
    x = editor.plain_tensor(padded, "explicit/padded", "float32")
    pad = editor.new_op("PAD", [source, paddings], x, relu6=False, after=conv)
    editor.graph.operators.remove(pad)  # the PAD runs first
    editor.graph.operators.insert(editor.graph.operators.index(conv), pad)
    conv.inputs = [x, *list(conv.inputs)[1:]]
    conv.builtinOptions.padding = schema().Padding.VALID


def dequantized_copy(source: Path, path: Path) -> Path:
    """The float model that the quantized `source` stands for, written to `path`."""
    editor = TFLiteEditor(source.read_bytes())
    editor.dequantize()
    path.write_bytes(editor.to_bytes())
    return path


def form_copy(source: Path, path: Path, ops: tuple[str, ...], separate_relu6: bool) -> Path:
    """`source` with each dilated conv folded, then given `ops` and its ReLU6 fused or as an op of its own."""
    editor = TFLiteEditor(source.read_bytes())
    chains = editor.dilated_convs()
    assert chains, "the rebuilt DeepLab has no space-to-batch conv to edit"
    for conv, to_space in chains:
        editor.fold(conv, to_space)
    for conv, to_space in editor.dilated_convs():
        editor.make_form(conv, to_space, ops, separate_relu6)
    path.write_bytes(editor.to_bytes())
    return path
