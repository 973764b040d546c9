"""The original MobileNetV2 model zoo as data (`converter/data/zoo.json`): names, tarball URLs, published
figures. `lookup` resolves what the user asked for (`--model`, `--depth`, `--size`, `--trainval`)."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from importlib import resources
from urllib.parse import urlsplit

from converter.errors import UsageError
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


def source_base_env(source: str) -> str:
    """The environment variable that overrides a source's base URL, e.g. MOBILENET_CONVERT_SOURCE_TFHUB."""
    return SOURCE_ENV_PREFIX + source.upper().replace("-", "_")


@dataclass(frozen=True)
class ZooEntry:
    """One tarball of the zoo. `bytes`/`sha256` are None where the real file's are not recorded."""

    name: str
    model: str  # "mobilenet_v2" (slim ImageNet) or "deeplabv3" (PASCAL VOC)
    depth: float
    url: str
    size: int | None = None  # None for DeepLab
    trainval: bool = False
    bytes: int | None = None
    sha256: str | None = None
    top1: float | None = None
    macs_millions: float | None = None
    params_millions: float | None = None

    @property
    def filename(self) -> str:
        """The tarball's file name (also its name in the cache and on a mirror)."""
        return urlsplit(self.url).path.rsplit("/", 1)[-1]

    def sources(self) -> list[ZooSource]:
        """Every place this model can be downloaded from, in the order they are tried."""
        official_base, filename = self.url.rsplit("/", 1)
        official_url = _based(OFFICIAL_SOURCE, official_base, filename)
        found = [
            ZooSource(OFFICIAL_SOURCE, official_url, filename, _OFFICIAL_HOLDS[self.model], self.bytes, self.sha256)
        ]
        fields = {"name": self.name, "size": self.size, "depth100": f"{round(self.depth * 100):03d}"}
        for row in _data()["sources"][self.model]:
            if "names" in row and self.name not in row["names"]:
                continue
            url = _based(row["name"], row["base"], row["path"].format(**fields))
            found.append(ZooSource(row["name"], url, row["filename"].format(**fields), row["holds"]))
        return found

    @property
    def is_deeplab(self) -> bool:
        return self.model == "deeplabv3"

    def output_name(self, output_stride: int = 8, size: int | None = None) -> str:
        """Default output folder name: the converter's variant name (plus `_trainval` for those twins)."""
        if not self.is_deeplab:
            return folder_name(CLASSIFICATION, self.depth, self.size)
        return folder_name(DEEPLAB, self.depth, size or DEEPLAB_CROP, output_stride, self.trainval)


_OFFICIAL_HOLDS = {
    "mobilenet_v2": "the slim checkpoint with its moving averages, its .meta graph and a frozen graph",
    "deeplabv3": "the DeepLab checkpoint (no moving averages) and its frozen inference graph",
}


def _based(source: str, base: str, path: str) -> str:
    """`base/path`, with the base replaced by the source's environment variable when it is set."""
    base = os.environ.get(source_base_env(source)) or base
    return f"{base.rstrip('/')}/{path}"


@functools.cache
def _data() -> dict:
    return json.loads(resources.files("converter").joinpath("data", "zoo.json").read_text())


@functools.cache
def entries() -> tuple[ZooEntry, ...]:
    """Every zoo entry, classification first, in the order of the published tables."""
    data = _data()
    found: list[ZooEntry] = []
    for model in MODELS:
        for row in data[model]:
            found.append(ZooEntry(model=model, **row))
    return tuple(found)


def find(name: str) -> ZooEntry | None:
    """The entry with this zoo name or tarball file name, if any."""
    for entry in entries():
        if name in (entry.name, entry.filename):
            return entry
    return None


def published_for(kind: str, depth: float, size: int) -> ZooEntry | None:
    """The zoo entry matching a converted variant (kind as in `Variant.kind`), for published figures."""
    if kind == CLASSIFICATION:
        return next((e for e in entries() if not e.is_deeplab and e.depth == depth and e.size == size), None)
    return next((e for e in entries() if e.is_deeplab and e.depth == depth and not e.trainval), None)


def select(
    model: str | None = None,
    depth: float | None = None,
    size: int | None = None,
    trainval: bool | None = None,
) -> list[ZooEntry]:
    """Entries matching every filter that is not None (the whole zoo when none is given). DeepLab
    entries have no size: a `size` filter leaves them out."""
    if model is not None and model not in MODELS:
        raise UsageError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    return [
        e
        for e in entries()
        if (model is None or e.model == model)
        and (depth is None or e.depth == depth)
        and (size is None or e.size == size)
        and (trainval is None or e.trainval == trainval)
    ]


def lookup(model: str = "mobilenet_v2", depth: float | None = None, size: int | None = None, trainval: bool = False):
    """The one zoo entry for `model` at `depth` (and `size` for classifiers, default 224).

    Raises:
        UsageError: for a combination the zoo does not have, listing the valid choices.
    """
    if model not in MODELS:
        raise UsageError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    family = [e for e in entries() if e.model == model]
    depths = sorted({e.depth for e in family}, reverse=True)
    if depth is None:
        raise UsageError(f"pass --depth to choose a {model} checkpoint: one of {_numbers(depths)}")
    if depth not in depths:
        raise UsageError(f"the zoo has no {model} of depth {depth}; depths: {_numbers(depths)}")
    if model == "deeplabv3":
        if size is not None and size != DEEPLAB_CROP:
            raise UsageError(
                f"the zoo's DeepLab checkpoints are not per size (crop {DEEPLAB_CROP}); leave the size out"
            )
        matches = [e for e in family if e.depth == depth and e.trainval == trainval]
        if not matches:
            kinds = ", ".join(sorted({"trainval" if e.trainval else "trainaug" for e in family if e.depth == depth}))
            raise UsageError(f"the zoo has no deeplabv3 of depth {depth} trained on that split; it has: {kinds}")
        return matches[0]
    if trainval:
        raise UsageError("--trainval selects a DeepLab checkpoint; pass --model deeplabv3 with it")
    size = 224 if size is None else size
    sizes = sorted((e.size for e in family if e.depth == depth), reverse=True)
    if size not in sizes:
        raise UsageError(f"the zoo has no mobilenet_v2_{depth}_{size}; sizes at depth {depth}: {_numbers(sizes)}")
    return next(e for e in family if e.depth == depth and e.size == size)


def _numbers(values) -> str:
    return ", ".join(str(v) for v in values)
