"""Throughput of `eval-mobilenet` against the plain inference of the same model on the same images.

    python benchmarks/eval_bench.py [--images 256] [--rounds 3] [--workers 2] [--batch-size 32]

The model is MobileNetV2 1.0/224 converted from the fixture zoo archive. The images are JPEGs at typical
ImageNet sizes (about 500x375), crops and resizes of the real photos, in class folders. "eval" is the whole
evaluation loop (DataLoader workers decoding and preparing the JPEGs, the model, the tallies) as
`converter.app.evaluate.evaluate` times it; "plain" is the model alone on the same number of tensors,
decoded and prepared beforehand, in batches of the same size. Rounds run interleaved (plain, eval, plain,
eval, ...) so that a busy machine's drifts hit both alike; the target (eval at least 90% of plain: decoding
must not be the bottleneck) is checked on the fastest round of each. Writes reports/eval_bench.json and
reports/eval_bench.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from converter.app.datasets import PreparedSamples, open_data_set  # noqa: E402
from converter.app.evaluate import evaluate  # noqa: E402
from converter.output.markdown import table_row  # noqa: E402

FIXTURE = "mobilenet_v2_1.0_224"
TARGET = 0.90
PHOTOS = ("bird", "cat", "dragonfly", "grace_hopper", "missvickie_potato_chips")
SIZES = ((500, 375), (375, 500), (500, 333), (640, 480), (500, 500))  # typical ImageNet validation sizes
CLASS_FOLDERS = ("tench", "goldfish", "junco", "tabby", "dragonfly")  # labels of the ImageNet head


def fixtures_dir() -> Path:
    return Path(os.environ.get("MOBILENET_FIXTURES", REPO / ".cache" / "fixtures"))


def converted_model(work: Path) -> Path:
    from converter.pipeline.convert import convert_checkpoint

    folder = work / FIXTURE
    if not (folder / "config.json").is_file():
        archive = fixtures_dir() / FIXTURE / f"{FIXTURE}.tgz"
        if not archive.is_file():
            sys.exit(f"{archive} is missing: run `python -m fixtures build --name {FIXTURE}` first")
        convert_checkpoint(archive, folder)
    return folder


def jpeg_images(work: Path, count: int) -> Path:
    """`count` JPEGs: random crops of the real photos resized to typical ImageNet sizes (seeded)."""
    from PIL import Image

    root = work / f"images_{count}"
    if root.is_dir() and len(list(root.rglob("*.jpg"))) == count:
        return root
    photos_dir = REPO.parent / "shared" / "realdata" / "images"
    if not photos_dir.is_dir():
        sys.exit(f"{photos_dir} is missing: the benchmark's images are made from the real photos")
    photos = [Image.open(photos_dir / f"{name}.bmp").convert("RGB") for name in PHOTOS]
    random = np.random.default_rng(0)
    for index in range(count):
        photo = photos[index % len(photos)]
        width, height = SIZES[index % len(SIZES)]
        scale = random.uniform(0.7, 1.0)
        crop_w, crop_h = int(photo.width * scale), int(photo.height * scale)
        left, top = random.integers(0, photo.width - crop_w + 1), random.integers(0, photo.height - crop_h + 1)
        image = photo.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.BILINEAR)
        folder = root / CLASS_FOLDERS[index % len(CLASS_FOLDERS)]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index:05d}.jpg", quality=90)
    return root


def plain_throughput(model, tensors: torch.Tensor, batch_size: int) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(tensors), batch_size):
            model(tensors[start : start + batch_size])
    return len(tensors) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the main process")
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    work = REPO / ".cache" / "eval_bench"
    folder = converted_model(work)
    data = jpeg_images(work, arguments.images)

    from mobilenet_torch import load_pretrained

    model = load_pretrained(folder).eval()
    data_set = open_data_set(data, dict(model.config.id2label), segmentation=False)
    settings = json.loads((folder / "preprocessor_config.json").read_text())
    prepared = PreparedSamples(data_set, "slim", model.config.image_size, settings)
    tensors = torch.from_numpy(np.stack([prepared[i]["pixels"] for i in range(len(prepared))]))
    plain_throughput(model, tensors[: arguments.batch_size], arguments.batch_size)  # warm-up

    rounds: dict[str, list[float]] = {"plain": [], "eval": []}
    for _ in range(arguments.rounds):
        rounds["plain"].append(plain_throughput(model, tensors, arguments.batch_size))
        result = evaluate(folder, data, batch_size=arguments.batch_size, workers=arguments.workers, write=False,
                          progress=False)  # fmt: skip
        rounds["eval"].append(result.images_per_second)
    best = {name: max(values) for name, values in rounds.items()}
    ratio = best["eval"] / best["plain"]
    report = {
        "model": FIXTURE,
        "images": arguments.images,
        "batch_size": arguments.batch_size,
        "workers": arguments.workers,
        "threads": arguments.threads,
        "rounds": rounds,
        "median": {name: statistics.median(values) for name, values in rounds.items()},
        "best": best,
        "ratio": ratio,
        "target": TARGET,
        "passed": ratio >= TARGET,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
    }
    reports = REPO / "reports"
    reports.mkdir(exist_ok=True)
    (reports / "eval_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    verdict = "PASS" if report["passed"] else "FAIL"
    lines = [
        f"### eval-mobilenet throughput: {verdict} (eval {ratio:.1%} of plain inference, target >= {TARGET:.0%})",
        "",
        f"{FIXTURE}, {arguments.images} JPEGs (~500x375), batch {arguments.batch_size}, {arguments.workers} "
        f"decoding workers, {arguments.threads} torch threads, {os.cpu_count()} CPUs; images/s per round.",
        "",
        "| run | median | fastest | rounds |",
        "| --- | --- | --- | --- |",
    ]
    for name, values in rounds.items():
        cells = [name, f"{report['median'][name]:.1f}", f"{best[name]:.1f}", ", ".join(f"{v:.1f}" for v in values)]
        lines.append(table_row(cells))
    (reports / "eval_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
