"""OutlierTune (Wang et al., arXiv 2406.18832): per-channel static activation scales folded into the weights
("pre-execution of dequantization") and symmetrization of each channel's range.

For an input ``x`` that a norm produces and linears ``W`` read (q/k/v after the attention norm, gate/up after the
MLP norm), with per-channel calibration ranges ``[lo_j, hi_j]``:

- symmetrization: ``m_j = (hi_j + lo_j) / 2`` centres channel ``j``; the shifted input ``x_j - m_j`` lies in
  ``[-r_j, r_j]`` with ``r_j = (hi_j - lo_j) / 2``;
- scaling: ``s_j = r_j`` (without symmetrization ``s_j = max(|lo_j|, |hi_j|)``, the paper's ``max |x_j|``), so every
  channel of ``(x - m) / s`` lies in ``[-1, 1]`` and one static per-tensor scale quantizes them all: a per-channel
  activation grid at the cost of a per-tensor one. ``1 / s`` folds into the norm's gain and ``s`` into the readers'
  input columns (``W' = W diag(s)``: SmoothQuant with alpha 1, ``qtool.algorithms.smoothing``);
- the shift ``c = m / s`` of the scaled input is subtracted online before the quantizer and added back after the
  linear through its bias: ``W' (x / s - c) + (b + W' c) = W x + b``.

The reference code (aIiKkkk/OutlierTune) has no licence; this is written from the paper and the issue's description.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qtool.algorithms.smoothing import apply_smoothing
from qtool.arch import Edge, LayerView

_EPS = 1e-5


def channel_params(lo: Tensor, hi: Tensor, symmetrize: bool) -> tuple[Tensor, Tensor | None]:
    """Per input channel, the scale ``s`` folded into the weights and (``symmetrize``) the shift ``c`` of the scaled
    input, both float64 ``[in]``, from the channel's calibration minimum ``lo`` and maximum ``hi``."""
    lo, hi = lo.double().clamp(max=0.0), hi.double().clamp(min=0.0)
    if not symmetrize:
        return torch.maximum(-lo, hi).clamp_min(_EPS), None
    s = ((hi - lo) / 2).clamp_min(_EPS)
    return s, (hi + lo) / 2 / s


@torch.no_grad()
def fold(view: LayerView, edge: Edge, s: Tensor, c: Tensor | None) -> None:
    """Fold ``s`` into ``edge``'s norm gain and readers, and ``W' c`` into the readers' biases (which must exist)."""
    apply_smoothing(view, edge, s)
    if c is None:
        return
    for r in edge.readers:
        bias = view.get(f"{r}.weight").double() @ c
        view.set(f"{r}.bias", view.get(f"{r}.bias").double() + bias)
