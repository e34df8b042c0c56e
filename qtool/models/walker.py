"""The layer walker: the one loop that runs calibration windows through a model one decoder layer at a time.

Every stage that needs what a layer sees (outlier statistics, SmoothQuant's activation ranges, GPTQ's Hessians,
OSTQuant's Hessian refresh) walks with it::

    for step in LayerWalker(model, spec, windows, progress=progress, task="gptq"):
        hessians = HessianObserver(spec, names)
        step.run(hessians)                # every window through this layer, the observer's hooks attached
        ...quantize step.layer...         # the next layer then sees this layer's *new* outputs

The walker captures what the first decoder layer receives (hidden states plus the keyword arguments the model
passes every layer: rotary embeddings, mask, positions) by a pre-hook that stops the forward pass, then feeds
layer ``i`` and makes its outputs layer ``i + 1``'s inputs. After a step the next inputs are recomputed with the
layer as the step left it, unless the step's last ``run`` passed ``keep=True`` (its change keeps the layer's
function, e.g. an equivalent transform): then that run's outputs are used and no second forward is spent.

Memory holds one layer's working set plus the calibration activations of one layer. The seams for streaming and
multi-process runs are here: ``LayerHooks.load``/``free`` around each layer (read a layer's weights when the walk
reaches it, write and release them after) and observers that ``merge`` (statistics gathered on several shards of
the windows add up to those of all windows). Device placement is the walker's: with ``device`` each layer and its
inputs move there for their step and the layer moves back afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from qtool.arch import ArchSpec, decoder_layers


class Observer(Protocol):
    """Accumulates statistics of a layer's inputs through hooks; ``merge`` adds another observer's (e.g. another
    rank's windows) to this one."""

    def attach(self, layer: nn.Module) -> list[RemovableHandle]: ...

    def merge(self, other: Any) -> None: ...


class LayerHooks:
    """Called around each step: ``load`` before the layer is used (e.g. read its weights from the checkpoint),
    ``free`` after the next inputs are computed (e.g. write it and release its memory). Does nothing by default."""

    def load(self, index: int, layer: nn.Module) -> None:
        return None

    def free(self, index: int, layer: nn.Module) -> None:
        return None


@dataclass
class LayerInputs:
    """``hidden[j]: [1, seqlen, hidden]`` per calibration window, and the layer kwargs shared by all windows."""

    hidden: list[torch.Tensor]
    kwargs: dict[str, Any]


class StopLayer(Exception):
    """Raised by an observer's hook to end a window's forward through the layer once it has seen what it needs
    (a static input scale of the first linears needs nothing after them); ``LayerStep.run`` then moves on to the
    next window."""


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass at the first decoder layer."""


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
def run_layer(layer: nn.Module, inputs: LayerInputs) -> LayerInputs | None:
    """Feed every window through ``layer``; returns the next layer's inputs, or ``None`` when a hook stopped a
    window early (``StopLayer``)."""
    outs: list[torch.Tensor] | None = []
    for h in inputs.hidden:
        try:
            out = layer(h, **inputs.kwargs)
        except StopLayer:
            outs = None
            continue
        if outs is not None:
            outs.append(out[0] if isinstance(out, tuple) else out)
    return None if outs is None else LayerInputs(outs, inputs.kwargs)


class LayerStep:
    """One decoder layer during a walk: ``index``, ``layer`` (on the walk's device) and its ``inputs`` (``None``
    when the walk has no calibration data)."""

    def __init__(self, index: int, layer: nn.Module, inputs: LayerInputs | None):
        self.index, self.layer, self.inputs = index, layer, inputs
        self._kept: LayerInputs | None = None

    def run(self, *observers: Observer, keep: bool = False) -> None:
        """A forward of every window through the layer with the observers' hooks attached. ``keep``: the outputs
        become the next layer's inputs (promise: nothing done to the layer afterwards changes what it computes)."""
        if self.inputs is None:
            raise ValueError("this walk has no calibration windows; pass input_ids to LayerWalker")
        handles = [h for obs in observers for h in obs.attach(self.layer)]
        try:
            outputs = run_layer(self.layer, self.inputs)
        finally:
            for h in handles:
                h.remove()
        if keep and outputs is None:
            raise ValueError("keep=True, but an observer stopped the forward early")
        self._kept = outputs if keep else None

    def next_inputs(self) -> LayerInputs | None:
        if self.inputs is None:
            return None
        if self._kept is not None:
            return self._kept
        outputs = run_layer(self.layer, self.inputs)
        assert outputs is not None  # no observer is attached here
        return outputs


class LayerWalker:
    """Iterate ``LayerStep``s over ``model``'s decoder layers in order (see the module docstring).

    ``input_ids: [n, seqlen]`` calibration windows, or ``None`` for a walk without data (RTN); ``device``: where
    each layer runs (default: where the model is); ``hooks``: ``LayerHooks`` around each step; ``progress(task,
    done, total)`` after each step."""

    def __init__(
        self,
        model: nn.Module,
        spec: ArchSpec,
        input_ids: torch.Tensor | None,
        *,
        device: torch.device | str | None = None,
        hooks: LayerHooks | None = None,
        progress=None,
        task: str = "layers",
    ):
        self.model, self.spec, self.input_ids = model, spec, input_ids
        self.device = torch.device(device) if device is not None else None
        self.hooks = hooks or LayerHooks()
        self.progress = progress or (lambda task, done, total: None)
        self.task = task

    def __iter__(self) -> Iterator[LayerStep]:
        layers = decoder_layers(self.model, self.spec)
        inputs = None
        if self.input_ids is not None:
            inputs = _to(capture_layer_inputs(self.model, layers, self.input_ids), self.device)
        for i, layer in enumerate(layers):
            self.hooks.load(i, layer)
            home = _device_of(layer)
            if self.device is not None and home is not None and home != self.device:
                layer.to(self.device)
            step = LayerStep(i, layer, inputs)
            yield step
            inputs = step.next_inputs() if i + 1 < len(layers) else None
            if self.device is not None and home is not None and home != self.device:
                layer.to(home)
            self.hooks.free(i, layer)
            self.progress(self.task, i + 1, len(layers))


def _device_of(module: nn.Module) -> torch.device | None:
    p = next(module.parameters(), None)
    return p.device if p is not None else None


def _to(inputs: LayerInputs, device: torch.device | None) -> LayerInputs:
    if device is None:
        return inputs

    def move(x):
        if isinstance(x, torch.Tensor):
            return x.to(device)
        if isinstance(x, tuple | list):
            return type(x)(move(v) for v in x)
        return x

    return LayerInputs([h.to(device) for h in inputs.hidden], {k: move(v) for k, v in inputs.kwargs.items()})
