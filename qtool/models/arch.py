"""Architecture knowledge as data: one table entry per model family.

Everything that needs to know where the decoder layers, norms and projections of a model live reads ``ArchSpec``;
nothing else branches on ``model_type``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from qtool.errors import QtoolError


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of a decoder-only family, relative to the model (``layers``, ``embed``…) or to one layer.

    ``input_groups`` lists linears that read the same input (they share one Hessian in GPTQ and one smoothing
    scale later); each group is preceded by ``norm`` when it has one.
    """

    family: str
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    attention: str = "self_attn"
    q_proj: str = "self_attn.q_proj"
    k_proj: str = "self_attn.k_proj"
    v_proj: str = "self_attn.v_proj"
    o_proj: str = "self_attn.o_proj"
    gate_proj: str = "mlp.gate_proj"
    up_proj: str = "mlp.up_proj"
    down_proj: str = "mlp.down_proj"

    @property
    def input_groups(self) -> tuple[tuple[str | None, tuple[str, ...]], ...]:
        """``(norm, linears)`` pairs in execution order within one decoder layer."""
        return (
            (self.attn_norm, (self.q_proj, self.k_proj, self.v_proj)),
            (None, (self.o_proj,)),
            (self.mlp_norm, (self.gate_proj, self.up_proj)),
            (None, (self.down_proj,)),
        )

    @property
    def layer_linears(self) -> tuple[str, ...]:
        return tuple(name for _, group in self.input_groups for name in group)


LLAMA = ArchSpec(family="llama")

# model_type -> spec. Llama, SmolLM/SmolLM2 (model_type "llama"), Mistral and Qwen2 share one layout
# (Qwen2's q/k/v biases do not change where anything lives).
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
}


def spec_for(config) -> ArchSpec:
    """The table entry for a transformers config, or a ``QtoolError`` naming what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise QtoolError(
            f"model: architecture '{model_type}' is not supported (supported: {supported}); "
            "add an entry to qtool/models/arch.py to support it"
        )
    return ARCHITECTURES[model_type]


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def decoder_layers(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    return model.get_submodule(spec.layers)


def head_dim_of(config) -> int:
    """Attention head size of a transformers config."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
