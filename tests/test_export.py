"""Export of the TF-exact models: ONNX (run in onnxruntime, dynamic batch), torch.jit.trace and
torch.compile all give the eager model's logits, for a classifier and a DeepLab model."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from mobilenet_torch import MobileNetV2Config, MobileNetV2ForImageClassification, MobileNetV2ForSemanticSegmentation
from tests.helpers import SMALL, with_random_batchnorm

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
from converter.app.onnx_export import export_onnx  # noqa: E402
from converter.output.layout import ONNX as ONNX_NAME  # noqa: E402

# Even sizes take TF's asymmetric padding (the path that differs from a plain PyTorch conv); 66 at
# output stride 8 also runs the dilated blocks and the head on a 9x9 map.
MODELS = {
    "classifier": (MobileNetV2ForImageClassification, dict(image_size=96), 96),
    "deeplab": (MobileNetV2ForSemanticSegmentation, dict(output_stride=8, id2label={i: str(i) for i in range(21)}), 66),
}


def build(kind: str):
    cls, options, size = MODELS[kind]
    torch.manual_seed(0)
    return with_random_batchnorm(cls(MobileNetV2Config(depth_multiplier=0.35, **options))), size


def images(batch: int, size: int) -> torch.Tensor:
    return torch.empty(batch, 3, size, size).uniform_(-1, 1, generator=torch.Generator().manual_seed(batch))


def eager_logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request, tmp_path_factory):
    """(model, size, path of its ONNX export). The classifier is exported from a saved folder (default
    size from config.json), the DeepLab model from the model object with an explicit size."""
    model, size = build(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "classifier":
        model.save_pretrained(folder)
        path = export_onnx(folder, folder / ONNX_NAME)
    else:
        path = export_onnx(model, folder / ONNX_NAME, size=size)
    return model, size, path


def test_onnx_has_a_dynamic_batch_and_a_recent_opset(exported):
    model, size, path = exported
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) >= 17
    (graph_input,) = proto.graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert graph_input.name == "pixel_values" and dims[0].dim_param and not dims[0].dim_value
    assert [d.dim_value for d in dims[1:]] == [3, size, size]
    assert [o.name for o in proto.graph.output] == ["logits"]


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_matches_pytorch(exported, batch):
    model, size, path = exported
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = images(batch, size)
    (logits,) = session.run(None, {"pixel_values": x.numpy()})
    expected = eager_logits(model, x).numpy()
    assert logits.shape == expected.shape
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)


def test_opsets_the_exporter_cannot_write_are_refused(tmp_path):
    model, _ = build("classifier")
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, tmp_path / "model.onnx", opset=13)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the size is fixed (the batch is not)
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_jit_trace_equals_eager(kind):
    model, size = build(kind)
    with torch.no_grad():
        traced = torch.jit.trace(model, images(2, size))
    for batch in (2, 3):
        x = images(batch, size)
        with torch.no_grad():
            (logits,) = traced(x)
        torch.testing.assert_close(logits, eager_logits(model, x), rtol=0, atol=1e-6)


@pytest.mark.slow  # about a minute per model on two cores, mostly compiling
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_torch_compile_equals_eager(kind):
    model, size = build(kind)
    compiled = torch.compile(model)
    x = images(2, size)
    with torch.no_grad():
        logits = compiled(x).logits
    torch.testing.assert_close(logits, eager_logits(model, x), rtol=0, atol=1e-5)


def test_convert_with_onnx_writes_a_runnable_model(tmp_path):
    from fixtures.cache import ensure_fixture

    small = ensure_fixture(SMALL)
    out = tmp_path / "model"
    command = [sys.executable, "-c", "from converter.app.cli import convert_main; convert_main()"]
    args = ["--checkpoint", str(small.tarball), "--output", str(out), "--onnx"]
    result = subprocess.run(command + args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    model = MobileNetV2ForImageClassification.from_pretrained(out)
    session = onnxruntime.InferenceSession(str(out / ONNX_NAME), providers=["CPUExecutionProvider"])
    x = images(2, 96)
    (logits,) = session.run(None, {"pixel_values": x.numpy()})
    np.testing.assert_allclose(logits, eager_logits(model, x).numpy(), rtol=0, atol=1e-4)
