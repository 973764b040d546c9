"""Writing the output folder: staged in a hidden sibling, published by one rename, never half-written."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from converter.errors import OutputError
from converter.output.card import write_model_card
from mobilenet_torch.configuration import MobileNetV2Config

WEIGHTS_NAME = "model.safetensors"
PREPROCESSOR_NAME = "preprocessor_config.json"
CONVERSION_NAME = "conversion.json"


def check_output(output: Path, force: bool) -> None:
    """Fail before any work if the output cannot be written or is in the way."""
    if output.exists() and not output.is_dir():
        raise OutputError(f"{output} exists and is not a folder; choose another --output")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise OutputError(f"{output} already exists and is not empty; pass --force to replace it")
    parent = output.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create the folder {parent} ({error.strerror}); choose another --output") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write in {parent}; choose another --output")


@contextlib.contextmanager
def staged_output(output: Path, force: bool) -> Iterator[Path]:
    """Yield a private staging folder next to `output`; publish it only if the block succeeds."""
    check_output(output, force)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    except OSError as error:
        raise OutputError(f"cannot create a folder in {output.parent} ({error.strerror})") from None
    try:
        yield staging
        _follow_umask(staging)
        _publish(staging, output, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _follow_umask(folder: Path) -> None:
    """Give the staged folder and its files the modes a plain mkdir / open would: mkdtemp makes the folder
    0700, and safetensors writes its file through a private temporary (0600). The umask is read off two
    probes, not by os.umask, which changes it process-wide (conversions run in threads)."""
    file_probe, folder_probe = folder / ".umask-file", folder / ".umask-folder"
    os.close(os.open(file_probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    folder_probe.mkdir(0o777)
    file_mode, folder_mode = (probe.stat().st_mode & 0o777 for probe in (file_probe, folder_probe))
    file_probe.unlink()
    folder_probe.rmdir()
    for path in folder.rglob("*"):
        os.chmod(path, folder_mode if path.is_dir() else file_mode)
    os.chmod(folder, folder_mode)


def _publish(staging: Path, output: Path, force: bool) -> None:
    try:
        os.rename(staging, output)  # succeeds when output is absent or an empty folder
        return
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise OutputError(f"cannot publish {output}: {error.strerror}") from None
        if not force:
            raise OutputError(f"{output} appeared meanwhile and is not empty; pass --force to replace it") from None
    # --force over an existing folder: swap the two atomically; the old one, now staged, is deleted.
    _exchange(staging, output)


def _exchange(a: Path, b: Path) -> None:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); elsewhere, rename aside then in."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    at_fdcwd, rename_exchange = -100, 2
    if renameat2 is not None and renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{b.name}.old-", dir=b.parent))
    os.rename(b, aside / b.name)
    os.rename(a, b)
    shutil.move(str(aside / b.name), str(a))
    aside.rmdir()


def preprocessor_config(size: int, segmentation: bool) -> dict[str, Any]:
    """`MobileNetV2ImageProcessor` settings: resize the shortest edge, center crop, scale to [-1, 1]."""
    return {
        "image_processor_type": "MobileNetV2ImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": size if segmentation else size + 32},
        "resample": 2,
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_reduce_labels": False,
    }


def write_model_folder(
    folder: Path,
    state: Mapping[str, np.ndarray],
    config: MobileNetV2Config,
    architecture: str,
    conversion: Mapping[str, Any],
) -> None:
    """The files of a converted model: weights, config, preprocessing, provenance and README.md."""
    from safetensors.numpy import save_file

    config.architectures = [architecture]
    config.save_pretrained(folder)
    save_file(dict(state), str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    segmentation = "Segmentation" in architecture
    _write_json(folder / PREPROCESSOR_NAME, preprocessor_config(config.image_size, segmentation))
    _write_json(folder / CONVERSION_NAME, conversion)
    write_model_card(folder)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
