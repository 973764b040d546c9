"""Which zoo model the user asked for (`--model`, `--depth`, `--size`, `--trainval`, `--quantized`): `select`
for a set, `lookup` for one, with errors listing the valid choices."""

from __future__ import annotations

from converter.errors import UsageError
from converter.zoo_catalog import DEEPLAB_CROP, MODELS, ZooEntry, entries


def select(
    model: str | None = None,
    depth: float | None = None,
    size: int | None = None,
    trainval: bool | None = None,
    quantized: bool = False,
) -> list[ZooEntry]:
    """Entries matching every filter that is not None (the whole float zoo when none is given, the
    quantized entries with `quantized`). DeepLab entries have no size: a `size` filter leaves them out."""
    if model is not None and model not in MODELS:
        raise UsageError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    return [
        e
        for e in entries()
        if (model is None or e.model == model)
        and (depth is None or e.depth == depth)
        and (size is None or e.size == size)
        and (trainval is None or e.trainval == trainval)
        and e.quantized == quantized
    ]


def lookup(
    model: str = "mobilenet_v2",
    depth: float | None = None,
    size: int | None = None,
    trainval: bool = False,
    quantized: bool = False,
) -> ZooEntry:
    """The one zoo entry for `model` at `depth` (and `size` for classifiers, default 224), its quantized
    form with `quantized`.

    Raises:
        UsageError: for a combination the zoo does not have, listing the valid choices.
    """
    if model not in MODELS:
        raise UsageError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    family = [e for e in entries() if e.model == model and e.quantized == quantized]
    depths = sorted({e.depth for e in family}, reverse=True)
    described = f"quantized {model}" if quantized else model
    if depth is None:
        raise UsageError(f"pass --depth to choose a {described} model: one of {_numbers(depths)}")
    if depth not in depths:
        raise UsageError(f"the zoo has no {described} of depth {depth}; depths: {_numbers(depths)}")
    if model == "deeplabv3":
        if size is not None and size != DEEPLAB_CROP:
            raise UsageError(
                f"the zoo's DeepLab checkpoints are not per size (crop {DEEPLAB_CROP}); leave the size out"
            )
        matches = [e for e in family if e.depth == depth and e.trainval == trainval]
        if not matches:
            kinds = ", ".join(sorted({"trainval" if e.trainval else "trainaug" for e in family if e.depth == depth}))
            raise UsageError(f"the zoo has no {described} of depth {depth} trained on that split; it has: {kinds}")
        return matches[0]
    if trainval:
        raise UsageError("--trainval selects a DeepLab checkpoint; pass --model deeplabv3 with it")
    size = 224 if size is None else size
    sizes = sorted((e.size for e in family if e.depth == depth), reverse=True)
    if size not in sizes:
        raise UsageError(f"the zoo has no {described} {depth}/{size}; sizes at depth {depth}: {_numbers(sizes)}")
    return next(e for e in family if e.depth == depth and e.size == size)


def _numbers(values) -> str:
    return ", ".join(str(v) for v in values)
