"""Reading a Keras HDF5 file defensively: every link, dataset, attribute and global heap is checked before
h5py reads it, so a damaged file is a one-line error, never a crash or a hang; archive members and JSON
are read within limits."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from converter.errors import KerasFileError

# Generous limits: the largest MobileNetV2 tensor has ~2M values, the largest .keras file ~30 MB.
MAX_DIM = 1 << 17


MAX_ARCHIVE_MEMBER_BYTES = 1 << 30


MAX_CONFIG_BYTES = 64 << 20


MAX_NAMES = 100_000  # layer or weight names in one attribute


# A global heap collection (HDF5's store of variable-length data): its signature and version, and the
# smallest size the format allows.
GLOBAL_HEAP_SIGNATURE = b"GCOL\x01"


GLOBAL_HEAP_MIN_SIZE = 4096


def is_group(link) -> bool:
    import h5py

    return isinstance(link, h5py.HardLink)


def checked_child(group, name: str, where: str):
    """group[name], refusing soft and external links (which h5py would follow silently)."""
    import h5py

    link = group.get(name, getlink=True)
    if link is None:
        raise KerasFileError(f"{where}: {group.name.rstrip('/')}/{name} is missing")
    if not isinstance(link, h5py.HardLink):
        raise KerasFileError(
            f"{where}: {group.name.rstrip('/')}/{name} is a {type(link).__name__}, which is refused: "
            "a weights file must hold its data itself"
        )
    return group[name]


def checked_dataset(group, path: str, where: str):
    """A dataset reached through hard links only, stored in the file, of a float dtype."""
    import h5py

    node = group
    for part in [p for p in path.split("/") if p]:
        if not isinstance(node, h5py.Group):
            raise KerasFileError(f"{where}: {node.name} is not a group")
        node = checked_child(node, part, where)
    if not isinstance(node, h5py.Dataset):
        raise KerasFileError(f"{where}: {node.name} is not a dataset")
    if node.is_virtual or node.external:
        raise KerasFileError(f"{where}: {node.name} keeps its data in other files, which is refused")
    if node.dtype.kind != "f":
        raise KerasFileError(f"{where}: {node.name} has dtype {node.dtype}, not a float type; the file is not weights")
    if len(node.shape) > 4 or any(d > MAX_DIM for d in node.shape):
        raise KerasFileError(f"{where}: {node.name} claims shape {list(node.shape)}, far beyond any MobileNetV2")
    return node


def check_global_heaps(contents, length_size: int, label: str) -> None:
    """Refuse a file whose global heap collections (where HDF5 keeps variable-length strings: the layer and
    weight names, the model config) do not hold together, before h5py reads any of them.

    libhdf5 walks a collection's objects by their declared sizes and, on a size that does not advance
    the walk, loops forever. A collection is found as libhdf5 recognises one (its signature and version);
    its objects must then tile it: every object header whole, every step forward, none past its end.
    Weights hardly ever spell the signature by chance: as float32 it needs a value near 199 or beyond 3e4."""
    header = len(GLOBAL_HEAP_SIGNATURE) + 3 + length_size  # signature and version, 3 reserved, collection size
    object_header = 8 + length_size  # index, reference count, 4 reserved, object size
    start = contents.find(GLOBAL_HEAP_SIGNATURE)
    while start >= 0:
        size = int.from_bytes(contents[start + header - length_size : start + header], "little")
        end = start + size
        problem = None
        if size < GLOBAL_HEAP_MIN_SIZE or end > len(contents):
            problem = f"it claims {size} bytes, not between {GLOBAL_HEAP_MIN_SIZE} and the end of the file"
        position = start + header
        while problem is None and position + object_header <= end:
            index = int.from_bytes(contents[position : position + 2], "little")
            declared = int.from_bytes(contents[position + 8 : position + object_header], "little")
            # The free-space object (index 0) counts its own header; the others are padded to 8 bytes.
            step = object_header + -(-declared // 8) * 8 if index else declared
            if step < object_header or position + step > end:
                problem = (
                    f"object {index} at byte {position} declares {declared} bytes, below its header or past the end"
                )
            position += step
        if problem:
            raise KerasFileError(
                f"{label} is damaged: the global heap collection at byte {start} (its variable-length strings) "
                f"is inconsistent: {problem}; the file cannot be read safely, re-save or re-download it"
            )
        start = contents.find(GLOBAL_HEAP_SIGNATURE, start + 1)


def text_attribute(attrs, name: str, where: str):
    """One text attribute (every one the reader reads holds names or JSON), its size and type checked before
    it is read: a damaged header can claim billions of values, or turn a string into a variable-length
    sequence, which h5py crashes on. Keras stores an empty list as an empty float array."""
    import h5py

    attribute = attrs.get_id(name)
    shape = attribute.shape or ()
    if len(shape) > 1 or int(np.prod(shape)) > MAX_NAMES:
        raise KerasFileError(f"{where}: attribute {name} claims shape {list(shape)}; the file is damaged")
    if int(np.prod(shape)) and not isinstance(attribute.get_type(), h5py.h5t.TypeStringID):
        raise KerasFileError(f"{where}: attribute {name} holds {attribute.dtype} values, not text")
    return attrs[name]


def string_list(attrs, name: str, where: str) -> list[str] | None:
    """A list-of-names attribute, whole or split into name0, name1, ... (Keras' 64 KB header limit)."""
    if name in attrs:
        chunks = [text_attribute(attrs, name, where)]
    elif f"{name}0" in attrs:
        chunks, i = [], 0
        while f"{name}{i}" in attrs and i < MAX_NAMES:
            chunks.append(text_attribute(attrs, f"{name}{i}", where))
            i += 1
    else:
        return None
    values = []
    for chunk in chunks:
        for item in np.atleast_1d(np.asarray(chunk)).tolist():
            if isinstance(item, bytes):
                item = item.decode("utf8", errors="replace")
            if not isinstance(item, str):
                raise KerasFileError(f"{where}: attribute {name} holds {type(item).__name__} values, not names")
            values.append(item)
    return values


def parse_json(raw: Any, where: str) -> Any:
    if isinstance(raw, np.ndarray) and raw.shape == ():
        raw = raw.item()
    try:
        return json.loads(raw.decode("utf8") if isinstance(raw, bytes) else raw)
    except (TypeError, ValueError, RecursionError) as exc:
        raise KerasFileError(f"{where} is not valid JSON ({first_line(exc)})") from None


def read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, where: str) -> bytes:
    if info.file_size > limit:
        raise KerasFileError(f"{where}: {info.filename} claims {info.file_size} bytes, more than {limit}")
    with archive.open(info) as member:
        data = member.read(limit + 1)
    if len(data) > limit:
        raise KerasFileError(f"{where}: {info.filename} expands beyond {limit} bytes")
    return data


def read_limited(path: Path, limit: int) -> bytes:
    with open(path, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise KerasFileError(f"{path.name} is larger than {limit} bytes: not a Keras shard index")
    return data


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
