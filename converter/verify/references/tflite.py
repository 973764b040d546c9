"""A ``.tflite`` file's reference: TFLite's interpreter with its reference kernels and no delegates, every
intermediate tensor kept, endpoints read off the ops that the TFLite reader's walk names."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from converter.errors import VerificationError
from converter.formats.base import References
from converter.verify.references.base import (
    DEEPLAB_LOGITS_TENSOR,
    LOGITS_TENSOR,
    TFLITE,
    Backend,
    BaseReference,
    ReferenceInfo,
    ReferenceRequest,
)

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
            if name == LOGITS_TENSOR:
                value = value.reshape(len(images), -1)
            elif value.ndim == 2:  # Keras' global pool drops h and w (a MEAN without keep_dims); slim's keeps them
                value = value.reshape(len(images), 1, 1, -1)
            out[name] = value
        return out


def open_tflite(tf, source: References, request: ReferenceRequest) -> TFLiteReference:
    import warnings

    from converter.formats.tflite import TFLiteReader
    from converter.pipeline.table import endpoints_for

    path, tensors = source["tflite_file"], request.tensors
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
            model_path=str(path), num_threads=request.threads or 1, experimental_op_resolver_type=resolver,
            experimental_preserve_all_tensors=True,
        )  # fmt: skip
    interpreter.allocate_tensors()
    by_step = {step.name: step.output_tensor for step in reader.steps}
    found, missing = {}, {}
    for _, tensor, module in endpoints_for(request.kind):
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


BACKENDS = (
    Backend(
        TFLITE,
        "tflite_file",
        open_tflite,
        "the source is not a .tflite file",
        "the .tflite file, run by TensorFlow Lite's interpreter",
    ),
)
