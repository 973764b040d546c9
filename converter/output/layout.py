"""The names of everything this toolkit writes into an output folder, defined once.

`--force` may replace a folder only when it holds nothing but these (see `converter.output.writer`).
"""

from __future__ import annotations

from mobilenet_torch.configuration import CONFIG_NAME, WEIGHTS_NAME
from mobilenet_torch.quantized_files import FAKE_QUANTIZATION_FILE, INTEGER_WEIGHTS_FILE, QUANTIZATION_FILE

WEIGHTS = WEIGHTS_NAME
CONFIG = CONFIG_NAME
PREPROCESSOR = "preprocessor_config.json"
CONVERSION = "conversion.json"
CARD = "README.md"
EVALUATION = "eval.json"  # eval-mobilenet's results
ONNX = "model.onnx"
PARITY_FOLDER = "parity"
PARITY_REPORTS = ("parity.json", "parity.md", "parity.xml", "parity.png")
PARITY_JSON = f"{PARITY_FOLDER}/{PARITY_REPORTS[0]}"
PARITY_MD = f"{PARITY_FOLDER}/{PARITY_REPORTS[1]}"

#: Top-level files of a converted folder, and its one subfolder with the files it may hold.
FILES = frozenset({WEIGHTS, CONFIG, PREPROCESSOR, CONVERSION, CARD, ONNX, EVALUATION})
FILES |= {QUANTIZATION_FILE, INTEGER_WEIGHTS_FILE, FAKE_QUANTIZATION_FILE}  # quantized sources only
FOLDERS = {PARITY_FOLDER: frozenset(PARITY_REPORTS)}
TOOLKIT_PREFIX = "mobilenet-convert"
