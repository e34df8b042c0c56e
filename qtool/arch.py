"""Architecture knowledge as data: one table entry per model family.

A decoder layer is described in two tables, and everything that touches a layer's structure (rotations,
smoothing, OSTQuant, outlier statistics, Hessians, quantizer attachment) iterates them instead of naming modules:

- **Logical projections** ``q k v o gate up down`` and the norms ``attn_norm``, ``mlp_norm``: what a layer
  computes, whatever the storage. Llama keeps each projection in its own linear; Phi-3 stores q/k/v as row blocks
  of one ``qkv_proj`` and gate/up as row blocks of ``gate_up_proj``. ``LayerView`` reads and writes a projection's
  rows in either case; ``join`` turns logical parameters back into module parameters (for
  ``torch.func.functional_call``). Parameters are keyed ``"<logical>.weight"`` / ``"<logical>.bias"``.
- **Edges** ``producer → readers``: where the layer's linears read their input, with what makes that input.
  ``kind`` says what an equivalent transform may do there:

  - ``norm``: the producer is an RMSNorm gain ``γ`` and the readers read ``norm(x) · γ``. A residual rotation
    fuses ``γ`` into the readers; a per-channel scale divides ``γ`` (SmoothQuant, OSTQuant's S_attn / S_ffn).
  - ``heads``: the readers read the attention output, one ``head_dim`` block per query head, made of the producer's
    (the value projection's) rows per KV head: a per-head rotation or scale of the values is undone in the readers'
    columns (QuaRot's R2, OSTQuant's R_ov / S_ov).
  - ``gated``: the readers read ``act(gate) ⊙ up``, linear in the producer ``up``: a per-channel scale of ``up``'s
    rows is undone in the readers' columns (SmoothQuant's down_proj mapping, OSTQuant's S_u|d); an online
    rotation of this input is folded into the readers (QuaRot's R4).

  The edge name keys outlier reports, smoothing mappings and clipping sites; the Llama names are kept
  (``qkv``, ``o_proj``, ``gate_up``, ``down_proj``).

``residual_writers`` are the projections whose outputs are added to the residual stream (a residual rotation
applies to their rows). A family is refused with a message naming this file unless it is in ``ARCHITECTURES``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
from torch import Tensor

from qtool.errors import QtoolError

EdgeKind = Literal["norm", "heads", "gated"]


@dataclass(frozen=True)
class Edge:
    """``readers`` (logical projections) read the tensor that ``producer`` (a logical norm or projection) makes."""

    name: str
    kind: EdgeKind
    producer: str
    readers: tuple[str, ...]


# The edges of a pre-norm decoder layer with attention and a gated MLP (Llama, Mistral, Qwen2, SmolLM, Phi-3).
GATED_MLP_EDGES = (
    Edge("qkv", "norm", "attn_norm", ("q", "k", "v")),
    Edge("o_proj", "heads", "v", ("o",)),
    Edge("gate_up", "norm", "mlp_norm", ("gate", "up")),
    Edge("down_proj", "gated", "up", ("down",)),
)


@dataclass(frozen=True)
class Shapes:
    """Sizes of one model's decoder layers (from its transformers config)."""

    layers: int
    hidden: int
    head_dim: int
    heads: int
    kv_heads: int
    intermediate: int

    @classmethod
    def of(cls, config) -> Shapes:
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            head_dim=head_dim_of(config),
            heads=config.num_attention_heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            intermediate=config.intermediate_size,
        )

    def out_features(self, logical: str) -> int:
        """Rows of a logical projection's weight."""
        rows = {
            "q": self.heads * self.head_dim,
            "k": self.kv_heads * self.head_dim,
            "v": self.kv_heads * self.head_dim,
            "gate": self.intermediate,
            "up": self.intermediate,
        }
        return rows.get(logical, self.hidden)


@dataclass(frozen=True)
class ArchSpec:
    """One family's layout. Module paths are relative to the model (``layers``, ``embed``, ``final_norm``,
    ``lm_head``) or to one decoder layer (``attention``, ``projections``, ``norms``).

    ``projections``: ``(logical, module)`` pairs; logical projections that share a module are its row blocks, in
    the order listed."""

    family: str
    projections: tuple[tuple[str, str], ...]
    norms: tuple[tuple[str, str], ...] = (("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm"))
    edges: tuple[Edge, ...] = GATED_MLP_EDGES
    residual_writers: tuple[str, ...] = ("o", "down")
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    attention: str = "self_attn"
    _modules: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_modules", dict(self.projections) | dict(self.norms))

    def module(self, logical: str) -> str:
        """Module path (in the layer) that holds a logical projection or norm."""
        return self._modules[logical]

    def parts(self, module: str) -> tuple[str, ...]:
        """The logical projections stored in ``module``, in row order (one for an unfused linear)."""
        return tuple(name for name, m in self.projections if m == module)

    def rows(self, logical: str, shapes: Shapes) -> slice | None:
        """The rows of ``logical`` in its module's weight; ``None`` when the module holds nothing else."""
        parts = self.parts(self.module(logical))
        if len(parts) <= 1:
            return None
        start = sum(shapes.out_features(p) for p in parts[: parts.index(logical)])
        return slice(start, start + shapes.out_features(logical))

    def edge(self, name: str) -> Edge:
        return next(e for e in self.edges if e.name == name)

    def edges_of(self, kind: EdgeKind) -> tuple[Edge, ...]:
        return tuple(e for e in self.edges if e.kind == kind)

    def linears(self, edge: Edge) -> tuple[str, ...]:
        """The linear modules that read ``edge``'s input (a fused module once), in the readers' order."""
        return tuple(dict.fromkeys(self.module(r) for r in edge.readers))

    @property
    def layer_linears(self) -> tuple[str, ...]:
        """Every linear of a decoder layer, in execution order."""
        return tuple(name for edge in self.edges for name in self.linears(edge))

    def edge_of(self, linear: str) -> Edge:
        """The edge whose input ``linear`` reads."""
        return next(e for e in self.edges if linear in self.linears(e))

    def join(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """Logical parameters -> module parameters (``"self_attn.qkv_proj.weight"``): fused modules get their parts
        concatenated along the rows (every part must be present), others are renamed only (the same tensor)."""
        out: dict[str, Tensor] = {}
        for key in params:
            logical, kind = key.rsplit(".", 1)
            module = self.module(logical)
            name = f"{module}.{kind}"
            if name in out:
                continue
            parts = self.parts(module)
            if len(parts) > 1:
                out[name] = torch.cat([params[f"{p}.{kind}"] for p in parts], dim=0)
            else:
                out[name] = params[key]
        return out


class LayerView:
    """A decoder layer's parameters by logical key (``"q.weight"``, ``"v.bias"``, ``"attn_norm.weight"``).

    ``get`` returns the rows of the module parameter (a view: no copy); ``set`` casts a new value to the parameter's
    dtype once and writes it into those rows."""

    def __init__(self, layer: nn.Module, spec: ArchSpec, shapes: Shapes):
        self.layer, self.spec, self.shapes = layer, spec, shapes

    def _param(self, key: str) -> tuple[nn.Parameter | None, slice | None]:
        logical, kind = key.rsplit(".", 1)
        module = self.layer.get_submodule(self.spec.module(logical))
        return getattr(module, kind, None), self.spec.rows(logical, self.shapes)

    def has(self, key: str) -> bool:
        return self._param(key)[0] is not None

    def get(self, key: str) -> Tensor:
        param, rows = self._param(key)
        if param is None:
            raise KeyError(f"{key}: this layer has no such parameter")
        return param.detach() if rows is None else param.detach()[rows]

    @torch.no_grad()
    def set(self, key: str, value: Tensor) -> None:
        param, rows = self._param(key)
        if param is None:
            raise KeyError(f"{key}: this layer has no such parameter")
        if rows is None:
            param.data.copy_(value.to(param.dtype))
        else:
            param.data[rows] = value.to(param.dtype)

    def keys(self) -> list[str]:
        """Every logical parameter of the layer: weights and biases of the projections, then the norm gains."""
        names = [p for p, _ in self.spec.projections] + [n for n, _ in self.spec.norms]
        return [f"{n}.{kind}" for n in names for kind in ("weight", "bias") if self.has(f"{n}.{kind}")]


_LLAMA_PROJECTIONS = (
    ("q", "self_attn.q_proj"),
    ("k", "self_attn.k_proj"),
    ("v", "self_attn.v_proj"),
    ("o", "self_attn.o_proj"),
    ("gate", "mlp.gate_proj"),
    ("up", "mlp.up_proj"),
    ("down", "mlp.down_proj"),
)
LLAMA = ArchSpec(family="llama", projections=_LLAMA_PROJECTIONS)
# Phi-3: q/k/v are row blocks of qkv_proj (queries, keys, values), gate/up of gate_up_proj (gate first).
PHI3 = ArchSpec(
    family="phi3",
    projections=(
        ("q", "self_attn.qkv_proj"),
        ("k", "self_attn.qkv_proj"),
        ("v", "self_attn.qkv_proj"),
        ("o", "self_attn.o_proj"),
        ("gate", "mlp.gate_up_proj"),
        ("up", "mlp.gate_up_proj"),
        ("down", "mlp.down_proj"),
    ),
)

# model_type -> spec. Llama, SmolLM/SmolLM2 (model_type "llama"), Mistral and Qwen2 share one layout
# (Qwen2's q/k/v biases do not change where anything lives).
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "phi3": PHI3,
}


def spec_for(config) -> ArchSpec:
    """The table entry for a transformers config, or a ``QtoolError`` naming what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise QtoolError(
            f"model: architecture '{model_type}' is not supported (supported: {supported}); "
            "add an entry to qtool/arch.py to support it"
        )
    return ARCHITECTURES[model_type]


def decoder_layers(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    return model.get_submodule(spec.layers)


def head_dim_of(config) -> int:
    """Attention head size of a transformers config."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
