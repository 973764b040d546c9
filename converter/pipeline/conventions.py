"""Which checkpoint tensor feeds each model variable: raw values or exponential-moving-average shadows.

Conventions (see the project README):
- ``raw``: every model variable as stored.
- ``ema``: trainable variables from their shadows, BatchNorm moving statistics raw (the authors'
  notebook and the Hugging Face port).
- ``ema-all``: every model variable from its shadow (slim's eval script).

Optimizer slots, ``global_step`` and the quantization variables of quantization-aware checkpoints are
set aside by rule, each under its own reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from converter.errors import WeightsConventionError
from converter.vocabulary import CONVENTIONS

EMA_SUFFIX = "/ExponentialMovingAverage"
# Optimizer state and bookkeeping that never belongs to the model.
OPTIMIZER_SLOT_SUFFIXES = ("/RMSProp", "/RMSProp_1", "/Momentum")
BOOKKEEPING_NAMES = ("global_step",)
# tf.contrib.quantize's variables in quantization-aware checkpoints: every one lives under a scope whose
# last part ends with this (weights_quant, act_quant, post_activation_bypass_quant, ...), moving-average
# bookkeeping (<prefix>/<prefix>/min/biased, .../local_step) included; the quantization delay's counter
# has its own name.
QUANTIZATION_SCOPE_SUFFIX = "_quant"
QUANTIZATION_BOOKKEEPING_NAMES = ("fake_quantization_step",)
NON_TRAINABLE_SUFFIXES = ("/moving_mean", "/moving_variance")


@dataclass(frozen=True)
class WeightsPlan:
    """model variable -> checkpoint tensor to read it from, and what was set aside by rule."""

    sources: dict[str, str]
    convention: str
    ignored: dict[str, list[str]]


def is_quantization_variable(name: str) -> bool:
    scopes = name.split("/")[:-1]
    return name in QUANTIZATION_BOOKKEEPING_NAMES or any(s.endswith(QUANTIZATION_SCOPE_SUFFIX) for s in scopes)


def is_ignored_by_rule(name: str) -> bool:
    return name in BOOKKEEPING_NAMES or name.endswith(OPTIMIZER_SLOT_SUFFIXES) or is_quantization_variable(name)


def takes_shadow(variable: str, convention: str) -> bool:
    """Whether `variable` is read from its ExponentialMovingAverage shadow under `convention`: the one rule
    of the conversion and of the reference graphs the verifier restores. Quantization variables are
    never (the model has no place for them; a reference graph restores them as stored)."""
    if is_quantization_variable(variable):
        return False
    return convention == "ema-all" or (convention == "ema" and not variable.endswith(NON_TRAINABLE_SUFFIXES))


def plan_weights(names: Iterable[str], convention: str | None = None) -> WeightsPlan:
    """Route each model variable to its raw tensor or its shadow; `None` picks ema when shadows exist."""
    names = list(names)
    slots = sorted(n for n in names if n.endswith(OPTIMIZER_SLOT_SUFFIXES))
    bookkeeping = sorted(n for n in names if n in BOOKKEEPING_NAMES)
    quantization = sorted(n for n in names if is_quantization_variable(n))
    shadows = {n[: -len(EMA_SUFFIX)] for n in names if n.endswith(EMA_SUFFIX) and not is_quantization_variable(n)}
    variables = sorted(n for n in names if not is_ignored_by_rule(n) and not n.endswith(EMA_SUFFIX))

    if convention is None:
        convention = "ema" if shadows else "raw"
    if convention not in CONVENTIONS:
        raise WeightsConventionError(f"unknown weights convention {convention!r}; use one of {CONVENTIONS}")
    if convention != "raw" and not shadows:
        raise WeightsConventionError(
            f"--weights {convention} needs ExponentialMovingAverage shadows, but this checkpoint has none; "
            "use --weights raw"
        )

    lacking = [v for v in variables if takes_shadow(v, convention) and v not in shadows]
    if lacking:
        raise WeightsConventionError(
            f"--weights {convention}: {len(lacking)} variables have no shadow, e.g. {', '.join(lacking[:3])}; "
            "use --weights raw"
        )
    sources = {v: v + EMA_SUFFIX if takes_shadow(v, convention) else v for v in variables}
    # Shadows of variables that do not exist are left for the mapping step to report as unmapped.
    orphan_shadows = sorted(s + EMA_SUFFIX for s in shadows - set(variables))
    sources.update({name: name for name in orphan_shadows})
    unused_shadows = sorted(s + EMA_SUFFIX for s in shadows & set(variables) if sources[s] != s + EMA_SUFFIX)
    unused_raw = sorted(v for v, source in sources.items() if source != v)
    ignored = {
        "optimizer_slots": slots,
        "bookkeeping": bookkeeping,
        "quantization": quantization,
        "unused_ema_shadows": unused_shadows,
        "raw_values_replaced_by_shadows": unused_raw,
    }
    return WeightsPlan(sources=sources, convention=convention, ignored=ignored)
