"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights with per-channel scales.

For an edge (``qtool.arch.Edge``: linears that read the same input ``X``, channels ``j``, and what produces
``X``):

    s_j = max|X_j| ** alpha / max_{readers, rows} |W_{:, j}| ** (1 - alpha)

``X`` is divided by ``s`` (folded into the producer) and every reader's column ``j`` is multiplied by ``s_j``, so
the product is unchanged and the activation range is flattened. Producers:

- a norm (``norm`` edges: attn_norm -> q/k/v, mlp_norm -> gate/up): the RMSNorm gain ``γ <- γ / s``;
- a projection (``gated`` edge: up -> down, whose input ``act(gate) * up`` is linear in ``up``; ``heads`` edge:
  v -> o, attention being linear in the values): the producer's output rows (and bias) ``/ s``.

All arithmetic runs in float64 on copies of the touched weights, which are cast back to their dtype once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qtool.arch import Edge, LayerView

# The edges smoothed by default (recipe ``transform.mappings``), by edge name.
MAPPINGS = ("qkv", "gate_up", "down_proj")
_EPS = 1e-5


def smoothing_scales(act_absmax: Tensor, weights: list[Tensor], alpha: float) -> Tensor:
    """``s`` (float64 ``[in]``) from the input's per-channel absmax and the readers' weights ``[out, in]``."""
    w_max = torch.stack([w.detach().double().abs().amax(dim=0) for w in weights]).amax(dim=0).clamp_min(_EPS)
    a_max = act_absmax.double().clamp_min(_EPS)
    return (a_max.pow(alpha) / w_max.pow(1.0 - alpha)).clamp_min(_EPS)


def reader_weights(view: LayerView, edge: Edge) -> list[Tensor]:
    """The readers' weights ``[out, in]`` of ``edge`` (row blocks of a fused linear included)."""
    return [view.get(f"{name}.weight") for name in edge.readers]


@torch.no_grad()
def apply_smoothing(view: LayerView, edge: Edge, s: Tensor, columns: Tensor | None = None) -> None:
    """Divide ``edge``'s producer's output channels by ``s`` and multiply its readers' input columns by ``columns``
    (default ``s``; a ``heads`` edge of a grouped-query model reads each value row once per query head of its group:
    ``qtool.algorithms.awq.expand_heads``)."""
    columns = s if columns is None else columns
    key = f"{edge.producer}.weight"
    if edge.kind == "norm":  # a gain vector
        view.set(key, view.get(key).double() / s)
    else:  # a projection's output rows
        view.set(key, view.get(key).double() / s.unsqueeze(1))
        if view.has(f"{edge.producer}.bias"):
            view.set(f"{edge.producer}.bias", view.get(f"{edge.producer}.bias").double() / s)
    for name in edge.readers:
        view.set(f"{name}.weight", view.get(f"{name}.weight").double() * columns)
