"""Which linears a scheme quantizes, with which arguments: resolved once against the model's real shapes."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from qtool.arch import ArchSpec
from qtool.errors import QtoolError
from qtool.schemes import QuantArgs, Scheme, matches

__all__ = ["Target", "matches", "plan_targets", "suggest_group_size"]


@dataclass(frozen=True)
class Target:
    """One linear to quantize. ``name`` is relative to its decoder layer (``mlp.down_proj``); ``args`` quantize its
    weight, ``input_args`` (``None``: none) its input."""

    layer: int
    name: str
    in_features: int
    args: QuantArgs
    input_args: QuantArgs | None = None

    def full_name(self, spec: ArchSpec) -> str:
        return f"{spec.layers}.{self.layer}.{self.name}"


def plan_targets(layers: nn.ModuleList, spec: ArchSpec, scheme: Scheme) -> list[list[Target]]:
    """Per decoder layer, the linears to quantize. Raises ``QtoolError`` naming the layer and a fix when a group
    size does not divide ``in_features`` and ``scheme.group_fallback`` is ``error``."""
    _check_patterns(layers, spec, scheme)
    plan: list[list[Target]] = []
    for i, layer in enumerate(layers):
        row = []
        for rel in spec.layer_linears:
            full = f"{spec.layers}.{i}.{rel}"
            if matches(full, scheme.ignore) or not matches(full, scheme.targets):
                continue
            linear = layer.get_submodule(rel)
            args = _fit_args(scheme, full, linear.in_features)
            if args is not None:
                row.append(Target(i, rel, linear.in_features, args, scheme.input_args_for(full)))
        _check_shared_inputs(spec, row)
        plan.append(row)
    if not any(plan):
        raise QtoolError(
            f"scheme.targets: {list(scheme.targets)} (minus scheme.ignore) matches no linear of the decoder layers; "
            f"use names such as {', '.join(n.rsplit('.', 1)[-1] for n in spec.layer_linears)}"
        )
    return plan


def _check_patterns(layers: nn.ModuleList, spec: ArchSpec, scheme: Scheme) -> None:
    """Every ``targets``/``ignore``/``input_overrides`` pattern must name at least one linear of the decoder layers:
    a misspelt ``ignore`` entry would otherwise quantize what the user meant to keep."""
    names = [f"{spec.layers}.{i}.{rel}" for i in range(len(layers)) for rel in spec.layer_linears]
    for field in ("targets", "ignore", "input_overrides"):
        for pattern in getattr(scheme, field):
            if not any(matches(name, (pattern,)) for name in names):
                raise QtoolError(
                    f"scheme.{field}: {pattern!r} matches no linear of the decoder layers; use names such as "
                    f"{', '.join(n.rsplit('.', 1)[-1] for n in spec.layer_linears)} or a full path like {names[0]}"
                )


def _check_shared_inputs(spec: ArchSpec, row: list[Target]) -> None:
    """Linears that read one tensor (q/k/v, gate/up) quantize it one way: one static scale serves them all, and
    runtimes that fuse them (vLLM's qkv_proj) take one input quantizer."""
    seen: dict[str, Target] = {}
    for t in row:
        edge = next((e.name for e in spec.edges if t.name in spec.linears(e)), t.name)
        first = seen.setdefault(edge, t)
        if first.input_args != t.input_args:
            raise QtoolError(
                f"scheme.input_overrides: layer {t.layer} {first.name} and {t.name} read the same input but get "
                "different input quantizers; give them the same entry"
            )


def _fit_args(scheme: Scheme, full: str, in_features: int) -> QuantArgs | None:
    args = scheme.weights
    if args.granularity != "group" or in_features % args.group_size == 0:
        return args
    if scheme.group_fallback == "channel":
        return args.model_copy(update={"granularity": "channel", "group_size": None})
    if scheme.group_fallback == "ignore":
        return None
    raise QtoolError(
        f"scheme.weights.group_size: {args.group_size} does not divide in_features={in_features} of {full}; "
        f"use {suggest_group_size(in_features, args.group_size)}, or set scheme.group_fallback: channel, "
        f"or add '{full.rsplit('.', 1)[-1]}' to scheme.ignore"
    )


def suggest_group_size(in_features: int, wanted: int) -> int:
    """The largest power-of-two divisor of ``in_features`` not above ``wanted`` (kernels want powers of two)."""
    d = 1
    while in_features % (d * 2) == 0 and d * 2 <= wanted:
        d *= 2
    return d
