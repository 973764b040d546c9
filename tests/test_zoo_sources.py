"""A zoo with several sources per model: the official tarball (HTTP 403 since 2025), then the TF Hub /
Kaggle SavedModel of the same weights (served in Kaggle's form: images in [0, 1], scaled inside), then
others; for the quantized model, the TFLite hosted archive (converted through its .tflite) and
google-coral/test_data. Each source's base URL is overridden to a server on 127.0.0.1 that the test
starts, so nothing ever leaves this machine."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")  # the SavedModel source is written by TensorFlow

import torch  # noqa: E402

from converter.zoo import download  # noqa: E402
from converter.zoo.table import lookup  # noqa: E402
from converter.zoo_catalog import entries, source_base_env  # noqa: E402
from fixtures.cache import ensure_fixture  # noqa: E402
from fixtures.qat_builder import hosted_quant_archive  # noqa: E402
from fixtures.savedmodel_builder import kaggle_archive, run_saved_model, write_saved_model  # noqa: E402
from mobilenet_torch import MobileNetV2ForImageClassification  # noqa: E402
from mobilenet_torch.quantized_files import FAKE_QUANTIZATION_FILE  # noqa: E402
from tests.helpers import REPO, SHARED, logit_tolerance, random_images, run_cli  # noqa: E402
from tests.zoo_server import running_zoo_server  # noqa: E402

ENTRY = lookup("mobilenet_v2", 1.0, 224)
OFFICIAL, TFHUB, TFLITE = (source.name for source in ENTRY.sources())
QUANTIZED = lookup("mobilenet_v2", 1.0, 224, quantized=True)
CORAL = QUANTIZED.sources()[-1].name
REAL_TFLITE = SHARED / "realdata" / "models" / f"{QUANTIZED.name}.tflite"


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tfhub") / "saved_model"
    return write_saved_model(ENTRY.name, folder, KAGGLE_STYLE)


KAGGLE_STYLE = "hub-tf2"  # tf.saved_model.save, images in [0, 1], the bare logits as output_0


@pytest.fixture
def server():
    with running_zoo_server() as zoo:
        yield zoo


def sources_env(server, tmp_path) -> dict[str, str]:
    """Every source served from the local server (base URL overrides), no mirror, a private cache."""
    env = {key: value for key, value in __import__("os").environ.items() if not key.startswith("MOBILENET_CONVERT")}
    names = {source.name for entry in entries() for source in entry.sources()}
    env.update({source_base_env(name): f"{server.url}/{name}" for name in names})
    env.update({download.CACHE_ENV: str(tmp_path / "cache"), download.ATTEMPTS_ENV: "2"})
    env[download.RETRY_DELAY_ENV] = "0.01"
    return env


def served_path(source_name: str, env: dict[str, str], entry=ENTRY) -> str:
    """The path a source's URL has on the local server (its URL minus the server's address)."""
    import os

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        url = next(s.url for s in lookup(entry.model, entry.depth, entry.size, quantized=entry.quantized).sources()
                   if s.name == source_name)  # fmt: skip
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return url.split("/", 3)[3]


def test_a_403_on_the_official_tarball_falls_through_to_the_saved_model(server, saved_model, tmp_path):
    env = sources_env(server, tmp_path)
    server.status[served_path(OFFICIAL, env)] = 403
    archive = kaggle_archive(saved_model, tmp_path / "hub.tar.gz")
    server.serve(served_path(TFHUB, env), archive)
    out = tmp_path / "out"
    result = run_cli("--depth", "1.0", "--size", "224", "--output", out, env=env)
    assert result.returncode == 0, result.stderr
    assert f"note: {OFFICIAL} source failed" in result.stderr and "HTTP 403" in result.stderr
    record = json.loads((out / "conversion.json").read_text())
    assert record["download"]["source"] == TFHUB and record["source"]["format"] == "saved-model"
    assert record["download"]["sha256"] == record["source"]["files"][0]["sha256"]
    images = random_images((224, 224), seed=3)
    expected = run_saved_model(saved_model, (images + 1) / 2, KAGGLE_STYLE)  # the same images, as it takes them
    model = MobileNetV2ForImageClassification.from_pretrained(out)
    with torch.inference_mode():
        ours = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).logits.numpy()
    assert np.abs(ours - expected).max() <= logit_tolerance(expected)
    # and the verifier, against what was downloaded, feeds it the range it reads off its graph
    command = [sys.executable, "-c", "from converter.app.cli import verify_main; verify_main()"]
    result = subprocess.run(
        [*command, "--checkpoint", str(archive), "--model", str(out)], capture_output=True, text=True, env=env,
        cwd=REPO, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    parity = json.loads((out / "parity" / "parity.json").read_text())
    assert parity["passed"] and parity["reference"]["input_range"] == [0.0, 1.0]


def test_source_picks_one_source(server, tmp_path):
    env = sources_env(server, tmp_path)
    server.serve(served_path(TFLITE, env), ensure_fixture(ENTRY.name).tarball)
    result = run_cli("--depth", "1.0", "--size", "224", "--source", TFLITE, "--output", tmp_path / "out", env=env)
    assert result.returncode == 0, result.stderr
    assert [name for name, _ in server.requests] == [served_path(TFLITE, env)]
    record = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert record["download"]["source"] == TFLITE and record["weights"] == "ema"


def test_when_every_source_fails_one_error_lists_them_all(server, tmp_path):
    env = sources_env(server, tmp_path)
    server.status[served_path(OFFICIAL, env)] = 403
    result = run_cli("--depth", "1.0", "--size", "224", "--output", tmp_path / "out", env=env)
    assert result.returncode == 1
    (error,) = result.stderr.strip().splitlines()
    assert error.startswith(f"error: cannot download {ENTRY.name} ({OFFICIAL}: HTTP 403 Forbidden; ")
    assert f"{TFHUB}: HTTP 404" in error and f"{TFLITE}: HTTP 404" in error
    assert "--checkpoint FILE" in error and "--mirror" in error and "--debug" in error
    assert not (tmp_path / "out").exists()
    # --debug adds each source's full error, naming the URL it asked for
    result = run_cli("--depth", "1.0", "--size", "224", "--output", tmp_path / "out", "--debug", env=env)
    details = [line for line in result.stderr.splitlines() if line.startswith("detail: ")]
    assert len(details) == 3
    for source, line in zip(ENTRY.sources(), details, strict=True):
        assert line.startswith(f"detail: {source.name}: cannot download {server.url}/{served_path(source.name, env)}")


def test_an_unknown_source_is_a_usage_error(tmp_path):
    result = run_cli("--depth", "1.0", "--size", "224", "--source", "nowhere", env=sources_env_offline(tmp_path))
    assert result.returncode == 2 and "official, tfhub, tflite-hosted" in result.stderr


def sources_env_offline(tmp_path) -> dict[str, str]:
    import os

    env = {key: value for key, value in os.environ.items() if not key.startswith("MOBILENET_CONVERT")}
    env[download.CACHE_ENV] = str(tmp_path / "cache")
    return env


# ------------------------------------------------------------------------------------------ quantized
@pytest.fixture(scope="module")
def hosted_quant(tmp_path_factory):
    """An archive built like TFLite's hosted mobilenet_v2_1.0_224_quant.tgz, holding the real uint8 .tflite."""
    if not REAL_TFLITE.is_file():
        pytest.skip(f"{REAL_TFLITE} is absent: no real quantized .tflite to put in the archive")
    archive = tmp_path_factory.mktemp("hosted") / f"{QUANTIZED.name}.tgz"
    return hosted_quant_archive(ENTRY.name, REAL_TFLITE, archive)


def test_the_quantized_model_falls_through_to_the_hosted_archive_and_converts_its_tflite(
    server, hosted_quant, tmp_path
):
    from mobilenet_torch.quantized import QuantizedMobileNetV2
    from tests.realdata_tflite import IMAGES, interpreter, pixel_values, quantized_image

    env = sources_env(server, tmp_path)
    server.status[served_path(OFFICIAL, env, QUANTIZED)] = 403
    server.serve(served_path(TFLITE, env, QUANTIZED), hosted_quant)
    out = tmp_path / "out"
    result = run_cli("--depth", "1.0", "--size", "224", "--quantized", "--output", out, "--verify", env=env)
    assert result.returncode == 0, result.stderr
    # --verify reads the download as it was converted: against the .tflite, run by the interpreter.
    assert "Parity PASS" in result.stdout and f"(tflite {QUANTIZED.name}.tflite" in result.stdout
    assert f"note: {OFFICIAL} source failed" in result.stderr and "HTTP 403" in result.stderr
    assert f"note: converted {QUANTIZED.name}.tflite (tflite)" in result.stderr
    assert "--format tf-checkpoint" in result.stderr  # the QAT checkpoint next to it, and how to pick it
    record = json.loads((out / "conversion.json").read_text())
    assert record["download"]["source"] == TFLITE and record["source"]["format"] == "tflite"
    assert record["download"]["sha256"] == hashlib.sha256(hosted_quant.read_bytes()).hexdigest()
    assert any("--format tf-checkpoint" in note for note in record["notes"])
    # The folder is the .tflite's integer model: it reproduces TFLite's reference kernels on a real image.
    model = QuantizedMobileNetV2.from_pretrained(out)
    interp = interpreter(REAL_TFLITE, reference_kernels=True)
    image = quantized_image(IMAGES / "cat.bmp", 224)
    interp.set_tensor(interp.get_input_details()[0]["index"], image)
    interp.invoke()
    output = interp.get_output_details()[0]
    theirs = interp.get_tensor(output["index"])[0] * output["quantization"][0]
    ours = model(pixel_values(image)).probabilities[0].numpy()
    assert np.mean(np.abs(ours - theirs) <= output["quantization"][0] + 1e-6) >= 0.99
    assert ours.argmax() == theirs.argmax()


def test_format_tf_checkpoint_converts_the_qat_checkpoint_of_the_same_download(server, hosted_quant, tmp_path):
    env = sources_env(server, tmp_path)
    server.serve(served_path(TFLITE, env, QUANTIZED), hosted_quant)
    out = tmp_path / "out"
    result = run_cli(
        "--depth", "1.0", "--quantized", "--source", TFLITE, "--format", "tf-checkpoint", "--output", out, env=env
    )
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "conversion.json").read_text())
    assert record["source"]["format"] == "tf-checkpoint" and record["download"]["source"] == TFLITE
    assert any(f"{QUANTIZED.name}.tflite (--format tflite)" in note for note in record["notes"])
    with tarfile.open(hosted_quant) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    stored = [name for name, _ in tf.train.list_variables(str(tmp_path / "unpacked" / f"{QUANTIZED.name}.ckpt"))]
    quantization = [name for name in stored if "_quant/" in name]
    assert quantization and record["tensors"]["ignored"]["quantization"] == len(quantization)
    assert (out / FAKE_QUANTIZATION_FILE).is_file()


def test_a_download_that_differs_from_the_recorded_checksum_is_refused(server, tmp_path):
    entry = lookup("deeplabv3", 0.5, quantized=True)
    (coral,) = entry.sources()
    env = sources_env(server, tmp_path)
    server.serve(served_path(CORAL, env, entry), b"\0" * coral.bytes)  # the right size, other bytes
    result = run_cli("--model", "deeplabv3", "--depth", "0.5", "--quantized", "--output", tmp_path / "out", env=env)
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert f"the zoo table says {coral.sha256}" in error and "--checkpoint" in error
    assert not (tmp_path / "out").exists() and not list((tmp_path / "cache").iterdir())
