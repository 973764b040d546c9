"""Damaged, hostile and unusual Keras files: each gives one KerasFileError line naming the problem,
before any value is read; sniffing tells the Keras containers from everything else; TensorFlow and
Keras are never imported to read them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile

import h5py
import numpy as np
import pytest

from converter.errors import ConverterError, KerasFileError, KerasHeadError
from converter.formats.keras import KerasReader
from converter.formats.sniffing import is_keras_file
from converter.output.records import ConversionRecord
from fixtures.keras_builder import FINE_TUNED_ALPHA, FINE_TUNED_CLASSES, ensure_keras_fixture

pytest.importorskip("keras")  # Keras writes the files that get damaged here
pytest.importorskip("tf_keras")

LEGACY, KERAS3 = "tf_keras_weights", "keras3_weights"


@pytest.fixture(scope="module")
def small():
    return ensure_keras_fixture(0.35)


def copy(small, kind, tmp_path):
    source = small.file(kind)
    target = tmp_path / source.name
    shutil.copyfile(source, target)
    return target


def edit_archive_weights(source, target, edit):
    """`source` (a .keras zip) copied to `target` with `edit(h5py.File)` applied to its model.weights.h5."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "model.weights.h5":
                inner = target.with_name(target.name + ".weights.h5")
                inner.write_bytes(data)
                with h5py.File(inner, "r+") as f:
                    edit(f)
                data = inner.read_bytes()
                inner.unlink()
            dst.writestr(info, data)


def refused(path, match, error=KerasFileError, **options):
    with pytest.raises(error, match=match) as caught:
        reader = KerasReader(path, **options)
        for name in reader.names():
            reader.read(name)
        reader.close()
    message = str(caught.value)
    assert "\n" not in message and isinstance(caught.value, ConverterError)
    return message


def test_sniffs_every_keras_container_and_nothing_else(small, tmp_path):
    for kind in ("tf_keras_weights", "keras3_legacy", "keras3_weights", "keras3_archive", "keras3_sharded"):
        assert is_keras_file(small.file(kind)), kind
    fake = tmp_path / "model.h5"
    fake.write_bytes(b"not hdf5 at all")
    archive = tmp_path / "other.keras"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("config.json", "{}")
    assert not is_keras_file(fake) and not is_keras_file(archive) and not is_keras_file(tmp_path)
    ckpt = ensure_keras_fixture(0.35).root / "references.npz"
    assert not is_keras_file(ckpt)


@pytest.mark.parametrize("kind", [LEGACY, KERAS3, "keras3_archive"])
def test_truncated_files(small, tmp_path, kind):
    path = copy(small, kind, tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    refused(path, "truncated|not a readable")


def test_wrong_shape(small, tmp_path):
    path = copy(small, LEGACY, tmp_path)
    with h5py.File(path, "r+") as f:
        group = f["block_3_expand/block_3_expand"]
        del group["kernel:0"]
        group["kernel:0"] = np.zeros((1, 1, 40, 144), np.float32)
    assert "block_3_expand" in refused(path, r"kernel shape \[1, 1, 40, 144\]")


def test_missing_layer(small, tmp_path):
    path = copy(small, LEGACY, tmp_path)
    with h5py.File(path, "r+") as f:
        f.attrs["layer_names"] = [n for n in f.attrs["layer_names"] if n != "block_7_depthwise_BN"]
    refused(path, "not a whole MobileNetV2|out of order")


def test_missing_layer_in_keras3_file(small, tmp_path):
    path = copy(small, KERAS3, tmp_path)
    with h5py.File(path, "r+") as f:
        del f["layers/depthwise_conv2d_16"]
    refused(path, "only 16 depthwise_conv2d layers")


def test_extra_layer_after_the_backbone_is_a_head_error(small, tmp_path):
    path = copy(small, LEGACY, tmp_path)
    with h5py.File(path, "r+") as f:
        names = list(f.attrs["layer_names"])
        extra = f.create_group("extra_conv")
        extra.attrs["weight_names"] = ["extra_conv/kernel:0"]
        extra["extra_conv/kernel:0"] = np.zeros((1, 1, 1280, 8), np.float32)
        f.attrs["layer_names"] = names[:-2] + ["extra_conv"] + names[-2:]
    message = refused(path, "2 weighted layers", KerasHeadError)
    assert "extra_conv" in message and "predictions" in message and "backbone" in message
    # The offered way out works: the backbone alone.
    reader = KerasReader(path, backbone_only=True)
    assert not [n for n in reader.names() if "Logits" in n] and any("dropped" in note for note in reader.hints.notes)
    reader.close()


def test_layers_out_of_order(small, tmp_path):
    path = copy(small, LEGACY, tmp_path)
    with h5py.File(path, "r+") as f:
        names = list(f.attrs["layer_names"])
        i, j = names.index("block_4_expand"), names.index("block_5_expand")
        names[i], names[j] = names[j], names[i]
        f.attrs["layer_names"] = names
    refused(path, "out of order")


def test_huge_claimed_shape(small, tmp_path):
    path = copy(small, KERAS3, tmp_path)
    with h5py.File(path, "r+") as f:
        del f["layers/conv2d_5/vars/0"]
        f["layers/conv2d_5/vars"].create_dataset("0", shape=(1, 1, 1 << 20, 1 << 20), dtype="f4", chunks=(1, 1, 64, 64))
    refused(path, "claims shape")


@pytest.mark.parametrize("link", ["external", "soft"])
def test_links_are_refused(small, tmp_path, link):
    path = copy(small, LEGACY, tmp_path)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["kernel"] = np.zeros((3, 3, 3, 16), np.float32)
    with h5py.File(path, "r+") as f:
        del f["Conv1/Conv1/kernel:0"]
        if link == "external":
            f["Conv1/Conv1/kernel:0"] = h5py.ExternalLink(str(other), "/kernel")
        else:
            f["Conv1/Conv1/kernel:0"] = h5py.SoftLink("/bn_Conv1/bn_Conv1/gamma:0")
    refused(path, "Link, which is refused")


def test_external_dataset_storage_is_refused(small, tmp_path):
    path = copy(small, LEGACY, tmp_path)
    raw = tmp_path / "raw.bin"
    raw.write_bytes(np.zeros((3, 3, 3, 16), np.float32).tobytes())
    with h5py.File(path, "r+") as f:
        del f["Conv1/Conv1/kernel:0"]
        f["Conv1/Conv1"].create_dataset("kernel:0", shape=(3, 3, 3, 16), dtype="f4", external=[(str(raw), 0, 1728)])
    refused(path, "keeps its data in other files")


def test_non_float_dtype(small, tmp_path):
    path = copy(small, KERAS3, tmp_path)
    with h5py.File(path, "r+") as f:
        values = f["layers/batch_normalization_3/vars/2"][()]
        del f["layers/batch_normalization_3/vars/2"]
        f["layers/batch_normalization_3/vars/2"] = values.astype(np.int32)
    refused(path, "dtype int32, not a float type")


def test_names_attribute_of_the_wrong_type(small, tmp_path):
    path = copy(small, LEGACY, tmp_path)
    with h5py.File(path, "r+") as f:
        f.attrs["layer_names"] = np.arange(5)
    refused(path, "attribute layer_names holds int64 values, not text")


@pytest.mark.parametrize(
    "damage",
    [
        # The string's size and bytes zeroed: the next object header reads as a free-space object of 0
        # bytes, on which libhdf5's walk of the collection never advances.
        lambda data, at: data[:at] + bytes(8 + 24) + data[at + 32 :],
        # A size past the collection's end: its objects must lie inside it.
        lambda data, at: data[:at] + (2**64 - 8).to_bytes(8, "little") + data[at + 8 :],
    ],
    ids=["zero-size-free-object", "size-past-the-end"],
)
def test_inconsistent_global_heap_is_refused_before_h5py_reads_it(small, tmp_path, damage):
    path = copy(small, LEGACY, tmp_path)
    data = path.read_bytes()
    # The layer names are variable-length strings in a global heap collection: each object's 8-byte size
    # right before its bytes (group link names live in local heaps, with no size in front).
    name = b"block_10_project_BN"
    at = data.index(len(name).to_bytes(8, "little") + name)
    path.write_bytes(damage(data, at))
    refused(path, f"{path.name} is damaged: the global heap collection at byte \\d+ .* is inconsistent")


def test_archive_whose_weights_lost_the_classifier_its_config_has(small, tmp_path):
    path = tmp_path / "no_head.keras"
    edit_archive_weights(small.file("keras3_archive"), path, lambda f: f.__delitem__("layers/dense"))
    refused(path, "its model config has predictions after the backbone, but the weights hold no such layer")
    backbone = KerasReader(small.file("keras3_archive"), backbone_only=True).names()
    assert KerasReader(path, backbone_only=True).names() == backbone  # dropping the head is then asked for


def test_archive_without_weights_and_corrupt_config(tmp_path):
    archive = tmp_path / "broken.keras"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("config.json", "{}")
    refused(archive, "lacks model.weights.h5")
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("config.json", "{not json")
        zf.writestr("model.weights.h5", b"")
    refused(archive, "not valid JSON")


def test_shard_index_may_not_point_elsewhere(small, tmp_path):
    index = tmp_path / "x.weights.json"
    index.write_text(json.dumps({"weight_map": {"/layers/conv2d/vars": "../../etc/passwd"}}))
    refused(index, "plain file names")
    index.write_text(json.dumps({"weight_map": {"/layers/conv2d/vars": "absent_00000.weights.h5"}}))
    refused(index, "not next to it")


def test_max_pooled_head_is_refused_and_offers_the_backbone():
    fixture = ensure_keras_fixture(FINE_TUNED_ALPHA)
    message = refused(fixture.file("max_pool_archive"), "GlobalMaxPooling2D", KerasHeadError)
    assert "--backbone-only" in message
    reader = KerasReader(fixture.file("max_pool_archive"), backbone_only=True)
    assert len(reader.names()) == 260 and reader.hints.labels is None
    reader.close()


def test_two_dense_head_is_read_as_it_comes():
    """Dense(64) -> Dense(5), both linear: the first becomes a hidden layer, the second the classifier."""
    reader = KerasReader(ensure_keras_fixture(FINE_TUNED_ALPHA).file("two_dense_archive"))
    assert reader.hints.hidden_activations == ("linear",)
    assert reader.shape("MobilenetV2/Logits/Dense_0/weights") == (1, 1, 1280, 64)
    assert reader.shape("MobilenetV2/Logits/Conv2d_1c_1x1/weights") == (1, 1, 64, FINE_TUNED_CLASSES)
    assert any("Dropout" in note for note in reader.hints.notes)
    reader.close()


def test_reading_never_imports_tensorflow_or_keras(small):
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('tensorflow', 'tf_keras', 'keras'):\n"
        "            raise ImportError('blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from pathlib import Path\n"
        "from converter.formats.keras import KerasReader\n"
        f"for kind in {[str(small.file(k)) for k in ('tf_keras_full', 'keras3_archive', 'keras3_sharded')]!r}:\n"
        "    reader = KerasReader(Path(kind))\n"
        "    assert len([reader.read(n) for n in reader.names()]) == 262\n"
        "    reader.close()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_cli_converts_a_keras_file_and_reports_a_damaged_one_in_one_line(small, tmp_path):
    from tests.test_cli import assert_one_line_error, run_cli

    result = run_cli("--checkpoint", small.file("keras3_archive"), "--output", tmp_path / "model")
    assert result.returncode == 0, result.stderr
    assert ConversionRecord.read(tmp_path / "model").source["format"] == "keras"
    damaged = copy(small, LEGACY, tmp_path)
    damaged.write_bytes(damaged.read_bytes()[:4096])
    assert_one_line_error(run_cli("--checkpoint", damaged, "--output", tmp_path / "out"), 1, damaged.name)
    assert not (tmp_path / "out").exists()
    head = ensure_keras_fixture(FINE_TUNED_ALPHA).file("max_pool_archive")
    assert_one_line_error(
        run_cli("--checkpoint", head, "--output", tmp_path / "out"), 1, "GlobalMaxPooling2D", "backbone"
    )


def test_class_names_in_the_model_config_become_the_labels(tmp_path):
    source = ensure_keras_fixture(FINE_TUNED_ALPHA).file("fine_tuned_archive")
    names = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
    target = tmp_path / "named.keras"
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "config.json":
                data = json.dumps({**json.loads(data), "class_names": names}).encode()
            dst.writestr(info, data)
    reader = KerasReader(target)
    assert reader.hints.labels == tuple(names)
    reader.close()


def tensors(path):
    reader = KerasReader(path)
    try:
        return {name: reader.read(name) for name in reader.names()}
    finally:
        reader.close()


def test_fixed_length_byte_names_read_like_strings(small, tmp_path):
    """The published files store layer_names / weight_names as fixed-length bytes, not str."""
    path = copy(small, LEGACY, tmp_path)
    with h5py.File(path, "r+") as f:

        def as_bytes(attrs, name):
            attrs[name] = np.array([n.encode() for n in attrs[name]], dtype="S")

        for key in [k for k in f.attrs if k.startswith("layer_names")]:
            as_bytes(f.attrs, key)
        f.visititems(lambda _, node: "weight_names" in node.attrs and as_bytes(node.attrs, "weight_names"))
        assert f.attrs["layer_names"].dtype.kind == "S"
    clean = tensors(small.file(LEGACY))
    assert {n: a.tobytes() for n, a in tensors(path).items()} == {n: a.tobytes() for n, a in clean.items()}


@pytest.mark.parametrize("kind", [KERAS3, "keras3_archive"])
def test_keras3_files_without_name_attributes(small, tmp_path, kind):
    """Older Keras 3 writers leave out the `name` attribute: class and counter alone place the layers."""
    path = copy(small, kind, tmp_path)
    if kind == KERAS3:
        with h5py.File(path, "r+") as f:
            f.visititems(lambda _, node: node.attrs.__delitem__("name") if "name" in node.attrs else None)
    else:
        edit_archive_weights(
            small.file(kind),
            path,
            lambda f: f.visititems(lambda _, node: node.attrs.__delitem__("name") if "name" in node.attrs else None),
        )
    clean = tensors(small.file(kind))
    assert {n: a.tobytes() for n, a in tensors(path).items()} == {n: a.tobytes() for n, a in clean.items()}
