"""Teachable Machine's class names: the ``labels.txt`` its exports put next to the model (``keras_model.h5``,
``model_unquant.tflite``, ``model.savedmodel/``), one ``<index> <class name>`` line per class.

A label file that does not name the model's classes costs the names (with a note saying why), never the
conversion.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

LABELS_FILE = "labels.txt"
LABEL_LINE = re.compile(r"^(?P<index>\d+) (?P<name>.*)$")
MAX_LABELS_BYTES = 1 << 20


def labels_beside(model: Path, count: int) -> tuple[tuple[str, ...] | None, str | None]:
    """The class names of Teachable Machine's labels.txt next to `model` ("0 Class 1" lines, one per class),
    and a note when there is one that does not name the head's classes (it is then not used)."""
    path = model.parent / LABELS_FILE
    if not path.is_file():
        return None, None
    with open(path, "rb") as fh:
        raw = fh.read(MAX_LABELS_BYTES + 1)
    lines = raw.decode("utf8", errors="replace").splitlines() if len(raw) <= MAX_LABELS_BYTES else []
    names = [LABEL_LINE.match(line.strip()) for line in lines if line.strip()]
    if len(names) != count or any(m is None or int(m["index"]) != i for i, m in enumerate(names)):
        return None, (
            f"{LABELS_FILE} next to the model was not used: it does not hold {count} lines '<index> <class name>' "
            "numbered from 0, one per class of the model."
        )
    return tuple(m["name"] for m in names), None


def teachable_machine_labels(
    model: Path, count: int, size: int, preprocessing: dict[str, Any] | None
) -> tuple[tuple[str, ...] | None, list[str], dict[str, Any] | None]:
    """(class names, notes, preprocessing) from a labels.txt next to `model`: where it names the `count`
    classes, the preprocessing takes Teachable Machine's center square of the image, resized to `size`."""
    labels, problem = labels_beside(model, count)
    if labels is None:
        return None, [problem] if problem else [], preprocessing
    note = (
        f"The class names were read from {LABELS_FILE} next to the model (Teachable Machine's export); "
        "it takes the center square of an image resized to its input size, x / 127.5 - 1."
    )
    # Resizing the shorter side to the input size, then cropping the center: that square.
    return labels, [note], {**(preprocessing or {}), "size": {"shortest_edge": size}}
