"""Stage 4: weight quantization, one decoder layer at a time, one checkpoint file per finished layer.

``rtn`` needs no data. ``gptq`` runs the calibration windows through the model layer by layer: the Hessians of a
layer's linears are gathered from the inputs that the already-quantized layers before it produce, as in the GPTQ
paper. Each finished layer is written to ``layers/NNN.safetensors`` at once, so a killed run loses at most the
layer in progress: on resume the finished layers are loaded, replayed through the model to rebuild the next layer's
inputs (forward passes only), and quantization continues at the first missing layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import Field

from qtool.algorithms.gptq import HessianAccumulator, gptq_quantize
from qtool.algorithms.quantizer import QuantizedWeight, rtn_quantize, scale_dtype_for
from qtool.artifacts import load_tensors, save_tensors
from qtool.models.arch import ArchSpec, decoder_layers
from qtool.models.online import CLIP_ATTR, attention_state, input_hook
from qtool.models.sequential import LayerInputs, capture_layer_inputs, run_layer
from qtool.schemes import QuantArgs, Scheme
from qtool.stages.base import Stage, StageConfig, StageContext
from qtool.stages.calibrate import calibration_inputs
from qtool.targets import Target, plan_targets

LAYERS = "layers"


class RtnConfig(StageConfig):
    """Round-to-nearest with the scheme's observer (``minmax`` or ``mse``). Needs no calibration data."""

    method: Literal["rtn"]


class GptqConfig(StageConfig):
    """GPTQ (Frantar et al., 2022) on Hessians from the calibration windows."""

    method: Literal["gptq"]
    block_size: int = Field(128, gt=0, description="columns updated together (lazy batch updates)")
    damp: float = Field(0.01, gt=0.0, lt=1.0, description="dampening, fraction of mean(diag H)")
    act_order: bool = Field(True, description="process columns by decreasing diag(H); groups stay static")
    true_sequential: bool = Field(
        False, description="re-collect inputs after each sub-block (qkv, o, gate/up, down) is quantized; slower"
    )


class Quantize(Stage):
    name = "quantize"
    sections = ("scheme", "quantize")

    def run(self, ctx: StageContext) -> dict[str, Any]:
        layers = decoder_layers(ctx.model, ctx.spec)
        plan = plan_targets(layers, ctx.spec, ctx.recipe.scheme)
        attach_quantizers(ctx.model, ctx.spec, plan, ctx.recipe.scheme)  # GPTQ sees quantized inputs
        ckpt_dir = ctx.out / LAYERS
        needs_data = ctx.config.method == "gptq"
        inputs = capture_layer_inputs(ctx.model, layers, calibration_inputs(ctx)) if needs_data else None
        errors: dict[str, float] = {}
        resumed = 0
        for i, layer in enumerate(layers):
            path = ckpt_dir / f"{i:03d}.safetensors"
            done = _read_checkpoint(path, ctx) if path.is_file() else None
            if done is not None:
                _set_weights(layer, done)
                resumed += 1
            else:
                qws = self._quantize_layer(ctx, layer, plan[i], inputs, errors)
                _set_weights(layer, qws)
                save_tensors(path, *_checkpoint_payload(qws))
            if needs_data and i + 1 < len(layers):
                inputs = run_layer(layer, inputs)
            ctx.progress("quantize layers", i + 1, len(layers))
        if resumed:
            ctx.log.info("quantize: resumed, %d of %d layers loaded from checkpoints", resumed, len(layers))
        n_targets = sum(len(row) for row in plan)
        return {"method": ctx.config.method, "linears": n_targets, "resumed_layers": resumed, "gptq_error": errors}

    def _quantize_layer(
        self,
        ctx: StageContext,
        layer: nn.Module,
        targets: list[Target],
        inputs: LayerInputs | None,
        errors: dict[str, float],
    ) -> dict[str, QuantizedWeight]:
        cfg = ctx.config
        if cfg.method == "rtn":
            return {
                t.name: rtn_quantize(_weight(layer, t.name), t.args, scale_dtype=_sdtype(layer, t)) for t in targets
            }
        groups = [[t for t in targets if t.name in names] for _, names in ctx.spec.input_groups]
        if not cfg.true_sequential:
            groups = [targets]
        out: dict[str, QuantizedWeight] = {}
        for group in groups:
            if not group:
                continue
            hessians = _collect_hessians(layer, [t.name for t in group], inputs, ctx.spec)
            for t in group:
                w = _weight(layer, t.name)
                h = hessians[t.name].hessian()
                qw = gptq_quantize(
                    w,
                    h,
                    t.args,
                    block_size=cfg.block_size,
                    damp=cfg.damp,
                    act_order=cfg.act_order,
                    scale_dtype=_sdtype(layer, t),
                )
                out[t.name] = qw
                errors[f"{t.layer}.{t.name}"] = _relative_error(w, qw.dequantize(torch.float32), h)
                if cfg.true_sequential:
                    _set_weights(layer, {t.name: qw})
        return out

    def apply(self, ctx: StageContext, manifest: dict[str, Any]) -> None:
        layers = decoder_layers(ctx.model, ctx.spec)
        ckpt_dir = ctx.reader.path("quantize") / LAYERS
        for i, layer in enumerate(layers):
            _set_weights(layer, load_layer(ckpt_dir / f"{i:03d}.safetensors"))
        attach_quantizers(ctx.model, ctx.spec, plan_targets(layers, ctx.spec, ctx.recipe.scheme), ctx.recipe.scheme)


def attach_quantizers(model: nn.Module, spec: ArchSpec, plan: list[list[Target]], scheme: Scheme) -> None:
    """Dynamic input quantization on every planned linear and KV-cache quantization in every attention module,
    as the scheme asks (after any online rotation the transform stage attached). A module carrying a
    ``qtool_clip_ratio`` attribute (clipping learned by a transform, e.g. OSTQuant's) gets that ``clip_ratio``."""
    for i, layer in enumerate(decoder_layers(model, spec)):
        if scheme.input_activations is not None:
            for t in plan[i]:
                module = layer.get_submodule(t.name)
                input_hook(module).quant = _with_clip(scheme.input_activations, module)
        if scheme.kv_cache is not None:
            attn = layer.get_submodule(spec.attention)
            attention_state(model, attn).kv_quant = _with_clip(scheme.kv_cache, attn)


def _with_clip(args: QuantArgs, module: nn.Module) -> QuantArgs:
    ratio = getattr(module, CLIP_ATTR, None)
    return args if ratio is None else args.model_copy(update={"clip_ratio": ratio})


def detach_quantizers(model: nn.Module, spec: ArchSpec) -> None:
    """Undo ``attach_quantizers`` (online rotations stay attached)."""
    for layer in decoder_layers(model, spec):
        state = getattr(layer.get_submodule(spec.attention), "qtool_attention", None)
        if state is not None:
            state.kv_quant = None
        for name in spec.layer_linears:
            hook = getattr(layer.get_submodule(name), "qtool_input", None)
            if hook is not None:
                hook.quant = None


def _weight(layer: nn.Module, name: str) -> torch.Tensor:
    return layer.get_submodule(name).weight.detach().float()


def _sdtype(layer: nn.Module, target: Target) -> torch.dtype:
    """Scales are stored (and quantization computed) in the model's dtype, as compressed-tensors expects."""
    return scale_dtype_for(layer.get_submodule(target.name).weight.dtype)


def _set_weights(layer: nn.Module, qws: dict[str, QuantizedWeight]) -> None:
    """Replace each linear's weight by its dequantized value (fake quantization, in the model's dtype)."""
    for name, qw in qws.items():
        linear = layer.get_submodule(name)
        linear.weight.data.copy_(qw.dequantize(linear.weight.dtype))


@torch.no_grad()
def _collect_hessians(
    layer: nn.Module, names: list[str], inputs: LayerInputs, spec: ArchSpec
) -> dict[str, HessianAccumulator]:
    """One forward of every calibration window through ``layer``, accumulating ``XᵀX`` at each named linear.
    Linears that read the same input (q/k/v, gate/up) share one accumulator: one hook, one product."""
    accs: dict[str, HessianAccumulator] = {}
    hooked: list[str] = []
    for _, group in spec.input_groups:
        members = [n for n in group if n in names]
        if members:
            acc = HessianAccumulator.zeros(layer.get_submodule(members[0]).in_features)
            accs.update({n: acc for n in members})
            hooked.append(members[0])
    handles = [
        layer.get_submodule(n).register_forward_hook(lambda _m, args, _out, n=n: accs[n].add(args[0])) for n in hooked
    ]
    try:
        run_layer(layer, inputs)
    finally:
        for h in handles:
            h.remove()
    return accs


def _relative_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """GPTQ's proxy loss relative to the output energy: tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)."""
    h = h.to(torch.float64)
    d = (w - w_hat).to(torch.float64)
    w = w.to(torch.float64)
    return float(((d @ h) * d).sum() / ((w @ h) * w).sum().clamp_min(1e-30))


def _checkpoint_payload(qws: dict[str, QuantizedWeight]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors: dict[str, torch.Tensor] = {}
    for name, qw in qws.items():
        tensors[f"{name}.q"] = qw.q
        tensors[f"{name}.scale"] = qw.scale
        if qw.zero_point is not None:
            tensors[f"{name}.zero_point"] = qw.zero_point
    args = {name: qw.args.model_dump(mode="json") for name, qw in qws.items()}
    return tensors, {"args": json.dumps(args, sort_keys=True)}


def load_layer(path: Path) -> dict[str, QuantizedWeight]:
    """A layer checkpoint -> ``{linear name: QuantizedWeight}``."""
    from safetensors import safe_open

    tensors = load_tensors(path)
    with safe_open(str(path), "pt") as f:
        args = json.loads(f.metadata()["args"])
    return {
        name: QuantizedWeight(
            q=tensors[f"{name}.q"],
            scale=tensors[f"{name}.scale"],
            zero_point=tensors.get(f"{name}.zero_point"),
            args=QuantArgs.model_validate(a),
        )
        for name, a in args.items()
    }


def _read_checkpoint(path: Path, ctx: StageContext) -> dict[str, QuantizedWeight] | None:
    """A finished layer from an interrupted run, or None when the file cannot be read (then it is redone)."""
    try:
        return load_layer(path)
    except Exception as e:  # a checkpoint is written atomically; anything unreadable is simply recomputed
        ctx.log.warning("quantize: %s unreadable (%s); recomputing that layer", path.name, e)
        return None
