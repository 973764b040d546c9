"""`conversion.json`: the typed record of what a conversion did. This module is its one owner: the
converter writes it through `ConversionRecord.write`, everything else reads it through `read`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from converter.output import layout


@dataclass
class ConversionRecord:
    toolkit: str  # "mobilenet-convert <version>" (what `--force` recognises as ours)
    source: dict[str, Any]  # name, format, files [{name, sha256, bytes}]
    variant: dict[str, Any]  # kind, depth, size, size_from, num_labels, output_stride, name
    weights: str  # the weights convention (ema, raw, ema-all, or "as exported" for single-valued sources)
    drop_background: bool = False
    tensors: dict[str, Any] = field(default_factory=dict)  # mapped, ignored by reason
    notes: list[str] = field(default_factory=list)  # facts about the source and the conversion
    placeholders: dict[str, str] | None = None  # tensors written only so that transformers loads the folder
    download: dict[str, Any] | None = None  # where a zoo source came from (source name, url, sha256)

    def to_json(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}

    def write(self, folder: Path) -> None:
        (folder / layout.CONVERSION).write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def read(cls, folder: Path) -> ConversionRecord | None:
        """The folder's record, or None where there is none (or it is not one of ours)."""
        try:
            data = json.loads((Path(folder) / layout.CONVERSION).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or not str(data.get("toolkit", "")).startswith(layout.TOOLKIT_PREFIX):
            return None
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{key: value for key, value in data.items() if key in known})
        except TypeError:
            return None
