"""The fixture builder reproduces the original checkpoints' inventories and graphs, deterministically."""

from __future__ import annotations

import math
import tarfile
from pathlib import Path

import numpy as np
import pytest

from fixtures.spec import (
    ZOO_CLASSIFICATION,
    ZOO_DEEPLAB,
    architecture,
    as_variant,
    checkpoint_inventory,
    get_variant,
    make_divisible,
    make_weights,
    model_variables,
)
from tests.helpers import SHARED

tf = pytest.importorskip("tensorflow")

from fixtures import tf_builder as tb  # noqa: E402
from fixtures.cache import ensure_fixture  # noqa: E402

INVENTORIES = SHARED / "reference" / "inventories"
INVENTORY_FILES = sorted(INVENTORIES.glob("*.tsv")) if INVENTORIES.is_dir() else []


def _read_inventory(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    out = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, shape, dtype = line.split("\t")
        out[name] = (tuple(int(s) for s in shape.split("x")) if shape else (), dtype)
    return out


def _rand(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


# ------------------------------------------------------------------------------------------- spec only
def test_zoo_names():
    assert len(ZOO_CLASSIFICATION) == 22 and len(ZOO_DEEPLAB) == 2
    names = {v.name for v in ZOO_CLASSIFICATION}
    assert {"mobilenet_v2_1.4_224", "mobilenet_v2_1.3_224", "mobilenet_v2_0.35_96", "mobilenet_v2_0.75_160"} <= names
    assert get_variant("deeplabv3_mnv2_pascal_train_aug").tarball_name.endswith("_2018_01_29.tar.gz")
    assert get_variant("deeplabv3_mnv2_dm05_pascal_trainaug").tarball_name.endswith("_2018_10_01.tar.gz")


@pytest.mark.parametrize(
    "value,divisor,minimum,expected",
    [
        (32 * 0.35, 8, 8, 16),
        (16 * 0.35, 8, 8, 8),
        (96 * 0.35, 8, 8, 32),
        (1280 * 1.4, 8, 8, 1792),
        (24 * 0.5, 1, 1, 12),
    ],
)
def test_make_divisible(value, divisor, minimum, expected):
    assert make_divisible(value, divisor, minimum) == expected


@pytest.mark.parametrize(
    "depth,millions", [(1.4, 6.06), (1.3, 5.34), (1.0, 3.47), (0.75, 2.61), (0.5, 1.95), (0.35, 1.66)]
)
def test_parameter_counts_match_published(depth, millions):
    specs = model_variables(as_variant(("classification", depth)))
    n = sum(math.prod(s.shape) for s in specs if s.role in ("weights", "depthwise_weights", "biases"))
    assert round(n / 1e6, 2) == millions


def test_output_stride_rates():
    deeplab = get_variant("deeplabv3_mnv2_pascal_train_aug")
    rates8 = {layer.scope: (layer.stride, layer.rate) for layer in architecture(deeplab, 8)}
    assert rates8["expanded_conv_6"] == (1, 1)
    assert all(rates8[f"expanded_conv_{k}"] == (1, 2) for k in range(7, 14))
    assert all(rates8[f"expanded_conv_{k}"] == (1, 4) for k in range(14, 17))
    rates16 = {layer.scope: (layer.stride, layer.rate) for layer in architecture(deeplab, 16)}
    assert rates16["expanded_conv_13"] == (1, 1)
    assert all(rates16[f"expanded_conv_{k}"] == (1, 2) for k in range(14, 17))
    assert all(rates16[f"expanded_conv_{k}"][1] == 1 for k in range(1, 14))


def test_weights_deterministic_and_ema_differs():
    a = make_weights("mobilenet_v2_0.35_96")
    b = make_weights("mobilenet_v2_0.35_96")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    c = make_weights("mobilenet_v2_0.35_128")
    assert not np.array_equal(a["MobilenetV2/Conv/weights"], c["MobilenetV2/Conv/weights"])
    for name in ("MobilenetV2/Conv/weights", "MobilenetV2/Conv/BatchNorm/moving_variance"):
        shadow = a[name + "/ExponentialMovingAverage"]
        assert not np.array_equal(a[name], shadow)
        assert np.abs(a[name] - shadow).max() < 0.5 * np.abs(a[name]).max()
    assert all(a[k].min() > 0 for k in a if k.endswith("moving_variance"))


def test_optional_slots():
    w = make_weights("mobilenet_v2_0.35_96", slots=("RMSProp",))
    assert "MobilenetV2/Conv/weights/RMSProp" in w and "MobilenetV2/Conv/weights/RMSProp_1" in w
    assert "MobilenetV2/Conv/BatchNorm/moving_mean/RMSProp" not in w
    assert len(w) == 525 + 2 * 158
    d = make_weights("deeplabv3_mnv2_pascal_train_aug", ema=True)
    assert "aspp0/weights/ExponentialMovingAverage" in d and "aspp0/weights/Momentum" in d


# -------------------------------------------------------------------------------------- checkpoints
@pytest.mark.skipif(not INVENTORY_FILES, reason=f"reference inventories not found under {INVENTORIES}")
@pytest.mark.parametrize("inventory", INVENTORY_FILES, ids=lambda p: p.stem)
def test_checkpoint_matches_inventory(inventory: Path):
    expected = _read_inventory(inventory)
    variant = get_variant(inventory.stem)
    assert checkpoint_inventory(variant) == expected
    fixture = ensure_fixture(variant)
    reader = tf.train.load_checkpoint(str(fixture.checkpoint_prefix))
    shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    got = {name: (tuple(shapes[name]), dtypes[name].name) for name in shapes}
    assert got == expected


@pytest.mark.parametrize("name", ["mobilenet_v2_0.35_96", "deeplabv3_mnv2_dm05_pascal_trainaug"])
def test_archive_layout(name):
    fixture = ensure_fixture(name)
    with tarfile.open(fixture.tarball) as tar:
        members = sorted(m.name for m in tar.getmembers() if m.isfile())
    if name.startswith("mobilenet"):
        ckpt = [f"{name}.ckpt.{s}" for s in ("data-00000-of-00001", "index", "meta")]
        assert members == ckpt + [f"{name}_frozen.pb", f"{name}_info.txt"]
    else:
        assert members == [
            f"{name}/frozen_inference_graph.pb",
            f"{name}/model.ckpt-30000.data-00000-of-00001",
            f"{name}/model.ckpt-30000.index",
        ]
    assert fixture.index.is_file() and fixture.data.is_file()


def test_checkpoint_deterministic(tmp_path):
    variant = get_variant("mobilenet_v2_0.35_96")
    archives = []
    with tb.CheckpointWriter() as writer:  # shares the .meta graph; its determinism is checked below
        for sub in ("a", "b"):
            _, archive = tb.write_files(tmp_path / sub / "files", tmp_path / sub, variant, writer=writer)
            archives.append(archive)
    assert tb.meta_graph_bytes(variant) == (tmp_path / "a" / "files" / f"{variant.name}.ckpt.meta").read_bytes()
    for suffix in (".index", ".data-00000-of-00001", ".meta"):
        a = (tmp_path / "a" / "files" / f"{variant.name}.ckpt{suffix}").read_bytes()
        b = (tmp_path / "b" / "files" / f"{variant.name}.ckpt{suffix}").read_bytes()
        assert a == b, suffix
    assert archives[0].read_bytes() == archives[1].read_bytes()


# --------------------------------------------------------------------------------------------- graphs
@pytest.fixture(scope="module")
def runner_1_0():
    fixture = ensure_fixture("mobilenet_v2_1.0_224")
    with tb.GraphRunner("mobilenet_v2_1.0_224") as runner:
        runner.restore(fixture.checkpoint_prefix, "raw")
        yield runner, fixture


@pytest.mark.parametrize("hw", [(224, 224), (97, 97), (160, 192)])
def test_classification_graph_shapes(runner_1_0, hw):
    runner, _ = runner_1_0
    h, w = hw
    fetches = ["layer_1", "layer_2", "layer_15/expansion_output", "layer_18", "layer_19", "global_pool", "Logits"]
    fetches += ["Predictions", "MobilenetV2/expanded_conv_13/expand/Relu6:0"]
    out = runner.run(_rand((2, h, w, 3)), fetches)

    def down(f):
        return math.ceil(h / f), math.ceil(w / f)

    assert out["layer_1"].shape == (2, *down(2), 32)
    assert out["layer_2"].shape == (2, *down(2), 16)
    assert out["layer_15/expansion_output"].shape == (2, *down(16), 576)
    assert np.array_equal(out["layer_15/expansion_output"], out["MobilenetV2/expanded_conv_13/expand/Relu6:0"])
    assert out["layer_18"].shape == (2, *down(32), 320)
    assert out["layer_19"].shape == (2, *down(32), 1280)
    assert out["global_pool"].shape == (2, 1, 1, 1280)
    np.testing.assert_allclose(out["global_pool"][:, 0, 0], out["layer_19"].mean(axis=(1, 2)), rtol=1e-5, atol=1e-5)
    assert out["Logits"].shape == (2, 1001)
    assert 0.5 < np.abs(out["Logits"]).max() < 50
    np.testing.assert_allclose(out["Predictions"].sum(axis=1), 1.0, rtol=1e-5)


def test_tensor_names(runner_1_0):
    runner, _ = runner_1_0
    for key in [
        "input",
        "layer_1",
        "layer_2",
        "layer_3",
        "layer_18",
        "layer_19",
        "global_pool",
        "Logits",
        "Predictions",
    ]:
        assert runner.built.endpoints[key].name == tb.TENSOR_NAMES[key]
    conv = runner.graph.get_operation_by_name("MobilenetV2/Conv/Conv2D")
    assert conv.inputs[0].name == "MobilenetV2/input:0"


def test_conventions_differ(runner_1_0):
    runner, fixture = runner_1_0
    x = _rand((2, 224, 224, 3), seed=1)
    logits = {}
    for convention in ("raw", "ema", "ema-all"):
        runner.restore(fixture.checkpoint_prefix, convention)
        logits[convention] = runner.run(x)["Logits"]
    runner.restore(fixture.checkpoint_prefix, "raw")
    assert 0.05 < np.abs(logits["raw"] - logits["ema"]).max() < 5
    assert 0.05 < np.abs(logits["ema"] - logits["ema-all"]).max() < 5
    # assign() from the weights dict agrees with the Saver restore
    runner.assign(make_weights("mobilenet_v2_1.0_224"), "ema")
    np.testing.assert_array_equal(runner.run(x)["Logits"], logits["ema"])
    runner.restore(fixture.checkpoint_prefix, "raw")


def test_meta_graph_restores(runner_1_0):
    """The .meta is a working graph: import it, restore with its own Saver (raw), same logits."""
    runner, fixture = runner_1_0
    x = _rand((1, 160, 192, 3), seed=2)
    graph = tf.Graph()
    with graph.as_default():
        saver = tf.compat.v1.train.import_meta_graph(str(fixture.meta))
        with tf.compat.v1.Session() as sess:
            saver.restore(sess, str(fixture.checkpoint_prefix))
            logits = sess.run("MobilenetV2/Logits/output:0", {"input:0": x})
    np.testing.assert_allclose(logits, runner.run(x)["Logits"], rtol=1e-5, atol=1e-5)


def test_fixed_pool():
    """slim's fixed 7x7 VALID average pool: one 1x1 window at the native size, a grid above it."""
    name = "mobilenet_v2_0.35_96"
    w = make_weights(name)
    kernel = w["MobilenetV2/Logits/Conv2d_1c_1x1/weights"][0, 0]
    bias = w["MobilenetV2/Logits/Conv2d_1c_1x1/biases"]
    for size, grid in (((224, 224), None), ((320, 288), (4, 3))):
        with tb.GraphRunner(name, pool="fixed7x7", static_size=size) as runner:
            runner.assign(w, "raw")
            out = runner.run(_rand((1, *size, 3)), ["Logits", "Predictions", "layer_19"])
        feat = out["layer_19"][0]
        if grid is None:
            assert out["Logits"].shape == (1, 1001)
            expected = feat.mean(axis=(0, 1)) @ kernel + bias
            np.testing.assert_allclose(out["Logits"][0], expected, rtol=1e-4, atol=1e-4)
        else:
            assert out["Logits"].shape == (1, *grid, 1001)
            expected = feat[1:8, 2:9].mean(axis=(0, 1)) @ kernel + bias
            np.testing.assert_allclose(out["Logits"][0, 1, 2], expected, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(out["Predictions"].sum(-1), 1.0, rtol=1e-5)


def test_deeplab_frozen_graph_matches_checkpoint():
    """The export graph pads the uint8 image to the 513 crop with the mean pixel, computes there, and
    resizes the cropped label map back to the input size with nearest neighbours."""
    variant = get_variant("deeplabv3_mnv2_dm05_pascal_trainaug")
    fixture = ensure_fixture(variant)
    image = np.random.default_rng(3).integers(0, 256, (1, 67, 91, 3), dtype=np.uint8)
    frozen = tb.run_frozen_graph(
        fixture.frozen_graph, {"ImageTensor:0": image}, ["SemanticPredictions:0", "ResizeBilinear_2:0"]
    )
    padded = np.full((1, 513, 513, 3), tb.DEEPLAB_MEAN_PIXEL, np.float32)
    padded[:, :67, :91] = image
    x = padded * np.float32(2.0 / 255.0) - 1.0
    fetches = ["SemanticPredictions", "upsampled_logits", "logits", "image_pooling", "layer_18"]
    out = tb.run_graph(variant, x, fetches, checkpoint=fixture.checkpoint_prefix)
    assert out["layer_18"].shape == (1, 65, 65, 160)  # output stride 8 on the crop
    assert out["image_pooling"].shape == (1, 1, 1, 256)
    assert frozen["SemanticPredictions:0"].dtype == np.int32
    assert frozen["SemanticPredictions:0"].shape == (1, 67, 91)
    np.testing.assert_allclose(frozen["ResizeBilinear_2:0"], out["upsampled_logits"], rtol=1e-4, atol=1e-4)
    assert (frozen["SemanticPredictions:0"] == out["SemanticPredictions"][:, :67, :91]).mean() > 0.99
    assert len(np.unique(out["SemanticPredictions"])) > 1
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(fixture.frozen_graph.read_bytes())
    ops = {node.op for node in graph_def.node}
    assert {"ResizeNearestNeighbor", "Pad", "Assert", "AvgPool", "SpaceToBatchND"} <= ops and "Mean" not in ops


def test_meta_graph_is_built_under_training_scope():
    """Like slim's training_scope: an L2 loss on every dense kernel (not the depthwise ones)."""
    fixture = ensure_fixture("mobilenet_v2_0.35_96")
    meta = tf.compat.v1.MetaGraphDef()
    meta.ParseFromString(fixture.meta.read_bytes())
    losses = meta.collection_def["regularization_losses"].node_list.value
    ops = [node.op for node in meta.graph_def.node]
    assert len(losses) == ops.count("L2Loss") == 36
    assert all(name.endswith("weights/Regularizer/l2_regularizer:0") for name in losses)
    assert ops.count("TruncatedNormal") == 53


def test_folded_frozen_graph_computes_the_checkpoint():
    """The classifier's _frozen.pb: BatchNorms folded, Identities gone, constants renamed, same logits."""
    variant = get_variant("mobilenet_v2_0.35_96")
    fixture = ensure_fixture(variant)
    frozen = fixture.frozen_graph
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(frozen.read_bytes())
    names = {node.name for node in graph_def.node}
    assert not {node.op for node in graph_def.node} & {"FusedBatchNormV3", "VariableV2"}
    assert "MobilenetV2/expanded_conv_3/output" not in names and "MobilenetV2/Conv/weights" not in names
    assert {"MobilenetV2/Conv/Relu6", "MobilenetV2/Logits/output"} <= names
    assert all(node.name.partition("_")[0] == "Const" for node in graph_def.node if node.op == "Const")
    x = _rand((2, 97, 97, 3), seed=4)
    logits = tb.run_frozen_graph(frozen, {"input:0": x}, ["MobilenetV2/Logits/output:0"])
    expected = tb.run_graph(variant, x, ["Logits"], checkpoint=fixture.checkpoint_prefix, convention="ema")
    np.testing.assert_allclose(logits["MobilenetV2/Logits/output:0"], expected["Logits"], rtol=1e-4, atol=1e-4)
