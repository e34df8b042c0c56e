"""QuantEase (Behdin et al. 2023, "QuantEase: Optimization-based Quantization for Language Models", arXiv 2309.01885).

Cyclic coordinate descent on GPTQ's layer objective ``f(Ŵ) = tr((Ŵ - W) Σ (Ŵ - W)ᵀ)``, ``Σ = XᵀX`` (any positive
multiple: the Hessian that ``HessianAccumulator`` gives). ``f`` is separable over output rows and quadratic in one
input column, so with every other column fixed, column ``j``'s exact minimiser is (Lemma 1 of the paper)

    u_j = W_j + Σ_{k≠j} (W_k - Ŵ_k) Σ_kj / Σ_jj  =  Ŵ_j + R_j,   R = (W - Ŵ) Σ diag(Σ)⁻¹,

and the nearest point of column ``j``'s grid to ``u_j`` (round, then clamp) minimises ``f`` over that grid, because
the 1-D quadratic has curvature ``Σ_jj`` in every row: a quantized sweep can only lower ``f``. No Cholesky, no
inverse. A *relaxed* sweep sets ``Ŵ_j = u_j`` (unquantized), which lets later sweeps leave a rounding basin; the last
sweep is always quantized.

Implementation (written from the paper; the reference code linkedin/QuantEase, BSD-2, was read):

- ``R`` is recomputed exactly (float64) at the start of every sweep, which also gives ``f`` for free
  (``f = Σ_j Σ_jj · Σ_rows Δ_rj R_rj``); inside a sweep it is updated lazily in blocks of ``block_size`` columns
  (rank-1 updates inside the block, one matmul for the columns after it), as GPTQ's lazy batches.
- Every quantized state's ``f`` is measured in float64 and the best is returned, so the result is never worse than
  the initial point (``init``: RTN or GPTQ) in ``f``, whatever relaxed sweeps or float32 rounding in the loop do.
- The grid (scale, zero point per column group) is computed once from the original ``W`` (static groups), so act
  order (columns visited by decreasing ``Σ_jj``) keeps the ordinary group layout.
- Columns with ``Σ_jj = 0`` (never activated) do not enter ``f``; they keep their initial value.

**Outlier-aware variant** (Section 4 of the paper): ``W ≈ Ŵ + H`` with ``H`` sparse — ``k`` entries (unstructured)
or ``k`` whole input columns (structured) kept in 16 bits. Alternates a quantized coordinate-descent sweep on
``W - H`` with one iterative-hard-thresholding step ``H ← P_k(H - η ∇_H f)``, ``η = 1 / (2 λ_max(Σ))``. ``H`` starts
as the ``k`` largest ``|W|`` (columns of largest norm), and the grid is computed from ``W`` without them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from qtool.algorithms.objective import output_error
from qtool.algorithms.quantizer import (
    QuantizedWeight,
    SparseOutliers,
    compute_qparams,
    qparam_shape,
    quantize,
    scale_dtype_for,
)
from qtool.schemes import QuantArgs

logger = logging.getLogger(__name__)


@dataclass
class QuantEaseResult:
    """``weight``: the result (with its 16-bit ``outliers`` in outlier-aware runs); ``objective``: ``f`` of the
    result as stored (float64, ``Σ`` as given), ``initial_objective`` the starting point's."""

    weight: QuantizedWeight
    objective: float
    initial_objective: float
    history: list[float]  # f after each quantized sweep


def relaxed_schedule(iterations: int, relax_every: int, final_quantized: int) -> list[bool]:
    """Which sweeps are relaxed (unquantized): sweep ``t`` with ``t % relax_every == 1``, except the last
    ``final_quantized`` sweeps (the reference runs relaxed sweeps at t = 1, 4, 7, … up to 25 of 30)."""
    if relax_every <= 0:
        return [False] * iterations
    return [t % relax_every == 1 and t < iterations - final_quantized for t in range(iterations)]


def quantease_quantize(
    w: Tensor,
    H: Tensor,
    args: QuantArgs,
    *,
    init: QuantizedWeight | None = None,
    iterations: int = 30,
    relax_every: int = 0,
    act_order: bool = True,
    block_size: int = 128,
    outlier_fraction: float = 0.0,
    outlier_structure: str = "unstructured",
    scale_dtype: torch.dtype | None = None,
    exact: bool = False,
) -> QuantEaseResult:
    """QuantEase on ``w: [out, in]`` with the Hessian ``H: [in, in]`` (``~ XᵀX``, float64 preferred).

    - ``init``: the starting point and its grid (e.g. GPTQ's result with static groups), or None for RTN on
      ``compute_qparams(w)``'s grid. The outlier-aware variant starts from RTN (its grid leaves the outliers out).
    - ``iterations``: sweeps over all columns; ``relax_every``: see ``relaxed_schedule`` (0: every sweep quantized).
    - ``outlier_fraction``: ``k = round(fraction · out · in)`` entries (``unstructured``) or
      ``round(fraction · in)`` input columns (``structured``) kept in 16 bits; 0 disables the variant.
    - ``scale_dtype``: as in ``rtn_quantize``; the grid is ``compute_qparams`` of ``w`` (outliers masked out).

    Returns the best quantized state in ``f`` (never worse than ``init``: the two are compared in float64). The
    loop runs in float32 on ``w``'s device; the residual ``ΣΔ`` and ``f`` are recomputed after every sweep, in
    float32 (``exact``: float64, 2-4x slower; ``history`` is then exact).
    """
    out_features, in_features = w.shape
    if H.shape != (in_features, in_features):
        raise ValueError(f"Hessian has shape {tuple(H.shape)}, expected ({in_features}, {in_features})")
    if iterations < 1 or block_size < 1:
        raise ValueError("iterations and block_size must be positive")
    if not 0.0 <= outlier_fraction < 0.5:
        raise ValueError(f"outlier_fraction must be in [0, 0.5), got {outlier_fraction}")
    if outlier_structure not in ("unstructured", "structured"):
        raise ValueError(f"outlier_structure must be 'unstructured' or 'structured', got {outlier_structure!r}")
    qparam_shape((out_features, in_features), args)
    Hd = H.detach().to(device=w.device, dtype=torch.float64)
    if not torch.isfinite(Hd).all():
        raise ValueError("Hessian contains inf or nan")
    scale_dtype = scale_dtype or scale_dtype_for(w.dtype)
    W = w.detach().to(torch.float32)

    outliers = outlier_fraction > 0
    if outliers and init is not None:
        raise ValueError("the outlier-aware variant starts from RTN on the grid without its outliers; pass init=None")
    mask = _initial_outliers(W, outlier_fraction, outlier_structure) if outliers else None
    if init is None:
        # the grid from W without the entries kept in 16 bits (zeros, which every range contains)
        grid_source = W if mask is None else torch.where(mask, torch.zeros_like(W), W)
        scale, zp = compute_qparams(grid_source, args, scale_dtype=scale_dtype)
        Q = quantize(grid_source, scale, zp, args).to(torch.float32)
    else:
        if init.shape != tuple(w.shape) or init.args != args:
            raise ValueError(f"init is {init.shape} under {init.args}, expected {tuple(w.shape)} under {args}")
        scale, zp = init.scale, init.zero_point
        Q = init.q.to(device=W.device, dtype=torch.float32)
    # qparams per group, transposed ([groups, out]); column j reads group group_of[j]
    St = scale.to(torch.float32).reshape(-1, scale.shape[-1]).T.contiguous()
    Zt = torch.zeros_like(St) if zp is None else zp.to(torch.float32).reshape(St.T.shape).T.contiguous()
    St, Zt = St.expand(St.shape[0], out_features).contiguous(), Zt.expand(Zt.shape[0], out_features).contiguous()
    group_size = args.group_size if args.granularity == "group" else in_features
    group_of = torch.arange(in_features, device=W.device) // group_size
    Hs = torch.zeros_like(W) if mask is None else torch.where(mask, W, torch.zeros_like(W))

    live = Hd.diagonal() > 0
    perm = torch.argsort(Hd.diagonal(), descending=True, stable=True) if act_order else None
    if perm is not None:
        W, Q, Hs = (t[:, perm] for t in (W, Q, Hs))
        Hd, live, group_of = Hd[perm][:, perm], live[perm], group_of[perm]
    diag = torch.where(live, Hd.diagonal(), torch.ones_like(Hd.diagonal()))
    # C[j', j] = Σ_j'j / Σ_j'j': a change δ of column j moves R's row j' by -C[j', j] δ
    C = (Hd / diag[:, None]).to(torch.float32)
    diag32 = diag.to(torch.float32)
    eta = 1.0 / (2.0 * float(torch.linalg.eigvalsh(Hd)[-1])) if outliers else 0.0
    k = _outlier_count(outlier_fraction, outlier_structure, out_features, in_features) if outliers else 0

    relaxed = relaxed_schedule(iterations, relax_every, final_quantized=4) if not outliers else [False] * iterations
    # The loop works on transposes ([in, out]): column j of the weight is a contiguous row.
    Wt, Qt, Ht = (t.T.contiguous() for t in (W, Q, Hs))
    W_hat = (Qt - Zt[group_of]) * St[group_of]
    Hm = Hd if exact else Hd.to(torch.float32)

    def residual() -> tuple[Tensor, float]:
        """``P = Σ Δ`` (float32, ``Δ = (W - H - Ŵ)ᵀ``) and ``f = Σ Δ ⊙ P`` (summed in float64)."""
        delta = (Wt - Ht - W_hat).to(Hm.dtype)
        P = Hm @ delta
        return P.to(torch.float32), float((delta.to(torch.float64) * P.to(torch.float64)).sum())

    initial_f = _objective(Wt - Ht, W_hat, Hd)
    Qt0, Ht0 = Qt.clone(), Ht.clone()
    best = (initial_f, Qt0, Ht0)
    history: list[float] = []
    P, _ = residual()
    for t in range(iterations):
        R = P / diag32[:, None]  # u_j = Ŵ_j + R_j
        _sweep(W_hat, Qt, R, C, St, Zt, group_of, args, live, block_size, quantized=not relaxed[t])
        P, f = residual()
        if outliers:
            # IHT: H <- P_k(H - η ∇_H f), ∇_H f = 2 Σ (Ŵ + H - W)ᵀ = -2 P
            Ht = _project_t(Ht + (2.0 * eta) * P, k, outlier_structure)
            P, f = residual()
        if not relaxed[t]:
            history.append(f)
            if f < best[0]:
                best = (f, Qt.clone(), Ht.clone())
    f, Qt, Ht = best
    if Qt is not Qt0:
        f = _objective(Wt - Ht, (Qt - Zt[group_of]) * St[group_of], Hd)
        if f > initial_f:  # float32 residuals misjudged a near-tie: keep the starting point
            f, Qt, Ht = initial_f, Qt0, Ht0
    Q, Hs = Qt.T, Ht.T
    if perm is not None:
        inv = torch.argsort(perm)
        Q, Hs = Q[:, inv], Hs[:, inv]
    sparse = None
    if outliers:  # values stored in 16 bits: f is that of the stored weight
        sparse = SparseOutliers.from_dense(Hs, torch.bfloat16 if w.dtype == torch.bfloat16 else torch.float16)
    weight = QuantizedWeight(Q.contiguous().to(torch.int8), scale, zp, args, sparse)
    if outliers:
        f = output_error(w, weight.dequantize(torch.float32), H)
    logger.debug("quantease: f %.6g -> %.6g over %d sweeps", initial_f, f, iterations)
    return QuantEaseResult(weight, f, initial_f, history)


def _objective(target_t: Tensor, w_hat_t: Tensor, Hd: Tensor) -> float:
    """``f`` from transposed ``[in, out]`` tensors: ``Σ_rows Δᵀ Σ Δ`` in float64."""
    d = (w_hat_t - target_t).to(torch.float64)
    return float(((Hd @ d) * d).sum())


def _sweep(
    W_hat: Tensor,
    Q: Tensor,
    R: Tensor,
    C: Tensor,
    S: Tensor,
    Z: Tensor,
    group_of: Tensor,
    args: QuantArgs,
    live: Tensor,
    block_size: int,
    *,
    quantized: bool,
) -> None:
    """One cyclic sweep over the live columns, in place on the transposed ``W_hat``, ``Q``, ``R`` (``[in, out]``
    float32), lazily blocked: ``R``'s rows inside the block get rank-1 updates, the rows after it one matmul."""
    n = W_hat.shape[0]
    live_list = live.tolist()
    groups = group_of.tolist()
    shifted = not args.symmetric
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        D = torch.zeros(i2 - i1, W_hat.shape[1], dtype=W_hat.dtype, device=W_hat.device)
        Cb = C[i1:i2, i1:i2].T.contiguous()  # Cb[i, i'] = C[i1 + i', i1 + i]
        with _one_thread():  # one column's vectors: starting threads costs more than the work (5x measured)
            for i in range(i2 - i1):
                j = i1 + i
                if not live_list[j]:
                    continue
                wj, g = W_hat[j], groups[j]
                u = wj + R[j]
                if quantized:
                    u.div_(S[g])
                    if shifted:
                        u.add_(Z[g])
                    u.round_().clamp_(args.qmin, args.qmax)
                    Q[j].copy_(u)
                    if shifted:
                        u.sub_(Z[g])
                    u.mul_(S[g])
                delta = torch.sub(u, wj, out=D[i])
                wj.copy_(u)
                if j + 1 < i2:
                    R[j + 1 : i2].addr_(Cb[i, i + 1 :], delta, alpha=-1.0)
        if i2 < n:
            R[i2:].addmm_(C[i2:, i1:i2], D, alpha=-1.0)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _outlier_count(fraction: float, structure: str, out_features: int, in_features: int) -> int:
    n = in_features if structure == "structured" else out_features * in_features
    return max(1, int(round(fraction * n)))


def _initial_outliers(W: Tensor, fraction: float, structure: str) -> Tensor:
    """Boolean ``[out, in]``: the ``k`` largest ``|W|`` entries, or the ``k`` input columns of largest norm."""
    k = _outlier_count(fraction, structure, *W.shape)
    mask = torch.zeros(W.shape, dtype=torch.bool, device=W.device)
    if structure == "structured":
        mask[:, torch.topk(W.norm(dim=0), k).indices] = True
    else:
        mask.view(-1)[torch.topk(W.abs().flatten(), k).indices] = True
    return mask


def _project_t(Ht: Tensor, k: int, structure: str) -> Tensor:
    """``P_k`` on a transposed ``[in, out]`` tensor: keep its ``k`` largest entries, or (structured) its ``k``
    rows of largest norm — the weight's input columns — and zero the rest."""
    out = torch.zeros_like(Ht)
    if structure == "structured":
        cols = torch.topk(Ht.norm(dim=1), k).indices
        out[cols] = Ht[cols]
    else:
        flat = Ht.reshape(-1)
        idx = torch.topk(flat.abs(), k).indices
        out.view(-1)[idx] = flat[idx]
    return out
