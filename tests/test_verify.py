"""The verifier: parity against the original graph, localisation of a planted fault, refusal of unsafe
graphs, DeepLab through its frozen graph, and `convert-mobilenet --verify`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from converter.pipeline.table import endpoints_for
from tests.helpers import REPO, SMALL, copied_frozen_graph

pytest.importorskip("tensorflow")

DEEPLAB = "deeplabv3_mnv2_dm05_pascal_trainaug"
REPORTS = ("parity.json", "parity.md", "parity.xml", "parity.png")


@pytest.fixture(scope="module")
def small_model(small, tmp_path_factory) -> Path:
    from converter import convert_checkpoint

    folder = tmp_path_factory.mktemp("verify") / SMALL
    convert_checkpoint(small.tarball, folder)
    return folder


def verify(*args: str):
    from converter.app.cli import verify_main

    return CliRunner().invoke(verify_main, [str(arg) for arg in args], catch_exceptions=False)


def parity(report_dir: Path) -> dict:
    return json.loads((report_dir / "parity.json").read_text())


def test_faithful_conversion_passes(small, small_model, tmp_path):
    from PIL import Image

    reports, photo = tmp_path / "reports", tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (120, 90, 3), dtype=np.uint8)).save(photo)
    inputs = ("--inputs", "random", "--inputs", photo)
    result = verify("--checkpoint", small.tarball, "--model", small_model, "--report-dir", reports, *inputs)
    assert result.exit_code == 0, result.output
    assert "Parity PASS" in result.output
    assert "x 5 images" in result.output  # random: a batch of 2, an odd-sized and a non-square one; the photo
    assert all((reports / name).is_file() for name in REPORTS)
    data = parity(reports)
    assert data["passed"] is True and data["first_divergence"] is None
    assert data["reference"]["kind"] == "meta_graph" and data["weights"] == "ema"
    assert 0 < data["max_abs_diff"] < 1e-4
    # The .meta is a training_scope graph: its losses, initializers and Saver were never imported.
    left_out, imported = data["reference"]["left_out_ops"], data["reference"]["imported_ops"]
    assert left_out["L2Loss"] == 36 and left_out["Assign"] > 262 and left_out["SaveV2"] == 1
    assert "L2Loss" not in imported and "Assign" not in imported and imported["VariableV2"] == 262
    assert "36 L2Loss" in (reports / "parity.md").read_text()
    assert all(e["compared"] and 0 < e["tolerance"] < 1e-3 for e in data["endpoints"])
    assert data["atol"] is None and "calibrated" in data["tolerance"]
    assert [e["endpoint"] for e in data["endpoints"]] == [e for e, _, _ in endpoints_for("classification")]
    names = {case["name"] for case in data["inputs"]}
    assert names == {"random-96x96", "random-97x97", "random-160x192", "image-photo.png"}
    assert set(data["versions"]) >= {"torch", "tensorflow", "numpy", "mobilenet-convert"}

    suite = ET.parse(reports / "parity.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) == len(endpoints_for("classification")) * 4
    assert suite.get("failures") == "0"
    assert "| `logits` | `classifier` |" in (reports / "parity.md").read_text()


@pytest.mark.parametrize(
    "tensor, endpoint, module",
    [
        ("mobilenet_v2.layer.6.reduce_1x1.normalization.bias", "layer_9", "mobilenet_v2.layer.6"),
    ],
)
def test_planted_fault_is_localised(small, small_model, tmp_path, tensor, endpoint, module):
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "faulty"
    shutil.copytree(small_model, folder)
    weights = load_file(folder / "model.safetensors")
    weights[tensor] = weights[tensor].copy()
    weights[tensor][3] += 0.5  # one BatchNorm bias of block expanded_conv_7
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})

    result = verify("--checkpoint", small.tarball, "--model", folder)
    assert result.exit_code == 1, result.output
    assert f"First divergence: {endpoint} ({module}" in result.output
    data = parity(folder / "parity")
    assert data["passed"] is False
    assert data["first_divergence"]["endpoint"] == endpoint
    assert data["first_divergence"]["module"].startswith(module)
    before = [e for e in data["endpoints"] if e["endpoint"] in ("layer_1", "layer_8", "layer_8/expansion_output")]
    assert before and all(e["passed"] for e in before)
    suite = ET.parse(folder / "parity" / "parity.xml").getroot().find("testsuite")
    failed = [case.get("name") for case in suite.iter("testcase") if case.find("failure") is not None]
    assert endpoint in failed and "layer_8" not in failed
    assert "FAIL (first)" in (folder / "parity" / "parity.md").read_text()


def _rewrite_meta(small, tmp_path: Path, edit) -> Path:
    """A copy of the fixture's checkpoint whose .meta graph `edit(graph_def)` has changed."""
    import tensorflow as tf

    files = tmp_path / "ckpt"
    shutil.copytree(small.files, files)
    meta_path = files / f"{SMALL}.ckpt.meta"
    meta = tf.compat.v1.MetaGraphDef()
    meta.ParseFromString(meta_path.read_bytes())
    edit(meta.graph_def)
    meta_path.write_bytes(meta.SerializeToString())
    return files / f"{SMALL}.ckpt"


def _add_node(graph_def, op: str, name: str, inputs=(), **attrs) -> None:
    import tensorflow as tf

    node = graph_def.node.add(op=op, name=name)
    node.input.extend(inputs)
    for key, value in attrs.items():
        node.attr[key].CopyFrom(tf.compat.v1.AttrValue(**value))


LOGITS_NODE = "MobilenetV2/Logits/output"


def _on_logits_path(graph_def, node: str) -> None:
    """Make the logits wait for `node` (a control dependency): computing them would run it."""
    next(n for n in graph_def.node if n.name == LOGITS_NODE).input.append(f"^{node}")


def _read_file(graph_def, name: str = "sneaky/ReadFile") -> None:
    _add_node(graph_def, "ReadFile", name, ["save/Const"])


def _copy_node(graph_def, source: str, name: str) -> None:
    original = next(n for n in graph_def.node if n.name == source)
    copy = graph_def.node.add()
    copy.CopyFrom(original)
    copy.name = name


@pytest.mark.parametrize(
    "op, node, build",
    [
        ("ReadFile", "sneaky/ReadFile", lambda g: (_read_file(g), _on_logits_path(g, "sneaky/ReadFile"))),
        (
            "PyFunc",
            "sneaky/PyFunc",
            lambda g: (
                _add_node(g, "PyFunc", "sneaky/PyFunc", [], token={"s": b"pyfunc_0"}, Tin={"list": {}}),
                _on_logits_path(g, "sneaky/PyFunc"),
            ),
        ),
        (
            "RestoreV2",
            "MobilenetV2/RestoreV2",
            lambda g: (
                _copy_node(g, "save/RestoreV2", "MobilenetV2/RestoreV2"),
                _on_logits_path(g, "MobilenetV2/RestoreV2"),
            ),
        ),
    ],
)
def test_forbidden_op_on_the_path_is_refused(small, small_model, tmp_path, op, node, build):
    prefix = _rewrite_meta(small, tmp_path, build)
    result = verify("--checkpoint", prefix, "--model", small_model, "--report-dir", tmp_path / "r")
    assert result.exit_code == 2, result.output
    assert op in result.output and node in result.output and "refusing" in result.output
    assert not (tmp_path / "r").exists()


def test_hostile_op_off_the_path_is_left_out(small, small_model, tmp_path):
    """Safety by what runs: a ReadFile nothing depends on is never imported, and the report counts it."""
    prefix = _rewrite_meta(small, tmp_path, _read_file)
    result = verify("--checkpoint", prefix, "--model", small_model, "--report-dir", tmp_path / "r")
    assert result.exit_code == 0, result.output
    assert parity(tmp_path / "r")["reference"]["left_out_ops"]["ReadFile"] == 1


def test_frozen_graph_whose_logits_read_a_file_is_refused(small, small_model, tmp_path):
    """The folded frozen graph, with the logits made to depend (by data) on the contents of a file."""
    import tensorflow as tf

    files, frozen, graph_def = copied_frozen_graph(small, tmp_path / "ckpt")
    leak = tf.Graph()
    with leak.as_default(), tf.name_scope("sneaky"):
        length = tf.strings.length(tf.io.read_file(tf.constant(str(frozen))))
        tf.multiply(tf.cast(length, tf.float32), 0.0, name="leak")
    graph_def.node.extend(leak.as_graph_def().node)
    original = next(n for n in graph_def.node if n.name == LOGITS_NODE)
    original.name = "MobilenetV2/Logits/clean"
    _add_node(graph_def, "AddV2", LOGITS_NODE, ["MobilenetV2/Logits/clean", "sneaky/leak"], T={"type": 1})
    frozen.write_bytes(graph_def.SerializeToString())
    args = ("--checkpoint", files / f"{SMALL}.ckpt", "--model", small_model, "--reference", "frozen_graph")
    result = verify(*args, "--report-dir", tmp_path / "r")
    assert result.exit_code == 2, result.output
    assert "ReadFile" in result.output and "reads or writes files" in result.output
    assert not (tmp_path / "r").exists()


def test_forward_pass_must_not_reach_the_saver(small, small_model, tmp_path):
    """Allowed ops, but a control dependency makes the logits run the Saver's SaveV2 (a file write)."""

    def edit(graph_def):
        logits = next(n for n in graph_def.node if n.name == "MobilenetV2/Logits/output")
        logits.input.append("^save/control_dependency")

    prefix = _rewrite_meta(small, tmp_path, edit)
    result = verify("--checkpoint", prefix, "--model", small_model)
    assert result.exit_code == 2, result.output
    assert "SaveV2" in result.output and "must not read files" in result.output


def test_checkpoint_without_graph_is_verified_against_the_builder_passed_in(small, small_model, tmp_path):
    """A checkpoint that ships neither a .meta nor a frozen graph: the graph builder the caller passes in
    (the fixtures', an independent TF model of the original) is its reference; without one, the verifier
    refuses, saying so, and the CLI (which has none) exits 2 without a traceback."""
    from converter.errors import VerificationError
    from converter.verify import check_parity
    from tools.parity_matrix import fixture_graph

    files = tmp_path / "ckpt"
    files.mkdir()
    for part in small.files.glob(f"{SMALL}.ckpt.*"):
        if part.suffix != ".meta":
            shutil.copy(part, files / part.name)
    prefix = files / f"{SMALL}.ckpt"
    check = check_parity(prefix, small_model, report_dir=tmp_path / "r", graph_builder=fixture_graph)
    data = parity(tmp_path / "r")
    assert check.result.passed and data["reference"]["kind"] == "builder" and data["first_divergence"] is None
    assert all(endpoint["compared"] for endpoint in data["endpoints"])
    with pytest.raises(VerificationError, match="neither a .meta graph nor a frozen graph.*no graph builder"):
        check_parity(prefix, small_model, report_dir=tmp_path / "refused")
    result = verify("--checkpoint", prefix, "--model", small_model, "--report-dir", tmp_path / "cli")
    assert result.exit_code == 2 and "no graph builder" in result.output and "Traceback" not in result.output


def test_deeplab_export_graph_passes_at_513_os8(tmp_path):
    """The export graph as export_model.py writes it: every input is padded to its 513 crop; 513x513 and
    output stride 8, the setting where one fixed tolerance used to fail a faithful conversion."""
    from converter import convert_checkpoint
    from fixtures import ensure_fixture

    fixture = ensure_fixture(DEEPLAB)
    folder = tmp_path / "deeplab"
    convert_checkpoint(fixture.tarball, folder)  # output stride 8, as the zoo's frozen graph
    result = verify("--checkpoint", fixture.tarball, "--model", folder)
    assert result.exit_code == 0, result.output
    data = parity(folder / "parity")
    assert data["passed"] is True
    reference = data["reference"]
    assert reference["kind"] == "frozen_graph" and reference["convention"] == "as frozen"
    assert reference["file"] == "frozen_inference_graph.pb"
    assert reference["crop_size"] == 513 and reference["output_stride"] == 8
    # The label post-processing (argmax, crop, nearest-neighbour resize back) is never imported.
    assert reference["left_out_ops"]["ResizeNearestNeighbor"] == 1 and reference["left_out_ops"]["ArgMax"] == 1
    assert reference["imported_ops"]["SpaceToBatchND"] == 10 and reference["imported_ops"]["Pad"] == 1
    assert {case["name"] for case in data["inputs"]} == {"random-513x513", "random-129x129", "random-160x192"}
    assert all(case["shape"][-2:] == [513, 513] for case in data["inputs"])
    names = [e["endpoint"] for e in data["endpoints"]]
    assert names[-4:] == ["image_pooling", "aspp0", "concat_projection", "logits"] and "layer_19" not in names
    assert all(e["compared"] for e in data["endpoints"])
    assert any("frozen" in note for note in data["notes"]) and any("padded" in note for note in data["notes"])


def test_convert_with_verify(small, tmp_path):
    from converter.app.cli import convert_main

    output = tmp_path / "converted"
    args = ["--checkpoint", str(small.tarball), "--output", str(output), "--verify"]
    result = CliRunner().invoke(convert_main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "Parity PASS" in result.output and "parity reports" in result.output
    assert all((output / "parity" / name).is_file() for name in REPORTS)
    assert parity(output / "parity")["passed"] is True
    assert (output / "README.md").is_file()


def test_report_dir_needs_verify(small, tmp_path):
    from converter.app.cli import convert_main

    args = ["--checkpoint", str(small.tarball), "--output", str(tmp_path / "x"), "--report-dir", str(tmp_path)]
    result = CliRunner().invoke(convert_main, args)
    assert result.exit_code == 2 and "--report-dir applies to --verify" in result.output


def test_missing_tensorflow_says_how_to_install(small, small_model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # `import tensorflow` now raises ImportError
    result = verify("--checkpoint", small.tarball, "--model", small_model, "--report-dir", tmp_path / "r")
    assert result.exit_code == 2
    assert "pip install -e '.[verify]'" in result.output


def test_image_inputs_are_preprocessed_like_transformers(tmp_path):
    from PIL import Image

    from converter.verify.inputs import make_inputs

    rng = np.random.default_rng(0)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (150, 230, 3), dtype=np.uint8)).save(path)
    (case,) = make_inputs([str(path)], "classification", 96)
    assert case.pixels.shape == (1, 3, 96, 96) and case.pixels.min() >= -1 and case.pixels.max() <= 1
    transformers = pytest.importorskip("transformers")
    processor = transformers.MobileNetV2ImageProcessor(
        size={"shortest_edge": 128}, crop_size={"height": 96, "width": 96}
    )
    expected = processor(images=Image.open(path), return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(case.pixels, expected, atol=1e-5)


def test_importing_the_toolkit_does_not_import_tensorflow():
    code = (
        "import sys, converter, converter.app.cli, converter.verify, converter.verify.compare, "
        "converter.verify.report, converter.verify.safety, mobilenet_torch; "
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_safety_rules_unit():
    import tensorflow as tf

    from converter.errors import VerificationError
    from converter.verify.safety import check_graph_def, needed_subgraph

    graph_def = tf.compat.v1.GraphDef()
    _add_node(graph_def, "Placeholder", "input")
    _add_node(graph_def, "ResizeNearestNeighbor", "resize", ["input"])
    check_graph_def(graph_def, "ok.pb")
    _add_node(graph_def, "MatchingFiles", "glob")
    with pytest.raises(VerificationError, match="MatchingFiles.*'glob'.*reads or writes files"):
        check_graph_def(graph_def, "bad.pb")
    _add_node(graph_def, "L2Loss", "loss", ["input"])
    kept, left_out = needed_subgraph(graph_def, ["resize"], "losses.pb")  # what the loss needs is not imported
    assert [node.name for node in kept.node] == ["input", "resize"] and left_out == {"L2Loss": 1, "MatchingFiles": 1}
    with pytest.raises(VerificationError, match="L2Loss"):
        needed_subgraph(graph_def, ["loss"], "losses.pb")
    with_function = tf.compat.v1.GraphDef()
    with_function.library.function.add().signature.name = "hidden"
    with pytest.raises(VerificationError, match="function"):
        check_graph_def(with_function, "fn.pb")


def _verify_process(small, model: Path, report_dir: Path, *extra: str, stderr_tty: bool) -> tuple[int, str, str]:
    """verify-mobilenet in a fresh interpreter, as a user runs it: (exit code, stdout, stderr), stderr a
    terminal (a pseudo-terminal) or a pipe."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    code = "from converter.app.cli import verify_main; verify_main()"
    args = ["--checkpoint", small.tarball, "--model", model, "--report-dir", report_dir, *extra]
    env = {key: value for key, value in os.environ.items() if key not in ("TF_CPP_MIN_LOG_LEVEL",)}
    command = [sys.executable, "-c", code, *map(str, args)]
    if not stderr_tty:
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
        return done.returncode, done.stdout, done.stderr
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal 100 wide
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=follower, env=env, cwd=REPO, text=True)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed: the process is done with it
            break
        if not chunk:
            break
        chunks.append(chunk)
    stdout = process.stdout.read()
    process.wait(timeout=600)
    os.close(leader)
    return process.returncode, stdout, b"".join(chunks).decode(errors="replace")


def test_verify_is_quiet_in_a_pipe_and_shows_progress_on_a_terminal(small, small_model, tmp_path):
    """TensorFlow's start-up noise (CUDA probing, absl, oneDNN) never reaches the user unless --debug; a
    terminal sees what the long steps are doing, a pipe only the verdict."""
    code, stdout, stderr = _verify_process(small, small_model, tmp_path / "pipe", stderr_tty=False)
    assert code == 0, stderr
    assert stderr == "" and stdout.startswith("Parity PASS")
    code, stdout, stderr = _verify_process(small, small_model, tmp_path / "tty", stderr_tty=True)
    assert code == 0, stderr
    assert "verifying" in stderr and "comparing with meta_graph" in stderr
    assert "absl" not in stderr and "cuda" not in stderr.lower() and "oneDNN" not in stderr
