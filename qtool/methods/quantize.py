"""The quantize stage's method table: weight-quantization methods, one config class and one handler each.

- ``rtn``: round-to-nearest with the scheme's observer; needs no data.
- ``gptq``: GPTQ (Frantar et al., 2022) on Hessians of the calibration windows, which the layer walker feeds
  through the already-quantized layers before (``qtool.algorithms.gptq``).

A new weight method is a pure algorithm module in ``qtool/algorithms/`` and, here, its config class, its handler
(``WeightMethod``) and one line in ``METHODS`` (``docs/adding-a-method.md``).
"""

from __future__ import annotations

import typing
from typing import Annotated, Any, Literal

import torch
import torch.nn as nn
from pydantic import Field

from qtool.algorithms.gptq import gptq_quantize
from qtool.algorithms.quantizer import rtn_quantize, scale_dtype_for
from qtool.arch import ArchSpec
from qtool.context import StageConfig
from qtool.errors import QtoolError
from qtool.formats.layers import LinearFacts
from qtool.methods.base import LayerResult, WeightMethod
from qtool.models.observers import HessianObserver
from qtool.models.quantizers import set_dequantized
from qtool.models.walker import LayerStep
from qtool.targets import Target


class RtnConfig(StageConfig):
    """Round-to-nearest with the scheme's observer (``minmax`` or ``mse``). Needs no calibration data."""

    method: Literal["rtn"]


class GptqConfig(StageConfig):
    """GPTQ (Frantar et al., 2022) on Hessians from the calibration windows."""

    method: Literal["gptq"]
    block_size: int = Field(128, gt=0, description="columns updated together (lazy batch updates)")
    damp: float = Field(0.01, gt=0.0, lt=1.0, description="dampening, fraction of mean(diag H)")
    act_order: bool = Field(True, description="process columns by decreasing diag(H); groups stay static")
    true_sequential: bool = Field(
        False, description="re-collect inputs after each sub-block (qkv, o, gate/up, down) is quantized; slower"
    )


class Rtn(WeightMethod):
    config = RtnConfig

    def quantize_layer(self, cfg: RtnConfig, step: LayerStep, targets: list[Target], spec: ArchSpec) -> LayerResult:
        result = LayerResult()
        for t in targets:
            result.weights[t.name] = rtn_quantize(weight_of(step.layer, t.name), t.args, scale_dtype=_sdtype(step, t))
            result.facts[t.name] = LinearFacts("rtn")
        return result


class Gptq(WeightMethod):
    config = GptqConfig
    needs_data = True
    needs_hessian = True

    def quantize_layer(self, cfg: GptqConfig, step: LayerStep, targets: list[Target], spec: ArchSpec) -> LayerResult:
        """All targets from one pass of Hessians, or (``true_sequential``) edge by edge, each edge's Hessians
        collected after the edges before it are quantized."""
        if cfg.true_sequential:
            groups = [[t for t in targets if t.name in spec.linears(edge)] for edge in spec.edges]
        else:
            groups = [targets]
        result = LayerResult()
        for group in groups:
            if not group:
                continue
            hessians = HessianObserver(spec, [t.name for t in group])
            step.run(hessians)
            for t in group:
                w = weight_of(step.layer, t.name)
                h = hessians.hessian(t.name)
                try:
                    qw = gptq_quantize(
                        w,
                        h,
                        t.args,
                        block_size=cfg.block_size,
                        damp=cfg.damp,
                        act_order=cfg.act_order,
                        scale_dtype=_sdtype(step, t),
                    )
                except ValueError as e:  # a Hessian the calibration data leaves singular: the user's to fix
                    raise QtoolError(f"quantize: layer {t.layer} {t.name}: {e}") from None
                result.weights[t.name] = qw
                result.facts[t.name] = LinearFacts("gptq", actorder="weight" if cfg.act_order else None)
                result.errors[f"{t.layer}.{t.name}"] = relative_error(w, qw.dequantize(torch.float32), h)
                if cfg.true_sequential:
                    set_dequantized(step.layer, {t.name: qw})
        return result

    def error_feedback(self, cfg: GptqConfig) -> dict[str, Any]:
        return {"gptq_damp": cfg.damp, "gptq_act_order": cfg.act_order}


# config class -> handler. The recipe's ``quantize:`` union is built from the keys, in this order.
METHODS: dict[type[StageConfig], WeightMethod] = {
    RtnConfig: Rtn(),
    GptqConfig: Gptq(),
}

QuantizeConfig = Annotated[typing.Union[tuple(METHODS)], Field(discriminator="method")]  # noqa: UP007


def method_for(cfg: StageConfig) -> WeightMethod:
    return METHODS[type(cfg)]


def weight_of(layer: nn.Module, name: str) -> torch.Tensor:
    """A linear's weight as float32 ``[out, in]`` (a copy when the model is not float32)."""
    return layer.get_submodule(name).weight.detach().float()


def _sdtype(step: LayerStep, target: Target) -> torch.dtype:
    """Scales are stored (and quantization computed) in the model's dtype, as compressed-tensors expects."""
    return scale_dtype_for(step.layer.get_submodule(target.name).weight.dtype)


def relative_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """GPTQ's proxy loss relative to the output energy: tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)."""
    h = h.to(torch.float64)
    d = (w - w_hat).to(torch.float64)
    w = w.to(torch.float64)
    return float(((d @ h) * d).sum() / ((w @ h) * w).sum().clamp_min(1e-30))
