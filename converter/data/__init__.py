"""The toolkit's data files (class names, WordNet ids, the zoo catalog), read from beside this module: a plain
path costs a conversion no import, where importlib.resources loads its readers and zipfile."""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).parent


def read_text(name: str) -> str:
    return (FOLDER / name).read_text()
