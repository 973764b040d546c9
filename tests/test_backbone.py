"""The backbone for detection and segmentation heads, with transformers' MobileNetV2 loading the same folders
as the truth: the maps it gives (by name or index), their channels, reductions and module names, only the
modules those maps need (so every parameter trains, under DistributedDataParallel too), and timm's
default choice of maps."""

from __future__ import annotations

import pytest
import torch

from mobilenet_torch import (
    MobileNetV2Backbone,
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    MobileNetV2Model,
)
from tests.helpers import logit_tolerance, random_images, to_torch

transformers = pytest.importorskip("transformers")

SIZES = {"classification": 96, "segmentation": 65}


def images(size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return to_torch(random_images((size, size), batch=batch, seed=seed))


def assert_parity(ours: torch.Tensor, reference: torch.Tensor, name: str) -> None:
    tolerance = logit_tolerance(reference.numpy())
    torch.testing.assert_close(ours, reference, rtol=0, atol=tolerance, msg=lambda message: f"{name}: {message}")


@pytest.fixture(params=sorted(SIZES))
def folder_and_size(request, classifier_folder, segmenter_folder):
    folder = classifier_folder if request.param == "classification" else segmenter_folder
    return folder, SIZES[request.param]


def transformers_maps(folder, modules: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The outputs of transformers' MobileNetV2Model modules named `modules`, caught by forward hooks."""
    model = transformers.MobileNetV2Model.from_pretrained(folder).eval()
    maps: dict[str, torch.Tensor] = {}

    def recorder(name: str):
        def record(module, inputs, output) -> None:  # returns None: the output stays as it is
            maps[name] = output

        return record

    hooks = [model.get_submodule(name).register_forward_hook(recorder(name)) for name in modules]
    try:
        with torch.no_grad():
            hidden_states = model(x, output_hidden_states=True).hidden_states
    finally:
        for hook in hooks:
            hook.remove()
    maps["hidden_states"] = hidden_states
    return maps


def test_every_map_is_the_output_of_transformers_module_of_that_name(folder_and_size):
    folder, size = folder_and_size
    model = MobileNetV2Model.from_pretrained(folder)
    backbone = MobileNetV2Backbone(model, out_features=model.feature_info.endpoints())
    # DeepLab has no final 1x1 conv: one map fewer.
    assert backbone.stage_names[-1] == ("layer_19" if size == 96 else "layer_18")
    assert len(backbone.stage_names) == (35 if size == 96 else 34)
    x = images(size)
    with torch.no_grad():
        features = backbone(x).feature_maps
    info = backbone.feature_info
    theirs = transformers_maps(folder, info.module_name(), x)
    assert len(features) == len(info.module_name()) == len(backbone.out_features)
    for name, module, channels, reduction, ours in zip(
        backbone.out_features, info.module_name(), info.channels(), info.reduction(), features, strict=True
    ):
        reference = theirs[module]
        assert ours.shape == reference.shape, name
        assert ours.shape[1] == channels and ours.shape[-1] == -(-size // reduction), name
        assert_parity(ours, reference, name)
    # The 16 block outputs are the hidden states, transformers' and those of the model it was cut from.
    blocks = [features[backbone.out_features.index(f"layer_{i}")] for i in range(3, 19)]
    with torch.no_grad():
        full = model(x, output_hidden_states=True).hidden_states
    for ours, reference, whole in zip(blocks, theirs["hidden_states"], full, strict=True):
        assert_parity(ours, reference, "hidden state")
        assert torch.equal(ours, whole)


@pytest.mark.parametrize(
    "out_features",
    [["layer_1"], ["layer_2"], ["layer_5/expansion_output"], ["layer_19", "layer_15/expansion_output"], None],
    ids=str,
)
def test_backbone_holds_exactly_the_parameters_its_maps_depend_on(out_features, classifier_folder):
    """A loss on the maps gives every parameter of the backbone a gradient; the same loss on the full
    model's maps reaches exactly those parameters (so nothing is missing either)."""
    model = MobileNetV2ForImageClassification.from_pretrained(classifier_folder).train()
    backbone = MobileNetV2Backbone(model, out_features=out_features)
    x = images(96)
    sum(f.square().mean() for f in backbone(x).feature_maps).backward()
    ours = {name for name, p in backbone.named_parameters()}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.parameters())
    model.zero_grad(set_to_none=True)
    maps = model.extract_features(x, backbone.out_features)
    sum(f.square().mean() for f in maps.values()).backward()
    reached = {name for name, p in model.mobilenet_v2.named_parameters() if p.grad is not None}
    assert ours == reached
    assert not any(name.startswith("classifier") for name in ours)


def test_distributed_data_parallel_trains_the_backbone_without_searching_for_unused_parameters(tmp_path):
    """DDP without find_unused_parameters fails on the second step when a parameter got no gradient."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not dist.is_available():
        pytest.skip("this PyTorch build has no torch.distributed")
    model = MobileNetV2ForImageClassification(MobileNetV2Config(depth_multiplier=0.35)).train()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        parallel = DistributedDataParallel(MobileNetV2Backbone(model, out_features=["layer_5", "layer_8"]))
        optimizer = torch.optim.SGD(parallel.parameters(), lr=0.01)
        for step in range(3):
            optimizer.zero_grad()
            loss = sum(f.square().mean() for f in parallel(images(64, seed=step)).feature_maps)
            loss.backward()
            optimizer.step()
    finally:
        dist.destroy_process_group()


def test_out_indices_and_out_features_choose_maps_as_transformers_backbones_do(classifier_folder):
    model = MobileNetV2ForImageClassification.from_pretrained(classifier_folder)
    by_name = MobileNetV2Backbone(model, out_features=["layer_5", "layer_19"])
    by_index = MobileNetV2Backbone(model, out_indices=[by_name.stage_names.index("layer_5"), -1])
    both = MobileNetV2Backbone(model, out_features="layer_19", out_indices=-1)
    assert by_index.out_features == by_name.out_features == ["layer_5", "layer_19"]
    assert by_index.out_indices == by_name.out_indices and both.out_indices == [len(both.stage_names) - 1]
    x = images(96)
    with torch.no_grad():
        for a, b in zip(by_name(x).feature_maps, by_index(x).feature_maps, strict=True):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="name different maps"):
        MobileNetV2Backbone(model, out_features=["layer_5"], out_indices=[0])
    with pytest.raises(ValueError, match="not feature maps"):
        MobileNetV2Backbone(model, out_features=["global_pool"])
    with pytest.raises(ValueError, match="not indices"):
        MobileNetV2Backbone(model, out_indices=[35])


def test_default_maps_are_timms_features_only_stages():
    """timm's mobilenetv2_100 with features_only=True gives 16, 24, 32, 96 and 320 channels at reductions
    2 to 32: the last block output at each reduction."""
    backbone = MobileNetV2Backbone(MobileNetV2ForImageClassification(MobileNetV2Config()))
    assert backbone.feature_info.channels() == backbone.channels == [16, 24, 32, 96, 320]
    assert backbone.feature_info.reduction() == [2, 4, 8, 16, 32]
    assert backbone.feature_info.module_name() == ["conv_stem", "layer.1", "layer.4", "layer.11", "layer.15"]
    assert backbone.feature_info.channels(-1) == 1280 and len(backbone.feature_info) == 35
    assert not hasattr(backbone, "conv_1x1")


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_backbone_traces_and_exports(classifier_folder):
    backbone = MobileNetV2Backbone.from_pretrained(classifier_folder, out_features=["layer_7", "layer_14"])
    x = images(96)
    with torch.no_grad():
        eager = backbone(x).feature_maps
        ((traced_7, traced_14),) = torch.jit.trace(backbone, x)(x)
        exported = torch.export.export(backbone, (x,)).module()(x).feature_maps
    for ours, reference in zip((traced_7, traced_14), eager, strict=True):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    for ours, reference in zip(exported, eager, strict=True):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
