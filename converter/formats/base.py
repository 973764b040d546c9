"""The seam between input formats and the format-free pipeline.

A reader turns one kind of file (a TF checkpoint, a SavedModel, a Keras file, a TFLite flatbuffer, ...)
into tensors under their canonical slim names (``MobilenetV2/expanded_conv_3/expand/weights``, with the
slim layouts: conv ``[h, w, in, out]``, depthwise ``[h, w, in, 1]``). Everything downstream (weights
conventions, variant detection, the mapping table, the output folder) sees only this interface, so it
never branches on the format. A new format is one subclass of :class:`Reader`, registered in
:mod:`converter.formats` with its name, description and sniff (which import no reader).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converter.hashing import file_sha256


@dataclass(frozen=True)
class SourceFile:
    """One file the weights were read from, for provenance."""

    name: str
    sha256: str
    bytes: int


class References(Mapping[str, Path]):
    """Originals that the verifier can run on the same inputs, where the source carries them, under the
    name the reference backend that runs each asks for: ``checkpoint_prefix``, ``meta_graph`` (<prefix>.meta),
    ``frozen_graph``, ``saved_model``, ``keras_file``, ``tflite_file``. A new format names its own, so it
    adds nothing here."""

    def __init__(self, **originals: Path | None) -> None:
        self._originals = {name: path for name, path in originals.items() if path is not None}

    def __getitem__(self, name: str) -> Path:
        return self._originals[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._originals)

    def __len__(self) -> int:
        return len(self._originals)


@dataclass(frozen=True)
class Hints:
    """What the source says about the model beyond its tensor shapes (None: it does not say)."""

    image_size: int | None = None  # input size fixed by the source (a TFLite input, a Keras input_shape)
    output_stride: int | None = None  # a DeepLab graph's fixed output stride (a TFLite model's dilations)
    labels: tuple[str, ...] | None = None  # class names in the order of the head's outputs
    convention: str | None = None  # the weights convention of a single-valued export ("raw", ...)
    preprocessing: dict[str, Any] | None = None  # how inputs are scaled, when it differs from [-1, 1]
    # The activation ("relu", "linear") of each Dense layer a head has ahead of its classifier.
    hidden_activations: tuple[str, ...] = ()
    # How each stride-2 conv pads, where the source pads otherwise than TF's SAME (`MobileNetV2Config.strided_padding`).
    strided_padding: tuple[str, ...] | None = None
    notes: tuple[str, ...] = ()  # facts worth recording in conversion.json and the model card


class Reader(ABC):
    """Tensors of one source under canonical slim names.

    Readers are opened by :func:`converter.formats.open_reader`, which sniffs the format, unpacks
    archives safely, hashes the source files for provenance and closes the reader afterwards. A reader
    is constructed with the file or folder its format's sniff accepted (and the archive it came from).
    """

    def __init__(self, path: Path, archive: Path | None = None, *, backbone_only: bool = False) -> None:
        self.path = path  # the file or folder to read (inside a temporary folder when unpacked)
        self.archive = archive  # the archive `path` was unpacked from, if any
        # Only the backbone is wanted: a reader may then skip (and not refuse) a head it cannot map.
        self.backbone_only = backbone_only
        # What the registry noticed around `path` (the other formats of its folder or archive).
        self.registry_notes: tuple[str, ...] = ()
        # The sha256 of `archive`, computed by the registry while it unpacked it (None: not yet known).
        self.archive_sha256: str | None = None

    @property
    def format(self) -> str:
        """Its registry name, used by ``--format`` and recorded in conversion.json."""
        from converter.formats import format_of  # the registry imports this module

        return format_of(type(self)).name

    @abstractmethod
    def names(self) -> list[str]:
        """Every tensor, by canonical slim name (EMA shadows and optimizer slots included, if stored)."""

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of one tensor, without reading its values."""

    @abstractmethod
    def read(self, name: str) -> np.ndarray:
        """The values of one tensor (float32 for weights), in the slim layout."""

    @abstractmethod
    def source_files(self) -> list[Path]:
        """The files the weights are read from (hashed for provenance unless they came in an archive)."""

    @property
    def source_name(self) -> str:
        """The name recorded as the source (a zoo file name where the source is one)."""
        return (self.archive or self.path).name

    def provenance(self) -> list[SourceFile]:
        """What the weights came from: the archive as given, else the files read, each with its sha256."""
        if self.archive and self.archive_sha256:
            return [SourceFile(self.archive.name, self.archive_sha256, self.archive.stat().st_size)]
        paths = [self.archive] if self.archive else self.source_files()
        return [SourceFile(path.name, file_sha256(path), path.stat().st_size) for path in paths]

    @property
    def references(self) -> References:
        return References()

    @property
    def hints(self) -> Hints:
        return Hints()

    @property
    def notes(self) -> tuple[str, ...]:
        """The reader's own notes (`hints.notes`), then the registry's."""
        return (*self.hints.notes, *self.registry_notes)

    def extra_files(self, background: str | None = None) -> tuple[dict[str, bytes], list[str]]:
        """(files the output folder carries besides the float model, e.g. quantization parameters, and notes
        about them); `background` ("drop", "add" or None) is the edit the float model's head gets."""
        return {}, []

    def close(self) -> None:  # noqa: B027 (an optional hook: most readers hold nothing open)
        """Release open files; the registry calls it when the reader's context ends."""
