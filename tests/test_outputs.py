"""Outputs behave as transformers' ModelOutput, with transformers' own MobileNetV2 outputs on the same folder
as the truth (keys, tuple order, attribute and key access, the loss first), train in transformers' Trainer
on the cross-entropy loss, and stay exportable."""

from __future__ import annotations

import pytest
import torch

from mobilenet_torch import MobileNetV2ForImageClassification, MobileNetV2ForSemanticSegmentation, MobileNetV2Model
from mobilenet_torch.outputs import ImageClassifierOutput
from tests.helpers import random_images, to_torch

transformers = pytest.importorskip("transformers")


def images(size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return to_torch(random_images((size, size), batch=batch, seed=seed))


def assert_same_output(ours, theirs) -> None:
    """Same keys in the same order, same tuple, same values by key, attribute and index."""
    assert isinstance(ours, dict) and list(ours.keys()) == list(theirs.keys())
    assert len(ours.to_tuple()) == len(theirs.to_tuple())
    for index, key in enumerate(theirs.keys()):
        values = [ours[key], getattr(ours, key), ours[index], ours.to_tuple()[index]]
        assert all(value is values[0] for value in values), key
        mine, reference = (value if isinstance(value, tuple) else (value,) for value in (ours[key], theirs[key]))
        assert len(mine) == len(reference), key
        for a, b in zip(mine, reference, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda message, key=key: f"{key}: {message}")


CASES = {
    "logits": {},
    "loss first": {"labels": True},
    "hidden states": {"output_hidden_states": True},
    "everything": {"labels": True, "output_hidden_states": True},
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES)
@pytest.mark.parametrize("kind", ["classification", "segmentation", "backbone"])
def test_outputs_are_those_of_transformers(kind, case, classifier_folder, segmenter_folder):
    if kind == "backbone" and "labels" in case:
        pytest.skip("the backbone takes no labels")
    folder = segmenter_folder if kind == "segmentation" else classifier_folder
    ours_cls, theirs_cls = {
        "classification": (MobileNetV2ForImageClassification, transformers.MobileNetV2ForImageClassification),
        "segmentation": (MobileNetV2ForSemanticSegmentation, transformers.MobileNetV2ForSemanticSegmentation),
        "backbone": (MobileNetV2Model, transformers.MobileNetV2Model),
    }[kind]
    ours, theirs = ours_cls.from_pretrained(folder), theirs_cls.from_pretrained(folder).eval()
    size = 65 if kind == "segmentation" else 96
    x = images(size)
    kwargs = dict(case)
    if kwargs.pop("labels", False):
        shape = (2, size, size) if kind == "segmentation" else (2,)
        kwargs["labels"] = torch.randint(0, 21, shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine, reference = ours(x, **kwargs), theirs(x, **kwargs)
        plain, plain_reference = ours(x, return_dict=False, **kwargs), theirs(x, return_dict=False, **kwargs)
    assert_same_output(mine, reference)
    assert type(plain) is tuple and len(plain) == len(plain_reference) == len(reference.to_tuple())
    if "labels" in kwargs:
        assert list(mine)[0] == "loss" and mine[0].ndim == 0
    with pytest.raises(KeyError):
        mine["attentions"]  # a field neither model computes is absent, as in transformers


def test_outputs_can_be_set_as_transformers_are():
    logits = torch.zeros(2, 3)
    output = ImageClassifierOutput(logits=logits)
    assert output.loss is None and list(output) == ["logits"] and output.to_tuple() == (logits,)
    output["loss"] = torch.tensor(1.0)
    assert output.loss is output["loss"] and "loss" in output
    with pytest.raises(KeyError):
        output["labels"] = logits


@pytest.fixture(scope="module")
def training_batch() -> list[dict[str, torch.Tensor]]:
    """Four in-memory examples: one batch, the same at every step."""
    pixels = images(64, batch=4, seed=5)
    return [{"pixel_values": pixels[i], "labels": torch.tensor(i * 7)} for i in range(4)]


def train(model, batch, folder) -> tuple[list[float], torch.nn.Module]:
    """Three steps of transformers' Trainer; the losses it logs."""
    args = transformers.TrainingArguments(
        output_dir=str(folder),
        per_device_train_batch_size=len(batch),
        max_steps=3,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=batch)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry], trainer.model


def test_trainer_trains_on_the_cross_entropy_loss(classifier_folder, training_batch, tmp_path):
    """The Trainer takes `outputs["loss"]`; its first logged loss is that of transformers' own model on the
    same folder and batch (both in training mode, dropout off), and training lowers it."""
    pytest.importorskip("accelerate")
    ours = MobileNetV2ForImageClassification.from_pretrained(classifier_folder, classifier_dropout_prob=0.0)
    before = {name: tensor.clone() for name, tensor in ours.state_dict().items()}
    losses, trained = train(ours, training_batch, tmp_path / "ours")
    theirs = transformers.MobileNetV2ForImageClassification.from_pretrained(
        classifier_folder, classifier_dropout_prob=0.0
    ).train()
    pixels = torch.stack([example["pixel_values"] for example in training_batch])
    labels = torch.stack([example["labels"] for example in training_batch])
    with torch.no_grad():
        reference = theirs(pixels, labels=labels).loss.item()
        assert abs(reference - torch.nn.functional.cross_entropy(theirs(pixels).logits, labels).item()) < 1e-5
    assert len(losses) == 3
    assert abs(losses[0] - reference) <= 1e-4 * max(1.0, reference)
    assert losses[-1] < losses[0]
    changed = [name for name, tensor in trained.state_dict().items() if not torch.equal(tensor, before[name])]
    assert "classifier.weight" in changed and "mobilenet_v2.conv_stem.first_conv.convolution.weight" in changed


@pytest.mark.parametrize("kind", ["classification", "segmentation"])
def test_torch_export_returns_the_output_with_its_loss(kind, classifier_folder, segmenter_folder):
    cls = MobileNetV2ForImageClassification if kind == "classification" else MobileNetV2ForSemanticSegmentation
    model = cls.from_pretrained(classifier_folder if kind == "classification" else segmenter_folder)
    size = 96 if kind == "classification" else 65
    x = images(size)
    labels = torch.zeros((2, size, size) if kind == "segmentation" else (2,), dtype=torch.long)
    with torch.no_grad():
        eager = model(x, labels=labels)
        exported = torch.export.export(model, (x,), {"labels": labels}).module()(x, labels=labels)
    assert type(exported) is type(eager) and list(exported) == ["loss", "logits"]
    torch.testing.assert_close(exported["loss"], eager.loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(exported.logits, eager.logits, rtol=0, atol=1e-5)
