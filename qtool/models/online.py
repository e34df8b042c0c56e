"""What runs inside the model at inference time besides its own modules: online rotations and dynamic quantizers.

Nothing here forks transformers' modeling code. Two insertion points are used:

- a forward pre-hook on a linear (``InputHook``): ``x -> rotation(x) -> fake-quantize(x)`` before the linear reads
  it (R4's online Hadamard before down_proj, per-token activation quantization at every targeted linear);
- a registered attention function (``qtool``, through transformers' ``AttentionInterface``): queries and keys
  after RoPE go through the R3 rotation, keys and values through the KV-cache quantizer, then SDPA. Settings live
  on each attention module as ``qtool_attention`` (an ``AttentionState``), so layers may differ.

``qtool.formats.online`` writes what is attached into a packed checkpoint's config and attaches it again on load.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from qtool.algorithms.actquant import StaticScale, fake_quantize_dynamic, fake_quantize_static
from qtool.algorithms.hadamard import fast_hadamard
from qtool.arch import ArchSpec
from qtool.schemes import QuantArgs

log = logging.getLogger(__name__)

ATTENTION = "qtool"
# module attribute holding a learned clip ratio for that module's input (linear) or KV cache (attention module);
# ``qtool.models.quantizers.attach_quantizers`` puts it into the module's QuantArgs
CLIP_ATTR = "qtool_clip_ratio"


@dataclass
class OnlineRotation:
    """``x -> x @ R`` over the last dimension: a fast Hadamard (``kind="hadamard"``, orthonormal) or a stored
    orthogonal matrix (``kind="matrix"``, used where no Hadamard of the size exists)."""

    kind: str
    size: int
    matrix: Tensor | None = None

    def __call__(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.size:
            raise ValueError(f"online rotation of size {self.size} applied to features of size {x.shape[-1]}")
        if self.kind == "hadamard":
            return fast_hadamard(x)
        assert self.matrix is not None
        return x @ self.matrix.to(device=x.device, dtype=x.dtype)

    def dense(self) -> Tensor:
        """The float64 matrix ``R`` of this rotation."""
        if self.kind == "hadamard":
            return fast_hadamard(torch.eye(self.size, dtype=torch.float64))
        assert self.matrix is not None
        return self.matrix.to(torch.float64)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "size": self.size}


class InputHook:
    """Forward pre-hook of one linear: optional rotation, optional ``shift`` (a per-feature vector subtracted from
    the input, OutlierTune's symmetrization; the linear's bias holds ``W · shift``), then optional quantization of
    its input — dynamic, or static with the calibrated ``static`` parameters (a static ``quant`` without them yet
    passes the input through: the quantize stage is calibrating it). ``learned_clip`` (training only, not
    described): returns a scalar tensor that replaces ``quant.clip_ratio``."""

    def __init__(self) -> None:
        self.rotation: OnlineRotation | None = None
        self.shift: Tensor | None = None
        self.quant: QuantArgs | None = None
        self.static: StaticScale | None = None
        self.learned_clip: Callable[[], Tensor] | None = None

    def __call__(self, module: nn.Module, args: tuple) -> tuple | None:
        if self.rotation is None and self.quant is None and self.shift is None:
            return None
        x = args[0]
        if self.rotation is not None:
            x = self.rotation(x)
        if self.shift is not None:
            x = x - self.shift.to(device=x.device, dtype=x.dtype)
        if self.quant is not None:
            if self.quant.dynamic:
                x = fake_quantize_dynamic(x, self.quant, self.learned_clip() if self.learned_clip else None)
            elif self.static is not None:
                x = fake_quantize_static(x, self.quant, self.static)
        return (x, *args[1:])


@dataclass
class AttentionState:
    """Online pieces inside one attention module: ``qk_rotation`` (R3, over head_dim, after RoPE) and
    ``kv_quant`` (applied to keys after R3 and to values); ``learned_kv_clip`` as ``InputHook.learned_clip``."""

    qk_rotation: OnlineRotation | None = None
    kv_quant: QuantArgs | None = None
    learned_kv_clip: Callable[[], Tensor] | None = None


def input_hook(linear: nn.Module) -> InputHook:
    """The ``InputHook`` of ``linear``, installed on first use (first in the pre-hook order)."""
    hook = getattr(linear, "qtool_input", None)
    if hook is None:
        hook = InputHook()
        handle = linear.register_forward_pre_hook(hook, prepend=True)
        linear.qtool_input = hook
        linear.qtool_input_handle = handle
    return hook


def attention_state(model: nn.Module, attn: nn.Module) -> AttentionState:
    """The ``AttentionState`` of attention module ``attn``; switches ``model`` to the ``qtool`` attention function."""
    state = getattr(attn, "qtool_attention", None)
    if state is None:
        state = AttentionState()
        attn.qtool_attention = state
        _use_qtool_attention(model)
    return state


def qtool_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
    """Attention function registered as ``qtool``: online R3 and KV-cache quantization, then SDPA.

    ``query: [batch, heads, seq, head_dim]``, ``key``/``value``: ``[batch, kv_heads, seq, head_dim]``.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    state: AttentionState | None = getattr(module, "qtool_attention", None)
    if state is not None:
        if state.qk_rotation is not None:
            query, key = state.qk_rotation(query), state.qk_rotation(key)
        if state.kv_quant is not None:
            clip = state.learned_kv_clip() if state.learned_kv_clip else None
            key = fake_quantize_dynamic(key, state.kv_quant, clip)
            value = fake_quantize_dynamic(value, state.kv_quant, clip)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _use_qtool_attention(model: nn.Module) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTENTION, qtool_attention)
    AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    if model.config._attn_implementation != ATTENTION:
        model.set_attn_implementation(ATTENTION)


def online_rotations(kinds: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, OnlineRotation]:
    """``{"r3"/"r4": OnlineRotation}`` from the transform stage's ``{name: {"kind", "size"}}`` and stored matrices."""
    return {
        name: OnlineRotation(
            "hadamard" if kinds[name]["kind"] == "hadamard" else "matrix", kinds[name]["size"], tensors.get(name)
        )
        for name in ("r3", "r4")
        if name in kinds
    }


def attach_rotations(model: nn.Module, spec: ArchSpec, online: dict[str, OnlineRotation]) -> None:
    """R3 on queries/keys in every attention module, R4 on the input of the linears of every ``gated`` edge
    (down_proj)."""
    for layer in model.get_submodule(spec.layers):
        if "r3" in online:
            attention_state(model, layer.get_submodule(spec.attention)).qk_rotation = online["r3"]
        if "r4" in online:
            for edge in spec.edges_of("gated"):
                for name in spec.linears(edge):
                    input_hook(layer.get_submodule(name)).rotation = online["r4"]
