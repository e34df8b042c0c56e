"""Quantization state of a runtime model: activation (dynamic or static) and KV-cache quantizers on their hooks
(``qtool.models.online``), and linears holding their dequantized (fake-quantized) weights.

The quantize stage attaches them before it walks the layers (GPTQ then sees quantized inputs), OSTQuant's student
attaches them to train against, and ``apply`` attaches them again on resume.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from qtool.algorithms.actquant import StaticScale
from qtool.algorithms.quantizer import QuantizedWeight
from qtool.arch import ArchSpec, decoder_layers
from qtool.models.online import CLIP_ATTR, attention_state, input_hook
from qtool.schemes import QuantArgs, Scheme
from qtool.targets import Target


def attach_quantizers(model: nn.Module, spec: ArchSpec, plan: list[list[Target]], scheme: Scheme) -> None:
    """Input quantization on every planned linear (its ``Target.input_args``) and KV-cache quantization in every
    attention module, as the scheme asks (after any online rotation the transform stage attached). A module carrying
    a ``qtool_clip_ratio`` attribute (clipping learned by a transform, e.g. OSTQuant's) gets that ``clip_ratio``.
    Static input quantizers pass their input through until ``set_static`` gives them their calibrated scales."""
    for i, layer in enumerate(decoder_layers(model, spec)):
        for t in plan[i]:
            if t.input_args is not None:
                module = layer.get_submodule(t.name)
                input_hook(module).quant = _with_clip(t.input_args, module)
        if scheme.kv_cache is not None:
            attn = layer.get_submodule(spec.attention)
            attention_state(model, attn).kv_quant = _with_clip(scheme.kv_cache, attn)


def _with_clip(args: QuantArgs, module: nn.Module) -> QuantArgs:
    ratio = getattr(module, CLIP_ATTR, None)
    return args if ratio is None else args.model_copy(update={"clip_ratio": ratio})


def detach_quantizers(model: nn.Module, spec: ArchSpec) -> None:
    """Undo ``attach_quantizers`` (online rotations stay attached)."""
    for layer in decoder_layers(model, spec):
        state = getattr(layer.get_submodule(spec.attention), "qtool_attention", None)
        if state is not None:
            state.kv_quant = None
        for name in spec.layer_linears:
            hook = getattr(layer.get_submodule(name), "qtool_input", None)
            if hook is not None:
                hook.quant, hook.static = None, None


def set_static(layer: nn.Module, params: dict[str, StaticScale]) -> None:
    """Give the named linears' static input quantizers their calibrated parameters."""
    for name, p in params.items():
        input_hook(layer.get_submodule(name)).static = p


@torch.no_grad()
def set_params(layer: nn.Module, params: dict[str, torch.Tensor]) -> None:
    """Set parameters of ``layer`` by their name in it (a method's folded norm gains, from a layer checkpoint)."""
    for name, value in params.items():
        layer.get_parameter(name).data.copy_(value)


def set_dequantized(layer: nn.Module, weights: dict[str, QuantizedWeight]) -> None:
    """Replace each named linear's weight by its dequantized value (fake quantization, in the model's dtype)."""
    for name, qw in weights.items():
        linear = layer.get_submodule(name)
        linear.weight.data.copy_(qw.dequantize(linear.weight.dtype))
