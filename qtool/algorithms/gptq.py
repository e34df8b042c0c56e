"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers").

The loop follows IST-DASLab/gptq ``gptq.py``: columns are quantized one at a time and each one's error is spread
over the not-yet-quantized columns through the upper Cholesky factor of ``H^-1``; updates inside a block of
``block_size`` columns are immediate, updates to later blocks are applied once per block (the "lazy batch" trick).
Quantization parameters come from ``quantizer.compute_qparams``, so GPTQ and RTN share one grid definition.

With ``act_order=True`` columns are visited in decreasing ``diag(H)`` order. Group parameters are then *static*:
computed up front from the weight in its natural column groups, so the result packs in the ordinary group layout
and needs no ``g_idx`` (compressed-tensors ``actorder="weight"``).

Per-input-channel grids (block ``(g, 1)``, AdaDim): each column has its own scales over groups of ``g`` rows, so
column ``j``'s scales are computed when GPTQ reaches it, from the column as the earlier columns' error updates have
left it; any column order (act-order included) packs in the same layout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from qtool.algorithms.quantizer import (
    QuantizedWeight,
    SparseOutliers,
    column_qparams,
    compute_qparams,
    qparam_shape,
    scale_dtype_for,
)
from qtool.schemes import QuantArgs

logger = logging.getLogger(__name__)

# Dampening is retried with damp * factor when H + damp * mean(diag H) * I is not positive definite.
_DAMP_RETRY_FACTORS = (1.0, 10.0, 100.0, 1000.0)


@dataclass
class HessianAccumulator:
    """Running ``sum = X^T X`` (``[in, in]`` float64) over ``count`` input rows (tokens) of one linear layer.

    Kept as sum + count, not as a mean, so that accumulators from different shards or runs merge exactly
    (``merge``) and a run can resume from a saved ``sum`` / ``count``.
    """

    sum: Tensor
    count: int = 0

    @classmethod
    def zeros(cls, in_features: int, device: torch.device | str | None = None) -> HessianAccumulator:
        return cls(torch.zeros(in_features, in_features, dtype=torch.float64, device=device), 0)

    def add(self, x: Tensor) -> None:
        """Accumulate inputs ``x: [..., in]`` (any float dtype); every leading index is one row.

        The product of one batch runs in float32 (3-4x faster than float64 on CPU; the reference GPTQ keeps the
        whole Hessian in float32) and is added to the float64 running sum, so error does not grow with the number
        of calibration windows."""
        if x.shape[-1] != self.sum.shape[0]:
            raise ValueError(f"input has {x.shape[-1]} features, the accumulator expects {self.sum.shape[0]}")
        rows = x.detach().reshape(-1, x.shape[-1]).to(device=self.sum.device, dtype=torch.float32)
        self.sum += (rows.T @ rows).to(torch.float64)
        self.count += rows.shape[0]

    def merge(self, other: HessianAccumulator) -> None:
        """Add another accumulator's rows to this one."""
        if other.sum.shape != self.sum.shape:
            raise ValueError(f"cannot merge Hessians of shapes {tuple(other.sum.shape)} and {tuple(self.sum.shape)}")
        self.sum += other.sum.to(self.sum.device)
        self.count += other.count

    def hessian(self) -> Tensor:
        """``H = 2 X^T X / count``: ``[in, in]`` float64 (GPTQ's normalization; any positive factor gives the same
        GPTQ result, since dampening is relative to ``mean(diag H)``)."""
        if self.count == 0:
            raise ValueError("no inputs were accumulated; the calibration data never reached this layer")
        return self.sum * (2.0 / self.count)


def gptq_quantize(
    w: Tensor,
    H: Tensor,
    args: QuantArgs,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = True,
    scale_dtype: torch.dtype | None = None,
    keep: Tensor | None = None,
    keep_dtype: torch.dtype = torch.float16,
) -> QuantizedWeight:
    """Quantize ``w: [out, in]`` minimizing ``||(W - Q) X^T||^2`` for the Hessian ``H: [in, in]`` (``~ X^T X``).

    - ``damp``: ``damp * mean(diag H)`` is added to the diagonal; on a failed Cholesky it is retried 10x, 100x and
      1000x larger before a ValueError.
    - ``static_groups``: group qparams from the original weight up front (required with ``act_order``); otherwise
      each group's qparams are computed when GPTQ reaches it, from the error-updated weight (the original GPTQ).
      Channel and tensor qparams are always computed up front.
    - ``scale_dtype``: dtype of the stored scale, default ``scale_dtype_for(w.dtype)``; quantization uses the scale
      as stored.

    - ``keep``: bool ``[out, in]``, weights kept in 16 bits (GWQ): left out of the group statistics, treated as
      exactly represented (their integer is the grid's zero, their rounding error 0), and stored as ``outliers``
      (in ``keep_dtype``) with the value GPTQ's updates have given them when their column is reached.

    Columns whose Hessian diagonal is 0 (never activated in calibration) are set to 0 before quantizing, as in the
    reference. The math runs in float32 on ``w``'s device with the Hessian inverse in float64. Returns the
    ``QuantizedWeight`` whose ``dequantize()`` is the GPTQ weight.
    """
    out_features, in_features = w.shape
    if H.shape != (in_features, in_features):
        raise ValueError(f"Hessian has shape {tuple(H.shape)}, expected ({in_features}, {in_features})")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if damp < 0:
        raise ValueError(f"damp must be >= 0 (a fraction of mean(diag H), e.g. 0.01), got {damp}")
    qparam_shape((out_features, in_features), args)  # validates granularity and group divisibility
    per_column = args.granularity == "block"
    if per_column and (args.block_structure is None or args.block_structure[1] != 1):
        raise ValueError(f"GPTQ quantizes block grids of one column ({args.block_structure} given)")
    if per_column and keep is not None:
        raise ValueError("kept weights (keep=) are not supported with per-input-channel grids")
    dynamic_groups = args.granularity == "group" and not static_groups
    if dynamic_groups and act_order:
        raise ValueError(
            "act_order with dynamic groups would need a g_idx, which qtool does not write; use static_groups=True"
        )
    scale_dtype = scale_dtype or scale_dtype_for(w.dtype)

    W = w.detach().to(torch.float32).clone()
    H = H.detach().to(device=W.device, dtype=torch.float64).clone()
    if not torch.isfinite(H).all():
        raise ValueError("Hessian contains inf or nan")
    if keep is not None and keep.shape != W.shape:
        raise ValueError(f"keep has shape {tuple(keep.shape)}, expected {tuple(W.shape)}")
    dead, perm = _column_order(H, act_order)
    W[:, dead] = 0.0
    K = None if keep is None else keep.to(W.device).clone()
    if K is not None:
        K[:, dead] = False  # a dead column's weights are 0 and do not matter

    if dynamic_groups or per_column:
        scale = torch.ones(qparam_shape(tuple(W.shape), args), dtype=scale_dtype, device=W.device)
        zp = None if args.symmetric else torch.zeros(scale.shape, dtype=torch.int8, device=W.device)
    else:
        scale, zp = compute_qparams(W if K is None else W.masked_fill(K, 0.0), args, scale_dtype=scale_dtype)
    params = _ColumnParams.create(scale, zp, args, in_features, scale_dtype)

    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
        K = None if K is None else K[:, perm]
        params.group_of = [params.group_of[p] for p in perm.tolist()]

    hinv, _ = _inverse_cholesky(H, damp)
    Q, kept = _gptq_loop(W, hinv, params, args, block_size, dynamic_groups, K)

    if perm is not None:
        inv = torch.argsort(perm)
        Q, kept = Q[:, inv], (None if kept is None else kept[:, inv])
    outliers = None
    if keep is not None:
        assert kept is not None
        outliers = SparseOutliers.from_dense(kept, keep_dtype)
    return QuantizedWeight(Q.to(torch.int8), params.scale, params.zp, args, outliers)


@dataclass
class _ColumnParams:
    """Quantization parameters as the column loop reads them.

    ``scale`` / ``zp``: the stored qparams (scale dtype / int8, shaped by ``qparam_shape``); ``scale_f`` / ``zp_f``:
    the same as float32 ``[out or 1, n_groups or 1]``; ``group_of[j]``: which of their columns column ``j`` (in the
    processing order) uses. Per-input-channel grids (``per_column``): ``scale_f`` / ``zp_f`` are ``[out, in]``, each
    column filled (``fill_column``) when the loop reaches it, ``group_of[j]`` is column ``j``'s original index.
    """

    scale: Tensor
    zp: Tensor | None
    scale_f: Tensor
    zp_f: Tensor
    group_of: list[int]
    scale_dtype: torch.dtype
    per_column: bool = False

    @classmethod
    def create(
        cls, scale: Tensor, zp: Tensor | None, args: QuantArgs, in_features: int, scale_dtype: torch.dtype
    ) -> _ColumnParams:
        if args.granularity == "block":
            out_features = scale.shape[0] * args.block_structure[0]
            f = torch.zeros(out_features, in_features, dtype=torch.float32, device=scale.device)
            return cls(scale, zp, f, f.clone(), list(range(in_features)), scale_dtype, per_column=True)
        scale_f = scale.to(torch.float32).reshape(-1 if scale.ndim == 2 else 1, scale.shape[-1]).clone()
        zp_f = torch.zeros_like(scale_f) if zp is None else zp.to(torch.float32).reshape(scale_f.shape)
        group_size = args.group_size or in_features  # channel and tensor grids: one column of qparams
        return cls(scale, zp, scale_f, zp_f, [j // group_size for j in range(in_features)], scale_dtype)

    def column(self, j: int) -> tuple[Tensor, Tensor]:
        """Scale and zero point of column ``j``: float32 ``[out]`` (or ``[1]`` for a per-tensor grid)."""
        g = self.group_of[j]
        return self.scale_f[:, g], self.zp_f[:, g]

    def fill_column(self, column: int, current: Tensor, args: QuantArgs) -> None:
        """Per-input-channel grids: set original column ``column``'s qparams from its current values ``[out]``."""
        s, z = column_qparams(current, args, self.scale_dtype)
        rows = args.block_structure[0]
        self.scale[:, column] = s
        self.scale_f[:, column] = s.to(torch.float32).repeat_interleave(rows)
        if self.zp is not None and z is not None:
            self.zp[:, column] = z
            self.zp_f[:, column] = z.to(torch.float32).repeat_interleave(rows)

    def fill_group(self, group: int, current: Tensor, args: QuantArgs) -> None:
        """Dynamic groups: set the qparams of ``group`` from its current weights ``[out, group_size]``."""
        s, z = compute_qparams(current, args, scale_dtype=self.scale_dtype)
        self.scale[:, group] = s[:, 0]
        self.scale_f[:, group] = s[:, 0].to(torch.float32)
        if self.zp is not None and z is not None:
            self.zp[:, group] = z[:, 0]
            self.zp_f[:, group] = z[:, 0].to(torch.float32)


def residual_share(H: Tensor, damp: float = 0.01, act_order: bool = True) -> Tensor:
    """Per input column ``j``: ``sqrt(d_j / H_jj)``, the fraction of a rounding error on column ``j`` that GPTQ
    leaves in the layer's output (in RMS), float32 ``[in]``.

    GPTQ's output error from column ``j`` is ``e_j² / U_jj²`` (``U`` the upper Cholesky factor of the damped
    ``H⁻¹``), and ``d_j = 1 / U_jj²`` is the conditional variance of input ``j`` given the columns quantized after
    it, which absorb the rest; round-to-nearest leaves ``e_j² H_jj``. Same damping and column order as
    ``gptq_quantize``."""
    H = H.detach().to(torch.float64).clone()
    _, perm = _column_order(H, act_order)
    if perm is None:
        perm = torch.arange(H.shape[0], device=H.device)
    upper, added = _inverse_cholesky(H[perm][:, perm], damp)
    u = upper.to(torch.float64).diagonal()
    damped = H.diagonal()[perm] + added
    share = torch.empty_like(u)
    share[perm] = (1.0 / (u.square() * damped)).sqrt()
    return share.clamp(max=1.0).to(torch.float32)


def _column_order(H: Tensor, act_order: bool) -> tuple[Tensor, Tensor | None]:
    """GPTQ's preparation of a float64 Hessian, shared by ``gptq_quantize`` and ``residual_share``: columns never
    activated (``diag H == 0``) get ``H_jj = 1`` (in place) so the inverse exists; returns their mask and the
    act-order column permutation (decreasing ``diag H``, stable), or None for the natural order."""
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else None
    return dead, perm


def _inverse_cholesky(H: Tensor, damp: float) -> tuple[Tensor, float]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``: ``[in, in]`` float32 from float64 ``H``,
    and the amount added to the diagonal (larger than ``damp * mean(diag H)`` when a retry was needed)."""
    mean_diag = H.diagonal().mean()
    for factor in _DAMP_RETRY_FACTORS:
        damped = H.clone()
        damped.diagonal().add_(damp * factor * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            # H^-1 = L^-T L^-1; a triangular solve is much faster on CPU than torch.cholesky_inverse
            eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
            lower_inv = torch.linalg.solve_triangular(lower, eye, upper=False)
            upper, info = torch.linalg.cholesky_ex(lower_inv.T @ lower_inv, upper=True)
            if info.item() == 0:
                return upper.to(torch.float32), float(damp * factor * mean_diag)
        logger.warning("Hessian not positive definite with damp=%g; retrying with more dampening", damp * factor)
    raise ValueError(
        f"Hessian is not positive definite even with damp={damp * _DAMP_RETRY_FACTORS[-1]:g}; "
        "use more (or more varied) calibration tokens, or raise damp"
    )


def _gptq_loop(
    W: Tensor,
    hinv: Tensor,
    params: _ColumnParams,
    args: QuantArgs,
    block_size: int,
    dynamic_groups: bool,
    K: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The GPTQ column loop on ``W: [out, in]`` float32 (modified in place). Returns ``Q: [out, in]`` float32
    holding the integers, in ``W``'s column order, and (with a keep mask ``K``) the kept weights' values."""
    in_features = W.shape[1]
    Q = torch.empty_like(W)
    kept = None if K is None else torch.zeros_like(W)
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        W1 = W[:, i1:i2].clone()
        err1 = torch.empty_like(W1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if dynamic_groups and args.group_size and j % args.group_size == 0:
                # W1 holds this block's in-block updates, W the block-level ones for later blocks
                current = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, : args.group_size]
                if K is not None:
                    current = current.masked_fill(K[:, j : j + args.group_size], 0.0)
                params.fill_group(j // args.group_size, current, args)
            if params.per_column:
                params.fill_column(params.group_of[j], W1[:, i], args)
            s, z = params.column(j)
            q = torch.round(W1[:, i] / s + z).clamp_(args.qmin, args.qmax)
            if K is not None:  # a kept weight is stored exactly: grid zero here, its value beside, no error
                k = K[:, j]
                q = torch.where(k, z.expand_as(q), q)
                kept[:, j] = torch.where(k, W1[:, i], 0.0)
            Q[:, j] = q
            err = (W1[:, i] - (q - z) * s) / hinv1[i, i]
            if K is not None:
                err = torch.where(K[:, j], 0.0, err)
            W1[:, i:].addr_(err, hinv1[i, i:], alpha=-1.0)
            err1[:, i] = err
        W[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1.0)
    return Q, kept
