"""Helpers shared by the tests (the pytest fixtures live in conftest.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SMALL = "mobilenet_v2_0.35_96"  # the smallest zoo classifier: the fixture of every test that any model serves


def run_cli(*args, env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`convert-mobilenet ARGS` in a fresh interpreter, as a user runs it. `env` is the whole environment
    (default: this one's)."""
    command = [sys.executable, "-c", "from converter.app.cli import convert_main; convert_main()", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    """The command failed with `code` and one line on stderr (no traceback) holding every fragment."""
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def python_blocks(markdown: str) -> list[tuple[int, str, str]]:
    """Each ```python block of a Markdown text: (line number of its opening fence, what follows `python`
    on that line, the code)."""
    fences = re.finditer(r"^```python([^\n]*)\n(.*?)^```", markdown, flags=re.S | re.M)
    return [(markdown.count("\n", 0, m.start()) + 1, m.group(1).strip(), m.group(2)) for m in fences]


def logit_tolerance(reference: np.ndarray) -> float:
    """The project's parity bar: max abs difference <= 1e-4 x max(1, max |logit|)."""
    return 1e-4 * max(1.0, float(np.abs(reference).max()))


def random_images(shape: tuple[int, int], batch: int = 1, seed: int = 0) -> np.ndarray:
    """Seeded NHWC images in [-1, 1], as the graphs take them."""
    return np.random.default_rng(seed).uniform(-1, 1, (batch, *shape, 3)).astype(np.float32)


def to_torch(images: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def to_nhwc(tensor) -> np.ndarray:
    array = tensor.detach().numpy()
    return array.transpose(0, 2, 3, 1) if array.ndim == 4 else array


def with_random_batchnorm(model):
    """BatchNorm statistics and affine terms away from the identity (seeded), so every layer matters
    and folding them is actually exercised. Returns the model in eval mode."""
    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.2)
    return model.eval()


def copied_frozen_graph(fixture, folder: Path):
    """A copy of `fixture`'s checkpoint files in `folder`, with its frozen graph parsed for editing:
    (folder, frozen graph path, GraphDef). Write the GraphDef back to the path once edited."""
    import shutil

    import tensorflow as tf

    shutil.copytree(fixture.files, folder)
    frozen = folder / fixture.frozen_graph.name
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(frozen.read_bytes())
    return folder, frozen, graph_def
