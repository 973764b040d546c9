"""The transformers-compatible Python API, with transformers' MobileNetV2 classes loading the same folders
as the truth: config arguments and round trips, from_pretrained (Hub ids, dtype, device, overrides),
losses, hidden states, parameter counts, a backbone model from any folder, and torch.hub."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mobilenet_torch import (
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    MobileNetV2ForSemanticSegmentation,
    MobileNetV2Model,
    ModelFolderError,
)
from tests.helpers import REPO, random_images, to_torch

transformers = pytest.importorskip("transformers")

ATOL = 1e-5


def images(size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return to_torch(random_images((size, size), batch=batch, seed=seed))


def close(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    return ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=ATOL, rtol=1e-4)


@pytest.fixture(scope="module")
def classifiers(classifier_folder):
    ours = MobileNetV2ForImageClassification.from_pretrained(classifier_folder)
    theirs = transformers.MobileNetV2ForImageClassification.from_pretrained(classifier_folder).eval()
    return ours, theirs


@pytest.fixture(scope="module")
def segmenters(segmenter_folder):
    ours = MobileNetV2ForSemanticSegmentation.from_pretrained(segmenter_folder)
    theirs = transformers.MobileNetV2ForSemanticSegmentation.from_pretrained(segmenter_folder).eval()
    return ours, theirs


@pytest.mark.parametrize(
    "labels",
    [
        {"num_labels": 10},
        {"id2label": {0: "cat", 1: "dog", 2: "bird"}},
        {"id2label": {"0": "cat", "1": "dog"}, "label2id": {"cat": 0, "dog": 1}},
    ],
)
def test_config_takes_transformers_label_arguments_and_round_trips(labels, tmp_path):
    ours = MobileNetV2Config(depth_multiplier=0.5, **labels)
    theirs = transformers.MobileNetV2Config(depth_multiplier=0.5, **labels)
    assert (ours.num_labels, ours.id2label) == (theirs.num_labels, theirs.id2label)
    assert theirs.label2id in (None, ours.label2id)  # transformers leaves it unset when only id2label is given

    ours.save_pretrained(tmp_path / "ours")
    loaded = transformers.MobileNetV2Config.from_pretrained(tmp_path / "ours")
    assert (loaded.num_labels, loaded.id2label, loaded.label2id) == (ours.num_labels, ours.id2label, ours.label2id)
    assert loaded.depth_multiplier == 0.5

    theirs.save_pretrained(tmp_path / "theirs")
    back = MobileNetV2Config.from_pretrained(tmp_path / "theirs")
    assert back.extra == {"transformers_version": transformers.__version__}  # kept, not modelled
    back.extra = {}
    assert back == MobileNetV2Config.from_pretrained(tmp_path / "ours")


def test_config_without_labels_means_what_transformers_reads_in_it(tmp_path):
    transformers.MobileNetV2Config().save_pretrained(tmp_path)
    assert "id2label" not in json.loads((tmp_path / "config.json").read_text())
    assert MobileNetV2Config.from_pretrained(tmp_path).num_labels == transformers.MobileNetV2Config().num_labels


def test_config_refuses_contradicting_labels():
    with pytest.raises(ValueError, match="num_labels=3 contradicts id2label"):
        MobileNetV2Config(num_labels=3, id2label={0: "cat", 1: "dog"})
    with pytest.raises(ValueError, match="not the inverse"):
        MobileNetV2Config(id2label={0: "cat", 1: "dog"}, label2id={"cat": 1, "dog": 0})


def test_from_pretrained_takes_dtype_device_and_config_overrides(classifier_folder):
    ours = MobileNetV2ForImageClassification.from_pretrained(
        classifier_folder, dtype="bfloat16", device="cpu", classifier_dropout_prob=0.1
    )
    theirs = transformers.MobileNetV2ForImageClassification.from_pretrained(
        classifier_folder, dtype=torch.bfloat16, classifier_dropout_prob=0.1
    )
    assert ours.dtype == theirs.dtype == torch.bfloat16 and ours.device == theirs.device == torch.device("cpu")
    assert ours.config.classifier_dropout_prob == theirs.config.classifier_dropout_prob == ours.dropout.p == 0.1
    theirs_state = theirs.state_dict()
    for name, tensor in ours.state_dict().items():
        assert tensor.dtype == theirs_state[name].dtype and torch.equal(tensor, theirs_state[name]), name
    with pytest.raises(TypeError, match="unexpected keyword argument 'depth'"):
        MobileNetV2ForImageClassification.from_pretrained(classifier_folder, depth=0.5)


def test_a_new_label_count_needs_ignore_mismatched_sizes_and_then_starts_a_new_head(classifier_folder, caplog):
    with pytest.raises(ModelFolderError, match="ignore_mismatched_sizes=True"):
        MobileNetV2ForImageClassification.from_pretrained(classifier_folder, num_labels=10)
    with caplog.at_level(logging.WARNING, logger="mobilenet_torch"):
        ours = MobileNetV2ForImageClassification.from_pretrained(
            classifier_folder, num_labels=10, ignore_mismatched_sizes=True
        )
    assert "classifier is newly initialised" in caplog.text
    theirs = transformers.MobileNetV2ForImageClassification.from_pretrained(
        classifier_folder, num_labels=10, ignore_mismatched_sizes=True
    )
    assert ours.config.num_labels == theirs.config.num_labels == 10
    assert ours.classifier.weight.shape == theirs.classifier.weight.shape
    assert torch.isfinite(ours.classifier.weight).all() and ours.classifier.weight.std() > 0
    theirs_state = theirs.state_dict()
    for name, tensor in ours.state_dict().items():
        if name.startswith("mobilenet_v2."):
            assert torch.equal(tensor, theirs_state[name]), name


def _hub_cache(folder, cache, repo_id: str) -> None:
    """A Hugging Face cache holding `repo_id` at main, laid out as huggingface_hub lays it out: blobs named
    by content hash, a snapshot of symlinks to them, refs/main naming the snapshot's commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    (repo / "snapshots" / commit).mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        blob = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        shutil.copyfile(folder / name, repo / "blobs" / blob)
        (repo / "snapshots" / commit / name).symlink_to(f"../../blobs/{blob}")


HUB_SCRIPT = """
import json, torch, transformers
from mobilenet_torch import MobileNetV2ForImageClassification, ModelFolderError, load_pretrained
x = torch.from_numpy(__import__("numpy").random.default_rng(0).uniform(-1, 1, (1, 3, 96, 96)).astype("float32"))
ours = MobileNetV2ForImageClassification.from_pretrained("tester/mnv2")
theirs = transformers.AutoModelForImageClassification.from_pretrained("tester/mnv2").eval()
with torch.no_grad():
    difference = (ours(x).logits - theirs(x).logits).abs().max().item()
try:
    MobileNetV2ForImageClassification.from_pretrained("tester/unknown")
    unknown = None
except ModelFolderError as error:
    unknown = str(error)
kind = type(load_pretrained("tester/mnv2")).__name__
print(json.dumps({"difference": difference, "unknown": unknown, "kind": kind}))
"""


def test_hub_id_loads_from_an_offline_hugging_face_cache(classifier_folder, tmp_path):
    _hub_cache(classifier_folder, tmp_path / "cache", "tester/mnv2")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", HUB_SCRIPT], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["difference"] <= ATOL and result["kind"] == "MobileNetV2ForImageClassification"
    assert result["unknown"].startswith("tester/unknown is neither a folder nor a model found on the Hub")


def test_hub_id_without_huggingface_hub_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes `import huggingface_hub` fail
    with pytest.raises(ModelFolderError, match="needs huggingface_hub: pip install huggingface_hub"):
        MobileNetV2ForImageClassification.from_pretrained("google/mobilenet_v2_1.0_224")


def test_a_path_that_is_no_folder_is_not_taken_for_a_hub_id(tmp_path):
    with pytest.raises(ModelFolderError, match="is not a folder: pass a folder"):
        MobileNetV2ForImageClassification.from_pretrained(tmp_path / "absent")


def test_classification_loss_and_hidden_states_equal_transformers(classifiers):
    ours, theirs = classifiers
    x = images(96, batch=3)
    cases = {
        "single label": torch.tensor([0, 5, 1000]),
        "multi label": (torch.rand(3, 1001, generator=torch.Generator().manual_seed(0)) > 0.5).float(),
    }
    for case, labels in cases.items():
        theirs.config.problem_type = None  # transformers keeps the problem type of its first loss
        with torch.no_grad():
            mine = ours(x, output_hidden_states=True, labels=labels)
            reference = theirs(x, output_hidden_states=True, labels=labels)
        assert close(mine.logits, reference.logits), case
        assert abs(mine.loss.item() - reference.loss.item()) <= ATOL, case
        assert len(mine.hidden_states) == len(reference.hidden_states) == 16
        for a, b in zip(mine.hidden_states, reference.hidden_states, strict=True):
            assert close(a, b), case
    theirs.config.problem_type = None
    with torch.no_grad():
        plain = ours(x, labels=cases["single label"], return_dict=False)
        reference = theirs(x, labels=cases["single label"], return_dict=False)
        assert ours(x).loss is None and ours(x).hidden_states is None
    assert len(plain) == len(reference) == 2 and all(isinstance(t, torch.Tensor) for t in plain)


def test_segmentation_loss_and_hidden_states_equal_transformers(segmenters):
    ours, theirs = segmenters
    x = images(65)
    labels = torch.randint(0, 21, (2, 65, 65), generator=torch.Generator().manual_seed(0))
    labels[:, :10] = ours.config.semantic_loss_ignore_index  # a band of unlabelled pixels, as in VOC
    with torch.no_grad():
        mine = ours(x, labels=labels, output_hidden_states=True)
        reference = theirs(x, labels=labels, output_hidden_states=True)
    assert close(mine.logits, reference.logits)
    assert abs(mine.loss.item() - reference.loss.item()) <= ATOL
    assert [h.shape for h in mine.hidden_states] == [h.shape for h in reference.hidden_states]
    assert len(mine.hidden_states) == 16 and close(mine.hidden_states[-1], reference.hidden_states[-1])


def test_device_and_parameter_counts_equal_transformers(classifiers, segmenters):
    (ours, theirs), (our_segmenter, their_segmenter) = classifiers, segmenters
    assert ours.device == theirs.device
    assert ours.num_parameters() == theirs.num_parameters()
    for model in (ours, theirs):
        model.mobilenet_v2.requires_grad_(False)
    try:
        assert ours.num_parameters(only_trainable=True) == theirs.num_parameters(only_trainable=True)
    finally:
        for model in (ours, theirs):
            model.mobilenet_v2.requires_grad_(True)
    # transformers' segmentation model also holds the final 1x1 conv it never uses; this one has none.
    unused = sum(p.numel() for p in their_segmenter.mobilenet_v2.conv_1x1.parameters())
    assert our_segmenter.num_parameters() == their_segmenter.num_parameters() - unused


def test_backbone_from_a_classification_folder_drops_the_head(classifier_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="mobilenet_torch"):
        ours = MobileNetV2Model.from_pretrained(classifier_folder)
    assert "MobileNetV2Model takes no classifier; dropped those weights" in caplog.text
    theirs = transformers.MobileNetV2Model.from_pretrained(classifier_folder).eval()
    x = images(96)
    with torch.no_grad():
        mine, reference = ours(x), theirs(x)
    assert close(mine.last_hidden_state, reference.last_hidden_state)
    assert close(mine.pooler_output, reference.pooler_output)


def test_backbone_loads_the_folder_transformers_writes_for_its_backbone(classifier_folder, tmp_path, caplog):
    theirs = transformers.MobileNetV2Model.from_pretrained(classifier_folder).eval()
    theirs.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as saved:
        assert not any(key.startswith("mobilenet_v2.") for key in saved.keys())
    ours = MobileNetV2Model.from_pretrained(tmp_path)
    x = images(96)
    with torch.no_grad():
        assert close(ours(x).last_hidden_state, theirs(x).last_hidden_state)
    # And a classifier on it starts a new head, as transformers' does.
    with caplog.at_level(logging.WARNING, logger="mobilenet_torch"):
        classifier = MobileNetV2ForImageClassification.from_pretrained(tmp_path)
    assert "classifier is newly initialised" in caplog.text
    their_classifier = transformers.MobileNetV2ForImageClassification.from_pretrained(tmp_path)
    assert classifier.classifier.weight.shape == their_classifier.classifier.weight.shape


def test_backbone_from_a_segmentation_folder_is_the_one_deeplab_uses(segmenter_folder, segmenters, caplog):
    with caplog.at_level(logging.WARNING, logger="mobilenet_torch"):
        ours = MobileNetV2Model.from_pretrained(segmenter_folder)
    assert "takes no segmentation_head" in caplog.text and "conv_1x1" not in caplog.text
    assert ours.conv_1x1 is None  # the folder's final conv is an inert placeholder
    x = images(65)
    with torch.no_grad():
        reference = segmenters[1](x, output_hidden_states=True).hidden_states[-1]
        assert close(ours(x).last_hidden_state, reference)


def test_extract_features_takes_a_single_name(classifiers):
    ours, theirs = classifiers
    x = images(96)
    with torch.no_grad():
        layer_5 = ours.extract_features(x, "layer_5")
        reference = theirs(x, output_hidden_states=True).hidden_states[2]  # layer_5 is the third block
    assert isinstance(layer_5, torch.Tensor) and close(layer_5, reference)
    with torch.no_grad():
        assert ours.extract_features(x, "logits").shape == (2, 1001)
        assert list(ours.extract_features(x, ["layer_5"])) == ["layer_5"]


def test_torch_hub_loads_from_a_clone(classifier_folder, segmenter_folder, classifiers):
    hub = dict(repo_or_dir=str(REPO), source="local")
    model = torch.hub.load(model="mobilenet_v2", name_or_path=str(classifier_folder), **hub)
    assert type(model) is MobileNetV2ForImageClassification
    x = images(96)
    with torch.no_grad():
        assert close(model(x).logits, classifiers[1](x).logits)
    segmenter = torch.hub.load(model="mobilenet_v2", name_or_path=str(segmenter_folder), **hub)
    assert type(segmenter) is MobileNetV2ForSemanticSegmentation
    backbone = torch.hub.load(model="mobilenet_v2_backbone", name_or_path=str(classifier_folder), **hub)
    assert type(backbone) is MobileNetV2Model
    untrained = torch.hub.load(model="mobilenet_v2", depth_multiplier=0.5, num_labels=10, **hub)
    assert untrained.classifier.out_features == 10 and untrained.config.depth_multiplier == 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: loading onto one cannot be tried")
def test_from_pretrained_reads_the_weights_onto_the_device(classifier_folder, classifiers):
    ours = MobileNetV2ForImageClassification.from_pretrained(classifier_folder, device="cuda")
    assert ours.device.type == "cuda" and all(t.device.type == "cuda" for t in ours.state_dict().values())
    x = images(96)
    with torch.no_grad():
        assert torch.allclose(ours(x.cuda()).logits.cpu(), classifiers[1](x).logits, atol=1e-4)


@pytest.mark.parametrize("torch_dtype", [torch.float16, "bfloat16", "auto"])
def test_from_pretrained_takes_torch_dtype_as_transformers_does(torch_dtype, classifier_folder, tmp_path):
    """The dtype "auto" keeps the file's: a float16 folder loads as float16."""
    folder = tmp_path / "half"
    MobileNetV2ForImageClassification.from_pretrained(classifier_folder, dtype=torch.float16).save_pretrained(folder)
    ours = MobileNetV2ForImageClassification.from_pretrained(folder, torch_dtype=torch_dtype)
    theirs = transformers.MobileNetV2ForImageClassification.from_pretrained(folder, torch_dtype=torch_dtype)
    assert ours.dtype == theirs.dtype
    theirs_state = theirs.state_dict()
    for name, tensor in ours.state_dict().items():
        assert tensor.dtype == theirs_state[name].dtype and torch.equal(tensor, theirs_state[name]), name


@pytest.mark.parametrize("device_map", ["auto", "cpu", {"": "cpu"}, torch.device("cpu")], ids=str)
def test_from_pretrained_takes_a_device_map_for_one_device(device_map, classifier_folder):
    pytest.importorskip("accelerate")  # transformers' device_map needs it
    ours = MobileNetV2ForImageClassification.from_pretrained(classifier_folder, device_map=device_map)
    theirs = transformers.MobileNetV2ForImageClassification.from_pretrained(classifier_folder, device_map=device_map)
    assert ours.device.type == theirs.device.type
    assert all(tensor.device == ours.device for tensor in ours.state_dict().values())


def test_device_maps_beyond_one_device_are_refused_with_what_to_pass(classifier_folder):
    with pytest.raises(ValueError, match="runs on one device: pass device_map='auto'"):
        MobileNetV2ForImageClassification.from_pretrained(
            classifier_folder, device_map={"mobilenet_v2": "cpu", "classifier": "meta"}
        )
    with pytest.raises(ValueError, match="'balanced' is not a device"):
        MobileNetV2ForImageClassification.from_pretrained(classifier_folder, device_map="balanced")
    with pytest.raises(ValueError, match="differ; pass one of them"):
        MobileNetV2ForImageClassification.from_pretrained(classifier_folder, device="meta", device_map="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda:0 is not available here"):
            MobileNetV2ForImageClassification.from_pretrained(classifier_folder, device_map=0)


def test_output_options_passed_to_from_pretrained_are_config_overrides(classifier_folder):
    """transformers' generic `output_hidden_states` and `return_dict` given to from_pretrained apply to
    every call, as in transformers."""
    options = dict(output_hidden_states=True, return_dict=False)
    ours = MobileNetV2ForImageClassification.from_pretrained(classifier_folder, **options)
    theirs = transformers.MobileNetV2ForImageClassification.from_pretrained(classifier_folder, **options).eval()
    assert ours.config.output_hidden_states and not ours.config.return_dict
    x = images(96)
    with torch.no_grad():
        mine, reference = ours(x), theirs(x)
    assert type(mine) is type(reference) is tuple and len(mine) == len(reference) == 2
    assert len(mine[1]) == len(reference[1]) == 16 and close(mine[0], reference[0])
    with torch.no_grad():
        assert ours(x, output_hidden_states=False, return_dict=True).hidden_states is None


def test_hub_options_apply_to_hub_ids_and_a_local_folder_is_read_as_it_is(classifier_folder, tmp_path):
    _hub_cache(classifier_folder, tmp_path / "cache", "tester/mnv2")
    hub = dict(cache_dir=tmp_path / "cache", local_files_only=True)
    from_hub = MobileNetV2ForImageClassification.from_pretrained("tester/mnv2", revision="main", **hub)
    local = MobileNetV2ForImageClassification.from_pretrained(classifier_folder, revision="v2", cache_dir=tmp_path)
    for name, tensor in local.state_dict().items():
        assert torch.equal(tensor, from_hub.state_dict()[name]), name
    with pytest.raises(ModelFolderError, match="neither a folder nor a model found on the Hub"):
        MobileNetV2ForImageClassification.from_pretrained("tester/mnv2", revision="v2", **hub)


def test_options_with_no_meaning_here_are_refused_with_what_to_do(classifier_folder):
    with pytest.raises(TypeError, match="does not take subfolder=: pass the subfolder's path"):
        MobileNetV2ForImageClassification.from_pretrained(classifier_folder, subfolder="model")
    with pytest.raises(TypeError, match="unexpected keyword argument 'trust_remote_code': it takes config fields"):
        MobileNetV2ForImageClassification.from_pretrained(classifier_folder, trust_remote_code=True)
    with pytest.raises(ValueError, match="only model.safetensors is read"):
        MobileNetV2ForImageClassification.from_pretrained(classifier_folder, use_safetensors=False)
    assert MobileNetV2ForImageClassification.from_pretrained(classifier_folder, use_safetensors=True) is not None
