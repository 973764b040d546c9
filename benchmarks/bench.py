"""Speed of the TF-exact model against a plain MobileNetV2 and transformers' port, of the emulated integer
model against its float twin and TFLite's interpreter, and the cost of converting.

    python benchmarks/bench.py [--quick] [--only peak,eager,compile,onnx,quantized,convert] [--strict]

Every comparison runs interleaved: each round times every candidate once, in turn, so a shared machine's
slow drifts hit all candidates alike. The table reports the median and the fastest round; the targets
check ratios of the fastest rounds, since other processes only ever add time. Writes reports/bench.json
and reports/bench.md.

"plain" is a MobileNetV2 with the same layers but torchvision-style symmetric padding (padding=1 on
every 3x3 conv), run channels_last on channels_last images: the speed a TF-exact model can hope for.
"ours" is our model as the constructors and `from_pretrained` return it, fed NCHW images as
preprocessing produces them. "fused" models have their BatchNorms folded into the convolutions
(`model.fuse()` for ours); fused models are only compared with fused models. The first torch.compile
call is timed in a fresh interpreter with an empty inductor cache (and again with the cache it left),
one model per interpreter, so neither model reuses the other's kernels. Progress lines go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from converter.output.markdown import table_row  # noqa: E402
from mobilenet_torch import MobileNetV2Config, MobileNetV2ForImageClassification  # noqa: E402
from mobilenet_torch.architecture import BLOCKS, LAST_CHANNELS, STEM_CHANNELS, STEM_OUT_CHANNELS  # noqa: E402

THREADS = 2
SIZE = 224
BIG_BATCH = 32
CHANNELS_LAST = torch.channels_last
HEAVY_MODULES = ("tensorflow", "transformers", "onnx", "onnxruntime", "torch")
FIXTURE = "mobilenet_v2_1.0_224"
OURS, PLAIN = "ours (as loaded)", "plain (channels_last)"
OURS_FUSED, PLAIN_FUSED = "ours fused (as loaded)", "plain fused (channels_last)"
SGEMM_SIZE = 2048
SECTIONS = ("peak", "eager", "compile", "onnx", "quantized", "convert")
REAL_MODELS = REPO.parent / "shared" / "realdata" / "models"
STARTED = time.perf_counter()


def progress(text: str) -> None:
    """One line on stderr with the time since the benchmark started: a long run says what it is doing."""
    print(f"[bench] {time.perf_counter() - STARTED:6.1f} s  {text}", file=sys.stderr, flush=True)


@dataclass
class Timing:
    section: str
    case: str
    batch: int
    median_ms: float
    fastest_ms: float
    rounds: int


@dataclass
class Target:
    """One row of the verdict table; without a limit it is reported, not judged."""

    name: str
    value: float
    limit: float | None
    unit: str = "x"
    note: str = ""

    @property
    def result(self) -> str:
        if self.value != self.value:
            return "SKIP"
        if self.limit is None:
            return "INFO"
        return "PASS" if self.value <= self.limit else "FAIL"


# --- the plain reference --------------------------------------------------------------------------


def conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True):
    layers = [
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels, eps=1e-3),
    ]
    return nn.Sequential(*layers, *([nn.ReLU6(inplace=True)] if act else []))


class PlainBlock(nn.Module):
    def __init__(self, in_channels: int, expanded: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.residual = stride == 1 and in_channels == out_channels
        expand = [conv_bn(in_channels, expanded, 1)] if expanded != in_channels else []
        self.conv = nn.Sequential(
            *expand,
            conv_bn(expanded, expanded, 3, stride, groups=expanded),
            conv_bn(expanded, out_channels, 1, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class PlainMobileNetV2(nn.Module):
    """MobileNetV2 (depth 1.0) as torchvision writes it: symmetric padding inside every conv."""

    def __init__(self, num_labels: int = 1001) -> None:
        super().__init__()
        layers = [conv_bn(3, STEM_CHANNELS, 3, 2), PlainBlock(STEM_CHANNELS, STEM_CHANNELS, STEM_OUT_CHANNELS, 1)]
        channels = STEM_OUT_CHANNELS
        for expansion, out_channels, stride in BLOCKS:
            layers.append(PlainBlock(channels, channels * expansion, out_channels, stride))
            channels = out_channels
        layers.append(conv_bn(channels, LAST_CHANNELS, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(LAST_CHANNELS, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))

    @torch.no_grad()
    def fuse(self) -> PlainMobileNetV2:
        """Fold each BatchNorm into the conv before it (as `fuse()` does for ours)."""
        for module in self.modules():
            if isinstance(module, nn.Sequential) and len(module) >= 2 and isinstance(module[1], nn.BatchNorm2d):
                conv, norm = module[0], module[1]
                scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
                conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
                conv.bias = nn.Parameter(norm.bias - norm.running_mean * scale)
                module[1] = nn.Identity()
        return self.eval()


# --- timing ---------------------------------------------------------------------------------------


def interleaved(candidates: dict[str, Callable[[], object]], rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds of each round per candidate, timing each candidate once per round, in turn."""
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    with torch.inference_mode():
        for run in candidates.values():
            for _ in range(warmup):
                run()
        for _ in range(rounds):
            for name, run in candidates.items():
                started = time.perf_counter()
                run()
                samples[name].append(time.perf_counter() - started)
    return samples


def record(timings: list[Timing], section: str, batch: int, samples: dict[str, list[float]]) -> dict[str, float]:
    """Add `samples` to the table; returns each candidate's fastest round (seconds)."""
    for case, times in samples.items():
        timings.append(Timing(section, case, batch, statistics.median(times) * 1e3, min(times) * 1e3, len(times)))
    return {case: min(times) for case, times in samples.items()}


def ours_and_plain() -> tuple[nn.Module, nn.Module]:
    """Our model as built (channels_last, as `from_pretrained` also returns it) and the plain one."""
    torch.manual_seed(0)
    ours = MobileNetV2ForImageClassification(MobileNetV2Config()).eval()
    return ours, PlainMobileNetV2().eval().to(memory_format=CHANNELS_LAST)


def models() -> dict[str, nn.Module]:
    import transformers

    ours, plain = ours_and_plain()
    hf_config = transformers.MobileNetV2Config(tf_padding=True, num_labels=1001)
    theirs = transformers.MobileNetV2ForImageClassification(hf_config).eval()
    theirs.load_state_dict(ours.state_dict())
    return {
        "transformers tf_padding (NCHW)": theirs,
        OURS: ours,
        "ours (switched to NCHW)": copy.deepcopy(ours).to(memory_format=torch.contiguous_format),
        PLAIN: plain,
        OURS_FUSED: copy.deepcopy(ours).fuse(),
        PLAIN_FUSED: copy.deepcopy(plain).fuse(),
    }


def images(batch: int, model_name: str) -> torch.Tensor:
    """NCHW images, as preprocessing makes them; channels_last for the models named so."""
    x = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
    return x.contiguous(memory_format=CHANNELS_LAST) if "channels_last" in model_name else x


def parity(nets: dict[str, nn.Module]) -> float:
    """Max abs difference between the final feature maps of every variant of ours and transformers'
    (a sanity check of the comparison: the models must compute the same function)."""
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = nets["transformers tf_padding (NCHW)"].mobilenet_v2(x).last_hidden_state
        return max(
            float((net.mobilenet_v2(x).last_hidden_state - reference).abs().max())
            for name, net in nets.items()
            if name.startswith("ours")
        )


def logits_of(net: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    return lambda: net(x)


def network_flops(batch: int) -> float:
    """Floating-point operations of one forward pass of the plain network (the useful work)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        PlainMobileNetV2().eval()(torch.zeros(1, 3, SIZE, SIZE))
    return float(counter.get_total_flops()) * batch


def fraction_of_peak(name: str, seconds: float, peak: dict[str, float], targets: list[Target]) -> None:
    if not peak:
        return
    rate = network_flops(BIG_BATCH) / seconds / 1e9
    best = max(peak.values())
    note = f"{rate:.0f} of {best:.0f} GFLOP/s"
    targets.append(Target(f"fraction of sgemm peak: {name} b{BIG_BATCH}", rate / best, None, "", note))


# --- sections -------------------------------------------------------------------------------------


def sgemm_peak(rounds: int, timings: list[Timing], targets: list[Target], peak: dict[str, float]) -> None:
    """The machine's fp32 matrix-multiply rate (GFLOP/s) on the benchmark's threads, torch and numpy."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((SGEMM_SIZE, SGEMM_SIZE), dtype=np.float32) for _ in range(2))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    samples = interleaved({"torch.mm": lambda: torch.mm(ta, tb), "numpy.matmul": lambda: a @ b}, rounds)
    for name, seconds in record(timings, f"sgemm {SGEMM_SIZE}x{SGEMM_SIZE}", 1, samples).items():
        peak[name] = 2 * SGEMM_SIZE**3 / seconds / 1e9
        targets.append(Target(f"sgemm peak: {name}", peak[name], None, " GFLOP/s"))


def eager(rounds: dict[int, int], timings: list[Timing], targets: list[Target], peak: dict[str, float]) -> None:
    nets = models()
    targets.append(Target("eager: max abs diff, ours vs transformers features", parity(nets), 1e-5, unit=""))
    for batch, count in rounds.items():
        candidates = {name: logits_of(net, images(batch, name)) for name, net in nets.items()}
        if batch != BIG_BATCH:
            candidates = {name: run for name, run in candidates.items() if "transformers" not in name}
        fastest = record(timings, "eager", batch, interleaved(candidates, count))
        targets.append(Target(f"eager b{batch}: {OURS} / {PLAIN}", fastest[OURS] / fastest[PLAIN], 1.10))
        fused = fastest[OURS_FUSED] / fastest[PLAIN_FUSED]
        targets.append(Target(f"eager b{batch}: {OURS_FUSED} / {PLAIN_FUSED}", fused, 1.10))
        if batch == BIG_BATCH:
            theirs = fastest["transformers tf_padding (NCHW)"]
            targets.append(Target(f"eager b{batch}: {OURS} / transformers", fastest[OURS] / theirs, 0.6))
            fraction_of_peak(f"eager {OURS}", fastest[OURS], peak, targets)
            fraction_of_peak(f"eager {OURS_FUSED}", fastest[OURS_FUSED], peak, targets)


def first_compile_seconds(name: str) -> float:
    """Seconds of the first call of torch.compile(model) at batch 32 (run in a fresh interpreter)."""
    torch.set_num_threads(THREADS)
    model = dict(zip((OURS, PLAIN), ours_and_plain(), strict=True))[name]
    compiled, x = torch.compile(model), images(BIG_BATCH, name)
    started = time.perf_counter()
    with torch.inference_mode():
        compiled(x)
    return time.perf_counter() - started


def compile_in_fresh_interpreter(name: str, cache: Path) -> float:
    progress(f"  first torch.compile of {name} in a fresh interpreter ({'warm' if cache.exists() else 'empty'} cache)")
    environment = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    command = [sys.executable, __file__, "--first-compile", name]
    result = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=REPO)
    if result.returncode:
        raise RuntimeError(f"torch.compile of {name} failed: {result.stderr[-2000:]}")
    return float(result.stdout.strip().splitlines()[-1])


def compiled(
    rounds: int, cold_rounds: int, timings: list[Timing], targets: list[Target], peak: dict[str, float]
) -> None:
    names = (OURS, PLAIN)
    ours, plain = ours_and_plain()
    explanation = torch._dynamo.explain(ours)(images(2, OURS))
    torch._dynamo.reset()
    breaks = "; ".join(str(reason.reason) for reason in explanation.break_reasons)[:300]
    targets.append(Target("torch.compile: graph breaks in ours", explanation.graph_break_count, 0, "", breaks))
    with tempfile.TemporaryDirectory() as folder:
        cold, caches = {name: [] for name in names}, {}
        for attempt in range(cold_rounds):  # interleaved, each with a new empty cache
            for i, name in enumerate(names):
                caches[name] = Path(folder, f"{attempt}-{i}")
                cold[name].append(compile_in_fresh_interpreter(name, caches[name]))
        warm = {name: [compile_in_fresh_interpreter(name, caches[name])] for name in names}
        candidates = {}
        for name, model in zip(names, (ours, plain), strict=True):
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(caches[name])  # warm: this compile is not timed
            run, x = torch.compile(model), images(BIG_BATCH, name)
            with torch.inference_mode():
                run(x)
            candidates[f"compiled {name}"] = logits_of(run, x)
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR")
        samples = interleaved(candidates, rounds)
    fastest = record(timings, "torch.compile", BIG_BATCH, samples)
    for cache, times, limit in (("empty", cold, 1.5), ("warm", warm, None)):
        seconds = record(timings, f"torch.compile first call, {cache} cache", BIG_BATCH, times)
        note = f"ours {seconds[OURS]:.1f} s, plain {seconds[PLAIN]:.1f} s"
        ratio = seconds[OURS] / seconds[PLAIN]
        targets.append(Target(f"torch.compile first call ({cache} cache): ours / plain", ratio, limit, note=note))
    steady = fastest[f"compiled {OURS}"] / fastest[f"compiled {PLAIN}"]
    targets.append(Target(f"torch.compile b{BIG_BATCH} steady: ours / plain", steady, 1.10))
    fraction_of_peak(f"compiled {OURS}", fastest[f"compiled {OURS}"], peak, targets)


def onnx(rounds: dict[int, int], timings: list[Timing], targets: list[Target], peak: dict[str, float]) -> None:
    import onnxruntime

    from converter.app.onnx_export import export_module, export_onnx

    ours, plain = ours_and_plain()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    with tempfile.TemporaryDirectory() as folder:
        export_onnx(ours, Path(folder, "ours.onnx"))
        export_module(plain, torch.zeros(2, 3, SIZE, SIZE), Path(folder, "plain.onnx"))
        providers = ["CPUExecutionProvider"]
        sessions = {
            name: onnxruntime.InferenceSession(str(Path(folder, f"{name}.onnx")), options, providers=providers)
            for name in ("ours", "plain")
        }
    for batch, count in rounds.items():
        x = images(batch, "NCHW").numpy()
        candidates = {f"onnxruntime {name}": _ort_run(session, x) for name, session in sessions.items()}
        fastest = record(timings, "onnxruntime", batch, interleaved(candidates, count))
        ratio = fastest["onnxruntime ours"] / fastest["onnxruntime plain"]
        targets.append(Target(f"onnxruntime b{batch}: ours / plain", ratio, 1.10))
        if batch == BIG_BATCH:
            fraction_of_peak("onnxruntime ours", fastest["onnxruntime ours"], peak, targets)


INTEGER, TWIN = "integer (QuantizedMobileNetV2)", "float twin"
TFLITE_REFERENCE, TFLITE_DEFAULT = "TFLite reference kernels", "TFLite default kernels (XNNPACK)"


def quantized(rounds: dict[str, int], timings: list[Timing], targets: list[Target]) -> None:
    """The emulated integer model of Google's uint8 models (../shared/realdata), its float twin and TFLite's
    interpreter with its reference kernels (what the integer model reproduces exactly) and its default
    (XNNPACK) ones: classification 224 at batch 1 and 32, DeepLab 513 at batch 1. The targets are ratios to
    the float twin in the same run."""
    import tensorflow as tf

    from converter import convert_checkpoint
    from mobilenet_torch.quantized import QuantizedMobileNetV2

    cases = (
        ("1.0_224", "mobilenet_v2_1.0_224_quant.tflite", 224, (1, BIG_BATCH), 3.0, 2.0),
        ("DeepLab 513", "deeplabv3_mnv2_pascal_quant.tflite", 513, (1,), 3.0, None),
    )
    for label, file_name, size, batches, limit_b1, limit_big in cases:
        tflite = REAL_MODELS / file_name
        if not tflite.is_file():
            targets.append(Target(f"quantized {label}", float("nan"), None, note=f"{tflite} is absent"))
            continue
        with tempfile.TemporaryDirectory() as folder:
            progress(f"  converting {file_name}")
            convert_checkpoint(tflite, Path(folder, "model"))
            integer = QuantizedMobileNetV2.from_pretrained(Path(folder, "model")).eval()
            twin = integer.float_twin()
        interpreters = {
            name: _interpreter(tf, tflite, reference)
            for name, reference in ((TFLITE_REFERENCE, True), (TFLITE_DEFAULT, False))
        }
        for batch in batches:
            x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)).clamp(-1, 1)
            candidates = {INTEGER: logits_of(integer, x), TWIN: logits_of(twin, x)}
            candidates.update({name: _invoke_each(interpreter, x) for name, interpreter in interpreters.items()})
            count = rounds["big" if batch > 1 or size > SIZE else "small"]
            progress(f"  {label} batch {batch}: {count} rounds of {len(candidates)} candidates")
            fastest = record(timings, f"quantized {label} uint8", batch, interleaved(candidates, count, warmup=1))
            note = (
                f"twin {fastest[TWIN] * 1e3:.1f} ms; TFLite default {fastest[TFLITE_DEFAULT] * 1e3:.1f} ms, reference "
                f"{fastest[TFLITE_REFERENCE] * 1e3:.1f} ms"
            )
            if batch > 1:
                note += f" ({batch} single-image invokes: the graph fixes batch 1)"
            name = f"quantized {label} b{batch}: integer / float twin"
            limit = limit_b1 if batch == 1 else limit_big
            targets.append(Target(name, fastest[INTEGER] / fastest[TWIN], limit, note=note))
            goal = fastest[INTEGER] / fastest[TFLITE_DEFAULT]
            targets.append(Target(f"quantized {label} b{batch}: integer / TFLite default kernels (goal)", goal, 1.0))


def _interpreter(tf, tflite: Path, reference: bool):
    """TFLite's interpreter on the benchmark's threads, with the reference kernels or the default ones."""
    resolvers = tf.lite.experimental.OpResolverType
    resolver = resolvers.BUILTIN_REF if reference else resolvers.AUTO
    interpreter = tf.lite.Interpreter(str(tflite), num_threads=THREADS, experimental_op_resolver_type=resolver)
    interpreter.allocate_tensors()
    return interpreter


def _invoke_each(interpreter, x: torch.Tensor) -> Callable[[], object]:
    """Run the interpreter on each image of `x` (NCHW in [-1, 1]), quantized as its input says; the graphs
    fix batch 1 (a Reshape to [1, classes]), so a batch is one invoke per image."""
    (detail,) = interpreter.get_input_details()
    scale, zero_point = detail["quantization"]
    info = np.iinfo(detail["dtype"])
    pixels = np.round(x.permute(0, 2, 3, 1).numpy() / scale) + zero_point
    images = np.clip(pixels, info.min, info.max).astype(detail["dtype"])[:, None]

    def run() -> None:
        for image in images:
            interpreter.set_tensor(detail["index"], image)
            interpreter.invoke()

    return run


def _ort_run(session, x) -> Callable[[], object]:
    return lambda: session.run(None, {"pixel_values": x})


# The floor of a conversion: a fresh interpreter that reads the checkpoint out of the archive and writes
# as many bytes.
FLOOR = """
import sys, tarfile
with tarfile.open(sys.argv[1]) as tar:
    members = [m for m in tar.getmembers() if ".ckpt.data-" in m.name or m.name.endswith(".ckpt.index")]
    data = b"".join(tar.extractfile(m).read() for m in members)
with open(sys.argv[2], "wb") as out:
    out.write(data)
"""


def convert(rounds: int, checkpoint: Path, timings: list[Timing], targets: list[Target]) -> None:
    """A conversion's wall time and peak RSS, each command in a fresh interpreter, against `import torch` and
    the floor. All run as an installed package does, with Python's bytecode cache (an environment that sets
    PYTHONDONTWRITEBYTECODE would otherwise compile every module of the project on every run); an untimed
    first round writes the cache."""
    if not checkpoint.is_file():
        targets.append(Target("conversion", float("nan"), 0, note=f"skipped: {checkpoint} is missing"))
        return
    script = Path(sys.executable).with_name("convert-mobilenet")
    torch_import, conversion, floor = 'python -c "import torch"', "convert-mobilenet", "read + write the checkpoint"
    start_up = 'start-up: python -c "import what a conversion imports"'
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder, "out")
        commands = {
            torch_import: [sys.executable, "-c", "import torch"],
            conversion: [str(script), "--checkpoint", str(checkpoint), "--output", str(output), "--force"],
            floor: [sys.executable, "-c", FLOOR, str(checkpoint), str(Path(folder, "copy"))],
            start_up: [sys.executable, "-c", CONVERSION_IMPORTS],
        }
        samples = {name: [] for name in commands}
        progress(f"  {rounds} rounds of {len(commands)} commands, after one untimed round")
        for round_number in range(rounds + 1):
            for name, command in commands.items():
                measured = run_measured(command, environment)
                if round_number:
                    samples[name].append(measured)
        imported = modules_imported_by_conversion(checkpoint, output)
    wall = record(timings, "conversion (wall)", 1, {name: [s[0] for s in runs] for name, runs in samples.items()})
    rss = {name: statistics.median(s[1] for s in runs) for name, runs in samples.items()}
    targets.append(Target("conversion wall / import torch wall", wall[conversion] / wall[torch_import], 0.5))
    targets.append(Target("conversion wall / floor wall (goal)", wall[conversion] / wall[floor], 2.0))
    note = f"of the conversion's {wall[conversion] * 1e3:.0f} ms; the floor's {wall[floor] * 1e3:.0f} ms"
    targets.append(Target("conversion: interpreter start-up and imports", wall[start_up] * 1e3, None, " ms", note))
    size = checkpoint_bytes(checkpoint)
    rss_limit = rss[torch_import] + 3 * size
    note = f"limit: import torch {rss[torch_import] / 2**20:.0f} MiB + 3 x checkpoint {size / 2**20:.1f} MiB"
    targets.append(Target("conversion peak RSS", rss[conversion] / 2**20, rss_limit / 2**20, " MiB", note))
    note = f"heavy packages imported: {', '.join(imported) or 'none'}"
    for package in ("tensorflow", "torch"):
        targets.append(Target(f"conversion imports {package} (1 = yes)", float(package in imported), 0, "", note))


# What convert-mobilenet imports before it reads anything (the rest of a conversion is its work).
CONVERSION_IMPORTS = "import converter.app.cli, converter.pipeline.convert, safetensors.numpy"

# Runs one command from a small, fresh interpreter: the child's peak RSS then cannot include pages it
# shared with this (large) process before exec, and the start-up of this launcher is not timed.
LAUNCHER = """
import json, resource, subprocess, sys, time
started = time.perf_counter()
result = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
wall = time.perf_counter() - started
if result.returncode:
    sys.exit(result.stderr.decode(errors="replace")[-2000:])
print(json.dumps([wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024]))
"""


def run_measured(command: list[str], environment: dict[str, str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one run of `command`."""
    launch = [sys.executable, "-c", LAUNCHER, *command]
    result = subprocess.run(launch, capture_output=True, text=True, env=environment)
    if result.returncode:
        raise RuntimeError(f"{command[0]} failed: {result.stderr}")
    wall, rss = json.loads(result.stdout)
    return wall, rss


def modules_imported_by_conversion(checkpoint: Path, output: Path) -> list[str]:
    """Top-level heavy packages present in sys.modules after a conversion, in a fresh interpreter."""
    code = (
        "import json, sys\n"
        "from converter.app.cli import convert_main\n"
        f"convert_main({['--checkpoint', str(checkpoint), '--output', str(output), '--force']!r}, "
        "standalone_mode=False)\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HEAVY_MODULES)!r}))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def checkpoint_bytes(archive: Path) -> int:
    """Bytes of the checkpoint itself (the .data and .index files) inside a zoo archive."""
    with tarfile.open(archive) as tar:
        return sum(m.size for m in tar.getmembers() if ".ckpt.data-" in m.name or m.name.endswith(".ckpt.index"))


# --- report ---------------------------------------------------------------------------------------


def machine() -> dict[str, object]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()}
    for name in ("transformers", "onnxruntime", "onnx"):
        with contextlib.suppress(ImportError):
            versions[name] = __import__(name).__version__
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "versions": versions,
        "image_size": SIZE,
    }


def formatted(value: float, unit: str) -> str:
    return "-" if value != value else f"{value:.3g}{unit}"


def markdown(info: dict[str, object], timings: list[Timing], targets: list[Target]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    lines = [
        "# Benchmark",
        "",
        f"Machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, {info['torch_threads']} threads "
        f"(torch and onnxruntime); load average {info['load_average_at_start']} at start, "
        f"{info.get('load_average_at_end')} at end; {info.get('wall_s', 0):.0f} s in all. {versions}. "
        f"Images {SIZE}x{SIZE}, float32.",
        "",
        "| target | value | limit | result | note |",
        "|---|---:|---:|---|---|",
    ]
    for t in targets:
        limit = "-" if t.limit is None else formatted(t.limit, t.unit)
        lines.append(table_row([t.name, formatted(t.value, t.unit), limit, t.result, t.note]))
    lines += ["", "| section | case | batch | median ms | fastest ms | rounds |", "|---|---|---:|---:|---:|---:|"]
    lines += [
        table_row([t.section, t.case, t.batch, f"{t.median_ms:.1f}", f"{t.fastest_ms:.1f}", t.rounds]) for t in timings
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated sections, of {', '.join(SECTIONS)}"
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds (noisier)")
    parser.add_argument("--checkpoint", type=Path, default=None, help=f"zoo archive of {FIXTURE} to convert")
    parser.add_argument("--reports", type=Path, default=REPO / "reports")
    parser.add_argument("--strict", action="store_true", help="exit 1 unless every target passes")
    parser.add_argument("--first-compile", choices=(OURS, PLAIN), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.first_compile:
        print(first_compile_seconds(args.first_compile))
        return 0
    sections = set(args.only.split(","))
    if sections - set(SECTIONS):
        parser.error(f"unknown sections {', '.join(sorted(sections - set(SECTIONS)))}; known: {', '.join(SECTIONS)}")
    torch.set_num_threads(THREADS)
    scale = 3 if args.quick else 1
    fixtures = Path(os.environ.get("MOBILENET_FIXTURES", REPO / ".cache" / "fixtures"))
    checkpoint = args.checkpoint or fixtures / FIXTURE / f"{FIXTURE}.tgz"

    started = time.perf_counter()
    info, timings, targets, peak = machine(), [], [], {}
    runs = {
        "peak": lambda: sgemm_peak(30 // scale, timings, targets, peak),
        "eager": lambda: eager({BIG_BATCH: 9 // scale, 1: 90 // scale}, timings, targets, peak),
        "compile": lambda: compiled(9 // scale, max(1, 2 // scale), timings, targets, peak),
        "onnx": lambda: onnx({BIG_BATCH: 11 // scale, 1: 90 // scale}, timings, targets, peak),
        "quantized": lambda: quantized({"small": 10 // scale, "big": max(1, 3 // scale)}, timings, targets),
        "convert": lambda: convert(5 // scale + 1, checkpoint, timings, targets),
    }
    for name, run in runs.items():
        if name not in sections:
            continue
        progress(f"section {name} ...")
        section_started = time.perf_counter()
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the ONNX exporter's progress lines
                run()
        except Exception as error:  # one section failing (no compiler for inductor, ...) spoils no other
            targets.append(Target(f"{name}: did not run", float("nan"), 0, note=f"{type(error).__name__}: {error}"))
            progress(f"section {name} failed: {type(error).__name__}: {error}")
        progress(f"section {name} done in {time.perf_counter() - section_started:.1f} s")
    info["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    info["wall_s"] = time.perf_counter() - started

    report = markdown(info, timings, targets)
    print(report)
    args.reports.mkdir(parents=True, exist_ok=True)
    (args.reports / "bench.md").write_text(report)
    data = {
        "machine": info,
        "timings": [asdict(t) for t in timings],
        "targets": [{**asdict(t), "result": t.result} for t in targets],
    }
    (args.reports / "bench.json").write_text(json.dumps(data, indent=2) + "\n")
    judged = [t for t in targets if t.limit is not None]
    return 1 if args.strict and not all(t.result == "PASS" for t in judged) else 0


if __name__ == "__main__":
    sys.exit(main())
