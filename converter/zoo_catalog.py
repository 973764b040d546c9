"""The original MobileNetV2 model zoo as data (`converter/data/zoo.json`): names, tarball URLs, published
figures, the places each model can still be downloaded from. The zoo package downloads from them; the model
card reads the published figures."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from converter import data
from converter.vocabulary import CLASSIFICATION, DEEPLAB, folder_name

MODELS = ("mobilenet_v2", "deeplabv3")
DEEPLAB_CROP = 513  # the zoo's DeepLab models are not per size; their frozen graphs use a 513 crop


OFFICIAL_SOURCE = "official"
SOURCE_ENV_PREFIX = "MOBILENET_CONVERT_SOURCE_"


@dataclass(frozen=True)
class ZooSource:
    """One place a zoo model can be downloaded from (what `converter.zoo.download` fetches)."""

    name: str  # "official" (the tarball the authors published), "tfhub", "tflite-hosted", ...
    url: str
    filename: str  # its name in the cache and on a --mirror
    holds: str  # what the download contains
    bytes: int | None = None
    sha256: str | None = None
    format: str | None = None  # the format converted from a download holding several (None: the registry's order)


def source_base_env(source: str) -> str:
    """The environment variable that overrides a source's base URL, e.g. MOBILENET_CONVERT_SOURCE_TFHUB."""
    return SOURCE_ENV_PREFIX + source.upper().replace("-", "_")


@dataclass(frozen=True)
class ZooEntry:
    """One model of the zoo. `bytes`/`sha256` are None where the real file's are not recorded."""

    name: str
    model: str  # "mobilenet_v2" (slim ImageNet) or "deeplabv3" (PASCAL VOC)
    depth: float
    url: str | None  # the official tarball; None where none was published
    size: int | None = None  # None for DeepLab
    trainval: bool = False
    quantized: bool = False  # the quantized form of the model (its integer TFLite export, QAT checkpoint)
    output_stride: int | None = None  # a DeepLab graph's fixed output stride, where it has one
    bytes: int | None = None
    sha256: str | None = None
    top1: float | None = None
    macs_millions: float | None = None
    params_millions: float | None = None

    @property
    def filename(self) -> str | None:
        """The official tarball's file name (also its name in the cache and on a mirror)."""
        return urlsplit(self.url).path.rsplit("/", 1)[-1] if self.url else None

    def sources(self) -> list[ZooSource]:
        """Every place this model can be downloaded from, in the order they are tried."""
        found = []
        if self.url:
            official_base, filename = self.url.rsplit("/", 1)
            official_url = _based(OFFICIAL_SOURCE, official_base, filename)
            holds = _OFFICIAL_HOLDS[self.model, self.quantized]
            found.append(ZooSource(OFFICIAL_SOURCE, official_url, filename, holds, self.bytes, self.sha256))
        fields = {"name": self.name, "size": self.size, "depth100": f"{round(self.depth * 100):03d}"}
        for row in _data()["sources"][self.model]:
            if row.get("quantized", False) != self.quantized or ("names" in row and self.name not in row["names"]):
                continue
            url = _based(row["name"], row["base"], row["path"].format(**fields))
            known = row.get("checksums", {}).get(self.name, {})
            found.append(
                ZooSource(
                    row["name"],
                    url,
                    row["filename"].format(**fields),
                    row["holds"],
                    known.get("bytes"),
                    known.get("sha256"),
                    row.get("format"),
                )
            )
        return found

    @property
    def is_deeplab(self) -> bool:
        return self.model == "deeplabv3"

    def output_name(self, output_stride: int | None = None, size: int | None = None) -> str:
        """Default output folder name: the converter's variant name (plus `_trainval` for those twins and
        `_quant` for the quantized forms); DeepLab's output stride defaults to the graph's, else 8."""
        if not self.is_deeplab:
            return folder_name(CLASSIFICATION, self.depth, self.size, quantized=self.quantized)
        stride = output_stride or self.output_stride or 8
        return folder_name(DEEPLAB, self.depth, size or DEEPLAB_CROP, stride, self.trainval, self.quantized)


_OFFICIAL_HOLDS = {
    ("mobilenet_v2", False): "the slim checkpoint with its moving averages, its .meta graph and a frozen graph",
    ("mobilenet_v2", True): "unknown: the quantization-aware checkpoint, by its name; it is gone since 2020 "
    "(tensorflow/models#8861) and no copy of its contents is recorded",
    ("deeplabv3", False): "the DeepLab checkpoint (no moving averages) and its frozen inference graph",
}


def _based(source: str, base: str, path: str) -> str:
    """`base/path`, with the base replaced by the source's environment variable when it is set."""
    base = os.environ.get(source_base_env(source)) or base
    return f"{base.rstrip('/')}/{path}"


@functools.cache
def _data() -> dict:
    return json.loads(data.read_text("zoo.json"))


@functools.cache
def entries() -> tuple[ZooEntry, ...]:
    """Every zoo entry, classification first, in the order of the published tables."""
    catalog = _data()
    found: list[ZooEntry] = []
    for model in MODELS:
        for row in catalog[model]:
            found.append(ZooEntry(model=model, **row))
    return tuple(found)


def find(name: str) -> ZooEntry | None:
    """The entry with this zoo name or official tarball file name, if any."""
    for entry in entries():
        if name in (entry.name, entry.filename):
            return entry
    return None


def recorded_sha256() -> dict[str, str]:
    """File name -> sha256, for every download whose checksum is recorded."""
    return {source.filename: source.sha256 for entry in entries() for source in entry.sources() if source.sha256}


def published_for(kind: str, depth: float, size: int) -> ZooEntry | None:
    """The float zoo entry matching a converted variant (kind as in `Variant.kind`), for published figures."""
    floats = [e for e in entries() if not e.quantized]
    if kind == CLASSIFICATION:
        return next((e for e in floats if not e.is_deeplab and e.depth == depth and e.size == size), None)
    return next((e for e in floats if e.is_deeplab and e.depth == depth and not e.trainval), None)
