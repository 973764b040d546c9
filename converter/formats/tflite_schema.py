"""A minimal, bounds-checked reader of the TFLite flatbuffer (the public ``schema.fbs``).

Only what MobileNetV2 models use is decoded: tensors (shape, type, buffer, name, quantization), the
operators of the first subgraph with the options of the ops these models hold, buffers and metadata.
Field numbers are those of ``schema.fbs`` (they never change: the schema only appends fields), and of
``metadata_schema.fbs`` for the label files that the model's metadata names.

Flatbuffer layout in brief: the file starts with a uoffset to the root table; a table starts with a
soffset back to its vtable, which lists the byte offset of each field inside the table (0: absent,
take the default); vectors and strings are a uint32 length followed by the elements; tables, vectors
and strings are reached through uoffsets relative to where the offset is stored. Every offset read
here is checked against the file length, so a truncated or hostile file raises
:class:`~converter.errors.TFLiteFormatError` instead of reading out of bounds.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from converter.errors import TFLiteFormatError
from converter.formats.sniffing import has_tflite_identifier

METADATA_IDENTIFIER = b"M001"  # of the ModelMetadata flatbuffer in the TFLITE_METADATA buffer
AXIS_LABELS = 2  # AssociatedFileType.TENSOR_AXIS_LABELS: one class name a line

# TensorType -> numpy dtype (the types MobileNetV2 models use).
TENSOR_TYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 7: "int16", 9: "int8"}

# BuiltinOperator codes of the ops these models hold.
BUILTIN_OPERATORS = {
    0: "ADD",
    1: "AVERAGE_POOL_2D",
    2: "CONCATENATION",
    3: "CONV_2D",
    4: "DEPTHWISE_CONV_2D",
    6: "DEQUANTIZE",
    9: "FULLY_CONNECTED",
    18: "MUL",
    21: "RELU6",
    22: "RESHAPE",
    23: "RESIZE_BILINEAR",
    25: "SOFTMAX",
    34: "PAD",
    37: "BATCH_TO_SPACE_ND",
    38: "SPACE_TO_BATCH_ND",
    40: "MEAN",
    43: "SQUEEZE",
    53: "CAST",
    55: "MAXIMUM",
    56: "ARG_MAX",
    57: "MINIMUM",
    114: "QUANTIZE",
}
# How many leading inputs each op must have (a conv's bias may be omitted, as -1): the reader indexes them.
REQUIRED_INPUTS = {
    "ADD": 2, "ARG_MAX": 2, "AVERAGE_POOL_2D": 1, "BATCH_TO_SPACE_ND": 3, "CAST": 1, "CONCATENATION": 1,
    "CONV_2D": 2, "DEPTHWISE_CONV_2D": 2, "DEQUANTIZE": 1, "FULLY_CONNECTED": 2, "MEAN": 2, "MUL": 2, "PAD": 2,
    "QUANTIZE": 1, "RELU6": 1, "RESHAPE": 1, "RESIZE_BILINEAR": 2, "SOFTMAX": 1, "SPACE_TO_BATCH_ND": 3,
    "SQUEEZE": 1,
}  # fmt: skip
# The rank of a conv's filter (input 1), which the reader reads its channels from.
FILTER_RANKS = {"CONV_2D": 4, "DEPTHWISE_CONV_2D": 4, "FULLY_CONNECTED": 2}
PADDINGS = {0: "SAME", 1: "VALID"}
ACTIVATIONS = {0: None, 1: "relu", 2: "relu_n1_to_1", 3: "relu6", 4: "tanh", 5: "sign_bit"}

# Options tables: op -> ((field number, option name, scalar kind, default), ...). Kinds: "b" int8,
# "B" bool, "i" int32, "f" float32; "padding" and "activation" are int8 enums decoded above.
OPTIONS: dict[str, tuple[tuple[int, str, str, Any], ...]] = {
    "CONV_2D": ((0, "padding", "b", 0), (1, "stride_w", "i", 0), (2, "stride_h", "i", 0),
                (3, "activation", "b", 0), (4, "dilation_w", "i", 1), (5, "dilation_h", "i", 1)),
    "DEPTHWISE_CONV_2D": ((0, "padding", "b", 0), (1, "stride_w", "i", 0), (2, "stride_h", "i", 0),
                          (3, "depth_multiplier", "i", 0), (4, "activation", "b", 0),
                          (5, "dilation_w", "i", 1), (6, "dilation_h", "i", 1)),
    "AVERAGE_POOL_2D": ((0, "padding", "b", 0), (1, "stride_w", "i", 0), (2, "stride_h", "i", 0),
                        (3, "filter_width", "i", 0), (4, "filter_height", "i", 0), (5, "activation", "b", 0)),
    "FULLY_CONNECTED": ((0, "activation", "b", 0), (2, "keep_num_dims", "B", False)),
    "ADD": ((0, "activation", "b", 0),),
    "MUL": ((0, "activation", "b", 0),),
    "CONCATENATION": ((0, "axis", "i", 0), (1, "activation", "b", 0)),
    "RESIZE_BILINEAR": ((2, "align_corners", "B", False), (3, "half_pixel_centers", "B", False)),
    "SOFTMAX": ((0, "beta", "f", 0.0),),
    "MEAN": ((0, "keep_dims", "B", False),),
}  # fmt: skip
_SCALARS = {"b": "<b", "B": "<?", "i": "<i", "I": "<I", "f": "<f", "q": "<q"}


@dataclass(frozen=True)
class Quantization:
    """real = scale * (q - zero_point), per tensor (one scale) or per channel along `axis`."""

    scale: np.ndarray  # float32
    zero_point: np.ndarray  # int64
    axis: int = 0


@dataclass(frozen=True)
class Tensor:
    index: int
    name: str
    shape: tuple[int, ...]
    dtype: str
    buffer: int
    quantization: Quantization | None


@dataclass(frozen=True)
class Operator:
    index: int
    op: str
    inputs: tuple[int, ...]  # tensor indices; -1 marks an omitted optional input
    outputs: tuple[int, ...]
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Model:
    tensors: list[Tensor]
    operators: list[Operator]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    buffers: list[bytes]
    metadata: dict[str, bytes]
    description: str

    def data(self, tensor: Tensor) -> np.ndarray | None:
        """A constant tensor's values (None for activations, whose buffer is empty)."""
        raw = self.buffers[tensor.buffer] if tensor.buffer < len(self.buffers) else b""
        if not raw:
            return None
        dtype = np.dtype(tensor.dtype).newbyteorder("<")
        count = math.prod(tensor.shape)  # Python integers: a damaged shape cannot overflow
        if len(raw) != count * dtype.itemsize:
            raise TFLiteFormatError(
                f"tensor {tensor.name!r}: its buffer holds {len(raw)} bytes, its shape {tensor.shape} needs "
                f"{count * dtype.itemsize}; the .tflite file is corrupted"
            )
        return np.frombuffer(raw, dtype=dtype).reshape(tensor.shape).astype(dtype.newbyteorder("="))


class _Buffer:
    """Bounds-checked little-endian reads from the flatbuffer bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def scalar(self, fmt: str, pos: int):
        size = struct.calcsize(fmt)
        if pos < 0 or pos + size > len(self.data):
            raise TFLiteFormatError(f"an offset points outside the file (byte {pos} of {len(self.data)}): truncated?")
        return struct.unpack_from(fmt, self.data, pos)[0]

    def indirect(self, pos: int) -> int:
        return pos + self.scalar("<I", pos)


class _Table:
    def __init__(self, buf: _Buffer, pos: int) -> None:
        self.buf, self.pos = buf, pos
        self.vtable = pos - buf.scalar("<i", pos)
        self.vtable_size = buf.scalar("<H", self.vtable)

    def _field(self, number: int) -> int | None:
        entry = 4 + 2 * number
        if entry >= self.vtable_size:
            return None
        offset = self.buf.scalar("<H", self.vtable + entry)
        return self.pos + offset if offset else None

    def scalar(self, number: int, kind: str, default: Any = 0) -> Any:
        pos = self._field(number)
        return default if pos is None else self.buf.scalar(_SCALARS[kind], pos)

    def table(self, number: int) -> _Table | None:
        pos = self._field(number)
        return None if pos is None else _Table(self.buf, self.buf.indirect(pos))

    def _vector(self, number: int) -> tuple[int, int] | None:
        pos = self._field(number)
        if pos is None:
            return None
        start = self.buf.indirect(pos)
        length = self.buf.scalar("<I", start)
        return start + 4, length

    def bytes(self, number: int) -> bytes:
        vector = self._vector(number)
        if vector is None:
            return b""
        start, length = vector
        if start + length > len(self.buf.data):
            raise TFLiteFormatError(f"a vector of {length} bytes runs past the end of the file: truncated?")
        return self.buf.data[start : start + length]

    def string(self, number: int) -> str:
        return self.bytes(number).decode("utf-8", errors="replace")

    def numbers(self, number: int, fmt: str) -> np.ndarray:
        vector = self._vector(number)
        if vector is None:
            return np.zeros(0, dtype=np.dtype(fmt))
        start, length = vector
        dtype = np.dtype(fmt)
        if start + length * dtype.itemsize > len(self.buf.data):
            raise TFLiteFormatError(f"a vector of {length} numbers runs past the end of the file: truncated?")
        return np.frombuffer(self.buf.data, dtype=dtype, count=length, offset=start).astype(dtype.newbyteorder("="))

    def tables(self, number: int) -> list[_Table]:
        vector = self._vector(number)
        if vector is None:
            return []
        start, length = vector
        if start + 4 * length > len(self.buf.data):
            raise TFLiteFormatError(f"a vector of {length} tables runs past the end of the file: truncated?")
        return [_Table(self.buf, self.buf.indirect(start + 4 * i)) for i in range(length)]


def parse_model(data: bytes) -> Model:
    """Decode the first subgraph of a .tflite file."""
    if not has_tflite_identifier(data):
        raise TFLiteFormatError("not a TFLite model: the file identifier 'TFL3' is missing at bytes 4..8")
    return _parse(_Buffer(data))


def _parse(buf: _Buffer) -> Model:
    root = _Table(buf, buf.indirect(0))
    codes = [_operator_name(code) for code in root.tables(1)]
    subgraphs = root.tables(2)
    if len(subgraphs) != 1:
        raise TFLiteFormatError(f"expected one subgraph, found {len(subgraphs)}: not a MobileNetV2 export")
    buffers = [_buffer_bytes(buf, table) for table in root.tables(4)]
    metadata = {}
    for table in root.tables(6):
        index = table.scalar(1, "I")
        metadata[table.string(0)] = buffers[index] if index < len(buffers) else b""
    graph = subgraphs[0]
    tensors = [_tensor(i, table) for i, table in enumerate(graph.tables(0))]
    operators = []
    for i, table in enumerate(graph.tables(3)):
        code = table.scalar(0, "I")
        if code >= len(codes):
            raise TFLiteFormatError(f"operator {i} names operator code {code} of {len(codes)}: corrupted file")
        operators.append(_operator(i, codes[code], table, len(tensors)))
    _check_execution_order(operators)
    for op in operators:
        if op.op in FILTER_RANKS and len(tensors[op.inputs[1]].shape) != FILTER_RANKS[op.op]:
            raise TFLiteFormatError(
                f"operator {op.index} ({op.op}) has a filter of shape {tensors[op.inputs[1]].shape}; it takes "
                f"{FILTER_RANKS[op.op]} dimensions: corrupted file"
            )
    inputs, outputs = (tuple(int(t) for t in graph.numbers(n, "<i4")) for n in (1, 2))
    for index in inputs + outputs:
        if not 0 <= index < len(tensors):
            raise TFLiteFormatError(f"the graph names tensor {index} of {len(tensors)}: corrupted file")
    return Model(tensors, operators, inputs, outputs, buffers, metadata, root.string(3))


def label_file_names(metadata: bytes) -> tuple[str, ...]:
    """The label files (``TENSOR_AXIS_LABELS``) that a model's ``TFLITE_METADATA`` buffer names, for the
    model, its subgraphs or their output tensors (``metadata_schema.fbs``)."""
    if len(metadata) < 8 or metadata[4:8] != METADATA_IDENTIFIER:
        raise TFLiteFormatError("its TFLITE_METADATA buffer lacks the identifier 'M001'")
    buf = _Buffer(metadata)
    root = _Table(buf, buf.indirect(0))
    files = root.tables(6)
    for subgraph in root.tables(3):
        files += subgraph.tables(4)
        for tensor in subgraph.tables(3):
            files += tensor.tables(6)
    return tuple(file.string(0) for file in files if file.scalar(2, "b") == AXIS_LABELS)


def _check_execution_order(operators: list[Operator]) -> None:
    """TFLite stores operators in execution order, each tensor written by one op: an op that reads a
    tensor written later (or by itself) makes the graph cyclic, and following it would never end."""
    writers: dict[int, int] = {}
    for op in operators:
        for tensor in op.outputs:
            if tensor in writers:
                raise TFLiteFormatError(
                    f"tensor {tensor} is written by operators {writers[tensor]} and {op.index}: corrupted file"
                )
            writers[tensor] = op.index
    for op in operators:
        for tensor in op.inputs:
            if writers.get(tensor, -1) >= op.index:
                raise TFLiteFormatError(
                    f"operator {op.index} ({op.op}) reads tensor {tensor}, which operator {writers[tensor]} "
                    "writes only later: corrupted file"
                )


def _operator_name(code: _Table) -> str:
    number = max(code.scalar(0, "b"), code.scalar(3, "i"))
    return BUILTIN_OPERATORS.get(number, "CUSTOM" if number == 32 else f"BUILTIN_{number}")


def _buffer_bytes(buf: _Buffer, table: _Table) -> bytes:
    offset, size = table.scalar(1, "q"), table.scalar(2, "q")
    if offset > 1:  # models over 2 GB keep their data after the flatbuffer, addressed from the file start
        if offset + size > len(buf.data):
            raise TFLiteFormatError("a buffer runs past the end of the file: truncated?")
        return buf.data[offset : offset + size]
    return table.bytes(0)


def _tensor(index: int, table: _Table) -> Tensor:
    code = table.scalar(1, "b")
    if code not in TENSOR_TYPES:
        raise TFLiteFormatError(f"tensor {index} has TFLite type {code}, which MobileNetV2 models never use")
    quantization = None
    params = table.table(4)
    if params is not None:
        scale = params.numbers(2, "<f4")
        zero_point = params.numbers(3, "<i8")
        if len(scale):
            if len(zero_point) not in (0, len(scale)):
                raise TFLiteFormatError(f"tensor {index}: {len(scale)} scales but {len(zero_point)} zero points")
            zero_point = zero_point if len(zero_point) else np.zeros(len(scale), dtype=np.int64)
            quantization = Quantization(scale, zero_point, params.scalar(6, "i"))
    shape = tuple(int(s) for s in table.numbers(0, "<i4"))
    if min(shape, default=0) < 0:
        raise TFLiteFormatError(f"tensor {index} has the shape {shape}: corrupted file")
    return Tensor(index, table.string(3), shape, TENSOR_TYPES[code], table.scalar(2, "I"), quantization)


def _operator(index: int, op: str, table: _Table, tensor_count: int) -> Operator:
    inputs = tuple(int(t) for t in table.numbers(1, "<i4"))
    outputs = tuple(int(t) for t in table.numbers(2, "<i4"))
    if not outputs or min(outputs) < 0:
        raise TFLiteFormatError(f"operator {index} ({op}) has no output tensor: corrupted file")
    required = REQUIRED_INPUTS.get(op, 0)
    if len(inputs) < required or min(inputs[:required], default=0) < 0:
        raise TFLiteFormatError(f"operator {index} ({op}) has inputs {inputs}; it takes {required}: corrupted file")
    for tensor in inputs + outputs:
        if not -1 <= tensor < tensor_count:
            raise TFLiteFormatError(f"operator {index} ({op}) names tensor {tensor} of {tensor_count}: corrupted file")
    options: dict[str, Any] = {}
    spec = OPTIONS.get(op)
    table_options = table.table(4) if spec else None
    for number, name, kind, default in spec or ():
        value = table_options.scalar(number, kind, default) if table_options is not None else default
        if name == "padding":
            value = PADDINGS.get(value, f"padding {value}")
        elif name == "activation":
            value = ACTIVATIONS.get(value, f"activation {value}")
        options[name] = value
    return Operator(index, op, inputs, outputs, options)
