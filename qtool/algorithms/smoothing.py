"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights with per-channel scales.

For a set of linears that read the same input ``X`` (channels ``j``) and the operation that produces ``X``:

    s_j = max|X_j| ** alpha / max_{linears, rows} |W_{:, j}| ** (1 - alpha)

``X`` is divided by ``s`` (folded into the producer) and every reader's column ``j`` is multiplied by ``s_j``, so
the product is unchanged and the activation range is flattened. Producers (``ArchSpec`` layout):

- ``attn_norm -> q/k/v`` and ``mlp_norm -> gate/up``: the RMSNorm gain ``γ <- γ / s``;
- ``up_proj -> down_proj``: down_proj's input is ``act(gate) * up``, so up_proj's output rows (and bias) ``/ s``.

All arithmetic runs in float64 on copies of the touched weights, which are cast back to their dtype once.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from qtool.algorithms.rotation import write_param
from qtool.models.arch import ArchSpec

# The pairs smoothed in each decoder layer: name -> (producer, readers). Producer kind from the module type.
MAPPINGS = ("qkv", "gate_up", "down_proj")
_EPS = 1e-5


def mapping_modules(spec: ArchSpec) -> dict[str, tuple[str, tuple[str, ...]]]:
    """``{mapping: (producer, readers)}`` within one decoder layer."""
    return {
        "qkv": (spec.attn_norm, spec.input_groups[0][1]),
        "gate_up": (spec.mlp_norm, spec.input_groups[2][1]),
        "down_proj": (spec.up_proj, (spec.down_proj,)),
    }


def smoothing_scales(act_absmax: Tensor, weights: list[Tensor], alpha: float) -> Tensor:
    """``s`` (float64 ``[in]``) from the input's per-channel absmax and the readers' weights ``[out, in]``."""
    w_max = torch.stack([w.detach().double().abs().amax(dim=0) for w in weights]).amax(dim=0).clamp_min(_EPS)
    a_max = act_absmax.double().clamp_min(_EPS)
    return (a_max.pow(alpha) / w_max.pow(1.0 - alpha)).clamp_min(_EPS)


@torch.no_grad()
def apply_smoothing(layer: nn.Module, producer: str, readers: tuple[str, ...], s: Tensor) -> None:
    """Divide ``producer``'s output channels by ``s`` and multiply the readers' input columns by ``s``."""
    prod = layer.get_submodule(producer)
    if isinstance(prod, nn.Linear):
        write_param(prod.weight, prod.weight.double() / s.unsqueeze(1))
        if prod.bias is not None:
            write_param(prod.bias, prod.bias.double() / s)
    else:  # a norm with a gain vector
        write_param(prod.weight, prod.weight.double() / s)
    for name in readers:
        lin = layer.get_submodule(name)
        write_param(lin.weight, lin.weight.double() * s)
