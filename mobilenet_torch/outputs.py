"""Model outputs that behave as transformers' `ModelOutput`, without transformers.

An output is a dataclass and an ordered dict of its fields that are not None, in field order: read by
attribute (`out.logits`; None when not computed), by key (`out["logits"]`) or as a tuple (`out[0]`,
`out.to_tuple()`), with the loss first when there is one. transformers' `Trainer` relies on exactly this:
it takes `outputs["loss"]` from a dict, and `outputs[0]` otherwise.

Each output class is a pytree node (as transformers registers its own), so `torch.export` and the ONNX
exporter flatten it to its tensors; `torch.jit.trace`, which takes only tensors and tuples, gets the tuple
(see `as_output`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields
from functools import partial
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .configuration import MobileNetV2Config


class ModelOutput(OrderedDict):
    """The base of every output: a dict of the fields set (not None), kept in step with the attributes."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        pytree.register_pytree_node(
            cls,
            _flatten,
            partial(_unflatten, cls),
            serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
            flatten_with_keys_fn=_flatten_with_keys,
        )

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if value is not None:
            super().__setitem__(name, value)
        elif name in self:
            super().__delitem__(name)

    def __getitem__(self, key: str | int | slice) -> Any:
        return super().__getitem__(key) if isinstance(key, str) else self.to_tuple()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in {field.name for field in fields(self)}:
            raise KeyError(f"{type(self).__name__} has no field {key!r}")
        setattr(self, key, value)

    def to_tuple(self) -> tuple[Any, ...]:
        """The values of the fields set, in field order."""
        return tuple(self.values())


def _flatten(output: ModelOutput) -> tuple[list[Any], list[str]]:
    return list(output.values()), list(output.keys())


def _flatten_with_keys(output: ModelOutput) -> tuple[list[tuple[Any, Any]], list[str]]:
    return [(pytree.MappingKey(key), value) for key, value in output.items()], list(output.keys())


def _unflatten(cls: type[ModelOutput], values: list[Any], keys: list[str]) -> ModelOutput:
    return cls(**dict(zip(keys, values, strict=True)))


# `hidden_states` are the 16 block outputs (layer_3..layer_18), as transformers'.
@dataclass
class BaseModelOutputWithPooling(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class ImageClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class SemanticSegmenterOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class BackboneOutput(ModelOutput):
    """transformers' backbone output: `feature_maps` in the order of the backbone's `out_features`."""

    feature_maps: tuple[torch.Tensor, ...] | None = None


def as_output(output: ModelOutput, return_dict: bool | None, config: MobileNetV2Config):
    """The output, or its plain tuple (`to_tuple`): when `return_dict` is False, or is unset while the
    config says `return_dict: false` or while tracing (which takes tensors and tuples of them only)."""
    if return_dict is None:
        return_dict = config.return_dict and not torch.jit.is_tracing()
    return output if return_dict else output.to_tuple()
