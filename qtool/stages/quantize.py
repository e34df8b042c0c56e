"""Stage 4: weight quantization, one decoder layer at a time, one checkpoint file per finished layer.

The method (``rtn``, ``gptq``: ``qtool.methods.quantize``) quantizes one layer's targeted linears; this stage
plans the targets, attaches the scheme's activation and KV-cache quantizers (so data-driven methods see quantized
inputs), walks the layers (``qtool.models.walker``: a method that ``needs_data`` gets the calibration windows as
the already-quantized layers before produce them, as in the GPTQ paper) and writes each finished layer at once
(``qtool.formats.layers``), so a killed run loses at most the layer in progress: on resume the finished layers are
loaded, replayed through the model to rebuild the next layer's inputs (forward passes only), and quantization
continues at the first missing layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtool.arch import decoder_layers
from qtool.context import StageContext
from qtool.formats.layers import LAYERS, LayerCheckpoint, finished_layers, layer_file, read_layer, write_layer
from qtool.methods.quantize import method_for
from qtool.models.quantizers import attach_quantizers, set_dequantized, set_params
from qtool.models.walker import LayerWalker
from qtool.stages.base import Stage
from qtool.targets import plan_targets


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
        windows = ctx.calibration_windows() if method.needs_data else None
        errors: dict[str, float] = {}
        details: dict[str, Any] = {}  # layer -> the method's per-layer facts (AWQ's scales)
        grids: dict[str, dict[str, int]] = {}  # linear name -> grid -> layers (AdaDim's axis choices)
        resumed = 0
        for step in LayerWalker(ctx.model, ctx.spec, windows, progress=ctx.progress, task="quantize layers"):
            done = _read_checkpoint(ckpt_dir, step.index, ctx)
            if done is not None:
                set_params(step.layer, done.params)
                set_dequantized(step.layer, done.weights)
                resumed += 1
            else:
                result = method.quantize_layer(ctx.config, step, plan[step.index], ctx.spec, prep)
                errors.update(result.errors)
                if result.details:
                    details[str(step.index)] = result.details
                set_params(step.layer, result.params)
                set_dequantized(step.layer, result.weights)
                done = LayerCheckpoint(result.weights, result.facts, result.params)
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
        for i, layer in enumerate(layers):
            done = read_layer(ckpt_dir, i)
            set_params(layer, done.params)
            set_dequantized(layer, done.weights)
        attach_quantizers(ctx.model, ctx.spec, plan_targets(layers, ctx.spec, ctx.recipe.scheme), ctx.recipe.scheme)

    def partial_progress(self, partial_dir: Path) -> str | None:
        done = finished_layers(partial_dir / LAYERS)
        return f"{done} layers checkpointed" if done else None


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
