"""Speed of the exact integer model (`QuantizedMobileNetV2`) against its float twin, in the same run.

    python benchmarks/integer_speed.py [--rounds N] [--profile] [--only DeepLab]

The cases: Google's uint8 MobileNetV2 1.0/224 at batch 1 and 32, its uint8 DeepLab (PASCAL) at 513 and
batch 1 (../shared/realdata/models), and the int8 per-channel models the fixtures hold
(`.cache/fixtures/tflite`, env MOBILENET_FIXTURES), each at batch 1. Timings run interleaved on 2 threads
(`bench.interleaved`): each round times the integer model and its twin in turn, and the ratio is taken
between the fastest rounds, since other processes only ever add time. The targets (issue: the integer
model at float speed) are the ratios of the first three rows: <= 3x, <= 2x and <= 3x. With --profile,
each case also prints its integer model's costliest ops (torch.profiler).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench import THREADS, interleaved  # noqa: E402
from converter import convert_checkpoint  # noqa: E402
from mobilenet_torch.quantized import QuantizedMobileNetV2  # noqa: E402

MODELS = REPO.parent / "shared" / "realdata" / "models"
FIXTURES = Path(os.environ.get("MOBILENET_FIXTURES", REPO / ".cache" / "fixtures")) / "tflite"
# (name, .tflite, batch, size, the limit on integer / float twin)
REAL_CASES = (
    ("1.0_224 uint8, batch 1", MODELS / "mobilenet_v2_1.0_224_quant.tflite", 1, 224, 3.0),
    ("1.0_224 uint8, batch 32", MODELS / "mobilenet_v2_1.0_224_quant.tflite", 32, 224, 2.0),
    ("DeepLab 1.0 uint8 513, batch 1", MODELS / "deeplabv3_mnv2_pascal_quant.tflite", 1, 513, 3.0),
)


def fixture_cases() -> list[tuple[str, Path, int, int, None]]:
    """One int8 per-channel classifier and DeepLab of the fixtures, where built; their size is in the name."""
    cases = []
    for pattern in ("mobilenet_v2_1.0_224_quant_224_int8_*.tflite", "deeplabv3_mnv2_pascal_quant_513_int8_*.tflite"):
        found = sorted(FIXTURES.glob(pattern))
        if found:
            size = int(found[0].name.split("_int8_")[0].rsplit("_", 1)[1])
            cases.append((f"{found[0].name.split('_quant')[0]} int8 {size}, batch 1", found[0], 1, size, None))
    return cases


def measure(name: str, tflite: Path, batch: int, size: int, rounds: int, folder: Path, profile: bool):
    """Fastest-round milliseconds of the integer model and its float twin, on the same images."""
    out = folder / tflite.stem
    if not out.exists():
        convert_checkpoint(tflite, out)
    integer = QuantizedMobileNetV2.from_pretrained(out)
    twin = integer.float_twin().eval()
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(size + batch)) * 2 - 1
    samples = interleaved({"integer": lambda: integer(images), "float twin": lambda: twin(images)}, rounds)
    if profile:
        from torch.profiler import profile as profiler

        with torch.inference_mode(), profiler() as run:
            integer(images)
        print(run.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return min(samples["integer"]) * 1e3, min(samples["float twin"]) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per case (batch 32: a third)")
    parser.add_argument("--profile", action="store_true", help="print each integer model's costliest ops")
    parser.add_argument("--only", default="", help="run only the cases whose name contains this")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    print(f"{'case':44s} {'integer ms':>11s} {'twin ms':>9s} {'ratio':>6s}  target")
    failed = False
    with tempfile.TemporaryDirectory() as folder:
        for name, tflite, batch, size, limit in (*REAL_CASES, *fixture_cases()):
            if args.only not in name:
                continue
            if not tflite.is_file():
                print(f"{name:44s} skipped: {tflite} is absent")
                continue
            rounds = max(2, args.rounds // 3) if batch > 1 else args.rounds
            integer, twin = measure(name, tflite, batch, size, rounds, Path(folder), args.profile)
            ratio = integer / twin
            verdict = "" if limit is None else f"<= {limit:g}x {'PASS' if ratio <= limit else 'FAIL'}"
            failed |= limit is not None and ratio > limit
            print(f"{name:44s} {integer:11.1f} {twin:9.1f} {ratio:5.2f}x  {verdict}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
