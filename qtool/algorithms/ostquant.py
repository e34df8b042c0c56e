"""OSTQuant's equivalent transforms (Hu et al., 2025, arXiv 2501.13987): orthogonal and scaling pairs, as learnable
parameters, and the weights of a decoder layer under them.

Row-vector convention (``y = x Wᵀ``, ``W: [out, in]``); ``R`` orthogonal, ``s`` positive vectors, ``γ`` norm gains:

- **R_res** ``[d, d]`` (shared by all layers) rotates the residual stream as QuaRot's R1 does.
- **S_attn / S_ffn** ``[d]`` per layer: the RMSNorm feeding q/k/v (gate/up) gets gain ``1 / s`` and the readers
  ``W <- W diag(γ) R_res diag(s)`` (the norm's own gain ``γ`` is fused into the readers first).
- **R_ov, S_ov** per layer (``R_ov [hd, hd]`` shared by the heads, ``S_ov [kv_heads * hd]``): values become
  ``v R_ov diag(1/s)`` per KV head (v_proj rows ``diag(1/s) R_ovᵀ W_v``), o_proj's input columns of each head
  ``W_o R_ov diag(s)`` (heads of one GQA group share their KV head's ``s``).
- **S_u|d** ``[intermediate]`` per layer: up_proj rows ``/ s``, down_proj columns ``· s`` (``silu(gate) ⊙ up`` is
  linear in ``up``).
- Fixed online rotations from the rotations release: R4 before down_proj (``W_down <- W_down R4``) and R3 on queries
  and keys (no weight change).
- **Clipping ratios** (learnable clipping thresholds, as FlatQuant's LCT): ``clip_act [layers, 4]`` for the dynamic
  quantizers of the four linear inputs of a layer (``ArchSpec.input_groups`` order: q/k/v, o_proj, gate/up,
  down_proj) and ``clip_kv [layers]`` for its KV cache; they change no weight, only the quantizers' ``clip_ratio``.

``layer_weights`` returns a decoder layer's transformed weights as a function of the parameters (differentiable,
used for training through ``torch.func.functional_call``, and in float64 for the final fusion), so one formula
serves both. Scales are stored as logarithms (``s = exp(log_s)``): always positive, identity at 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from qtool.models.arch import ArchSpec, head_dim_of


@dataclass(frozen=True)
class OstShapes:
    """Sizes of the transform parameters for one model."""

    layers: int
    hidden: int
    head_dim: int
    heads: int
    kv_heads: int
    intermediate: int

    @classmethod
    def of(cls, config) -> OstShapes:
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            head_dim=head_dim_of(config),
            heads=config.num_attention_heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            intermediate=config.intermediate_size,
        )


CLIP_SITES = 4  # dynamic input quantizers per decoder layer: ArchSpec.input_groups
CLIP_MIN = 0.3  # lower bound of a learned clipping ratio
# transforms added after the first release: a transforms file or training checkpoint without them predates them,
# and they stay at identity when such a file is applied
LATER_TRANSFORMS = frozenset({"log_s_qk"})


class OstTransforms(nn.Module):
    """The learnable transforms. ``r_res``/``r_ov`` are orthogonal (train them with ``qtool.algorithms.stiefel``),
    ``log_s_*`` are log-scales (train with Adam), ``clip_act``/``clip_kv`` clipping ratios (start them at the
    scheme's ``clip_ratio``: the student's quantizers read these, not the scheme's)."""

    def __init__(
        self,
        shapes: OstShapes,
        r_res: Tensor,
        r_ov: Tensor | None = None,
        dtype=torch.float32,
        clip_act: float = 1.0,
        clip_kv: float = 1.0,
    ):
        super().__init__()
        self.shapes = shapes
        n, d, hd = shapes.layers, shapes.hidden, shapes.head_dim
        if r_ov is None:
            r_ov = torch.eye(hd, dtype=torch.float64).expand(n, hd, hd)
        self.r_res = nn.Parameter(r_res.to(dtype).clone())
        self.r_ov = nn.Parameter(r_ov.to(dtype).clone().reshape(n, hd, hd))
        self.log_s_attn = nn.Parameter(torch.zeros(n, d, dtype=dtype))
        self.log_s_ffn = nn.Parameter(torch.zeros(n, d, dtype=dtype))
        self.log_s_ov = nn.Parameter(torch.zeros(n, shapes.kv_heads * hd, dtype=dtype))
        self.log_s_ud = nn.Parameter(torch.zeros(n, shapes.intermediate, dtype=dtype))
        # S_qk: one scale per KV head and RoPE pair (dims j and j + hd/2 rotate together, so they share it)
        self.log_s_qk = nn.Parameter(torch.zeros(n, shapes.kv_heads * (hd // 2), dtype=dtype))
        self.clip_act = nn.Parameter(torch.full((n, CLIP_SITES), clip_act, dtype=dtype))
        self.clip_kv = nn.Parameter(torch.full((n,), clip_kv, dtype=dtype))

    def orthogonal(self) -> list[nn.Parameter]:
        return [self.r_res, self.r_ov]

    def scales(self) -> list[nn.Parameter]:
        return [self.log_s_attn, self.log_s_ffn, self.log_s_ov, self.log_s_ud, self.log_s_qk]

    def clips(self) -> list[nn.Parameter]:
        return [self.clip_act, self.clip_kv]

    @torch.no_grad()
    def project_clips(self) -> None:
        """Keep every clipping ratio in ``[CLIP_MIN, 1]`` (projected gradient steps)."""
        for p in self.clips():
            p.clamp_(CLIP_MIN, 1.0)


def clip_sites(spec: ArchSpec) -> list[tuple[int | None, str]]:
    """Where a decoder layer's clipping ratios act: ``(column of clip_act, module path in the layer)`` for each
    quantized linear input, and ``(None, attention module)`` for the KV cache (``clip_kv``)."""
    sites: list[tuple[int | None, str]] = [
        (site, name) for site, (_, names) in enumerate(spec.input_groups) for name in names
    ]
    return [*sites, (None, spec.attention)]


def clip_ratios(t: OstTransforms, spec: ArchSpec) -> dict[str, float]:
    """``{module path: clip ratio}`` over ``clip_sites`` of every layer (rounded to 6 digits: a ratio that did not
    train reads back as the scheme's value)."""
    acts, kvs = t.clip_act.detach().double().tolist(), t.clip_kv.detach().double().tolist()
    return {
        f"{spec.layers}.{i}.{name}": round(kvs[i] if site is None else acts[i][site], 6)
        for i in range(t.shapes.layers)
        for site, name in clip_sites(spec)
    }


def layer_weights(
    base: dict[str, Tensor], t: OstTransforms, i: int, spec: ArchSpec, r4: Tensor | None, dtype: torch.dtype
) -> dict[str, Tensor]:
    """Layer ``i``'s transformed parameters ``{"<module path>.weight" (or .bias): tensor}`` in ``dtype``.

    ``base`` holds the layer's *original* parameters under the same keys (norm gains included); ``r4`` is the dense
    online rotation before down_proj (``None``: no R4).
    """
    sh = t.shapes
    hd = sh.head_dim
    cast = {k: v.to(dtype) for k, v in base.items()}
    r = t.r_res.to(dtype)
    r_ov = t.r_ov[i].to(dtype)
    s_attn, s_ffn = t.log_s_attn[i].to(dtype).exp(), t.log_s_ffn[i].to(dtype).exp()
    s_ov, s_ud = t.log_s_ov[i].to(dtype).exp(), t.log_s_ud[i].to(dtype).exp()
    w = lambda name: cast[f"{name}.weight"]  # noqa: E731
    out: dict[str, Tensor] = {}
    gain_a, gain_m = w(spec.attn_norm), w(spec.mlp_norm)
    for name in (spec.q_proj, spec.k_proj, spec.v_proj):
        out[f"{name}.weight"] = ((w(name) * gain_a) @ r) * s_attn
    for name in (spec.gate_proj, spec.up_proj):
        out[f"{name}.weight"] = ((w(name) * gain_m) @ r) * s_ffn
    # S_qk: query rows of every head · s of its KV head, key rows / s. RoPE turns the pair (j, j + hd/2) by an
    # angle, which commutes with scaling both by one number, so q·k (and the scores) are unchanged.
    half = t.log_s_qk[i].to(dtype).exp().view(sh.kv_heads, hd // 2)
    s_k = torch.cat([half, half], dim=1)
    s_q = s_k.repeat_interleave(sh.heads // sh.kv_heads, dim=0)  # query head h reads KV head h // group
    for name, s, heads in ((spec.q_proj, s_q, sh.heads), (spec.k_proj, 1.0 / s_k, sh.kv_heads)):
        out[f"{name}.weight"] = (out[f"{name}.weight"].unflatten(0, (heads, hd)) * s.unsqueeze(-1)).flatten(0, 1)
        if f"{name}.bias" in cast:
            out[f"{name}.bias"] = (cast[f"{name}.bias"].view(heads, hd) * s).flatten()
    out[f"{spec.attn_norm}.weight"] = 1.0 / s_attn
    out[f"{spec.mlp_norm}.weight"] = 1.0 / s_ffn
    # values: per KV head, rows diag(1/s) R_ovᵀ W_v,h
    v = out[f"{spec.v_proj}.weight"].unflatten(0, (sh.kv_heads, hd))
    out[f"{spec.v_proj}.weight"] = ((r_ov.T @ v) / s_ov.view(sh.kv_heads, hd, 1)).flatten(0, 1)
    if f"{spec.v_proj}.bias" in cast:
        vb = cast[f"{spec.v_proj}.bias"].view(sh.kv_heads, hd) @ r_ov
        out[f"{spec.v_proj}.bias"] = (vb / s_ov.view(sh.kv_heads, hd)).flatten()
    # o_proj: output side R_resᵀ, input columns of head h: R_ov diag(s of its KV head)
    o = (r.T @ w(spec.o_proj)).unflatten(1, (sh.heads, hd)) @ r_ov
    s_heads = s_ov.view(sh.kv_heads, 1, hd).expand(-1, sh.heads // sh.kv_heads, -1).reshape(sh.heads, hd)
    out[f"{spec.o_proj}.weight"] = (o * s_heads).flatten(1, 2)
    out[f"{spec.up_proj}.weight"] = out[f"{spec.up_proj}.weight"] / s_ud.unsqueeze(1)
    if f"{spec.up_proj}.bias" in cast:
        out[f"{spec.up_proj}.bias"] = cast[f"{spec.up_proj}.bias"] / s_ud
    down = (r.T @ w(spec.down_proj)) * s_ud
    out[f"{spec.down_proj}.weight"] = down @ r4.to(dtype) if r4 is not None else down
    for name in (spec.o_proj, spec.down_proj):
        if f"{name}.bias" in cast:
            out[f"{name}.bias"] = cast[f"{name}.bias"] @ r
    return out


@torch.no_grad()
def weight_covariances(model: nn.Module, spec: ArchSpec) -> tuple[Tensor, Tensor]:
    """The weight covariances behind OSTQuant's weight-outlier-minimizing initialisation (WOMI), float64.

    ``c_res [d, d]``: ``Σ Ŵᵀ Ŵ`` over the linears that read the residual stream (q/k/v with the attention norm's
    gain fused, gate/up with the MLP norm's) plus ``Σ Ŵ Ŵᵀ`` over those that write it (o_proj, down_proj), all
    layers, each ``Ŵ = W / ‖W‖_F`` so that no matrix dominates by its scale alone. ``c_ov [layers, hd, hd]``: per
    layer, the same over the value rows of each KV head (``Ŵ_v,h Ŵ_v,hᵀ``) and o_proj's columns of each head
    (``Ŵ_o,hᵀ Ŵ_o,h``) — the sides ``R_res`` and ``R_ov`` rotate (``layer_weights``).

    ``womi_rotation(c, h)``: with ``R = Q H`` (``Q`` the eigenvectors of ``c``, ``H`` an orthonormal Hadamard, its
    rows sign-flipped or not) every rotated column carries the same share of the energy, ``(Rᵀ c R)_jj = tr(c)/n``.
    """
    from qtool.models.arch import decoder_layers

    sh = OstShapes.of(model.config)
    hd = sh.head_dim
    c_res = torch.zeros(sh.hidden, sh.hidden, dtype=torch.float64)
    c_ov = []
    for layer in decoder_layers(model, spec):
        w = {name: layer.get_submodule(name).weight.detach().double() for name in spec.layer_linears}
        gain_a = layer.get_submodule(spec.attn_norm).weight.detach().double()
        gain_m = layer.get_submodule(spec.mlp_norm).weight.detach().double()
        unit = {name: m / m.norm() for name, m in w.items()}
        for name, gain in ((spec.q_proj, gain_a), (spec.k_proj, gain_a), (spec.v_proj, gain_a),
                           (spec.gate_proj, gain_m), (spec.up_proj, gain_m)):  # fmt: skip
            m = w[name] * gain
            m = m / m.norm()
            c_res += m.T @ m
        for name in (spec.o_proj, spec.down_proj):
            c_res += unit[name] @ unit[name].T
        v = unit[spec.v_proj].unflatten(0, (sh.kv_heads, hd))  # [kv_heads, hd, d]
        o = unit[spec.o_proj].unflatten(1, (sh.heads, hd))  # [d, heads, hd]
        c_ov.append(torch.einsum("kid,kjd->ij", v, v) + torch.einsum("dhi,dhj->ij", o, o))
    return c_res, torch.stack(c_ov)


def womi_rotation(c: Tensor, h: Tensor) -> Tensor:
    """``Q H``: the eigenvectors of the covariance ``c`` (``[..., n, n]``) composed with the orthonormal ``h``."""
    return torch.linalg.eigh(c.double()).eigenvectors @ h.double()


def layer_parameters(layer: nn.Module, spec: ArchSpec) -> dict[str, Tensor]:
    """The parameters ``layer_weights`` reads, detached, keyed by module path."""
    names = [*spec.layer_linears, spec.attn_norm, spec.mlp_norm]
    out = {}
    for name in names:
        module = layer.get_submodule(name)
        out[f"{name}.weight"] = module.weight.detach()
        if getattr(module, "bias", None) is not None:
            out[f"{name}.bias"] = module.bias.detach()
    return out


@torch.no_grad()
def fuse(model: nn.Module, spec: ArchSpec, t: OstTransforms, r4: Tensor | None) -> None:
    """Write the transforms into ``model``'s weights (float64 arithmetic, cast back once per tensor), embeddings and
    lm_head included (``R_res`` as R1). Online R3/R4 must be attached by the caller."""
    from qtool.algorithms.rotation import rotate_embeddings, write_param
    from qtool.models.arch import decoder_layers

    for i, layer in enumerate(decoder_layers(model, spec)):
        new = layer_weights(layer_parameters(layer, spec), t, i, spec, r4, torch.float64)
        for key, value in new.items():
            write_param(layer.get_parameter(key), value)
    rotate_embeddings(model, spec, t.r_res.detach().to(torch.float64))
