"""Names of the files a folder converted from a quantized TFLite model or a quantization-aware checkpoint
carries (torch-free, so the converter can write them without importing torch); their content is described
in :mod:`mobilenet_torch.quantized` and :mod:`mobilenet_torch.fakequant`."""

QUANTIZATION_FILE = "quantization.json"
INTEGER_WEIGHTS_FILE = "quantized.safetensors"
QUANTIZATION_FORMAT = "mobilenet-convert/tflite-quantization/1"
#: A folder converted from a quantization-aware (tf.contrib.quantize) checkpoint: the fake-quant ranges,
#: described in :mod:`mobilenet_torch.fakequant`.
FAKE_QUANTIZATION_FILE = "fake_quantization.json"
FAKE_QUANTIZATION_FORMAT = "mobilenet-convert/fake-quantization/1"
