"""Loss gradients of chosen weights: a forward and backward pass of the whole model over calibration windows with
the language-modelling loss (GWQ's saliency)."""

from __future__ import annotations

import torch
import torch.nn as nn


def weight_gradients(
    model: nn.Module, weights: dict[str, nn.Parameter], input_ids: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``∂L/∂W`` of the mean next-token loss over the windows ``input_ids: [n, seqlen]``, one window at a time, for
    each named parameter in ``weights`` (float32 copies). The model is left as it was: no gradients kept, the
    parameters' ``requires_grad`` restored."""
    before = {name: p.requires_grad for name, p in weights.items()}
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for p in weights.values():
        p.requires_grad_(True)
        p.grad = None
    n = input_ids.shape[0]
    try:
        with torch.enable_grad():
            for i in range(n):
                ids = input_ids[i : i + 1].to(next(iter(weights.values())).device)
                loss = model(input_ids=ids, labels=ids).loss / n
                loss.backward()
        return {name: p.grad.detach().to(torch.float32).clone() for name, p in weights.items()}
    finally:
        for name, p in weights.items():
            p.grad = None
            p.requires_grad_(before[name])
        for p in frozen:
            p.requires_grad_(True)
