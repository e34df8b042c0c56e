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
- **Clipping ratios** (learnable clipping thresholds, as FlatQuant's LCT): ``clip_act [layers, sites]`` for the
  dynamic quantizers of a layer's linear inputs, one per edge (``ArchSpec.edges`` order: q/k/v, o_proj, gate/up,
  down_proj) and ``clip_kv [layers]`` for its KV cache; they change no weight, only the quantizers' ``clip_ratio``.

``layer_weights`` returns a decoder layer's transformed weights as a function of the parameters (differentiable,
used for training through ``torch.func.functional_call``, and in float64 for the final fusion), so one formula
serves both. It reads and returns *logical* parameters (``"q.weight"``, ``"attn_norm.weight"``: see
``qtool.arch``), so families that fuse q/k/v or gate/up into one linear (Phi-3) are transformed by row
blocks; the transforms follow the edges of a pre-norm attention + gated-MLP layer (``GATED_MLP_EDGES``). Scales
are stored as logarithms (``s = exp(log_s)``): always positive, identity at 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from qtool.arch import ArchSpec, LayerView, Shapes, decoder_layers


@dataclass(frozen=True)
class OstShapes(Shapes):
    """Sizes of the transform parameters for one model: its layer ``Shapes`` and ``sites``, the number of dynamic
    input quantizers per decoder layer (one per edge, ``ArchSpec.edges``) that get a clipping ratio."""

    sites: int = 0

    @classmethod
    def of(cls, config, spec: ArchSpec) -> OstShapes:  # type: ignore[override]
        return cls(**vars(Shapes.of(config)), sites=len(spec.edges))


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
        self.clip_act = nn.Parameter(torch.full((n, shapes.sites), clip_act, dtype=dtype))
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
    """Where a decoder layer's clipping ratios act: ``(column of clip_act, linear path in the layer)`` for each linear
    reading edge ``column``, and ``(None, attention module)`` for the KV cache (``clip_kv``)."""
    sites: list[tuple[int | None, str]] = [
        (site, name) for site, edge in enumerate(spec.edges) for name in spec.linears(edge)
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
    """Layer ``i``'s transformed logical parameters ``{"q.weight" (or .bias), ...: tensor}`` in ``dtype``.

    ``base`` holds the layer's *original* logical parameters (norm gains included, ``layer_parameters``); ``r4`` is
    the dense online rotation before down_proj (``None``: no R4).
    """
    sh = t.shapes
    hd = sh.head_dim
    attn, ffn = spec.edge("qkv"), spec.edge("gate_up")  # the norm edges S_attn and S_ffn scale
    heads, gated = spec.edges_of("heads")[0], spec.edges_of("gated")[0]  # v -> o (R_ov, S_ov); up -> down (S_u|d)
    v, up = heads.producer, gated.producer
    cast = {k: val.to(dtype) for k, val in base.items()}
    r = t.r_res.to(dtype)
    r_ov = t.r_ov[i].to(dtype)
    s_attn, s_ffn = t.log_s_attn[i].to(dtype).exp(), t.log_s_ffn[i].to(dtype).exp()
    s_ov, s_ud = t.log_s_ov[i].to(dtype).exp(), t.log_s_ud[i].to(dtype).exp()
    w = lambda name: cast[f"{name}.weight"]  # noqa: E731
    out: dict[str, Tensor] = {}
    gains = {edge.producer: w(edge.producer) for edge in (attn, ffn)}
    for edge, s in ((attn, s_attn), (ffn, s_ffn)):
        for name in edge.readers:
            out[f"{name}.weight"] = ((w(name) * gains[edge.producer]) @ r) * s
    # S_qk: query rows of every head · s of its KV head, key rows / s. RoPE turns the pair (j, j + hd/2) by an
    # angle, which commutes with scaling both by one number, so q·k (and the scores) are unchanged.
    half = t.log_s_qk[i].to(dtype).exp().view(sh.kv_heads, hd // 2)
    s_k = torch.cat([half, half], dim=1)
    s_q = s_k.repeat_interleave(sh.heads // sh.kv_heads, dim=0)  # query head h reads KV head h // group
    for name, s, n_heads in (("q", s_q, sh.heads), ("k", 1.0 / s_k, sh.kv_heads)):
        out[f"{name}.weight"] = (out[f"{name}.weight"].unflatten(0, (n_heads, hd)) * s.unsqueeze(-1)).flatten(0, 1)
        if f"{name}.bias" in cast:
            out[f"{name}.bias"] = (cast[f"{name}.bias"].view(n_heads, hd) * s).flatten()
    out[f"{attn.producer}.weight"] = 1.0 / s_attn
    out[f"{ffn.producer}.weight"] = 1.0 / s_ffn
    # values: per KV head, rows diag(1/s) R_ovᵀ W_v,h
    vw = out[f"{v}.weight"].unflatten(0, (sh.kv_heads, hd))
    out[f"{v}.weight"] = ((r_ov.T @ vw) / s_ov.view(sh.kv_heads, hd, 1)).flatten(0, 1)
    if f"{v}.bias" in cast:
        vb = cast[f"{v}.bias"].view(sh.kv_heads, hd) @ r_ov
        out[f"{v}.bias"] = (vb / s_ov.view(sh.kv_heads, hd)).flatten()
    # o_proj: output side R_resᵀ, input columns of head h: R_ov diag(s of its KV head)
    s_heads = s_ov.view(sh.kv_heads, 1, hd).expand(-1, sh.heads // sh.kv_heads, -1).reshape(sh.heads, hd)
    for name in heads.readers:
        o = (r.T @ w(name)).unflatten(1, (sh.heads, hd)) @ r_ov
        out[f"{name}.weight"] = (o * s_heads).flatten(1, 2)
    out[f"{up}.weight"] = out[f"{up}.weight"] / s_ud.unsqueeze(1)
    if f"{up}.bias" in cast:
        out[f"{up}.bias"] = cast[f"{up}.bias"] / s_ud
    for name in gated.readers:
        down = (r.T @ w(name)) * s_ud
        out[f"{name}.weight"] = down @ r4.to(dtype) if r4 is not None else down
    for name in spec.residual_writers:
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
    sh = Shapes.of(model.config)
    hd = sh.head_dim
    heads = spec.edges_of("heads")[0]
    c_res = torch.zeros(sh.hidden, sh.hidden, dtype=torch.float64)
    c_ov = []
    for layer in decoder_layers(model, spec):
        view = LayerView(layer, spec, sh)
        w = {name: view.get(f"{name}.weight").double() for name, _ in spec.projections}
        unit = {name: m / m.norm() for name, m in w.items()}
        for edge in spec.edges_of("norm"):  # readers of the residual stream, the norm's gain fused
            gain = view.get(f"{edge.producer}.weight").double()
            for name in edge.readers:
                m = w[name] * gain
                m = m / m.norm()
                c_res += m.T @ m
        for name in spec.residual_writers:
            c_res += unit[name] @ unit[name].T
        v = unit[heads.producer].unflatten(0, (sh.kv_heads, hd))  # [kv_heads, hd, d]
        o = unit[heads.readers[0]].unflatten(1, (sh.heads, hd))  # [d, heads, hd]
        c_ov.append(torch.einsum("kid,kjd->ij", v, v) + torch.einsum("dhi,dhj->ij", o, o))
    return c_res, torch.stack(c_ov)


def womi_rotation(c: Tensor, h: Tensor) -> Tensor:
    """``Q H``: the eigenvectors of the covariance ``c`` (``[..., n, n]``) composed with the orthonormal ``h``."""
    return torch.linalg.eigh(c.double()).eigenvectors @ h.double()


def layer_parameters(view: LayerView) -> dict[str, Tensor]:
    """The logical parameters ``layer_weights`` reads (``LayerView.keys``), detached views of the layer's."""
    return {key: view.get(key) for key in view.keys()}


@torch.no_grad()
def fuse(model: nn.Module, spec: ArchSpec, t: OstTransforms, r4: Tensor | None) -> None:
    """Write the transforms into ``model``'s weights (float64 arithmetic, cast back once per tensor), embeddings and
    lm_head included (``R_res`` as R1). Online R3/R4 must be attached by the caller."""
    from qtool.algorithms.rotation import rotate_embeddings

    for i, layer in enumerate(decoder_layers(model, spec)):
        view = LayerView(layer, spec, t.shapes)
        new = layer_weights(layer_parameters(view), t, i, spec, r4, torch.float64)
        for key, value in new.items():
            view.set(key, value)
    rotate_embeddings(model, spec, t.r_res.detach().to(torch.float64))
