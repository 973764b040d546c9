"""Writing the output folder: staged in a hidden sibling, published by one rename, never half-written."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from converter.errors import OutputError
from converter.output import layout
from converter.output.card import write_model_card
from converter.output.records import ConversionRecord
from mobilenet_torch.configuration import MobileNetV2Config


def check_output(output: Path, force: bool, sources: Iterable[Path] = ()) -> None:
    """Fail before any work if the output cannot be written or is in the way.

    `--force` replaces only an empty folder or one this toolkit wrote (its conversion record says so
    and it holds nothing but the files the toolkit writes), and never one holding any of `sources`.
    """
    if output.exists() and not output.is_dir():
        raise OutputError(f"{output} exists and is not a folder; choose another {{output}}")
    _check_not_inside(output, sources)
    if output.is_dir() and any(output.iterdir()):
        if not force:
            raise OutputError(f"{output} already exists and is not empty; pass {{force}} to replace it")
        _check_replaceable(output)
    parent = output.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create the folder {parent} ({error.strerror}); choose another {{output}}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write in {parent}; choose another {{output}}")


def _check_not_inside(output: Path, sources: Iterable[Path]) -> None:
    target = output.resolve()
    for source in sources:
        resolved = Path(source).resolve()
        if resolved == target or target in resolved.parents:
            raise OutputError(
                f"{output} holds the source {source}: replacing it would delete the source; choose another {{output}}"
            )


def _check_replaceable(output: Path) -> None:
    """--force: the folder must be one this toolkit wrote, holding only files it writes."""
    foreign = sorted(_foreign_entries(output))
    if foreign:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise OutputError(
            f"{{force}} replaces only a folder this tool wrote, but {output} also holds {shown}; move those "
            "files away or choose another {output}"
        )
    try:
        record = json.loads((output / layout.CONVERSION).read_text())
    except (OSError, ValueError):
        record = None
    if not (isinstance(record, dict) and str(record.get("toolkit", "")).startswith(layout.TOOLKIT_PREFIX)):
        raise OutputError(
            f"{{force}} replaces only a folder this tool wrote, and {output} has no {layout.CONVERSION} of "
            "mobilenet-convert; choose another {output}"
        )


def _foreign_entries(output: Path) -> Iterator[str]:
    for entry in output.iterdir():
        if entry.is_symlink():
            yield entry.name
        elif entry.is_dir() and entry.name in layout.FOLDERS:
            allowed = layout.FOLDERS[entry.name]
            for inner in entry.iterdir():
                if inner.name not in allowed or inner.is_symlink() or not inner.is_file():
                    yield f"{entry.name}/{inner.name}"
        elif not (entry.is_file() and entry.name in layout.FILES):
            yield entry.name


@contextlib.contextmanager
def staged_output(output: Path, force: bool, sources: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a private staging folder next to `output`; publish it only if the block succeeds."""
    sources = tuple(sources)
    check_output(output, force, sources)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    except OSError as error:
        raise OutputError(f"cannot create a folder in {output.parent} ({error.strerror})") from None
    try:
        yield staging
        _follow_umask(staging)
        _publish(staging, output, force, sources)
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


def _publish(staging: Path, output: Path, force: bool, sources: tuple[Path, ...]) -> None:
    try:
        os.rename(staging, output)  # succeeds when output is absent or an empty folder
        return
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise OutputError(f"cannot publish {output}: {error.strerror}") from None
        if not force:
            raise OutputError(f"{output} appeared meanwhile and is not empty; pass {{force}} to replace it") from None
    # --force over a folder this tool wrote (checked again: it may have changed while converting): swap
    # the two atomically; the old one, now in the staging place, is deleted with it.
    check_output(output, force, sources)
    _exchange(staging, output)


def _exchange(a: Path, b: Path) -> None:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); elsewhere, rename aside then in."""
    import ctypes  # only a conversion over an existing folder needs it

    try:  # the C library's symbols are the process's own (ctypes.util.find_library would run ldconfig)
        renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except (OSError, TypeError):  # Windows has no process-wide symbol table to open
        renameat2 = None
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
    record: ConversionRecord,
    extra_files: Mapping[str, bytes] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
) -> None:
    """The files of a converted model: weights, config, preprocessing, provenance, README.md and any
    files the source's reader adds (each one a name of `layout.FILES`, so --force knows it as ours)."""
    from safetensors.numpy import save_file

    config.architectures = [architecture]
    config.save_pretrained(folder)
    save_file(dict(state), str(folder / layout.WEIGHTS), metadata={"format": "pt"})
    segmentation = "Segmentation" in architecture
    # The source's own input scaling (a Keras Rescaling layer, say) replaces the [-1, 1] default.
    settings = {**preprocessor_config(config.image_size, segmentation), **(preprocessing or {})}
    _write_json(folder / layout.PREPROCESSOR, settings)
    record.write(folder)
    for name, content in (extra_files or {}).items():
        if name not in layout.FILES:
            raise ValueError(f"{name} is not a file name of converter.output.layout")
        (folder / name).write_bytes(content)
    write_model_card(folder)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
