"""The layer objective every calibrated weight method shares: a linear's output error on the calibration inputs,
``tr(ΔW H ΔWᵀ)`` with ``ΔW = W - Ŵ`` and ``H ∝ XᵀX`` (``Σ_t ‖ΔW x_t‖²`` over the calibration tokens, up to the
positive factor of ``H``). GPTQ minimises it column by column, QuantEase by coordinate descent; AdaDim and AWQ
compare candidates with it; the quantize stage reports it relative to the output energy."""

from __future__ import annotations

import torch
from torch import Tensor


def output_error(w: Tensor, w_hat: Tensor, H: Tensor, *, product: torch.dtype = torch.float64) -> float:
    """``tr(ΔW H ΔWᵀ)``. ``ΔW`` is formed in float64 and the sum taken in float64; ``product`` is the dtype of
    ``ΔW H`` — float32 is 3-4x faster on CPU with a relative error ~1e-6 that is the same for every candidate, so
    it can rank candidates (AWQ's search), while reported values use float64."""
    d = w.to(torch.float64) - w_hat.to(torch.float64)
    return float(((d.to(product) @ H.to(product)).to(torch.float64) * d).sum())


def relative_error(w: Tensor, w_hat: Tensor, H: Tensor) -> float:
    """``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` in float64: the output error as a fraction of the output energy."""
    w = w.to(torch.float64)
    h = H.to(torch.float64)
    d = w - w_hat.to(torch.float64)
    return float(((d @ h) * d).sum() / ((w @ h) * w).sum().clamp_min(1e-30))
