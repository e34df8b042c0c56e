"""AWQ (Lin et al., 2024, arXiv 2306.00978): activation-aware per-channel weight scaling, and clipping.

For the linears that read one input ``X`` (an edge of ``qtool.arch``: q/k/v read the attention norm's output,
o reads the attention output, gate/up the MLP norm's, down the gated product), AWQ multiplies input channel ``j``
of every reader's weight by ``s_j`` before quantization and divides the producer of ``X`` by ``s_j`` (a norm gain,
or the rows of the value / up projection), so the product is unchanged in exact arithmetic and the channels that
carry large activations get a finer grid. The scale is searched on a grid:

    s = x̄^α / w̄^(1-α)   ("duo" scaling)   or   s = x̄^α   (plain),   α = i / grid,  i = 0 .. grid-1,

normalised by ``sqrt(max s · min s)``, where ``x̄_j`` is the mean ``|X_j|`` over the calibration tokens and
``w̄_j`` the mean over the readers' rows of ``|W_ij| / max |W_group(i,j)|``. The candidate kept is the one with the
lowest loss — the error of the readers' parent module's output (the attention block for q/k/v, the MLP for
gate/up, the linear itself for o and down) between the full-precision and the scaled, quantized, unscaled weights.
**The identity ``s = 1`` is always the first candidate and ties keep it**, so the kept scale never has a higher loss
than plain quantization (AutoAWQ's and llm-compressor's grids lack it: with duo scaling α = 0 is ``1 / w̄``).

Clipping (AutoAWQ's ``_search_best_clip``): per weight group, the range ``± r · max|w|`` for ``r`` in
``1, 1 - 1/grid, …`` down to ``1 - max_shrink``, scored by the group's share of the output error. The reference
scores ``(x_g · Δw_g)²`` over 512 sampled tokens; that sum over *all* calibration tokens is ``Δw_g H_g Δw_gᵀ``
with ``H_g`` the group's diagonal block of ``XᵀX``, which is what this module computes (exact, and cheaper).

Everything here is pure tensor code; ``qtool.methods.quantize.Awq`` walks the layers and folds the scales.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from qtool.algorithms.quantizer import compute_qparams, dequantize, quantize
from qtool.schemes import QuantArgs

_EPS = 1e-4  # AutoAWQ's floor for the duo denominator and the scales


def weight_means(weights: list[Tensor], group_size: int | None) -> Tensor:
    """``w̄`` (float64 ``[in]``): mean over every reader row of ``|w| / max|w|`` of its group (the whole row when
    ``group_size`` is None)."""
    w = torch.cat([x.detach().double() for x in weights]).abs()
    rows, cols = w.shape
    g = group_size or cols
    grouped = w.reshape(rows, cols // g, g)
    normed = grouped / (grouped.amax(dim=2, keepdim=True) + 1e-6)
    return normed.reshape(rows, cols).mean(dim=0)


def candidate_scales(x_mean: Tensor, w_mean: Tensor | None, grid: int, duo: str) -> list[Tensor]:
    """The searched scales (float64 ``[in]``), the identity first. ``duo``: ``"true"`` (x̄^α / w̄^(1-α)),
    ``"false"`` (x̄^α) or ``"both"`` (both grids)."""
    x = x_mean.double().clamp_min(_EPS)
    out = [torch.ones_like(x)]
    kinds = {"true": (True,), "false": (False,), "both": (True, False)}[duo]
    for use_w in kinds:
        for i in range(grid):
            alpha = i / grid
            if use_w:
                s = x.pow(alpha) / (w_mean.double().pow(1 - alpha) + _EPS)
            else:
                s = x.pow(alpha)
            s = s.clamp_min(_EPS)
            s = s / (s.max() * s.min()).sqrt()
            if bool(torch.isfinite(s).all()):
                out.append(s)
    return out


def search(candidates: list[Tensor], loss: Callable[[Tensor], float]) -> tuple[Tensor, list[float]]:
    """The candidate with the lowest finite ``loss`` (strictly lower than the earlier ones: ties keep the first,
    the identity) and every candidate's loss. Raises ``ValueError`` when no candidate has a finite loss."""
    losses = [loss(s) for s in candidates]
    best = None
    for i, value in enumerate(losses):
        if math.isfinite(value) and (best is None or value < losses[best]):
            best = i
    if best is None:
        raise ValueError(f"no finite loss among the {len(candidates)} candidate scales (the identity included)")
    return candidates[best], losses


def scaled_fake_quant(w: Tensor, s: Tensor, args: QuantArgs, scale_dtype: torch.dtype) -> Tensor:
    """``Q(W · diag(s)) · diag(1/s)`` in float64: what the readers compute from the unscaled input."""
    ws = (w.double() * s).to(w.dtype)
    scale, zp = compute_qparams(ws, args, scale_dtype=scale_dtype)
    return dequantize(quantize(ws, scale, zp, args), scale, zp, args, torch.float64) / s


def expand_heads(s: Tensor, heads: int, kv_heads: int, head_dim: int) -> Tensor:
    """A scale over the value projection's rows (``kv_heads · head_dim``) -> over o_proj's input columns
    (``heads · head_dim``): every query head of a KV group reads that group's values, so its columns get the
    group's scale (one copy per query head)."""
    group = heads // kv_heads
    return s.reshape(kv_heads, 1, head_dim).expand(kv_heads, group, head_dim).reshape(heads * head_dim)


def reduce_heads(x: Tensor, heads: int, kv_heads: int, head_dim: int) -> Tensor:
    """Per o_proj input column (``heads · head_dim``) -> per value row: the mean over the query heads of a group."""
    group = heads // kv_heads
    return x.reshape(kv_heads, group, head_dim).mean(dim=1).reshape(kv_heads * head_dim)


def clip_ratios(
    w: Tensor, H: Tensor, args: QuantArgs, scale_dtype: torch.dtype, *, grid: int = 20, max_shrink: float = 0.5
) -> tuple[Tensor, Tensor]:
    """Per weight group (``args``: group or channel granularity), the ratio ``r`` of ``max|w|`` whose clamped range
    gives the lowest output error ``Δw_g H_g Δw_gᵀ`` (``H``: the input's ``[in, in]`` Hessian, any positive
    factor). Ratios ``1 - i/grid`` for ``i < max_shrink · grid``; ties keep the larger ratio (1: no clipping).
    Returns the ratios (shaped like the scales) and the summed error at the chosen ratios."""
    if args.granularity not in ("group", "channel"):
        raise ValueError(f"clipping searches per weight group; granularity {args.granularity} has none")
    out_f, in_f = w.shape
    g = args.group_size if args.granularity == "group" else in_f
    n = in_f // g
    idx = torch.arange(n)
    blocks = H.double().reshape(n, g, n, g)[idx, :, idx, :]  # [n, g, g]: each group's diagonal block
    shape = (out_f, n) if args.granularity == "group" else (out_f, 1)
    best = torch.ones(shape, dtype=torch.float64)
    best_err = torch.full((out_f, n), math.inf, dtype=torch.float64)
    for i in range(int(max_shrink * grid)):
        r = 1.0 - i / grid
        ratio = torch.full(shape, r, dtype=torch.float64)
        scale, zp = compute_qparams(w, args, scale_dtype=scale_dtype, clip=ratio)
        w_hat = dequantize(quantize(w, scale, zp, args), scale, zp, args, torch.float64)
        d = (w.double() - w_hat).reshape(out_f, n, g)
        err = torch.einsum("ong,ngh,onh->on", d, blocks, d)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better.reshape(shape), ratio, best)
    return best, best_err.sum()
