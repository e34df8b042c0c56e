"""Round-to-nearest weight quantization on the compressed-tensors integer grid.

Shapes, for a weight ``w: [out, in]``:

- ``q``: ``[out, in]`` int8, every value in ``[args.qmin, args.qmax]`` (the signed grid of ``qtool.schemes.qrange``);
- ``scale``: ``[out, in // group_size]`` (group), ``[out // r, in // c]`` (block ``(r, c)``; AdaDim's per-input-channel
  groups are ``(g, 1)``), ``[out, 1]`` (channel) or ``[1]`` (tensor), float in the *scale
  dtype* (the model's dtype, see ``scale_dtype_for``): exactly what compressed-tensors stores as ``weight_scale``;
- ``zero_point``: same shape as ``scale``, int8, ``None`` for symmetric grids.

The grids match compressed-tensors 0.20 ``calculate_qparams``: the observed range is widened to contain 0
(``min <= 0 <= max``); symmetric ``scale = absmax / ((qmax - qmin) / 2)`` (so ``+absmax`` lands on ``qmax + 0.5``
and is clamped to ``qmax``), asymmetric ``scale = (max - min) / (qmax - qmin)`` with
``zero_point = clamp(round(qmin - min / scale), qmin, qmax)``; a zero scale becomes ``finfo(scale_dtype).eps``.
Dequantization follows compressed-tensors' ``_dequantize`` operation for operation, in the scale dtype:
``(q.to(s.dtype) - zp.to(s.dtype)) * s``, so a packed checkpoint decompresses there to the same bits as ours.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from qtool.schemes import QuantArgs

logger = logging.getLogger(__name__)

# MSE observer (the grid search of IST-DASLab/gptq ``Quantizer.find_params(mse=True)``, also llm-compressor's
# ``mse`` observer): candidate ranges ``p * range`` for ``p = 1 - i / MSE_GRID``, ``i < MSE_MAXSHRINK * MSE_GRID``
# (p from 1.0 down to 0.21), scored per scale group by ``sum |w - fq(w)| ** MSE_NORM``. We use norm 2 (a true squared
# error, GPTQ uses 2.4) so that the first candidate, p = 1, is exactly the minmax grid and the search can never do
# worse than minmax in squared error, group by group.
MSE_GRID = 100
MSE_MAXSHRINK = 0.8
MSE_NORM = 2.0
# The search evaluates candidates on chunks of this many weight elements, which bounds its temporary memory.
_MSE_CHUNK_ELEMENTS = 1 << 22

_FLOAT_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def scale_dtype_for(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype compressed-tensors gives ``weight_scale`` for a weight of ``weight_dtype``.

    It is the weight's own float dtype (float16, bfloat16, float32, float64), float16 for anything else
    (``initialize_qparams``). Storing scales in the model dtype is what llm-compressor writes and what vLLM and
    transformers expect; it also fixes the arithmetic of dequantization (``(q - zp) * scale`` runs in that dtype).
    """
    return weight_dtype if weight_dtype in _FLOAT_SCALE_DTYPES else torch.float16


_OUTLIER_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class SparseOutliers:
    """Weights kept in 16 bits beside the grid (GWQ, outlier-aware QuantEase): the linear's weight is the grid part
    plus ``values`` at ``(rows, cols)``.

    ``rows`` / ``cols``: int64 ``[k]`` in row-major order, no position twice; ``values``: ``[k]`` float16 or
    bfloat16 (the stored precision). Stored as CSR (``to_csr``): a column index per entry (int16 where the row
    length allows), its value, and a 32-bit row pointer per row."""

    rows: Tensor
    cols: Tensor
    values: Tensor

    def __post_init__(self) -> None:
        if not (self.rows.shape == self.cols.shape == self.values.shape and self.rows.ndim == 1):
            raise ValueError("outlier rows, cols and values must be 1-D of one length")
        if self.values.dtype not in _OUTLIER_DTYPES:
            raise ValueError(f"outlier values must be float16 or bfloat16, got {self.values.dtype}")

    @classmethod
    def from_dense(cls, h: Tensor, dtype: torch.dtype) -> SparseOutliers:
        """The nonzero entries of ``h: [out, in]``, rounded to ``dtype``."""
        rows, cols = h.nonzero(as_tuple=True)
        return cls(rows, cols, h[rows, cols].to(dtype))

    @property
    def count(self) -> int:
        return int(self.values.numel())

    def add_to(self, dense: Tensor) -> Tensor:
        """``dense [out, in]`` with the outliers added, in its dtype (in place)."""
        return dense.index_put_((self.rows, self.cols), self.values.to(dense.dtype), accumulate=True)

    def to_csr(self, out_features: int, in_features: int) -> dict[str, Tensor]:
        """``row_ptr`` int32 ``[out + 1]``, ``col`` int16 (int32 past 32,767 columns) ``[k]``, ``value`` ``[k]``."""
        order = torch.argsort(self.rows * in_features + self.cols)
        counts = torch.bincount(self.rows, minlength=out_features)
        row_ptr = torch.zeros(out_features + 1, dtype=torch.int32)
        row_ptr[1:] = torch.cumsum(counts, 0).to(torch.int32)
        col_dtype = torch.int16 if in_features <= 32767 else torch.int32
        return {"row_ptr": row_ptr, "col": self.cols[order].to(col_dtype), "value": self.values[order].contiguous()}

    @classmethod
    def from_csr(cls, row_ptr: Tensor, col: Tensor, value: Tensor, shape: tuple[int, int]) -> SparseOutliers:
        """Inverse of ``to_csr``; raises ValueError when the arrays do not describe positions inside ``shape``."""
        out_features, in_features = shape
        row_ptr, col = row_ptr.to(torch.int64), col.to(torch.int64)
        ok = (
            row_ptr.shape == (out_features + 1,)
            and int(row_ptr[0]) == 0
            and bool((row_ptr[1:] >= row_ptr[:-1]).all())
            and int(row_ptr[-1]) == col.numel() == value.numel()
            and (col.numel() == 0 or (int(col.min()) >= 0 and int(col.max()) < in_features))
        )
        if not ok:
            raise ValueError(f"outlier CSR arrays do not describe a {out_features}x{in_features} sparse matrix")
        rows = torch.repeat_interleave(torch.arange(out_features), row_ptr[1:] - row_ptr[:-1])
        return cls(rows, col, value)

    def bits(self, out_features: int, in_features: int) -> int:
        """Stored bits: index and value per entry, a 32-bit pointer per row."""
        index_bits = 16 if in_features <= 32767 else 32
        return self.count * (index_bits + self.values.element_size() * 8) + 32 * (out_features + 1)


@dataclass(frozen=True)
class QuantizedWeight:
    """A quantized linear weight: ``q: [out, in] int8``, ``scale`` / ``zero_point`` as in the module docstring, and
    optionally ``outliers`` kept in 16 bits (the weight is then the grid part plus them)."""

    q: Tensor
    scale: Tensor
    zero_point: Tensor | None
    args: QuantArgs
    outliers: SparseOutliers | None = None

    def __post_init__(self) -> None:
        if self.q.dtype != torch.int8 or self.q.ndim != 2:
            raise ValueError(f"q must be a 2-D int8 tensor, got {tuple(self.q.shape)} {self.q.dtype}")
        expected = qparam_shape(tuple(self.q.shape), self.args)
        if tuple(self.scale.shape) != expected:
            raise ValueError(f"scale has shape {tuple(self.scale.shape)}, expected {expected} for {self.args}")
        if self.args.symmetric != (self.zero_point is None):
            raise ValueError("zero_point must be None exactly when the grid is symmetric")
        if self.zero_point is not None and (
            self.zero_point.dtype != torch.int8 or self.zero_point.shape != self.scale.shape
        ):
            raise ValueError("zero_point must be int8 with the shape of scale")
        if self.outliers is not None and self.outliers.count:
            o = self.outliers
            out_features, in_features = self.q.shape
            if (
                int(o.rows.min()) < 0
                or int(o.rows.max()) >= out_features
                or int(o.cols.min()) < 0
                or (int(o.cols.max()) >= in_features)
            ):
                raise ValueError(f"outlier positions fall outside the {out_features}x{in_features} weight")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q.shape[0], self.q.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``[out, in]`` weight, computed in the scale dtype (as compressed-tensors does) and cast to ``dtype``;
        outliers are added in the scale dtype before the cast."""
        if self.outliers is None:
            return dequantize(self.q, self.scale, self.zero_point, self.args, dtype)
        dense = dequantize(self.q, self.scale, self.zero_point, self.args, self.scale.dtype)
        return self.outliers.add_to(dense).to(dtype)


def qparam_shape(weight_shape: tuple[int, int], args: QuantArgs) -> tuple[int, ...]:
    """Shape of ``scale`` / ``zero_point`` for a weight ``[out, in]``; raises ValueError if groups do not fit."""
    out_features, in_features = weight_shape
    if args.granularity == "group":
        group_size = args.group_size
        assert group_size is not None  # QuantArgs validates this
        if in_features % group_size:
            hint = math.gcd(in_features, group_size)
            raise ValueError(
                f"group_size={group_size} does not divide in_features={in_features}; "
                f"use a group_size that divides it (e.g. {hint}), granularity 'channel', or ignore this layer"
            )
        return (out_features, in_features // group_size)
    if args.granularity == "block":
        assert args.block_structure is not None  # QuantArgs validates this
        rows, cols = args.block_structure
        if out_features % rows or in_features % cols:
            raise ValueError(
                f"block {rows}x{cols} does not tile the {out_features}x{in_features} weight; use a block size that "
                f"divides out_features (e.g. {math.gcd(out_features, rows)}) or keep this linear's groups along the "
                "input dimension"
            )
        return (out_features // rows, in_features // cols)
    if args.granularity == "channel":
        return (out_features, 1)
    if args.granularity == "tensor":
        return (1,)
    raise ValueError(f"granularity '{args.granularity}' is for activations; weights use tensor, channel or group")


def compute_qparams(
    w: Tensor, args: QuantArgs, *, scale_dtype: torch.dtype | None = None, clip: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """Scale and zero point of ``w: [out, in]`` under ``args`` with the observer ``args.observer``.

    Returns ``scale`` in ``scale_dtype`` (default ``scale_dtype_for(w.dtype)``) and ``zero_point`` int8 (``None``
    when symmetric), both shaped ``qparam_shape(w.shape, args)``. The math runs in float32; the zero point is
    derived from the scale as stored, so the grid is exactly the one that will be serialized.

    ``clip`` (minmax observer only; shaped like the scales): each scale's range is that of its weights clamped to
    ``± clip · max|w|`` (AutoAWQ's clipping: ``[max(lo, -c), min(hi, c)]``); ``None``: the whole range.
    """
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    shape = qparam_shape(tuple(w.shape), args)
    if not torch.isfinite(w).all():
        raise ValueError("weight contains inf or nan; cannot choose quantization parameters")
    scale_dtype = scale_dtype or scale_dtype_for(w.dtype)
    rows = _scale_groups(w.detach().to(torch.float32), args)
    if clip is not None and args.observer == "mse":
        raise ValueError("clip ranges apply to the minmax observer; the mse observer searches its own")
    if args.observer == "mse":
        scale, zp = _mse_params(rows, args, scale_dtype)
    else:
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        if clip is not None:
            c = rows.abs().amax(dim=1) * clip.reshape(-1).to(torch.float32)
            lo, hi = torch.maximum(lo, -c), torch.minimum(hi, c)
        scale, zp = _grid_params(lo * args.clip_ratio, hi * args.clip_ratio, args, scale_dtype)
    zp_int = None if zp is None else zp.to(torch.int8).reshape(shape)
    return scale.reshape(shape), zp_int


def column_qparams(col: Tensor, args: QuantArgs, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """Qparams of one input column ``col: [out]`` under a per-input-channel grid (block ``(r, 1)``): scale
    ``[out // r]`` in ``scale_dtype`` and int8 zero point (``None`` when symmetric), with ``args.observer`` — the
    same numbers ``compute_qparams`` gives that column of a whole weight. GPTQ calls it when it reaches a column."""
    assert args.granularity == "block" and args.block_structure is not None and args.block_structure[1] == 1
    rows = col.detach().to(torch.float32).reshape(-1, args.block_structure[0])
    if args.observer == "mse":
        scale, zp = _mse_params(rows, args, scale_dtype)
    else:
        scale, zp = _grid_params(rows.amin(dim=1) * args.clip_ratio, rows.amax(dim=1) * args.clip_ratio, args,
                                 scale_dtype)  # fmt: skip
    return scale, (None if zp is None else zp.to(torch.int8))


def quantize(w: Tensor, scale: Tensor, zero_point: Tensor | None, args: QuantArgs) -> Tensor:
    """``w: [out, in]`` float -> ``q: [out, in]`` int8 = ``clamp(round(w / scale + zp), qmin, qmax)`` in float32.

    ``torch.round`` rounds half to even, as compressed-tensors does.
    """
    shape = qparam_shape(tuple(w.shape), args)
    if tuple(scale.shape) != shape:
        raise ValueError(f"scale has shape {tuple(scale.shape)}, expected {shape}")
    x, s = _broadcastable(w.to(torch.float32), scale.to(torch.float32), args)
    x = x / s
    if zero_point is not None:
        x = x + _broadcastable(w, zero_point.to(torch.float32), args)[1]
    q = torch.round(x).clamp_(args.qmin, args.qmax)
    return q.reshape(w.shape).to(torch.int8)


def dequantize(
    q: Tensor, scale: Tensor, zero_point: Tensor | None, args: QuantArgs, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``q: [out, in]`` int8 -> ``[out, in]`` in ``dtype``.

    Computed as compressed-tensors does, in ``scale.dtype``: ``(q - zp) * scale``, each operand cast to the scale
    dtype first; the result is then cast to ``dtype``. With ``dtype == scale.dtype`` it equals compressed-tensors'
    decompressed weight bit for bit.
    """
    x, s = _broadcastable(q.to(scale.dtype), scale, args)
    if zero_point is not None:
        x = x - _broadcastable(q, zero_point.to(scale.dtype), args)[1]
    return (x * s).reshape(q.shape).to(dtype)


def rtn_quantize(
    w: Tensor, args: QuantArgs, *, scale_dtype: torch.dtype | None = None, clip: Tensor | None = None
) -> QuantizedWeight:
    """Round-to-nearest quantization of ``w: [out, in]`` (qparams from ``compute_qparams``, ``clip`` included)."""
    scale, zp = compute_qparams(w, args, scale_dtype=scale_dtype, clip=clip)
    return QuantizedWeight(quantize(w, scale, zp, args), scale, zp, args)


def fake_quantize(w: Tensor, args: QuantArgs, *, scale_dtype: torch.dtype | None = None) -> Tensor:
    """``w: [out, in]`` -> RTN quantize-dequantize of ``w``, in ``w.dtype``."""
    return rtn_quantize(w, args, scale_dtype=scale_dtype).dequantize(w.dtype)


def _broadcastable(x: Tensor, qparam: Tensor, args: QuantArgs) -> tuple[Tensor, Tensor]:
    """View ``x: [out, in]`` and a qparam so that they broadcast the way compressed-tensors broadcasts them.

    Group: ``x -> [out, n_groups, group_size]``, qparam ``[out, n_groups, 1]``; channel ``[out, 1]`` and tensor
    ``[1]`` broadcast against ``[out, in]`` as they are.
    """
    if args.granularity == "group":
        assert args.group_size is not None
        return x.unflatten(-1, (-1, args.group_size)), qparam.unsqueeze(-1)
    if args.granularity == "block":
        assert args.block_structure is not None
        rows, cols = args.block_structure
        blocks = x.reshape(x.shape[0] // rows, rows, x.shape[1] // cols, cols)
        return blocks, qparam.reshape(qparam.shape[0], 1, qparam.shape[1], 1)
    return x, qparam


def _scale_groups(w: Tensor, args: QuantArgs) -> Tensor:
    """``w: [out, in]`` -> ``[n_scales, elements_per_scale]``, one row per scale (row-major over the qparam shape)."""
    if args.granularity == "group":
        assert args.group_size is not None
        return w.reshape(-1, args.group_size)
    if args.granularity == "block":
        assert args.block_structure is not None
        rows, cols = args.block_structure
        blocks = w.reshape(w.shape[0] // rows, rows, w.shape[1] // cols, cols).permute(0, 2, 1, 3)
        return blocks.reshape(-1, rows * cols)
    if args.granularity == "channel":
        return w
    return w.reshape(1, -1)


def _grid_params(lo: Tensor, hi: Tensor, args: QuantArgs, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """Per-row range ``[lo, hi]`` (float32 ``[R]``) -> scale ``[R]`` in ``scale_dtype``, zero point float32 or None.

    The zero point is a float tensor holding integers in ``[qmin, qmax]``.
    """
    lo = lo.clamp(max=0.0)  # 0 must be exactly representable (padding, ReLU zeros)
    hi = hi.clamp(min=0.0)
    levels = float(args.qmax - args.qmin)
    if args.symmetric:
        scale = torch.maximum(-lo, hi) / (levels / 2)
    else:
        scale = (hi - lo) / levels
    scale = scale.to(scale_dtype)
    eps = torch.finfo(scale_dtype).eps  # compressed-tensors' replacement for a zero scale
    scale = torch.where(scale == 0, torch.tensor(eps, dtype=scale_dtype, device=scale.device), scale)
    if args.symmetric:
        return scale, None
    zp = torch.round(args.qmin - lo / scale.to(torch.float32)).clamp_(args.qmin, args.qmax)
    return scale, zp


def _fake_quant_rows(x: Tensor, scale: Tensor, zp: Tensor | None, args: QuantArgs) -> Tensor:
    """Quantize-dequantize ``x: [R, n]`` float32 with per-row ``scale`` / ``zp`` ``[R]``, in float32."""
    s = scale.to(torch.float32).unsqueeze(1)
    z = 0.0 if zp is None else zp.unsqueeze(1)
    q = torch.round(x / s + z).clamp_(args.qmin, args.qmax)
    return (q - z) * s


def _mse_params(rows: Tensor, args: QuantArgs, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """Per-row grid with the lowest squared error over shrunk ranges (see ``MSE_GRID``), ``rows: [R, n]`` float32."""
    chunk = max(1, _MSE_CHUNK_ELEMENTS // rows.shape[1])
    scales, zps = [], []
    for start in range(0, rows.shape[0], chunk):
        part = rows[start : start + chunk]
        lo0 = part.amin(dim=1) * args.clip_ratio
        hi0 = part.amax(dim=1) * args.clip_ratio
        best_err = torch.full_like(lo0, math.inf)
        best_scale = torch.empty(lo0.shape, dtype=scale_dtype, device=lo0.device)
        best_zp = None if args.symmetric else torch.zeros_like(lo0)
        for i in range(int(MSE_MAXSHRINK * MSE_GRID)):
            shrink = 1.0 - i / MSE_GRID
            scale, zp = _grid_params(lo0 * shrink, hi0 * shrink, args, scale_dtype)
            err = (_fake_quant_rows(part, scale, zp, args) - part).abs_().pow_(MSE_NORM).sum(dim=1)
            better = err < best_err  # strict: ties keep the wider range (p = 1 is minmax)
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            if best_zp is not None and zp is not None:
                best_zp = torch.where(better, zp, best_zp)
        scales.append(best_scale)
        zps.append(best_zp)
    scale = torch.cat(scales)
    return scale, (None if args.symmetric else torch.cat([z for z in zps if z is not None]))
