"""Run a model one decoder layer at a time over calibration windows.

``capture_layer_inputs`` runs the model up to the first decoder layer and keeps what that layer receives (hidden
states and the keyword arguments: rotary embeddings, mask, positions). ``run_layer`` then feeds layer ``i`` and its
outputs become layer ``i + 1``'s inputs, so memory holds one layer's working set plus the calibration activations,
and only the current layer needs to be on the compute device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass at the first decoder layer."""


@dataclass
class LayerInputs:
    """``hidden[j]: [1, seqlen, hidden]`` per calibration window, and the layer kwargs shared by all windows."""

    hidden: list[torch.Tensor]
    kwargs: dict[str, Any]


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor) -> LayerInputs:
    """``input_ids: [n, seqlen]`` -> the first decoder layer's inputs, one window at a time."""
    hidden: list[torch.Tensor] = []
    kwargs: dict[str, Any] = {}

    def hook(_module, args, kw):
        hidden.append(args[0] if args else kw["hidden_states"])
        if not kwargs:
            kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Captured

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for row in input_ids:
            try:
                model(row.unsqueeze(0).to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    kwargs["use_cache"] = False
    kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_value", None)
    return LayerInputs(hidden, kwargs)


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs) -> LayerInputs:
    """Feed every window through ``layer``; returns the next layer's inputs."""
    outs = []
    for h in inputs.hidden:
        out = layer(h, **inputs.kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return LayerInputs(outs, inputs.kwargs)
