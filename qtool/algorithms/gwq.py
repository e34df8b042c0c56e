"""GWQ (Shao et al. 2024, "GWQ: Gradient-Aware Weight Quantization for Large Language Models", arXiv 2411.00850;
no public code): the weights whose loss gradient is largest are kept in 16 bits, the rest quantized.

A calibration batch is run forward and backward through the full-precision (transformed) model with the language
modelling loss; each linear's top ``fraction`` of weights by saliency is kept beside the grid (``SparseOutliers``)
and the rest is quantized by RTN or GPTQ with the kept weights masked out of the group statistics (GPTQ treats a
kept weight as exactly represented: ``gptq_quantize(keep=...)``). Saliency, per weight:

- ``grad``: ``|∂L/∂W|`` (the paper's);
- ``grad_weight``: ``|∂L/∂W · W|`` (the first-order change of the loss if the weight were zeroed);
- ``weight``: ``|W|`` (magnitude, no data);
- ``hessian``: ``W_ij² · H_jj`` (the output energy the weight carries under the layer's input Hessian, SpQR/OBS-like).
"""

from __future__ import annotations

import torch
from torch import Tensor

from qtool.algorithms.quantizer import QuantizedWeight, SparseOutliers, compute_qparams, quantize, scale_dtype_for
from qtool.schemes import QuantArgs

SALIENCIES = ("grad", "grad_weight", "weight", "hessian")


def saliency(kind: str, w: Tensor, grad: Tensor | None = None, H: Tensor | None = None) -> Tensor:
    """Per-weight score ``[out, in]`` float32 (larger: keep first)."""
    w = w.detach().to(torch.float32)
    if kind == "weight":
        return w.abs()
    if kind == "hessian":
        if H is None:
            raise ValueError("saliency 'hessian' needs the layer's input Hessian")
        return w.square() * H.diagonal().to(torch.float32)
    if grad is None:
        raise ValueError(f"saliency '{kind}' needs the weight's gradient")
    g = grad.detach().to(torch.float32)
    if kind == "grad":
        return g.abs()
    if kind == "grad_weight":
        return (g * w).abs()
    raise ValueError(f"unknown saliency '{kind}'; use one of {', '.join(SALIENCIES)}")


def top_mask(scores: Tensor, fraction: float) -> Tensor:
    """Bool mask of the ``round(fraction · numel)`` largest scores (at least 1); ties broken by position."""
    if not 0.0 < fraction < 0.5:
        raise ValueError(f"fraction must be in (0, 0.5), got {fraction}")
    k = max(1, round(fraction * scores.numel()))
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[torch.topk(scores.flatten(), k, sorted=False).indices] = True
    return mask.view(scores.shape)


def rtn_keep(
    w: Tensor,
    args: QuantArgs,
    keep: Tensor,
    *,
    scale_dtype: torch.dtype | None = None,
    keep_dtype: torch.dtype = torch.float16,
) -> QuantizedWeight:
    """Round-to-nearest of ``w: [out, in]`` with the ``keep`` weights out of the grid: the group statistics see
    them as 0, their integer is the grid's zero, and they are stored as outliers in ``keep_dtype``."""
    masked = w.detach().to(torch.float32).masked_fill(keep, 0.0)
    scale, zp = compute_qparams(masked, args, scale_dtype=scale_dtype or scale_dtype_for(w.dtype))
    q = quantize(masked, scale, zp, args)
    kept = torch.where(keep, w.detach().to(torch.float32), torch.zeros_like(masked))
    return QuantizedWeight(q, scale, zp, args, SparseOutliers.from_dense(kept, keep_dtype))
