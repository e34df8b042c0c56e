"""Quantization state of a runtime model: dynamic activation and KV-cache quantizers on their hooks
(``qtool.models.online``), and linears holding their dequantized (fake-quantized) weights.

The quantize stage attaches them before it walks the layers (GPTQ then sees quantized inputs), OSTQuant's student
attaches them to train against, and ``apply`` attaches them again on resume.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from qtool.algorithms.quantizer import QuantizedWeight
from qtool.arch import ArchSpec, decoder_layers
from qtool.models.online import CLIP_ATTR, attention_state, input_hook
from qtool.schemes import QuantArgs, Scheme
from qtool.targets import Target


def attach_quantizers(model: nn.Module, spec: ArchSpec, plan: list[list[Target]], scheme: Scheme) -> None:
    """Dynamic input quantization on every planned linear and KV-cache quantization in every attention module,
    as the scheme asks (after any online rotation the transform stage attached). A module carrying a
    ``qtool_clip_ratio`` attribute (clipping learned by a transform, e.g. OSTQuant's) gets that ``clip_ratio``."""
    for i, layer in enumerate(decoder_layers(model, spec)):
        if scheme.input_activations is not None:
            for t in plan[i]:
                module = layer.get_submodule(t.name)
                input_hook(module).quant = _with_clip(scheme.input_activations, module)
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
                hook.quant = None


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
