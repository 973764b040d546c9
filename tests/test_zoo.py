"""The zoo table (converter/data/zoo.json) and `lookup`: names, URLs, published figures, clear errors."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
from click.testing import CliRunner

from converter import zoo_catalog
from converter.app.cli import convert_main
from converter.errors import UsageError
from converter.output import layout
from converter.zoo import table as zoo
from fixtures import ZOO_CLASSIFICATION, ZOO_DEEPLAB
from mobilenet_torch.quantized_files import QUANTIZATION_FILE
from tests.helpers import SHARED


def test_the_22_classification_checkpoints_with_official_urls():
    entries = zoo.select("mobilenet_v2")
    assert [e.name for e in entries] == [v.name for v in ZOO_CLASSIFICATION]
    assert len(entries) == 22
    for e in entries:
        assert e.name == f"mobilenet_v2_{e.depth}_{e.size}"
        assert e.url == f"https://storage.googleapis.com/mobilenet_v2/checkpoints/{e.name}.tgz"
        assert e.filename == f"{e.name}.tgz"
        assert e.bytes is None and e.sha256 is None  # unknown here: recorded when downloaded


def test_deeplab_tarballs_match_the_fixture_archive_names():
    entries = zoo.select("deeplabv3")
    assert {(e.depth, e.trainval) for e in entries} == {(1.0, False), (0.5, False), (1.0, True), (0.5, True)}
    for variant in ZOO_DEEPLAB:
        entry = zoo_catalog.find(variant.tarball_name)
        assert entry is not None and entry.name == variant.name and entry.depth == variant.depth
    for e in entries:
        assert re.fullmatch(
            r"http://download\.tensorflow\.org/models/deeplabv3_mnv2_\w+_\d{4}_\d\d_\d\d\.tar\.gz", e.url
        )
    assert (
        zoo.lookup("deeplabv3", 0.5, trainval=True).filename == "deeplabv3_mnv2_dm05_pascal_trainval_2018_10_01.tar.gz"
    )


def test_published_figures_are_those_of_the_reference_table():
    expected = {  # depth: (MACs at 224, params, top-1 at 224)
        1.4: (582, 6.06, 75.0),
        1.3: (509, 5.34, 74.4),
        1.0: (300, 3.47, 71.8),
        0.75: (209, 2.61, 69.8),
        0.5: (97, 1.95, 65.4),
        0.35: (59, 1.66, 60.3),
    }
    for depth, (macs, params, top1) in expected.items():
        entry = zoo.lookup("mobilenet_v2", depth, 224)
        assert (entry.macs_millions, entry.params_millions, entry.top1) == (macs, params, top1)
    assert zoo.lookup("mobilenet_v2", 0.35, 96).top1 == 45.5
    assert zoo.lookup("mobilenet_v2", 1.0, 160).top1 is None  # not in the reference table
    readme = SHARED / "reference" / "README.md"
    if readme.is_file():
        assert "45.5 at 96" in readme.read_text()


def test_lookup_defaults_and_family_selection():
    assert zoo.lookup("mobilenet_v2", 1.0).name == "mobilenet_v2_1.0_224"
    assert zoo.lookup("mobilenet_v2", 0.75, 128).name == "mobilenet_v2_0.75_128"
    assert zoo.lookup("deeplabv3", 1.0).name == "deeplabv3_mnv2_pascal_train_aug"
    assert zoo.lookup("deeplabv3", 1.0, 513).name == "deeplabv3_mnv2_pascal_train_aug"
    assert zoo.lookup("deeplabv3", 1.0).output_name() == "deeplabv3_mobilenet_v2_1.0_513_os8"
    assert zoo.lookup("deeplabv3", 1.0, trainval=True).output_name(16) == "deeplabv3_mobilenet_v2_1.0_513_os16_trainval"


@pytest.mark.parametrize(
    ("args", "kwargs", "listed"),
    [
        (("mobilenet_v2", 0.9, 224), {}, "1.4, 1.3, 1.0, 0.75, 0.5, 0.35"),
        (("mobilenet_v2", 1.4, 192), {}, "sizes at depth 1.4: 224"),
        (("mobilenet_v2", 1.0, 100), {}, "224, 192, 160, 128, 96"),
        (("mobilenet_v2", None), {}, "1.4, 1.3, 1.0, 0.75, 0.5, 0.35"),
        (("deeplabv3", 0.35), {}, "depths: 1.0, 0.5"),
        (("deeplabv3", 1.0, 224), {}, "not per size"),
        (("mobilenet_v2", 1.0, 224), {"trainval": True}, "--model deeplabv3"),
        (("mobilenet_v3", 1.0), {}, "mobilenet_v2, deeplabv3"),
        (("mobilenet_v2", 0.5), {"quantized": True}, "no quantized mobilenet_v2 of depth 0.5; depths: 1.0"),
        (("mobilenet_v2", 1.0, 160), {"quantized": True}, "sizes at depth 1.0: 224"),
        (("deeplabv3", 1.0), {"quantized": True, "trainval": True}, "it has: trainaug"),
    ],
)
def test_unknown_combinations_list_the_valid_choices(args, kwargs, listed):
    with pytest.raises(UsageError) as caught:
        zoo.lookup(*args, **kwargs)
    assert listed in str(caught.value)
    assert "\n" not in str(caught.value)


def test_select_filters_for_whole_zoo_runs():
    assert len(zoo.select()) == 26
    assert [e.name for e in zoo.select(depth=0.35)] == [f"mobilenet_v2_0.35_{s}" for s in (224, 192, 160, 128, 96)]
    assert len(zoo.select(size=224)) == 6  # DeepLab entries have no size
    assert len(zoo.select("deeplabv3", trainval=True)) == 2
    assert len(zoo.select("deeplabv3", depth=1.0)) == 2


def test_quantized_entries_and_where_they_live():
    classifier = zoo.lookup("mobilenet_v2", 1.0, 224, quantized=True)
    assert classifier.name == "mobilenet_v2_1.0_224_quant"
    assert zoo.lookup("mobilenet_v2", 1.0, quantized=True) == classifier  # 224 by default, as the float ones
    assert classifier.url == "https://storage.googleapis.com/mobilenet_v2/checkpoints/quantized_v2_224_100.tgz"
    assert classifier.output_name() == "mobilenet_v2_1.0_224_quant"
    official, hosted, coral = classifier.sources()
    assert (official.name, official.format, official.sha256) == ("official", None, None)
    assert "unknown" in official.holds  # the tarball is gone and nobody recorded what it held
    assert hosted.url == (
        "https://storage.googleapis.com/download.tensorflow.org/models/tflite_11_05_08/mobilenet_v2_1.0_224_quant.tgz"
    )
    assert hosted.format == "tflite" and hosted.sha256 is None
    deeplab = [zoo.lookup("deeplabv3", depth, quantized=True) for depth in (1.0, 0.5)]
    assert [e.name for e in deeplab] == ["deeplabv3_mnv2_pascal_quant", "deeplabv3_mnv2_dm05_pascal_quant"]
    assert [e.output_name() for e in deeplab] == [f"deeplabv3_mobilenet_v2_{d}_513_os16_quant" for d in (1.0, 0.5)]
    assert all(e.url is None and [s.name for s in e.sources()] == ["coral"] for e in deeplab)
    assert [e.name for e in zoo.select(quantized=True)] == [classifier.name] + [e.name for e in deeplab]
    assert not [s for e in zoo.select() for s in e.sources() if "quant" in s.filename]  # float entries stay float
    commit = "104342d2d3480b3e66203073dac24f4e2dbb4c41"
    for entry in [classifier, *deeplab]:
        source = entry.sources()[-1]
        assert source.url == f"https://github.com/google-coral/test_data/raw/{commit}/{entry.name}.tflite"
        real = SHARED / "realdata" / "models" / f"{entry.name}.tflite"
        if real.is_file():  # the copies of that commit
            assert (source.bytes, source.sha256) == (real.stat().st_size, hashlib.sha256(real.read_bytes()).hexdigest())
        else:
            assert source.bytes and re.fullmatch(r"[0-9a-f]{64}", source.sha256)
    assert zoo_catalog.published_for("classification", 1.0, 224).name == "mobilenet_v2_1.0_224"


def test_published_for_a_converted_variant():
    assert zoo_catalog.published_for("classification", 1.4, 224).top1 == 75.0
    assert zoo_catalog.published_for("classification", 1.0, 300) is None
    assert zoo_catalog.published_for("deeplab", 0.5, 513).name == "deeplabv3_mnv2_dm05_pascal_trainaug"


def test_all_quantized_converts_the_quantized_models_from_a_mirror_of_their_files(tmp_path):
    """A folder holding google-coral/test_data's files is a mirror: each entry falls through to them, and each
    file matches the checksums the zoo table records for that source."""
    models = SHARED / "realdata" / "models"
    if not models.is_dir():
        pytest.skip(f"{models} is absent: no copies of the quantized models to mirror")
    out = tmp_path / "zoo"
    arguments = ["--all", "--quantized", "--mirror", str(models), "--cache-dir", str(tmp_path / "cache")]
    result = CliRunner().invoke(convert_main, [*arguments, "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "3 of 3 converted" in result.stdout
    for entry in zoo.select(quantized=True):
        folder = out / entry.output_name()
        record = json.loads((folder / layout.CONVERSION).read_text())
        served = models / entry.sources()[-1].filename
        assert record["download"]["source"] == "coral" and record["source"]["format"] == "tflite"
        assert record["download"]["sha256"] == hashlib.sha256(served.read_bytes()).hexdigest()
        assert (folder / QUANTIZATION_FILE).is_file()  # the integer model, as the name promises


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--all", "--format", "tflite"], "leave it out with --all"),
        (["--checkpoint", "model.tflite", "--quantized"], "--quantized and --cache-dir choose what is downloaded"),
        (["--quantized", "--depth", "0.5"], "no quantized mobilenet_v2 of depth 0.5; depths: 1.0"),
    ],
)
def test_quantized_and_format_flags_are_checked_before_anything_is_downloaded(arguments, message, tmp_path):
    result = CliRunner().invoke(convert_main, [*arguments, "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 2 and message in result.stderr
    assert not (tmp_path / "cache").exists()


def test_the_parity_matrix_names_the_quantized_entries_it_leaves_out(tmp_path):
    from tools.parity_matrix import MatrixRow, left_out, write_summary

    quantized = [entry.name for entry in zoo.select(quantized=True)]
    assert list(left_out()) == quantized
    row = MatrixRow("m", "classification", "meta_graph", True, "pass", 0.0, None, "meta", 1.0)
    write_summary([row], tmp_path, total=1.0, fixtures_seconds=0.0, jobs=1)
    assert all(f"`{name}`" in (tmp_path / "summary.md").read_text() for name in quantized)
    assert list(json.loads((tmp_path / "summary.json").read_text())["left_out"]) == quantized
