"""TensorFlow checkpoints (the slim zoo's and DeepLab's): a prefix, its .index or .data file, or a folder
holding one, read natively by :mod:`converter.formats.tf_bundle`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from converter.formats.base import Reader, References
from converter.formats.files import locate_checkpoint
from converter.formats.tf_bundle import TensorBundle


class CheckpointReader(Reader):
    def __init__(self, path: Path, archive: Path | None = None, *, backbone_only: bool = False) -> None:
        super().__init__(path, archive, backbone_only=backbone_only)
        self.location = locate_checkpoint(path, archive)
        self.bundle = TensorBundle(self.location.prefix)

    @property
    def source_name(self) -> str:
        return (self.archive or self.location.prefix).name

    def names(self) -> list[str]:
        return self.bundle.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.bundle.info(name).shape

    def read(self, name: str) -> np.ndarray:
        return self.bundle.read(name)

    def source_files(self) -> list[Path]:
        return list(self.location.files)

    @property
    def references(self) -> References:
        return References(
            checkpoint_prefix=self.location.prefix,
            meta_graph=self.location.meta_graph,
            frozen_graph=self.location.frozen_graph,
        )

    def close(self) -> None:
        self.bundle.close()
