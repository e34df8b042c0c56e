"""Stage 3: equivalent transforms that make a model easier to quantize without changing what it computes.

- ``hadamard`` (QuaRot): fused R1 (residual) and R2 (per value head) rotations, online R3 (queries and keys after
  RoPE) and R4 (down_proj input) Hadamards; see ``qtool.algorithms.rotation``. Sizes that are not powers of two use
  Kronecker Hadamards (``qtool.algorithms.hadamard``); where none exists (e.g. 172) a seeded random orthogonal
  matrix takes its place, and the summary says so.
- ``smoothquant``: per-channel scales from calibration activations migrated into the preceding norm or linear
  (``qtool.algorithms.smoothing``).
- ``ostquant``: learned orthogonal + scaling transforms (``qtool.stages.transform_ostquant``).

Artifacts: ``rotations.safetensors`` (every matrix applied, float64, plus their kinds) or ``scales.safetensors``;
``apply`` replays them exactly on resume. When the outliers stage computed statistics, they are computed again on
the transformed model (``after-stats.json``) and compared (``before_after`` in the summary, ``plots/``).
"""

from __future__ import annotations

import json
from functools import partial
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from qtool.algorithms.hadamard import hadamard_matrix
from qtool.algorithms.rotation import FusedRotations, make_rotation, rotate_model
from qtool.algorithms.smoothing import MAPPINGS, apply_smoothing, mapping_modules, smoothing_scales
from qtool.artifacts import load_tensors, save_tensors
from qtool.models.arch import ArchSpec, decoder_layers, head_dim_of
from qtool.models.online import attach_rotations, online_rotations
from qtool.models.sequential import capture_layer_inputs, run_layer
from qtool.stages.base import Stage, StageConfig, StageContext
from qtool.stages.calibrate import calibration_inputs
from qtool.stages.outliers import METRICS, collect_stats, input_kinds, read_report, write_report
from qtool.stages.transform_ostquant import TRANSFORMS, OstQuantConfig, apply_ostquant, run_ostquant

ROTATIONS = "rotations.safetensors"
SCALES = "scales.safetensors"
Rotation = Literal["r1", "r2", "r3", "r4"]


class NoTransform(StageConfig):
    """Weights are left as loaded."""

    method: Literal["none"] = "none"


class HadamardConfig(StageConfig):
    """QuaRot rotations. ``random``: R1/R2 are Hadamards with seeded random sign flips (QuaRot's randomized
    Hadamard); otherwise plain Hadamards. Online rotations (R3, R4) are always plain fast Hadamards."""

    method: Literal["hadamard"]
    rotations: tuple[Rotation, ...] = Field(("r1", "r2", "r3", "r4"), description="which of R1–R4 to apply")
    random: bool = True
    seed: int = 0


class SmoothQuantConfig(StageConfig):
    """SmoothQuant: ``s = max|X|^alpha / max|W|^(1-alpha)`` per input channel of each mapping."""

    method: Literal["smoothquant"]
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="migration strength (0: none, 1: all into the weights)")
    mappings: tuple[Literal["qkv", "gate_up", "down_proj"], ...] = Field(MAPPINGS, description="pairs to smooth")
    max_samples: int = Field(64, gt=0, description="calibration windows whose activation ranges set the scales")


TransformConfig = Annotated[
    NoTransform | HadamardConfig | SmoothQuantConfig | OstQuantConfig, Field(discriminator="method")
]


class Transform(Stage):
    name = "transform"
    sections = ("transform",)

    def sections_for(self, recipe) -> tuple[str, ...]:
        """OSTQuant trains against the scheme's quantizers: a scheme change must retrain."""
        return ("transform", "scheme") if recipe.transform.method == "ostquant" else self.sections

    def run(self, ctx: StageContext) -> dict[str, Any]:
        cfg = ctx.config
        if cfg.method == "none":
            ctx.log.info("transform: method 'none', weights left as loaded")
            return {"method": "none"}
        if cfg.method == "hadamard":
            tensors, kinds = build_rotations(ctx.model, cfg)
            save_tensors(ctx.out / ROTATIONS, tensors, metadata={"kinds": json.dumps(kinds)})
            apply_rotations(ctx.model, ctx.spec, tensors, kinds)
            summary: dict[str, Any] = {"method": "hadamard", "rotations": kinds}
            fallback = [k for k, v in kinds.items() if v["kind"] != "hadamard"]
            for k in fallback:
                ctx.log.warning("transform: %s (size %d) is a random orthogonal matrix", k, kinds[k]["size"])
            if fallback:
                summary["note"] = f"no Hadamard of the size of {', '.join(fallback)}: random orthogonal used"
        elif cfg.method == "ostquant":
            online = _online_config(cfg.seed, cfg.online_rotations)
            summary = run_ostquant(ctx, cfg, lambda m: build_rotations(m, online))
        else:
            scales = smoothquant_scales(ctx, cfg)  # smooths ctx.model layer by layer as it goes
            save_tensors(ctx.out / SCALES, scales)
            summary = {"method": "smoothquant", "alpha": cfg.alpha, "mappings": list(cfg.mappings)}
        if ctx.recipe.outliers.method == "stats":
            summary["before_after"] = self._after_stats(ctx)
        return summary

    def apply(self, ctx: StageContext, manifest: dict[str, Any]) -> None:
        cfg = ctx.config
        if cfg.method == "hadamard":
            path = ctx.reader.path("transform") / ROTATIONS
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                kinds = json.loads(f.metadata()["kinds"])
            apply_rotations(ctx.model, ctx.spec, load_tensors(path), kinds)
        elif cfg.method == "smoothquant":
            apply_scales(ctx.model, ctx.spec, ctx.reader.tensors("transform", SCALES))
        elif cfg.method == "ostquant":
            apply_ostquant(ctx, ctx.reader.path("transform") / TRANSFORMS)

    def _after_stats(self, ctx: StageContext) -> list[dict[str, Any]]:
        """Outlier stats of the transformed model next to the outliers stage's, worst layers first."""
        from qtool.report.plots import plot_heatmaps_side_by_side, plot_layer_metric

        ocfg = ctx.recipe.outliers
        ids = calibration_inputs(ctx)[: ocfg.max_samples]
        after = collect_stats(ctx.model, ctx.spec, ids, ocfg.covariance_tokens, ctx.progress, "outlier stats after")
        write_report(ctx.out, after, ocfg, ctx.spec, prefix="after-")
        before = read_report(ctx.reader.path("outliers"))
        plots = ctx.out / "plots"
        for kind in ("qkv", "down_proj"):
            for metric in ("kurtosis", "mmr"):
                series = {"before": before.series(kind, metric), "after": after.series(kind, metric)}
                plot_layer_metric(series, metric, plots / f"before-after-{kind}-{metric}.png", f"{kind} input {metric}")
            plot_heatmaps_side_by_side(
                before.channel_matrix(kind),
                after.channel_matrix(kind),
                plots / f"before-after-{kind}-channel-absmax.png",
                f"{kind} input channel absmax",
            )
        return compare_rows(before.layers, after.layers, list(input_kinds(ctx.spec)), ocfg.top)


def _online_config(seed: int, rotations: tuple[str, ...]) -> HadamardConfig:
    """The fixed online rotations (R3, R4) that OSTQuant keeps from the ``hadamard`` method."""
    return HadamardConfig(method="hadamard", rotations=rotations, seed=seed)


def compare_rows(before: list[dict], after: list[dict], kinds: list[str], top: int) -> list[dict[str, Any]]:
    """``top`` (layer, input) pairs with the highest kurtosis before, each with its metrics before and after."""
    rows = []
    for b, a in zip(before, after, strict=True):
        for kind in kinds:
            row: dict[str, Any] = {"layer": b["layer"], "input": kind}
            for m in METRICS:
                row[m] = [b["inputs"][kind][m], a["inputs"][kind][m]]
            rows.append(row)
    return sorted(rows, key=lambda r: -r["kurtosis"][0])[:top]


def build_rotations(model: torch.nn.Module, cfg: HadamardConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The rotation matrices for ``model`` (float64) and ``{name: {"kind", "size"}}``."""
    c = model.config
    gen = torch.Generator().manual_seed(cfg.seed)
    hd = head_dim_of(c)
    sizes = {"r1": c.hidden_size, "r2": hd, "r3": hd, "r4": c.intermediate_size}
    tensors, kinds = {}, {}
    for name in sorted(set(cfg.rotations)):
        n, online = sizes[name], name in ("r3", "r4")
        if online and hadamard_matrix(n) is not None:  # a plain fast Hadamard, nothing to store
            kinds[name] = {"kind": "hadamard", "size": n}
            continue
        tensors[name], kind = make_rotation(n, gen, cfg.random)  # online ones get here only without a Hadamard
        kinds[name] = {"kind": "matrix" if online else kind, "size": n}
    return tensors, kinds


def apply_rotations(model: torch.nn.Module, spec: ArchSpec, tensors: dict[str, torch.Tensor], kinds: dict) -> None:
    """Fuse R1/R2 (and R4's weight side) into ``model`` and attach the online R3/R4."""
    online = online_rotations(kinds, tensors)
    r4 = online["r4"].dense() if "r4" in online else None
    rotate_model(model, spec, FusedRotations(tensors.get("r1"), tensors.get("r2"), r4))
    attach_rotations(model, spec, online)


@torch.no_grad()
def smoothquant_scales(ctx: StageContext, cfg: SmoothQuantConfig) -> dict[str, torch.Tensor]:
    """``{"<layer>.<mapping>": s}`` from the activation ranges of the first ``max_samples`` windows; each layer is
    smoothed as soon as its scales are known (smoothing does not change its outputs)."""
    layers = decoder_layers(ctx.model, ctx.spec)
    inputs = capture_layer_inputs(ctx.model, layers, calibration_inputs(ctx)[: cfg.max_samples])
    mods = mapping_modules(ctx.spec)
    scales: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        absmax: dict[str, torch.Tensor] = {}
        handles = [
            layer.get_submodule(mods[m][1][0]).register_forward_pre_hook(partial(_track_absmax, absmax, m))
            for m in cfg.mappings
        ]
        try:
            outputs = run_layer(layer, inputs)
        finally:
            for h in handles:
                h.remove()
        for m in cfg.mappings:
            producer, readers = mods[m]
            weights = [layer.get_submodule(r).weight for r in readers]
            scales[f"{i}.{m}"] = smoothing_scales(absmax[m], weights, cfg.alpha)
            apply_smoothing(layer, producer, readers, scales[f"{i}.{m}"])
        inputs = outputs
        ctx.progress("smoothquant", i + 1, len(layers))
    return scales


def _track_absmax(store: dict[str, torch.Tensor], key: str, _module: torch.nn.Module, args: tuple) -> None:
    x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).double()
    store[key] = torch.maximum(store[key], x) if key in store else x


def apply_scales(model: torch.nn.Module, spec: ArchSpec, scales: dict[str, torch.Tensor]) -> None:
    mods = mapping_modules(spec)
    for key in sorted(scales, key=lambda k: (int(k.split(".")[0]), k)):
        i, m = key.split(".", 1)
        producer, readers = mods[m]
        apply_smoothing(decoder_layers(model, spec)[int(i)], producer, readers, scales[key])
