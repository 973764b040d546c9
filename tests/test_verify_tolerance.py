"""The calibrated tolerance separates faithful conversions from broken ones: planted faults fail at the
endpoint they break, on the training-scope .meta, on the BatchNorm-folded frozen graph and on a DeepLab
graph; a DeepLab model converted at another output stride than its graph is verified at the graph's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tests.helpers import SMALL, copied_frozen_graph

pytest.importorskip("tensorflow")

DEEPLAB = "deeplabv3_mnv2_dm05_pascal_trainaug"
BLOCK_7 = "mobilenet_v2.layer.6"  # expanded_conv_7: layer_9


def verify(*args) -> tuple[int, str]:
    from converter.app.cli import verify_main

    result = CliRunner().invoke(verify_main, [str(arg) for arg in args], catch_exceptions=False)
    return result.exit_code, result.output


def parity(folder: Path) -> dict:
    return json.loads((folder / "parity.json").read_text())


@pytest.fixture(scope="module")
def converted(small, tmp_path_factory):
    """The small classifier converted with ema (the default) and with raw weights."""
    from converter import convert_checkpoint

    root = tmp_path_factory.mktemp("tolerance")
    for weights in ("ema", "raw"):
        convert_checkpoint(small.tarball, root / weights, weights=weights)
    return root


def _edit_weights(folder: Path, edit) -> None:
    from safetensors.numpy import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    edit(weights)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def _bias_off(folder: Path, converted: Path, monkeypatch) -> None:
    def edit(weights):
        name = f"{BLOCK_7}.expand_1x1.normalization.bias"
        weights[name] = weights[name].copy()
        weights[name][3] += 0.5

    _edit_weights(folder, edit)


def _epsilon(folder: Path, converted: Path, monkeypatch) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["layer_norm_eps"] = 1e-5
    (folder / "config.json").write_text(json.dumps(config))


def _symmetric_padding(folder: Path, converted: Path, monkeypatch) -> None:
    """Strided convolutions padded symmetrically (as a plain PyTorch port does) instead of TF's SAME."""
    import mobilenet_torch.layers

    def symmetric(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
        half = (kernel - 1) * dilation // 2
        return half, half

    monkeypatch.setattr(mobilenet_torch.layers, "same_padding", symmetric)


def _raw_weights(folder: Path, converted: Path, monkeypatch) -> None:
    """The raw variables where conversion.json (and so the reference) says ema."""
    shutil.copy(converted / "raw" / "model.safetensors", folder / "model.safetensors")


def _transposed_depthwise(folder: Path, converted: Path, monkeypatch) -> None:
    def edit(weights):
        name = f"{BLOCK_7}.conv_3x3.convolution.weight"
        weights[name] = np.ascontiguousarray(weights[name].transpose(0, 1, 3, 2))

    _edit_weights(folder, edit)


# (fault, its first divergence) on the training-scope .meta; the folded frozen graph lacks the block outputs
FAULTS = [
    (_bias_off, "layer_9/expansion_output"),
    (_epsilon, "layer_1"),
    (_symmetric_padding, "layer_1"),
    (_raw_weights, "layer_1"),
    (_transposed_depthwise, "layer_9"),
]
FOLDED_FAULTS = [(_epsilon, "layer_1"), (_transposed_depthwise, "layer_10/expansion_output")]
CASES = [("meta_graph", *fault) for fault in FAULTS] + [("frozen_graph", *fault) for fault in FOLDED_FAULTS]


@pytest.mark.parametrize("reference, fault, expected", CASES, ids=lambda value: getattr(value, "__name__", value))
def test_planted_fault_fails_at_its_endpoint(small, converted, tmp_path, monkeypatch, reference, fault, expected):
    folder = tmp_path / "model" / "ema"
    shutil.copytree(converted / "ema", folder)
    fault(folder, converted, monkeypatch)
    code, output = verify("--checkpoint", small.tarball, "--model", folder, "--reference", reference)
    assert code == 1, output
    assert f"First divergence: {expected} (" in output
    data = parity(folder / "parity")
    divergence = data["first_divergence"]
    assert divergence["endpoint"] == expected
    assert divergence["ratio"] > 10, divergence  # far beyond the tolerance, not at its edge
    order = [entry["endpoint"] for entry in data["endpoints"]]
    before = [entry for entry in data["endpoints"][: order.index(expected)] if entry["compared"]]
    assert all(entry["passed"] for entry in before)


def test_fixed_tolerance_overrides_the_calibrated_one(small, converted, tmp_path):
    code, output = verify("--checkpoint", small.tarball, "--model", converted / "ema", "--report-dir", tmp_path,
                          "--atol", "0", "--rtol", "1e-9")  # fmt: skip
    assert code == 1 and "atol 0 + rtol 1e-09" in output
    data = parity(tmp_path)
    assert data["atol"] == 0 and data["rtol"] == 1e-9 and "atol 0 + rtol 1e-09" in data["tolerance"]


def test_folded_frozen_graph_says_which_endpoints_it_lacks(small, converted, tmp_path):
    code, output = verify("--checkpoint", small.tarball, "--model", converted / "ema", "--report-dir", tmp_path,
                          "--reference", "frozen_graph")  # fmt: skip
    assert code == 0, output
    assert "17 endpoint(s) not compared (layer_2, layer_3, layer_4, layer_5 ..." in output
    assert "tensorflow/models#10109" in output
    data = parity(tmp_path)
    skipped = {entry["endpoint"]: entry["reason"] for entry in data["not_compared"]}
    assert set(skipped) == {f"layer_{i}" for i in range(2, 19)}
    assert "MobilenetV2/expanded_conv_3/output:0" in skipped["layer_5"]
    compared = [entry["endpoint"] for entry in data["endpoints"] if entry["compared"]]
    assert {"layer_1", "layer_3/expansion_output", "layer_19", "global_pool", "logits"} <= set(compared)
    markdown = (tmp_path / "parity.md").read_text()  # each reason said once, under the table
    assert "Not compared:" in markdown and all(markdown.count(reason) == 1 for reason in skipped.values())


def test_a_graph_without_logits_cannot_pass(small, converted, tmp_path):
    files, frozen, graph_def = copied_frozen_graph(small, tmp_path / "ckpt")
    for node in graph_def.node:
        if node.name == "MobilenetV2/Logits/output":
            node.name = "MobilenetV2/Logits/renamed"
    frozen.write_bytes(graph_def.SerializeToString())
    code, output = verify("--checkpoint", files / f"{SMALL}.ckpt", "--model", converted / "ema",
                          "--reference", "frozen_graph", "--report-dir", tmp_path / "r")  # fmt: skip
    assert code == 1, output
    assert "Not a PASS: the logits could not be compared" in output and "MobilenetV2/Logits/output:0" in output
    assert parity(tmp_path / "r")["first_divergence"] is None


def test_shape_mismatch_names_endpoint_and_shapes():
    from converter.verify.compare import ParityResult, Row, compare_arrays
    from converter.verify.report import verdict_line

    ours, theirs = np.zeros((1, 9, 9, 8), np.float32), np.zeros((1, 17, 17, 8), np.float32)
    result = compare_arrays(ours, ours.astype(np.float64), theirs)
    assert (
        result["passed"] is False
        and result["error"] == "shapes differ: [1, 9, 9, 8] (ours) vs [1, 17, 17, 8] (reference)"
    )
    row = Row("random-129x129", "layer_8", "mobilenet_v2.layer.5", "t:0", [1, 17, 17, 8], **result)
    reference = {"kind": "meta_graph", "file": "model.ckpt.meta", "convention": "raw", "left_out_ops": {}}
    endpoints, inputs = [("layer_8", "t:0", "mobilenet_v2.layer.5")], [{"name": "random-129x129"}]
    parity_result = ParityResult("m", "m", "deeplab", "c", "raw", reference, None, None, endpoints, inputs, [row])
    line = verdict_line(parity_result)
    assert "First divergence: `layer_8` (`mobilenet_v2.layer.5`) on random-129x129: shapes differ" in line
    assert "n/a" not in line


# ------------------------------------------------------------------------------------------------ DeepLab
@pytest.fixture(scope="module")
def deeplab_meta(tmp_path_factory):
    """The DeepLab checkpoint with a training-scope .meta in export form at output stride 8, built with a
    129 crop (the zoo's 513 would make every test input 513x513)."""
    from fixtures import ensure_fixture
    from fixtures.tf_builder import meta_graph_bytes

    fixture = ensure_fixture(DEEPLAB)
    files = tmp_path_factory.mktemp("deeplab-meta") / "files"
    shutil.copytree(fixture.files, files)
    prefix = files / fixture.variant.checkpoint_relpath
    (prefix.parent / "frozen_inference_graph.pb").unlink()
    Path(f"{prefix}.meta").write_bytes(meta_graph_bytes(fixture.variant, output_stride=8, crop_size=129))
    return fixture, prefix


def test_deeplab_model_at_os16_is_verified_at_the_graph_s_os8(deeplab_meta, tmp_path):
    from converter import convert_checkpoint

    fixture, prefix = deeplab_meta
    folder = tmp_path / "os16"
    convert_checkpoint(fixture.tarball, folder, output_stride=16)
    code, output = verify("--checkpoint", prefix, "--model", folder, "--size", "129")
    assert code == 0, output
    data = parity(folder / "parity")
    assert data["reference"]["kind"] == "meta_graph" and data["reference"]["output_stride"] == 8
    assert data["reference"]["crop_size"] == 129 and data["reference"]["left_out_ops"]["L2Loss"] == 38
    assert any("verified at output stride 8" in note for note in data["notes"])
    assert all(entry["compared"] for entry in data["endpoints"])


def test_deeplab_fault_in_a_dilated_block_is_located(deeplab_meta, tmp_path):
    from converter import convert_checkpoint

    fixture, prefix = deeplab_meta
    folder = tmp_path / "faulty"
    convert_checkpoint(fixture.tarball, folder)

    def edit(weights):
        name = "mobilenet_v2.layer.12.conv_3x3.convolution.weight"  # expanded_conv_13, rate 2 at OS 8
        weights[name] = np.ascontiguousarray(weights[name].transpose(0, 1, 3, 2))

    _edit_weights(folder, edit)
    code, output = verify("--checkpoint", prefix, "--model", folder, "--size", "129")
    assert code == 1, output
    divergence = parity(folder / "parity")["first_divergence"]
    assert divergence["endpoint"] == "layer_15" and divergence["ratio"] > 10


def test_float64_depthwise_equals_torch_s_own():
    """The fast float64 depthwise path computes what F.conv2d computes, for every stride/dilation used."""
    import torch.nn.functional as F

    from converter.verify.compare import _fast_float64_depthwise

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 17, 16, dtype=torch.float64, generator=generator)
    weight = torch.randn(12, 1, 3, 3, dtype=torch.float64, generator=generator)
    for stride, padding, dilation in ((1, 1, 1), (2, 1, 1), (2, (2, 2), 1), (1, 4, 4), (1, 2, 2)):
        expected = F.conv2d(x, weight, None, stride, padding, dilation, 12)
        with _fast_float64_depthwise():
            fast = F.conv2d(x, weight, None, stride, padding, dilation, 12)
        torch.testing.assert_close(fast, expected, rtol=0, atol=1e-12)
