"""Stage 4: weight quantization, one decoder layer at a time, one checkpoint file per finished layer.

The method (``rtn``, ``gptq``: ``qtool.methods.quantize``) quantizes one layer's targeted linears; this stage
plans the targets, attaches the scheme's activation and KV-cache quantizers (so data-driven methods see quantized
inputs), walks the layers (``qtool.models.walker``: a method that ``needs_data`` gets the calibration windows as
the already-quantized layers before produce them, as in the GPTQ paper) and writes each finished layer at once
(``qtool.formats.layers``), so a killed run loses at most the layer in progress: on resume the finished layers are
loaded, replayed through the model to rebuild the next layer's inputs (forward passes only), and quantization
continues at the first missing layer.

Static input quantizers (``scheme.input_activations`` with ``dynamic: false``) are calibrated here, once the method
has quantized the layer's weights: edge by edge in the layer's order (q/k/v, o, gate/up, down), a forward of the
calibration windows through the layer as it now is (earlier layers and this layer's weights quantized, the inputs
already calibrated quantized), stopped at that edge's input, gives its ranges (``models.observers.RangeObserver``),
whose parameters (``qtool.algorithms.actquant.static_params``) go into the layer checkpoint. The method itself sees
the layer's own static inputs unquantized (their scales do not exist yet), the earlier layers' quantized.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from qtool.algorithms.actquant import StaticScale, static_params
from qtool.arch import ArchSpec, decoder_layers
from qtool.context import StageContext
from qtool.formats.layers import LAYERS, LayerCheckpoint, finished_layers, layer_file, read_layer, write_layer
from qtool.methods.quantize import method_for
from qtool.models.observers import RangeObserver
from qtool.models.quantizers import attach_quantizers, set_dequantized, set_params, set_static
from qtool.models.walker import LayerStep, LayerWalker
from qtool.schemes import QuantArgs
from qtool.stages.base import Stage
from qtool.targets import Target, plan_targets

# tokens of each static edge kept for the percentile and mse observers (every k-th token of every window)
STATIC_SAMPLE_TOKENS = 8192


class Quantize(Stage):
    name = "quantize"
    sections = ("scheme", "quantize")
    resumable = True  # finished layers in layers/

    def run(self, ctx: StageContext) -> dict[str, Any]:
        method = method_for(ctx.config)
        plan = plan_targets(decoder_layers(ctx.model, ctx.spec), ctx.spec, ctx.recipe.scheme)
        prep = method.prepare(ctx.config, ctx, plan)  # on the full-precision model, before any quantizer
        attach_quantizers(ctx.model, ctx.spec, plan, ctx.recipe.scheme)  # data-driven methods see quantized inputs
        ckpt_dir = ctx.out / LAYERS
        static = ctx.recipe.scheme.static_activations
        windows = ctx.calibration_windows() if method.needs_data or static else None
        errors: dict[str, float] = {}
        details: dict[str, Any] = {}  # layer -> the method's per-layer facts (AWQ's scales)
        grids: dict[str, dict[str, int]] = {}  # linear name -> grid -> layers (AdaDim's axis choices)
        resumed = 0
        for step in LayerWalker(ctx.model, ctx.spec, windows, progress=ctx.progress, task="quantize layers"):
            done = _read_checkpoint(ckpt_dir, step.index, ctx)
            if done is not None:
                set_params(step.layer, done.params)
                set_dequantized(step.layer, done.weights)
                set_static(step.layer, {name: p for name, (_, p) in done.inputs.items()})
                resumed += 1
            else:
                result = method.quantize_layer(ctx.config, step, plan[step.index], ctx.spec, prep)
                errors.update(result.errors)
                if result.details:
                    details[str(step.index)] = result.details
                set_params(step.layer, result.params)
                set_dequantized(step.layer, result.weights)
                inputs = calibrate_static_inputs(step, plan[step.index], ctx.spec) if static else {}
                done = LayerCheckpoint(result.weights, result.facts, result.params, inputs)
                write_layer(ckpt_dir, step.index, done)
            for name, qw in done.weights.items():
                counts = grids.setdefault(name, {})
                counts[qw.args.grid] = counts.get(qw.args.grid, 0) + 1
        if resumed:
            ctx.log.info("quantize: resumed, %d of %d layers loaded from checkpoints", resumed, len(plan))
        n_targets = sum(len(row) for row in plan)
        summary = {"method": ctx.config.method, "linears": n_targets, "resumed_layers": resumed,
                   "layer_error": errors, "grids": grids}  # fmt: skip
        if details:
            summary["layers"] = details
        return summary

    def apply(self, ctx: StageContext, manifest: dict[str, Any]) -> None:
        layers = decoder_layers(ctx.model, ctx.spec)
        ckpt_dir = ctx.reader.path("quantize") / LAYERS
        attach_quantizers(ctx.model, ctx.spec, plan_targets(layers, ctx.spec, ctx.recipe.scheme), ctx.recipe.scheme)
        for i, layer in enumerate(layers):
            done = read_layer(ckpt_dir, i)
            set_params(layer, done.params)
            set_dequantized(layer, done.weights)
            set_static(layer, {name: p for name, (_, p) in done.inputs.items()})

    def partial_progress(self, partial_dir: Path) -> str | None:
        done = finished_layers(partial_dir / LAYERS)
        return f"{done} layers checkpointed" if done else None


def calibrate_static_inputs(
    step: LayerStep, targets: list[Target], spec: ArchSpec
) -> dict[str, tuple[QuantArgs, StaticScale]]:
    """Calibrate the static input quantizers of ``targets`` (module docstring), one edge at a time, and set them on
    the layer; returns them by linear name."""
    assert step.inputs is not None
    tokens = sum(h.shape[0] * h.shape[1] for h in step.inputs.hidden)
    stride = max(1, math.ceil(tokens / STATIC_SAMPLE_TOKENS))
    out: dict[str, tuple[QuantArgs, StaticScale]] = {}
    for edge in spec.edges:
        members = [t for t in targets if t.name in spec.linears(edge) and t.input_args is not None]
        members = [t for t in members if t.input_args.static]
        if not members:
            continue
        args = members[0].input_args  # one input, one quantizer (checked by plan_targets)
        sample = stride if args.observer != "minmax" else None
        observer = RangeObserver(spec, [t.name for t in members], sample, stop=True)
        step.run(observer)
        lo, hi = observer.range(members[0].name)
        hook_args = step.layer.get_submodule(members[0].name).qtool_input.quant  # with a learned clip, if any
        p = static_params(lo, hi, hook_args, observer.sample(members[0].name))
        for t in members:
            out[t.name] = (args, p)
        set_static(step.layer, {t.name: p for t in members})
    return out


def _read_checkpoint(ckpt_dir: Path, index: int, ctx: StageContext) -> LayerCheckpoint | None:
    """A finished layer from an interrupted run, or None when there is none or it cannot be read (then it is
    redone)."""
    if not layer_file(ckpt_dir, index).is_file():
        return None
    try:
        return read_layer(ckpt_dir, index)
    except Exception as e:  # a checkpoint is written atomically; anything unreadable is simply recomputed
        ctx.log.warning("quantize: %s unreadable (%s); recomputing that layer", layer_file(ckpt_dir, index).name, e)
        return None
