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
    drop_background: bool = False  # the 1001-class head was written without its background class
    add_background: bool = False  # a 1000-class head was given a background class at index 0
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
        return cls.from_json(data)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ConversionRecord | None:
        """The record `data` (what `to_json` gave) holds, or None where it lacks a field the record needs."""
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{key: value for key, value in data.items() if key in known})
        except TypeError:
            return None


@dataclass
class ParityRecord:
    """`parity/parity.json`: the verdict of the verifier (`converter.verify`), the source of truth of every
    parity report. The verifier writes it through `write`; the model card and `--all` read it through `read`.
    The fields below are what those readers use; `detail` keeps everything else the verifier records
    (inputs, per-input rows, reference, notes, versions)."""

    passed: bool
    max_abs_diff: float | None  # worst over the compared endpoints and inputs
    tolerance: str  # the rule the verdict was taken with
    first_divergence: dict[str, Any] | None  # the first endpoint, in network order, that fails
    endpoints: list[dict[str, Any]]  # one summary per endpoint: endpoint, max_abs_diff, tolerance, passed, ...
    detail: dict[str, Any] = field(default_factory=dict)

    def endpoint(self, name: str) -> dict[str, Any] | None:
        return next((row for row in self.endpoints if row.get("endpoint") == name), None)

    def to_json(self) -> dict[str, Any]:
        summary = {key: getattr(self, key) for key in ("passed", "max_abs_diff", "tolerance", "first_divergence")}
        return {**summary, "verdict": "PASS" if self.passed else "FAIL", **self.detail, "endpoints": self.endpoints}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ParityRecord:
        typed = {f.name for f in fields(cls)} - {"detail"}
        detail = {key: value for key, value in data.items() if key not in typed | {"verdict"}}
        return cls(
            passed=bool(data.get("passed")),
            max_abs_diff=data.get("max_abs_diff"),
            tolerance=str(data.get("tolerance", "")),
            first_divergence=data.get("first_divergence"),
            endpoints=list(data.get("endpoints") or []),
            detail=detail,
        )

    def write(self, report_dir: Path) -> Path:
        path = Path(report_dir) / layout.PARITY_REPORTS[0]
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, report_dir: Path) -> ParityRecord | None:
        """The record in `report_dir` (a model's `parity/` folder), or None where there is none."""
        try:
            data = json.loads((Path(report_dir) / layout.PARITY_REPORTS[0]).read_text())
        except (OSError, ValueError):
            return None
        return cls.from_json(data) if isinstance(data, dict) else None
