"""The transform stage's method table: equivalent transforms that make a model easier to quantize without changing
what it computes.

- ``none``: weights are left as loaded.
- ``hadamard`` (QuaRot): fused R1 (residual) and R2 (per value head) rotations, online R3 (queries and keys after
  RoPE) and R4 (down_proj input) Hadamards (``qtool.algorithms.rotation``). Sizes that are not powers of two use
  Kronecker Hadamards (``qtool.algorithms.hadamard``); where none exists (e.g. 172) a seeded random orthogonal
  matrix takes its place, and the summary says so. Artifact: ``rotations.safetensors`` (every matrix applied,
  float64, plus their kinds).
- ``smoothquant``: per-channel scales from calibration activations migrated into each edge's producer
  (``qtool.algorithms.smoothing``). Artifact: ``scales.safetensors``.
- ``ostquant``: learned orthogonal + scaling transforms (``qtool.methods.ostquant``).

A new transform is a pure algorithm module in ``qtool/algorithms/`` and, here, its config class, its handler
(``TransformMethod``) and one line in ``METHODS``.
"""

from __future__ import annotations

import json
import typing
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from qtool.algorithms.rotation import FusedRotations, build_rotations, rotate_model
from qtool.algorithms.smoothing import MAPPINGS, apply_smoothing, reader_weights, smoothing_scales
from qtool.arch import ArchSpec, LayerView, Shapes, decoder_layers
from qtool.artifacts import load_tensors, save_tensors
from qtool.context import StageConfig, StageContext
from qtool.methods.base import TransformMethod
from qtool.methods.ostquant import OstQuant, OstQuantConfig
from qtool.models.observers import AbsmaxObserver
from qtool.models.online import attach_rotations, online_rotations
from qtool.models.walker import LayerWalker

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


class Identity(TransformMethod):
    config = NoTransform
    changes_model = False

    def run(self, ctx: StageContext, cfg: NoTransform) -> dict[str, Any]:
        ctx.log.info("transform: method 'none', weights left as loaded")
        return {"method": "none"}


class Hadamard(TransformMethod):
    config = HadamardConfig
    artifacts = (ROTATIONS,)

    def run(self, ctx: StageContext, cfg: HadamardConfig) -> dict[str, Any]:
        tensors, kinds = build_rotations(ctx.model.config, cfg.rotations, cfg.seed, cfg.random)
        save_tensors(ctx.out / ROTATIONS, tensors, metadata={"kinds": json.dumps(kinds)})
        apply_rotations(ctx.model, ctx.spec, tensors, kinds)
        summary: dict[str, Any] = {"method": "hadamard", "rotations": kinds}
        fallback = [k for k, v in kinds.items() if v["kind"] != "hadamard"]
        for k in fallback:
            ctx.log.warning("transform: %s (size %d) is a random orthogonal matrix", k, kinds[k]["size"])
        if fallback:
            summary["note"] = f"no Hadamard of the size of {', '.join(fallback)}: random orthogonal used"
        return summary

    def apply(self, ctx: StageContext, cfg: HadamardConfig) -> None:
        from safetensors import safe_open

        path = ctx.reader.path("transform") / ROTATIONS
        with safe_open(str(path), "pt") as f:
            kinds = json.loads(f.metadata()["kinds"])
        apply_rotations(ctx.model, ctx.spec, load_tensors(path), kinds)

    def draws_from_seed(self, cfg: HadamardConfig) -> bool:
        return cfg.random


class SmoothQuant(TransformMethod):
    config = SmoothQuantConfig
    artifacts = (SCALES,)

    def run(self, ctx: StageContext, cfg: SmoothQuantConfig) -> dict[str, Any]:
        scales = smoothquant_scales(ctx, cfg)  # smooths ctx.model layer by layer as it goes
        save_tensors(ctx.out / SCALES, scales)
        return {"method": "smoothquant", "alpha": cfg.alpha, "mappings": list(cfg.mappings)}

    def apply(self, ctx: StageContext, cfg: SmoothQuantConfig) -> None:
        apply_scales(ctx.model, ctx.spec, ctx.reader.tensors("transform", SCALES))


# config class -> handler. The recipe's ``transform:`` union is built from the keys, in this order.
METHODS: dict[type[StageConfig], TransformMethod] = {
    NoTransform: Identity(),
    HadamardConfig: Hadamard(),
    SmoothQuantConfig: SmoothQuant(),
    OstQuantConfig: OstQuant(),
}

TransformConfig = Annotated[typing.Union[tuple(METHODS)], Field(discriminator="method")]  # noqa: UP007


def method_for(cfg: StageConfig) -> TransformMethod:
    return METHODS[type(cfg)]


def apply_rotations(model: torch.nn.Module, spec: ArchSpec, tensors: dict[str, torch.Tensor], kinds: dict) -> None:
    """Fuse R1/R2 (and R4's weight side) into ``model`` and attach the online R3/R4."""
    online = online_rotations(kinds, tensors)
    r4 = online["r4"].dense() if "r4" in online else None
    rotate_model(model, spec, FusedRotations(tensors.get("r1"), tensors.get("r2"), r4))
    attach_rotations(model, spec, online)


@torch.no_grad()
def smoothquant_scales(ctx: StageContext, cfg: SmoothQuantConfig) -> dict[str, torch.Tensor]:
    """``{"<layer>.<edge>": s}`` from the activation ranges of the first ``max_samples`` windows; each layer is
    smoothed as soon as its scales are known (smoothing does not change its outputs, so the walk keeps them)."""
    shapes = Shapes.of(ctx.model.config)
    edges = [ctx.spec.edge(m) for m in cfg.mappings]
    windows = ctx.calibration_windows()[: cfg.max_samples]
    scales: dict[str, torch.Tensor] = {}
    for step in LayerWalker(ctx.model, ctx.spec, windows, progress=ctx.progress, task="smoothquant"):
        absmax = AbsmaxObserver(ctx.spec, edges)
        step.run(absmax, keep=True)
        view = LayerView(step.layer, ctx.spec, shapes)
        for edge in edges:
            s = smoothing_scales(absmax.absmax(edge.name), reader_weights(view, edge), cfg.alpha)
            scales[f"{step.index}.{edge.name}"] = s
            apply_smoothing(view, edge, s)
    return scales


def apply_scales(model: torch.nn.Module, spec: ArchSpec, scales: dict[str, torch.Tensor]) -> None:
    shapes = Shapes.of(model.config)
    layers = decoder_layers(model, spec)
    for key in sorted(scales, key=lambda k: (int(k.split(".")[0]), k)):
        i, edge = key.split(".", 1)
        apply_smoothing(LayerView(layers[int(i)], spec, shapes), spec.edge(edge), scales[key])
