"""Names of the files a folder converted from a quantized TFLite model carries (torch-free, so the
converter can write them without importing torch); their content is described in
:mod:`mobilenet_torch.quantized`."""

QUANTIZATION_FILE = "quantization.json"
INTEGER_WEIGHTS_FILE = "quantized.safetensors"
QUANTIZATION_FORMAT = "mobilenet-convert/tflite-quantization/1"
