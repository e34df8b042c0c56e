"""The quantize stage's method table: weight-quantization methods, one config class and one handler each.

- ``rtn``: round-to-nearest with the scheme's observer; needs no data.
- ``gptq``: GPTQ (Frantar et al., 2022) on Hessians of the calibration windows, which the layer walker feeds
  through the already-quantized layers before (``qtool.algorithms.gptq``).
- ``quantease``: QuantEase (Behdin et al., 2023), cyclic coordinate descent on the same layer objective, started
  from GPTQ or RTN (``qtool.algorithms.quantease``).
- ``gwq``: GWQ (Shao et al., 2024), the most loss-gradient-salient weights kept in 16 bits, the rest by RTN or GPTQ
  (``qtool.algorithms.gwq``).
- ``awq``: AWQ (Lin et al., 2024), activation-aware per-channel scales searched on a grid and folded into the
  producers, clipping, then RTN or GPTQ (``qtool.algorithms.awq``).
- ``adadim``: AdaDim (Heo et al., 2024), each linear's weight groups along the input or the output dimension,
  whichever gives the lower calibration output error, under RTN or GPTQ (``qtool.algorithms.adadim``).

A new weight method is a pure algorithm module in ``qtool/algorithms/`` and, here, its config class, its handler
(``WeightMethod``) and one line in ``METHODS`` (``docs/adding-a-method.md``).
"""

from __future__ import annotations

import json
import math
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from qtool.algorithms.adadim import choose, output_axis_args
from qtool.algorithms.awq import (
    candidate_scales,
    clip_ratios,
    expand_heads,
    reduce_heads,
    scaled_fake_quant,
    search,
    weight_means,
)
from qtool.algorithms.gptq import gptq_quantize
from qtool.algorithms.gwq import rtn_keep, saliency, top_mask
from qtool.algorithms.objective import output_error, relative_error
from qtool.algorithms.quantease import quantease_quantize
from qtool.algorithms.quantizer import QuantizedWeight, SparseOutliers, rtn_quantize, scale_dtype_for
from qtool.algorithms.smoothing import apply_smoothing
from qtool.arch import ArchSpec, LayerView, Shapes, decoder_layers
from qtool.artifacts import load_tensors, save_tensors, sha256_file, write_json
from qtool.context import StageConfig, StageContext
from qtool.errors import ArtifactError, QtoolError
from qtool.formats.layers import LinearFacts
from qtool.methods.base import LayerResult, WeightMethod
from qtool.models.gradients import weight_gradients
from qtool.models.observers import HessianObserver, MeanAbsObserver, ModuleCallsObserver
from qtool.models.quantizers import set_dequantized
from qtool.models.walker import LayerStep
from qtool.schemes import QuantArgs
from qtool.targets import Target


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


class QuantEaseConfig(StageConfig):
    """QuantEase (Behdin et al., 2023): cyclic coordinate descent on GPTQ's layer objective, each column set to the
    nearest grid point of its exact 1-D minimiser; the best quantized sweep is kept, so the layer error never exceeds
    the starting point's."""

    method: Literal["quantease"]
    iterations: int = Field(30, gt=0, le=1000, description="sweeps over all columns (the paper: 30)")
    init: Literal["gptq", "rtn"] = Field("gptq", description="starting point (and its grid): GPTQ's result or RTN")
    relax_every: int = Field(
        3,
        ge=0,
        description="sweep t with t % relax_every == 1 is relaxed (unquantized), except the last 4; 0: all quantized",
    )
    act_order: bool = Field(True, description="visit columns by decreasing diag(H); groups stay static")
    block_size: int = Field(128, gt=0, description="columns per lazy update block")
    damp: float = Field(0.01, gt=0.0, lt=1.0, description="GPTQ's dampening, for init: gptq")
    outlier_fraction: float = Field(
        0.0,
        ge=0.0,
        lt=0.5,
        description="outlier-aware variant: this fraction of each linear's weights (or of its input columns, "
        "structured) kept in 16 bits beside the grid; 0: off. Needs init: rtn",
    )
    outlier_structure: Literal["unstructured", "structured"] = Field(
        "unstructured", description="outliers anywhere, or whole input columns"
    )

    @model_validator(mode="after")
    def _outliers_start_from_rtn(self) -> QuantEaseConfig:
        if self.outlier_fraction > 0 and self.init != "rtn":
            raise ValueError(
                "init: the outlier-aware variant (outlier_fraction > 0) starts from RTN on the grid without its "
                "outliers; set init: rtn"
            )
        return self


class GwqConfig(StageConfig):
    """GWQ (Shao et al., 2024): the top ``fraction`` of each linear's weights by loss-gradient saliency stays in
    16 bits beside the grid; the rest is quantized by RTN or GPTQ with the kept weights out of the group statistics."""

    method: Literal["gwq"]
    fraction: float = Field(0.01, gt=0.0, lt=0.5, description="share of each linear's weights kept in 16 bits")
    saliency: Literal["grad", "grad_weight", "weight", "hessian"] = Field(
        "grad",
        description="|dL/dW| (the paper's), |dL/dW * W|, |W| (no data) or W^2 * H_jj (the layer's input Hessian)",
    )
    base: Literal["rtn", "gptq"] = Field("gptq", description="how the remaining weights are quantized")
    gradient_windows: int = Field(8, gt=0, description="calibration windows of the forward + backward pass")
    gradient_seed: int = Field(0, description="which calibration windows the gradient pass uses")
    block_size: int = Field(128, gt=0, description="GPTQ: columns updated together")
    damp: float = Field(0.01, gt=0.0, lt=1.0, description="GPTQ: dampening, fraction of mean(diag H)")
    act_order: bool = Field(True, description="GPTQ: process columns by decreasing diag(H); groups stay static")


class AdaDimConfig(StageConfig):
    """AdaDim (Heo et al., 2024): per linear, weight groups along the input dimension (scales [out, in/g], today's
    grid) or along the output dimension (per input channel, scales [out/g, in]), whichever has the lower calibration
    output error; the weights quantized by RTN or GPTQ."""

    method: Literal["adadim"]
    base: Literal["rtn", "gptq"] = Field("gptq", description="how each candidate grid is quantized")
    candidates: tuple[Literal["input", "output"], ...] = Field(
        ("input", "output"),
        min_length=1,
        description="axes along which weight groups may run: input (scales [out, in/g]), output (per input channel, "
        "scales [out/g, in]); ties go to the first",
    )
    criterion: Literal["linear", "block"] = Field(
        "linear",
        description="linear: the linear's output error tr(dW H dW^T), no extra forward pass; block: the reference "
        "code's sub-block criterion, MSE of the attention (q/k/v) or MLP (gate/up) output on the calibration windows",
    )
    block_size: int = Field(128, gt=0, description="GPTQ: columns updated together")
    damp: float = Field(0.01, gt=0.0, lt=1.0, description="GPTQ: dampening, fraction of mean(diag H)")
    act_order: bool = Field(True, description="GPTQ: process columns by decreasing diag(H)")

    @model_validator(mode="after")
    def _distinct(self) -> AdaDimConfig:
        if len(set(self.candidates)) != len(self.candidates):
            raise ValueError(f"candidates: {list(self.candidates)} names an axis twice; use [input, output]")
        return self


class AwqConfig(StageConfig):
    """AWQ (Lin et al., 2024): per input channel, a scale searched on a grid so that the channels with large
    activations get a finer weight grid, folded into what produces the input (a norm gain, the value or up
    projection's rows); then clipping per group (RTN) and RTN or GPTQ on the scaled weights."""

    method: Literal["awq"]
    base: Literal["rtn", "gptq"] = Field("rtn", description="how the scaled weights are quantized")
    mappings: tuple[str, ...] = Field(
        ("qkv", "o_proj", "gate_up", "down_proj"),
        min_length=1,
        description="edges of the family table (qtool/arch.py) whose readers are balanced against their producer; "
        "o_proj is v -> o, grouped-query models included",
    )
    duo_scaling: bool | Literal["both"] = Field(
        True, description="true: s = x^a / w^(1-a); false: s = x^a; both: both grids (twice the candidates)"
    )
    grid: int = Field(20, gt=0, le=1000, description="alphas i / grid, i = 0 .. grid-1, per grid (identity added)")
    loss: Literal["parent", "linear"] = Field(
        "parent",
        description="parent: output error of the readers' parent module (attention for q/k/v, MLP for gate/up; o "
        "and down: the linear) on loss_tokens; linear: the readers' own output error tr(dW H dW^T), all tokens",
    )
    loss_tokens: int = Field(
        2048,
        ge=0,
        description="parent loss: calibration tokens scored (attention: the first windows holding that many; MLP: "
        "that many tokens evenly spaced over all windows); 0: all",
    )
    clip: bool | None = Field(
        None, description="AutoAWQ's activation-weighted clipping search per group (not q/k); default: on with RTN"
    )
    clip_grid: int = Field(20, gt=0, le=1000, description="clipping ratios 1 - i / clip_grid")
    clip_max_shrink: float = Field(0.5, gt=0.0, lt=1.0, description="smallest clipping ratio 1 - clip_max_shrink")
    block_size: int = Field(128, gt=0, description="GPTQ: columns updated together")
    damp: float = Field(0.01, gt=0.0, lt=1.0, description="GPTQ: dampening, fraction of mean(diag H)")
    act_order: bool = Field(True, description="GPTQ: process columns by decreasing diag(H); groups stay static")

    @model_validator(mode="after")
    def _clip_with_rtn(self) -> AwqConfig:
        if self.clip and self.base == "gptq":
            raise ValueError(
                "clip: the clipping search picks RTN ranges; GPTQ chooses its own as it goes (llm-compressor's AWQ + "
                "GPTQ does not clip either); set clip: false or base: rtn"
            )
        if len(set(self.mappings)) != len(self.mappings):
            raise ValueError(f"mappings: {list(self.mappings)} names an edge twice")
        return self

    @property
    def clipping(self) -> bool:
        return self.base == "rtn" if self.clip is None else self.clip


class Rtn(WeightMethod):
    config = RtnConfig

    def quantize_layer(
        self, cfg: RtnConfig, step: LayerStep, targets: list[Target], spec: ArchSpec, prep: Any = None
    ) -> LayerResult:
        result = LayerResult()
        for t in targets:
            result.weights[t.name] = rtn_quantize(weight_of(step.layer, t.name), t.args, scale_dtype=_sdtype(step, t))
            result.facts[t.name] = LinearFacts("rtn")
        return result


class Gptq(WeightMethod):
    config = GptqConfig
    needs_data = True
    needs_hessian = True

    def quantize_layer(
        self, cfg: GptqConfig, step: LayerStep, targets: list[Target], spec: ArchSpec, prep: Any = None
    ) -> LayerResult:
        """All targets from one pass of Hessians, or (``true_sequential``) edge by edge, each edge's Hessians
        collected after the edges before it are quantized."""
        if cfg.true_sequential:
            groups = [[t for t in targets if t.name in spec.linears(edge)] for edge in spec.edges]
        else:
            groups = [targets]
        result = LayerResult()
        for group in groups:
            if not group:
                continue
            hessians = HessianObserver(spec, [t.name for t in group])
            step.run(hessians)
            for t in group:
                w = weight_of(step.layer, t.name)
                h = hessians.hessian(t.name)
                try:
                    qw = gptq_quantize(
                        w,
                        h,
                        t.args,
                        block_size=cfg.block_size,
                        damp=cfg.damp,
                        act_order=cfg.act_order,
                        scale_dtype=_sdtype(step, t),
                    )
                except ValueError as e:  # a Hessian the calibration data leaves singular: the user's to fix
                    raise QtoolError(f"quantize: layer {t.layer} {t.name}: {e}") from None
                result.weights[t.name] = qw
                result.facts[t.name] = LinearFacts("gptq", actorder="weight" if cfg.act_order else None)
                result.errors[f"{t.layer}.{t.name}"] = relative_error(w, qw.dequantize(torch.float32), h)
                if cfg.true_sequential:
                    set_dequantized(step.layer, {t.name: qw})
        return result

    def error_feedback(self, cfg: GptqConfig) -> dict[str, Any]:
        return {"gptq_damp": cfg.damp, "gptq_act_order": cfg.act_order}


class QuantEase(WeightMethod):
    config = QuantEaseConfig
    needs_data = True
    needs_hessian = True

    def quantize_layer(
        self, cfg: QuantEaseConfig, step: LayerStep, targets: list[Target], spec: ArchSpec, prep: Any = None
    ) -> LayerResult:
        """The linears that read one input (q/k/v, gate/up) share a Hessian and are solved as one stack of rows
        (rows are independent in QuantEase and GPTQ; one column loop instead of three), except with outliers,
        whose budget is per linear."""
        hessians = HessianObserver(spec, [t.name for t in targets])
        step.run(hessians)
        result = LayerResult()
        for group in _stacks(targets, hessians) if cfg.outlier_fraction == 0 else [[t] for t in targets]:
            names = ", ".join(t.name for t in group)
            t0 = group[0]
            ws = [weight_of(step.layer, t.name) for t in group]
            w = torch.cat(ws)
            h = hessians.hessian(t0.name)
            sdtype = _sdtype(step, t0)
            try:
                init = None
                if cfg.init == "gptq":
                    init = gptq_quantize(
                        w, h, t0.args, block_size=cfg.block_size, damp=cfg.damp, act_order=cfg.act_order,
                        scale_dtype=sdtype,
                    )  # fmt: skip
                qe = quantease_quantize(
                    w,
                    h,
                    t0.args,
                    init=init,
                    iterations=cfg.iterations,
                    relax_every=cfg.relax_every,
                    act_order=cfg.act_order,
                    block_size=cfg.block_size,
                    outlier_fraction=cfg.outlier_fraction,
                    outlier_structure=cfg.outlier_structure,
                    scale_dtype=sdtype,
                )
            except ValueError as e:
                raise QtoolError(f"quantize: layer {t0.layer} {names}: {e}") from None
            parts = split_rows(qe.weight, [x.shape[0] for x in ws])
            for t, w_t, part in zip(group, ws, parts, strict=True):
                result.weights[t.name] = part
                result.facts[t.name] = LinearFacts("quantease", actorder="weight" if cfg.act_order else None)
                result.errors[f"{t.layer}.{t.name}"] = relative_error(w_t, part.dequantize(torch.float32), h)
        return result


def _stacks(targets: list[Target], hessians: HessianObserver) -> list[list[Target]]:
    """Targets grouped by shared input (one Hessian accumulator) and grid; per-tensor grids stay alone (one scale
    for a stack would be a different grid)."""
    groups: dict[tuple, list[Target]] = {}
    for t in targets:
        key = (id(hessians.accumulator(t.name)), t.args) if t.args.granularity != "tensor" else (t.name,)
        groups.setdefault(key, []).append(t)
    return list(groups.values())


def split_rows(qw: QuantizedWeight, rows: list[int]) -> list[QuantizedWeight]:
    """A row-stacked quantized weight back into its parts (scales, zero points and outliers are per row)."""
    if len(rows) == 1:
        return [qw]
    parts, start = [], 0
    for n in rows:
        zp = None if qw.zero_point is None else qw.zero_point[start : start + n].clone()
        outliers = None
        if qw.outliers is not None:
            o = qw.outliers
            keep = (o.rows >= start) & (o.rows < start + n)
            outliers = SparseOutliers(o.rows[keep] - start, o.cols[keep], o.values[keep])
        q, scale = qw.q[start : start + n].clone(), qw.scale[start : start + n].clone()
        parts.append(QuantizedWeight(q, scale, zp, qw.args, outliers))
        start += n
    return parts


class Gwq(WeightMethod):
    config = GwqConfig
    needs_data = True  # the gradient pass, and GPTQ's Hessians
    needs_hessian = True

    def prepare(self, cfg: GwqConfig, ctx: StageContext, plan: list[list[Target]]) -> dict[str, torch.Tensor] | None:
        """The kept positions of every target (flat int32 indices by ``"<layer>.<linear>"``), from one gradient
        pass of the full-precision model; stored in the stage directory (``GWQ_KEEP``) and reused on resume."""
        if cfg.saliency not in ("grad", "grad_weight"):
            return None  # chosen per layer from the weights (and Hessian)
        path = ctx.out / GWQ_KEEP
        kept = _read_checked(path)
        if kept is not None:
            ctx.log.info("quantize: gwq kept positions loaded from %s", path.name)
            return kept
        layers = decoder_layers(ctx.model, ctx.spec)
        params = {f"{t.layer}.{t.name}": layers[t.layer].get_submodule(t.name).weight for row in plan for t in row}
        windows = ctx.calibration_windows()
        order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(cfg.gradient_seed))
        ids = windows[order[: cfg.gradient_windows]]
        ctx.log.info("quantize: gwq gradient pass over %d windows", ids.shape[0])
        grads = weight_gradients(ctx.model, params, ids)
        kept = {
            name: top_mask(saliency(cfg.saliency, p, grads.pop(name)), cfg.fraction).flatten().nonzero().flatten()
            .to(torch.int32)
            for name, p in params.items()
        }  # fmt: skip
        _write_checked(path, kept)
        return kept

    def quantize_layer(
        self, cfg: GwqConfig, step: LayerStep, targets: list[Target], spec: ArchSpec, prep: Any = None
    ) -> LayerResult:
        hessians = HessianObserver(spec, [t.name for t in targets])
        step.run(hessians)
        result = LayerResult()
        for t in targets:
            w = weight_of(step.layer, t.name)
            h = hessians.hessian(t.name)
            if prep is not None:
                keep = torch.zeros(w.numel(), dtype=torch.bool)
                keep[prep[f"{t.layer}.{t.name}"].long()] = True
                keep = keep.view(w.shape)
            else:
                keep = top_mask(saliency(cfg.saliency, w, H=h), cfg.fraction)
            sdtype = _sdtype(step, t)
            kdtype = torch.bfloat16 if sdtype == torch.bfloat16 else torch.float16
            try:
                if cfg.base == "gptq":
                    qw = gptq_quantize(
                        w, h, t.args, block_size=cfg.block_size, damp=cfg.damp, act_order=cfg.act_order,
                        scale_dtype=sdtype, keep=keep, keep_dtype=kdtype,
                    )  # fmt: skip
                else:
                    qw = rtn_keep(w, t.args, keep, scale_dtype=sdtype, keep_dtype=kdtype)
            except ValueError as e:
                raise QtoolError(f"quantize: layer {t.layer} {t.name}: {e}") from None
            result.weights[t.name] = qw
            actorder = "weight" if cfg.base == "gptq" and cfg.act_order else None
            result.facts[t.name] = LinearFacts("gwq", actorder=actorder)
            result.errors[f"{t.layer}.{t.name}"] = relative_error(w, qw.dequantize(torch.float32), h)
        return result


class AdaDim(WeightMethod):
    config = AdaDimConfig
    needs_data = True  # the criterion reads the calibration inputs
    needs_hessian = True

    def check_plan(self, cfg: AdaDimConfig, scheme: Any, spec: ArchSpec, layers: Any, plan: list[list[Target]]) -> None:
        if "output" not in cfg.candidates:
            return
        for row in plan:
            for t in row:
                out_features = layers[t.layer].get_submodule(t.name).out_features
                try:
                    output_axis_args(scheme.weights, out_features, scheme.group_fallback)
                except ValueError as e:
                    raise QtoolError(
                        f"quantize.candidates: output groups run along the output dimension, and for layer "
                        f"{t.layer} {t.name}: {e}; use a scheme.weights.group_size that divides it, set "
                        "scheme.group_fallback: channel (one scale per input column there) or ignore (that linear "
                        "keeps input-axis groups), or drop output from quantize.candidates"
                    ) from None

    def prepare(self, cfg: AdaDimConfig, ctx: StageContext, plan: list[list[Target]]) -> dict[str, QuantArgs | None]:
        """Each target's output-axis grid (``None``: none, the linear keeps its input-axis groups), from the scheme's
        group size and fallback (a target's own arguments may be the per-channel fallback of the input axis)."""
        layers = decoder_layers(ctx.model, ctx.spec)
        scheme = ctx.recipe.scheme
        out = {}
        for row in plan:
            for t in row:
                rows = layers[t.layer].get_submodule(t.name).out_features
                key = f"{t.layer}.{t.name}"
                out[key] = (
                    output_axis_args(scheme.weights, rows, scheme.group_fallback)
                    if "output" in cfg.candidates
                    else None
                )
        return out

    def quantize_layer(
        self, cfg: AdaDimConfig, step: LayerStep, targets: list[Target], spec: ArchSpec, prep: Any = None
    ) -> LayerResult:
        """Every candidate grid of every linear is quantized, the lowest-error one kept. With ``criterion: block``
        the linears that read a sub-block's input (q/k/v, gate/up) are decided in order, each one's choice in place
        while the next is scored, as the reference does; the others' sub-block is the linear itself."""
        hessians = HessianObserver(spec, [t.name for t in targets])
        parents = _parents(spec, targets) if cfg.criterion == "block" and len(cfg.candidates) > 1 else {}
        calls = ModuleCallsObserver(sorted(set(parents.values())))
        step.run(hessians, calls)
        reference = {p: calls.outputs(step.layer, p) for p in calls.calls}  # full-precision sub-block outputs
        result = LayerResult()
        for t in targets:
            w = weight_of(step.layer, t.name)
            h = hessians.hessian(t.name)
            found: dict[str, QuantizedWeight] = {}
            for axis in cfg.candidates:
                args = t.args if axis == "input" else prep[f"{t.layer}.{t.name}"]
                if args is None:
                    continue
                found[axis] = self._quantize(cfg, w, h, args, step, t)
            if len(found) == 1:
                axis = next(iter(found))
            elif t.name in parents:
                errors = {a: _subblock_error(step.layer, t.name, qw, calls, parents[t.name], reference[parents[t.name]])
                          for a, qw in found.items()}  # fmt: skip
                axis = choose(errors)
            else:
                axis = choose({a: output_error(w, qw.dequantize(torch.float32), h) for a, qw in found.items()})
            qw = found[axis]
            if t.name in parents:  # the next sibling is scored with this choice in place
                set_dequantized(step.layer, {t.name: qw})
            result.weights[t.name] = qw
            actorder = "weight" if cfg.base == "gptq" and cfg.act_order and axis == "input" else None
            result.facts[t.name] = LinearFacts("adadim", actorder=actorder)
            result.errors[f"{t.layer}.{t.name}"] = relative_error(w, qw.dequantize(torch.float32), h)
        return result

    def _quantize(self, cfg: AdaDimConfig, w, h, args, step: LayerStep, t: Target) -> QuantizedWeight:
        sdtype = _sdtype(step, t)
        if cfg.base == "rtn":
            return rtn_quantize(w, args, scale_dtype=sdtype)
        try:
            return gptq_quantize(w, h, args, block_size=cfg.block_size, damp=cfg.damp, act_order=cfg.act_order,
                                 scale_dtype=sdtype)  # fmt: skip
        except ValueError as e:
            raise QtoolError(f"quantize: layer {t.layer} {t.name}: {e}") from None


class Awq(WeightMethod):
    config = AwqConfig
    needs_data = True
    needs_hessian = True

    def check_plan(self, cfg: AwqConfig, scheme: Any, spec: ArchSpec, layers: Any, plan: list[list[Target]]) -> None:
        known = [e.name for e in spec.edges]
        for name in cfg.mappings:
            if name not in known:
                raise QtoolError(
                    f"quantize.mappings: '{name}' is not an edge of the {spec.family} family; its edges: "
                    f"{', '.join(known)} (qtool/arch.py)"
                )
        covered = set(spec.layer_linears)
        for row in plan:
            for t in row:
                if t.name not in covered:
                    raise QtoolError(
                        f"quantize: layer {t.layer} {t.name} reads no edge of the {spec.family} family table "
                        "(qtool/arch.py), so AWQ cannot balance it; add it to scheme.ignore or describe its edge"
                    )
        if cfg.clipping and scheme.weights is not None and scheme.weights.observer != "minmax":
            raise QtoolError(
                f"quantize.clip: the clipping search picks minmax ranges, scheme.weights.observer is "
                f"{scheme.weights.observer}; set scheme.weights.observer: minmax or quantize.clip: false"
            )

    def prepare(self, cfg: AwqConfig, ctx: StageContext, plan: list[list[Target]]) -> Shapes:
        return Shapes.of(ctx.model.config)

    def quantize_layer(
        self, cfg: AwqConfig, step: LayerStep, targets: list[Target], spec: ArchSpec, prep: Any = None
    ) -> LayerResult:
        """One forward of the windows collects each edge's mean |x| and Hessian (and the parents' inputs); the
        edges are then searched and folded in order (q/k/v, v -> o, gate/up, up -> down), each from the full-precision
        layer's statistics rescaled by the folds before it; last, every target is clipped and quantized."""
        shapes: Shapes = prep
        layer, view = step.layer, LayerView(step.layer, spec, shapes)
        by_name = {t.name: t for t in targets}
        edges = [e for e in spec.edges if e.name in cfg.mappings and any(m in by_name for m in spec.linears(e))]
        parents = {}
        if cfg.loss == "parent":
            for e in edges:
                mods = spec.linears(e)
                if e.kind == "norm" and all("." in m for m in mods):
                    parent = mods[0].rsplit(".", 1)[0]
                    if all(m.rsplit(".", 1)[0] == parent for m in mods):
                        parents[e.name] = parent
        seqlen = step.inputs.hidden[0].shape[1] if step.inputs is not None and step.inputs.hidden else 1
        limit = None if cfg.loss_tokens == 0 else max(1, -(-cfg.loss_tokens // seqlen))
        hessians = HessianObserver(spec, [t.name for t in targets])
        means = MeanAbsObserver(spec, edges)
        # attention mixes the tokens of a window: whole windows; the MLP is per token: tokens from every window
        windows = ModuleCallsObserver(sorted({p for p in parents.values() if p == spec.attention}), limit=limit)
        tokens = ModuleCallsObserver(sorted({p for p in parents.values() if p != spec.attention}))
        step.run(hessians, means, windows, tokens)
        calls = ModuleCallsObserver([])
        calls.merge(windows)
        for name in tokens.calls:
            calls.calls[name] = _token_sample(tokens.calls[name], cfg.loss_tokens)
        h_of = {e.name: hessians.hessian(next(m for m in spec.linears(e) if m in by_name)) for e in spec.edges
                if any(m in by_name for m in spec.linears(e))}  # fmt: skip
        before = {n: p.detach().clone() for n, p in layer.named_parameters()}
        details: dict[str, Any] = {}
        for e in edges:
            mods = [m for m in spec.linears(e) if m in by_name]
            w0 = {m: weight_of(layer, m) for m in mods}
            args0 = by_name[mods[0]].args
            x_mean = means.mean_abs(e.name)
            w_mean = weight_means(list(w0.values()), args0.group_size if args0.granularity == "group" else None)
            gqa = e.kind == "heads" and x_mean.numel() != view.get(f"{e.producer}.weight").shape[0]
            if gqa:  # one scale per value row, shared by the o_proj columns of every query head of its group
                dims = (shapes.heads, shapes.kv_heads, shapes.head_dim)
                x_mean, w_mean = reduce_heads(x_mean, *dims), reduce_heads(w_mean, *dims)
                columns = lambda s, dims=dims: expand_heads(s, *dims)  # noqa: E731
            else:
                columns = lambda s: s  # noqa: E731
            h = h_of[e.name]
            if e.name in parents:
                reference = calls.outputs(layer, parents[e.name])
                loss = lambda s, e=e, w0=w0, ref=reference: _parent_loss(  # noqa: E731
                    layer, {m: (w0[m], by_name[m].args) for m in w0}, s, calls, parents[e.name], ref, step, by_name
                )
            else:
                h32 = h.float()  # output_error's product runs in float32: converted once, not per candidate
                loss = lambda s, w0=w0, h=h32, columns=columns: sum(  # noqa: E731
                    output_error(
                        w0[m],
                        scaled_fake_quant(w0[m], columns(s), by_name[m].args, _sdtype(step, by_name[m])),
                        h,
                        product=torch.float32,
                    )
                    for m in w0
                )
            duo = {True: "true", False: "false"}.get(cfg.duo_scaling, "both")  # type: ignore[arg-type]
            candidates = candidate_scales(x_mean, w_mean, cfg.grid, duo)
            try:
                s, losses = search(candidates, loss)
            except ValueError as err:
                raise QtoolError(f"quantize: layer {step.index} edge {e.name} ({', '.join(mods)}): {err}") from None
            best = next(i for i, c in enumerate(candidates) if c is s)  # 0: the identity
            details[e.name] = {"candidate": best, "loss_vs_identity": losses[best] / losses[0] if losses[0] else 1.0}
            if best:  # the identity folds nothing
                cols = columns(s)
                apply_smoothing(view, e, s, cols)
                inv = 1.0 / cols
                h_of[e.name] = h * inv.unsqueeze(1) * inv.unsqueeze(0)  # the readers' input is now X / s
        result = LayerResult(details=details)
        for t in targets:
            w = weight_of(layer, t.name)
            h = h_of[spec.edge_of(t.name).name]
            sdtype = _sdtype(step, t)
            if cfg.base == "gptq":
                try:
                    qw = gptq_quantize(w, h, t.args, block_size=cfg.block_size, damp=cfg.damp,
                                       act_order=cfg.act_order, scale_dtype=sdtype)  # fmt: skip
                except ValueError as err:
                    raise QtoolError(f"quantize: layer {t.layer} {t.name}: {err}") from None
            elif cfg.clipping and not _reads_query_or_key(spec, t.name):
                ratios, _ = clip_ratios(w, h, t.args, sdtype, grid=cfg.clip_grid, max_shrink=cfg.clip_max_shrink)
                qw = rtn_quantize(w, t.args, scale_dtype=sdtype, clip=ratios)
            else:
                qw = rtn_quantize(w, t.args, scale_dtype=sdtype)
            result.weights[t.name] = qw
            actorder = "weight" if cfg.base == "gptq" and cfg.act_order else None
            result.facts[t.name] = LinearFacts("awq", actorder=actorder)
            result.errors[f"{t.layer}.{t.name}"] = relative_error(w, qw.dequantize(torch.float32), h)
        quantized = {f"{t.name}.weight" for t in targets}
        result.params = {n: p.detach().clone() for n, p in layer.named_parameters()
                         if n not in quantized and not torch.equal(p, before[n])}  # fmt: skip
        return result

    def error_feedback(self, cfg: AwqConfig) -> dict[str, Any] | None:
        return {"gptq_damp": cfg.damp, "gptq_act_order": cfg.act_order} if cfg.base == "gptq" else None


def _token_sample(calls: list[tuple[tuple, dict]], n: int) -> list[tuple[tuple, dict]]:
    """The recorded calls of a per-token module (one positional input ``[1, seq, d]`` per window, no keyword
    arguments) as one call on ``n`` tokens evenly spaced over all windows (0, or no more tokens than that: all of
    them); calls of another form are returned as they are."""
    if not calls or any(len(args) != 1 or kwargs for args, kwargs in calls):
        return calls
    x = torch.cat([args[0].reshape(-1, args[0].shape[-1]) for args, _ in calls])
    if 0 < n < x.shape[0]:
        x = x[torch.linspace(0, x.shape[0] - 1, n).round().long()]
    return [((x.unsqueeze(0),), {})]


def _reads_query_or_key(spec: ArchSpec, linear: str) -> bool:
    """q/k (or a fused module holding them): their outputs meet in a softmax, which an output error misjudges, so
    AutoAWQ does not clip them."""
    return any(p in ("q", "k") for p in spec.parts(linear))


@torch.no_grad()
def _parent_loss(
    layer: nn.Module,
    readers: dict[str, tuple[torch.Tensor, QuantArgs]],
    s: torch.Tensor,
    calls: ModuleCallsObserver,
    parent: str,
    reference: list[torch.Tensor],
    step: LayerStep,
    by_name: dict[str, Target],
) -> float:
    """Sum of squared differences between the parent's full-precision output and its output with each reader set
    to ``Q(W s) / s``; when that overflows in the layer's dtype, both outputs are recomputed in float64. The
    readers' weights are restored afterwards."""
    saved = {m: layer.get_submodule(m).weight.data.clone() for m in readers}
    fake = {m: scaled_fake_quant(w, s, args, _sdtype(step, by_name[m])) for m, (w, args) in readers.items()}

    def outputs(weights: dict[str, torch.Tensor], dtype: torch.dtype | None) -> list[torch.Tensor]:
        for m, w in weights.items():
            linear = layer.get_submodule(m)
            linear.weight.data = w.to(dtype or linear.weight.dtype)
        return calls.outputs(layer, parent, dtype)

    def distance(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
        return float(sum((o.double() - r.double()).square().sum() for o, r in zip(outs, refs, strict=True)))

    try:
        value = distance(outputs(fake, None), reference)
        if not math.isfinite(value):
            value = distance(outputs(fake, torch.float64), outputs(saved, torch.float64))
    finally:
        for m, w in saved.items():
            layer.get_submodule(m).weight.data = w
    return value


def _parents(spec: ArchSpec, targets: list[Target]) -> dict[str, str]:
    """Linear -> the module whose input it reads (``self_attn`` for q/k/v, ``mlp`` for gate/up), for the linears
    of a normalized sub-block input; o/down read an input of their own and are their own sub-block."""
    out = {}
    for t in targets:
        edge = spec.edge_of(t.name)
        if edge.kind == "norm" and "." in t.name:
            out[t.name] = t.name.rsplit(".", 1)[0]
    return out


@torch.no_grad()
def _subblock_error(
    layer: nn.Module, name: str, qw: QuantizedWeight, calls: ModuleCallsObserver, parent: str, reference: list
) -> float:
    """Sum of squared differences (float64) between the sub-block's output with ``name`` set to ``qw`` and its
    full-precision output; the linear's weight is restored afterwards."""
    linear = layer.get_submodule(name)
    saved = linear.weight.data.clone()
    try:
        linear.weight.data.copy_(qw.dequantize(linear.weight.dtype))
        outs = calls.outputs(layer, parent)
    finally:
        linear.weight.data.copy_(saved)
    return float(sum((o.double() - r.double()).square().sum() for o, r in zip(outs, reference, strict=True)))


GWQ_KEEP = "gwq_keep.safetensors"


def _read_checked(path: Path) -> dict[str, torch.Tensor] | None:
    """Tensors written by ``_write_checked`` whose sha256 still matches, else None (then recomputed)."""
    try:
        if json.loads(path.with_suffix(".sha256.json").read_text())["sha256"] != sha256_file(path):
            return None
        return load_tensors(path)
    except (OSError, ValueError, KeyError, TypeError, ArtifactError):
        return None


def _write_checked(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_tensors(path, tensors)
    write_json(path.with_suffix(".sha256.json"), {"sha256": sha256_file(path)})


# config class -> handler. The recipe's ``quantize:`` union is built from the keys, in this order.
METHODS: dict[type[StageConfig], WeightMethod] = {
    RtnConfig: Rtn(),
    GptqConfig: Gptq(),
    QuantEaseConfig: QuantEase(),
    GwqConfig: Gwq(),
    AdaDimConfig: AdaDim(),
    AwqConfig: Awq(),
}

QuantizeConfig = Annotated[typing.Union[tuple(METHODS)], Field(discriminator="method")]  # noqa: UP007


def method_for(cfg: StageConfig) -> WeightMethod:
    return METHODS[type(cfg)]


def weight_of(layer: nn.Module, name: str) -> torch.Tensor:
    """A linear's weight as float32 ``[out, in]`` (a copy when the model is not float32)."""
    return layer.get_submodule(name).weight.detach().float()


def _sdtype(step: LayerStep, target: Target) -> torch.dtype:
    """Scales are stored (and quantization computed) in the model's dtype, as compressed-tensors expects."""
    return scale_dtype_for(step.layer.get_submodule(target.name).weight.dtype)
