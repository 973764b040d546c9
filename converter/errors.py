"""The one exception family of the toolkit.

Every failure the user can cause (bad paths, corrupted or hostile files, mismatched flags, an output
folder in the way) is raised as a subclass of :class:`ConverterError`. Each message says what was wrong
and what to do about it; the CLI prints it as a single line and exits with :attr:`exit_code`.
"""

from __future__ import annotations

# Raised by `from_pretrained`; defined there so that mobilenet_torch stays independent of the converter.
from mobilenet_torch.errors import ModelFolderError

#: The entry points, and how each spells the options a message names by placeholder (``{force}``).
COMMAND_LINE, PYTHON = "command line", "python"
OPTION_SPELLINGS = {
    "force": {COMMAND_LINE: "--force", PYTHON: "force=True"},
    "output": {COMMAND_LINE: "--output", PYTHON: "output"},
}


class ConverterError(Exception):
    """Base class: a problem with the user's input or environment, never a bug in the toolkit.

    A message names an option by placeholder (``pass {force}``): `str()` spells it as the Python API
    takes it (``force=True``), `worded(COMMAND_LINE)` as the command line does (``--force``)."""

    exit_code = 1

    def __str__(self) -> str:
        return self.worded(PYTHON)

    def worded(self, entry_point: str) -> str:
        """The message with each option spelt as `entry_point` (COMMAND_LINE or PYTHON) takes it."""
        message = super().__str__()
        for option, spellings in OPTION_SPELLINGS.items():
            message = message.replace(f"{{{option}}}", spellings[entry_point])
        return message


class UsageError(ConverterError):
    """Flags that contradict each other or cannot be satisfied (exit code 2, like click's usage errors)."""

    exit_code = 2


class SourceError(ConverterError):
    """The checkpoint source (prefix, folder or archive) cannot be found or is ambiguous."""


class UnsafeArchiveError(SourceError):
    """An archive member would escape the extraction folder, is a link or device, or is too large."""


class CheckpointFormatError(ConverterError):
    """The tensor bundle (.index / .data-*) is malformed, truncated or inconsistent."""


class TFLiteFormatError(ConverterError):
    """A .tflite flatbuffer is malformed or truncated, or its graph is not a MobileNetV2 this toolkit reads."""


class ChecksumError(CheckpointFormatError):
    """A block or tensor checksum does not match its bytes: the file is corrupted."""


class UnsupportedDTypeError(CheckpointFormatError):
    """A tensor uses a dtype this toolkit does not read."""


class KerasFileError(ConverterError):
    """A Keras file (.h5, .weights.h5, .keras, sharded .weights.json) is malformed, truncated, hostile, or
    does not hold a MobileNetV2."""


class KerasHeadError(KerasFileError):
    """A Keras model's head is not a short stack of Dense layers on globally averaged features whose
    activations are known; the backbone alone can still be converted."""


class NonFiniteWeightsError(ConverterError):
    """Model weights contain NaN or Inf."""


class VariantError(ConverterError):
    """The checkpoint is not a recognised MobileNetV2 variant, or contradicts --depth / --size."""


class WeightsConventionError(ConverterError):
    """The requested --weights convention cannot be applied to this checkpoint."""


class MappingError(ConverterError):
    """Checkpoint variables and model parameters do not correspond one to one."""


class OutputError(ConverterError):
    """The output folder cannot be written, or exists and `force` was not given."""


class VerificationError(ConverterError):
    """Parity cannot be checked: TensorFlow is missing, the reference graph is refused as unsafe or absent,
    or the model folder and checkpoint cannot be compared (exit code 2, unusable input; a parity failure
    is a result, exit code 1, not an error)."""

    exit_code = 2


class DownloadError(ConverterError):
    """A zoo tarball cannot be fetched (offline, not found, server errors, retries exhausted).

    `reason` is the failure in a few words, for a summary over several sources; `detail` holds one full
    line per source tried, which the CLI shows under --debug."""

    def __init__(self, message: str, *, reason: str | None = None, detail: tuple[str, ...] = ()):
        super().__init__(message)
        self.reason = reason or message
        self.detail = detail


class PublishError(ConverterError):
    """The converted folder cannot be uploaded to the Hugging Face Hub."""


class DataSetError(UsageError):
    """An evaluation data set that cannot be used: no images, class names the model does not know, a PASCAL
    VOC folder missing a part (exit code 2)."""


class ImageError(ConverterError):
    """An input image for prediction cannot be read."""


# Everything the CLI reports as one line instead of a traceback.
USER_ERRORS = (ConverterError, ModelFolderError)


def command_line_message(error: BaseException) -> str:
    """What the command line prints for a user error: its options spelt as flags."""
    return error.worded(COMMAND_LINE) if isinstance(error, ConverterError) else str(error)
