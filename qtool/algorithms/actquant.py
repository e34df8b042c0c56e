"""Fake quantization of activations and of the KV cache: dynamic (on the fly) and static (calibrated scales).

Activations are quantized per token: the last dimension of ``x: [..., features]`` holds one token's features.

- ``token``: one scale (and zero point) per token over all its features;
- ``group``: one per token and ``group_size`` consecutive features;
- ``head`` (KV cache, ``x: [batch, heads, seq, head_dim]``): one per token and head, i.e. over ``head_dim``;
- ``tensor``: one for the whole tensor.

The grid is the one of ``qtool.schemes.qrange`` (signed; asymmetric grids shift it by an integer zero point), the
range comes from min/max times ``clip_ratio``. Symmetric scales are ``absmax / qmax`` (``+-absmax`` land exactly on
``+-qmax``; what vLLM's dynamic per-token int8 kernels and QuaRot compute), unlike static weight grids, which
follow compressed-tensors' ``absmax / ((qmax - qmin) / 2)``; quantize-dequantize is therefore idempotent.
Arithmetic runs in float32 (float64 when ``x`` is float64) and the result has ``x``'s dtype. When ``x``
requires grad, rounding uses the straight-through estimator (the gradient of quantize-dequantize is the identity
inside the clipping range), which is what learned transforms train through. A ``clip`` tensor replaces
``args.clip_ratio`` and receives the gradient through the scale (learned clipping, LSQ-style:
``d out / d scale`` is ``q - x / scale`` inside the grid and ``q`` where clamped).

Static activation quantization uses fixed parameters (``StaticScale``) calibrated once from what a linear reads on
the calibration windows (``static_params``): one scale per tensor or per input feature, on the same grid and scale
convention as the dynamic quantizers (symmetric ``absmax / qmax``; asymmetric ``(max - min) / (qmax - qmin)`` with
an integer zero point). Observers: ``minmax`` (the extremes over every calibration token, times ``clip_ratio``),
``percentile`` (that percentile of ``|x|``, or of ``x`` at both ends when asymmetric, over a token sample) and
``mse`` (the range shrunk by ``1 - i / 100``, ``i < 80``, with the lowest squared error on the sample; ``i = 0``,
minmax, wins ties, so it never does worse than minmax on the sample).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from qtool.schemes import QuantArgs


def fake_quantize_dynamic(x: Tensor, args: QuantArgs, clip: Tensor | None = None) -> Tensor:
    """Quantize-dequantize ``x`` with ``args`` (``dynamic``), scales computed from ``x`` itself; ``clip`` (a
    scalar tensor, differentiable) overrides ``args.clip_ratio``."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    shape = x.shape
    v = grouped(x.to(work), args)
    ratio = args.clip_ratio if clip is None else clip.to(work)
    if args.symmetric:
        q, scale = symmetric_codes(v, args, ratio)
        out = q * scale
    else:
        lo = v.amin(dim=-1, keepdim=True).clamp(max=0.0) * ratio
        hi = v.amax(dim=-1, keepdim=True).clamp(min=0.0) * ratio
        scale = ((hi - lo) / (args.qmax - args.qmin)).clamp_min(torch.finfo(work).tiny)
        zp = torch.round(args.qmin - lo / scale).clamp(args.qmin, args.qmax).detach()
        q = (_round(v / scale) + zp).clamp(args.qmin, args.qmax)
        out = (q - zp) * scale
    return out.reshape(shape).to(x.dtype)


def symmetric_codes(v: Tensor, args: QuantArgs, ratio: float | Tensor) -> tuple[Tensor, Tensor]:
    """``v``'s symmetric codes (float, integer-valued) and scales, one scale per row of the last dimension:
    ``absmax · ratio / qmax``. What ``fake_quantize_dynamic`` dequantizes and qtool's integer kernels multiply."""
    absmax = v.abs().amax(dim=-1, keepdim=True) * ratio
    scale = (absmax / args.qmax).clamp_min(torch.finfo(v.dtype).tiny)
    return _round(v / scale).clamp(args.qmin, args.qmax), scale


def grouped(x: Tensor, args: QuantArgs) -> Tensor:
    """``x`` viewed so that each row of the last dimension shares one scale."""
    if args.granularity == "tensor":
        return x.reshape(1, -1)
    if args.granularity == "group":
        assert args.group_size is not None
        if x.shape[-1] % args.group_size:
            raise ValueError(f"group_size {args.group_size} does not divide the feature size {x.shape[-1]}")
        return x.unflatten(-1, (-1, args.group_size))
    return x  # token / head: the last dimension


def _round(v: Tensor) -> Tensor:
    if v.requires_grad:
        return v + (torch.round(v) - v).detach()
    return torch.round(v)


def weight_fake_quant(w: Tensor, args: QuantArgs) -> Tensor:
    """Straight-through RTN fake quantization of a weight ``[out, in]`` (per channel, group or tensor).

    The gradient is that of ``fake_quantize_dynamic`` with rounding straight-through: identity inside the grid,
    plus the path through the scale (``absmax``). Symmetric grids use one fused autograd function with that exact
    gradient (a third of the temporaries); asymmetric grids go through ``fake_quantize_dynamic``."""
    dyn = _as_dynamic(args)
    if not (dyn.symmetric and w.requires_grad and w.dtype in (torch.float32, torch.float64)):
        return fake_quantize_dynamic(w, dyn)
    v = grouped(w, dyn)
    return _SymmetricSTE.apply(v, float(dyn.qmin), float(dyn.qmax), float(dyn.clip_ratio)).reshape(w.shape)


@functools.cache
def _as_dynamic(args: QuantArgs) -> QuantArgs:
    """``args`` as a dynamic grid over the weight's rows (``channel`` → ``token``), built once per ``QuantArgs``."""
    gran = {"channel": "token"}.get(args.granularity, args.granularity)
    return args.model_copy(update={"granularity": gran, "dynamic": True, "observer": "minmax"})


class _SymmetricSTE(torch.autograd.Function):
    """``clamp(round(v / s)) * s`` with ``s = max(absmax(v) * clip / qmax, tiny)`` per row of ``v``; rounding is
    straight-through, clamping and the scale are differentiated exactly (as autograd would through the unfused
    expression)."""

    @staticmethod
    def forward(ctx, v: Tensor, qmin: float, qmax: float, clip: float) -> Tensor:
        absmax = v.abs().amax(dim=-1, keepdim=True)
        raw = absmax * clip / qmax  # the same rounding as fake_quantize_dynamic
        scale = raw.clamp_min(torch.finfo(v.dtype).tiny)
        ctx.save_for_backward(v, scale, absmax, raw)
        ctx.grid = (qmin, qmax, clip)
        return (v / scale).round_().clamp_(qmin, qmax).mul_(scale)

    @staticmethod
    def backward(ctx, g: Tensor):
        v, scale, absmax, raw = ctx.saved_tensors
        qmin, qmax, clip = ctx.grid
        u = v / scale
        r = torch.round(u)
        inside = (r >= qmin) & (r <= qmax)
        q = r.clamp_(qmin, qmax)
        # d out / d scale = q - u inside the grid (the u = v / s path), q outside (clamped)
        grad_s = (g * torch.where(inside, q - u, q)).sum(dim=-1, keepdim=True)
        grad_s = grad_s * (raw >= torch.finfo(v.dtype).tiny)
        peak = v.abs() == absmax
        share = grad_s * (clip / qmax) / peak.sum(dim=-1, keepdim=True)
        grad_v = torch.where(inside, g, 0.0) + torch.where(peak, v.sign() * share, 0.0)
        return grad_v, None, None, None


@dataclass
class StaticScale:
    """A static input quantizer's calibrated parameters: ``scale`` float32 ``[1]`` (tensor) or ``[in]`` (channel)
    and, for asymmetric grids, the integer-valued ``zero_point`` (int8, same shape)."""

    scale: Tensor
    zero_point: Tensor | None = None


def fake_quantize_static(x: Tensor, args: QuantArgs, p: StaticScale) -> Tensor:
    """Quantize-dequantize ``x: [..., features]`` with fixed scale (and zero point) ``p``, broadcast over the last
    dimension; float32 arithmetic (float64 for float64 ``x``), result in ``x``'s dtype."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    v = x.to(work)
    s = p.scale.to(device=x.device, dtype=work)
    if p.zero_point is None:
        out = _round(v / s).clamp(args.qmin, args.qmax) * s
    else:
        z = p.zero_point.to(device=x.device, dtype=work)
        out = ((_round(v / s) + z).clamp(args.qmin, args.qmax) - z) * s
    return out.to(x.dtype)


# the mse observer's candidate ranges: 1 - i / STATIC_MSE_GRID for i < STATIC_MSE_MAXSHRINK * STATIC_MSE_GRID
STATIC_MSE_GRID = 100
STATIC_MSE_MAXSHRINK = 0.8


def static_params(lo: Tensor, hi: Tensor, args: QuantArgs, sample: Tensor | None = None) -> StaticScale:
    """Calibrate a static quantizer. ``lo``/``hi``: per-feature minimum and maximum over every calibration token
    (``[in]``); ``sample``: ``[tokens, in]`` calibration inputs for the ``percentile`` and ``mse`` observers."""
    if args.dynamic or args.granularity not in ("tensor", "channel"):
        raise ValueError(f"static_params calibrates static tensor/channel scales, not {args.granularity}")
    lo, hi = lo.to(torch.float32), hi.to(torch.float32)
    rows = None
    if args.observer != "minmax":
        if sample is None or sample.numel() == 0:
            raise ValueError(f"observer '{args.observer}' needs a sample of calibration inputs")
        rows = sample.to(torch.float32).reshape(1, -1) if args.granularity == "tensor" else sample.to(torch.float32).T
    if args.granularity == "tensor":
        lo, hi = lo.min().reshape(1), hi.max().reshape(1)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    if args.observer == "percentile":
        assert rows is not None and args.percentile is not None
        if args.symmetric:
            hi = _kth(rows.abs(), args.percentile)
            lo = -hi
        else:
            hi = _kth(rows, args.percentile).clamp(min=0.0)
            lo = -_kth(-rows, args.percentile).clamp(min=0.0)
    lo, hi = lo * args.clip_ratio, hi * args.clip_ratio
    if args.observer == "mse":
        assert rows is not None
        return _mse_static(rows, lo, hi, args)
    return _grid(lo, hi, args)


def _kth(rows: Tensor, percentile: float) -> Tensor:
    """The ``percentile``-th percentile of each row (the nearest-rank value, exact for any row length)."""
    n = rows.shape[1]
    k = min(n, max(1, math.ceil(percentile / 100.0 * n)))
    return rows.kthvalue(k, dim=1).values


def _grid(lo: Tensor, hi: Tensor, args: QuantArgs) -> StaticScale:
    tiny = torch.finfo(torch.float32).tiny
    if args.symmetric:
        absmax = torch.maximum(-lo, hi)
        return StaticScale((absmax / args.qmax).clamp_min(tiny))
    scale = ((hi - lo) / (args.qmax - args.qmin)).clamp_min(tiny)
    zp = torch.round(args.qmin - lo / scale).clamp(args.qmin, args.qmax)
    return StaticScale(scale, zp.to(torch.int8))


def _mse_static(rows: Tensor, lo: Tensor, hi: Tensor, args: QuantArgs) -> StaticScale:
    """Per row of ``rows`` (one per scale), the shrunk range with the lowest squared error (strict: ties keep the
    wider range, so minmax, candidate 0, is never beaten by a worse one)."""
    best_err = torch.full(lo.shape, math.inf)
    best = _grid(lo, hi, args)
    for i in range(int(STATIC_MSE_MAXSHRINK * STATIC_MSE_GRID)):
        shrink = 1.0 - i / STATIC_MSE_GRID
        cand = _grid(lo * shrink, hi * shrink, args)
        p = StaticScale(cand.scale.unsqueeze(1), None if cand.zero_point is None else cand.zero_point.unsqueeze(1))
        err = (fake_quantize_static(rows, args, p) - rows).square_().sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best.scale = torch.where(better, cand.scale, best.scale)
        if best.zero_point is not None and cand.zero_point is not None:
            best.zero_point = torch.where(better, cand.zero_point, best.zero_point)
    return best
