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
- ``outliertune``: OutlierTune's per-channel activation scales folded into the norms and readers, and
  symmetrization (an online shift before q/k/v and gate/up, compensated in their biases)
  (``qtool.algorithms.outliertune``). Artifact: ``outliertune.safetensors``.

A new transform is a pure algorithm module in ``qtool/algorithms/`` and, here, its config class, its handler
(``TransformMethod``) and one line in ``METHODS``.
"""

from __future__ import annotations

import json
import typing
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from qtool.algorithms.outliertune import channel_params, fold
from qtool.algorithms.rotation import FusedRotations, build_rotations, rotate_model
from qtool.algorithms.smoothing import MAPPINGS, apply_smoothing, reader_weights, smoothing_scales
from qtool.arch import ArchSpec, LayerView, Shapes, decoder_layers
from qtool.artifacts import load_tensors, save_tensors
from qtool.context import StageConfig, StageContext
from qtool.errors import QtoolError
from qtool.methods.base import TransformMethod
from qtool.methods.ostquant import OstQuant, OstQuantConfig
from qtool.models.observers import AbsmaxObserver, RangeObserver
from qtool.models.online import attach_rotations, input_hook, online_rotations
from qtool.models.walker import LayerWalker

ROTATIONS = "rotations.safetensors"
SCALES = "scales.safetensors"
OUTLIERTUNE = "outliertune.safetensors"
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


class OutlierTuneConfig(StageConfig):
    """OutlierTune: per-channel activation scales ``max |x_j|`` (with symmetrization: half the channel's range)
    folded into the attention and MLP norms and their readers (q/k/v, gate/up), so that one static per-tensor scale
    quantizes every channel; ``symmetrize`` also centres each channel (an online shift before the readers, compensated
    in their biases, which bias-free Llama models get through ``attention_bias`` / ``mlp_bias``)."""

    method: Literal["outliertune"]
    symmetrize: bool = Field(True, description="centre each channel's range (online shift + reader biases)")
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
        apply_scales(ctx.model, ctx.spec, ctx.reader.tensors("transform", SCALES), cfg.mappings)


class OutlierTune(TransformMethod):
    config = OutlierTuneConfig
    artifacts = (OUTLIERTUNE,)
    edges = ("qkv", "gate_up")  # the norm-produced inputs; o/down keep dynamic per-token quantization

    def run(self, ctx: StageContext, cfg: OutlierTuneConfig) -> dict[str, Any]:
        spec = ctx.spec
        edges = [spec.edge(e) for e in self.edges]
        if cfg.symmetrize:
            biased = enable_biases(ctx.model, spec, edges)
        shapes = Shapes.of(ctx.model.config)
        windows = ctx.calibration_windows()[: cfg.max_samples]
        tensors: dict[str, torch.Tensor] = {}
        for step in LayerWalker(ctx.model, spec, windows, progress=ctx.progress, task="outliertune"):
            ranges = RangeObserver(spec, [spec.linears(e)[0] for e in edges])
            step.run(ranges, keep=True)  # the fold below keeps the layer's function
            view = LayerView(step.layer, spec, shapes)
            for edge in edges:
                scale, shift = channel_params(*ranges.range(spec.linears(edge)[0]), cfg.symmetrize)
                tensors[f"{step.index}.{edge.name}.scale"] = scale
                if shift is not None:
                    tensors[f"{step.index}.{edge.name}.shift"] = shift
                _fold(step.layer, view, spec, edge, scale, shift)
        save_tensors(ctx.out / OUTLIERTUNE, tensors)
        summary: dict[str, Any] = {"method": "outliertune", "symmetrize": cfg.symmetrize}
        if cfg.symmetrize:
            summary["biases_added"] = biased
        return summary

    def check_fit(self, recipe: Any, spec: ArchSpec, config: Any = None) -> None:
        names = {e.name for e in spec.edges}
        if not set(self.edges) <= names:
            raise QtoolError(
                f"transform.method: outliertune folds into the qkv and gate_up edges, which the {spec.family} family "
                "does not have; use smoothquant"
            )
        if recipe.transform.symmetrize and config is not None:
            from transformers import AutoModelForCausalLM

            with torch.device("meta"):
                shape = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
            bias_switches(config, decoder_layers(shape, spec)[0], spec, [spec.edge(e) for e in self.edges])

    def apply(self, ctx: StageContext, cfg: OutlierTuneConfig) -> None:
        spec = ctx.spec
        edges = [spec.edge(e) for e in self.edges]
        if cfg.symmetrize:
            enable_biases(ctx.model, spec, edges)
        tensors = ctx.reader.tensors("transform", OUTLIERTUNE)
        shapes = Shapes.of(ctx.model.config)
        for i, layer in enumerate(decoder_layers(ctx.model, spec)):
            view = LayerView(layer, spec, shapes)
            for edge in edges:  # the run's order
                shift = tensors.get(f"{i}.{edge.name}.shift")
                _fold(layer, view, spec, edge, tensors[f"{i}.{edge.name}.scale"], shift)


def _fold(layer, view: LayerView, spec: ArchSpec, edge, scale: torch.Tensor, shift: torch.Tensor | None) -> None:
    fold(view, edge, scale, shift)
    if shift is not None:
        for name in spec.linears(edge):
            input_hook(layer.get_submodule(name)).shift = shift


_BIAS_FLAGS = {"qkv": "attention_bias", "gate_up": "mlp_bias"}  # transformers' config switches (Llama)


def bias_switches(config: Any, layer: torch.nn.Module, spec: ArchSpec, edges: list) -> list[str]:
    """The config switches (``attention_bias``, ``mlp_bias``) that give the readers of ``edges`` the biases they lack
    (``layer``: a decoder layer as built from ``config``); raises ``QtoolError`` when a reader cannot get one."""
    switched = []
    for edge in edges:
        readers = spec.linears(edge)
        if any(len(spec.parts(r)) > 1 for r in readers):
            raise QtoolError(
                f"transform.symmetrize: {', '.join(readers)} fuse several projections; the shift is per projection "
                "here: set transform.symmetrize: false"
            )
        if all(layer.get_submodule(r).bias is not None for r in readers):
            continue
        flag = _BIAS_FLAGS.get(edge.name)
        if flag is None or not hasattr(config, flag):
            raise QtoolError(
                f"transform.symmetrize: the model's {', '.join(readers)} have no bias and its config no switch to add "
                "one; set transform.symmetrize: false"
            )
        switched.append(flag)
    return switched


def enable_biases(model: torch.nn.Module, spec: ArchSpec, edges: list) -> list[str]:
    """Give the readers of ``edges`` biases (zeros) where they have none, through the config switch that makes the
    architecture itself have them, so the packed model loads them; every linear that switch adds gets a zero bias.
    Returns the switches set."""
    from transformers import AutoModelForCausalLM

    config = model.config
    layers = decoder_layers(model, spec)
    switched = bias_switches(config, layers[0], spec, edges)
    if not switched:
        return switched
    for flag in switched:
        setattr(config, flag, True)
    with torch.device("meta"):
        shape = AutoModelForCausalLM.from_config(config)
    meta_layer = decoder_layers(shape, spec)[0]
    for name in spec.layer_linears:
        if meta_layer.get_submodule(name).bias is None:
            continue
        for layer in layers:
            linear = layer.get_submodule(name)
            if linear.bias is None:
                w = linear.weight
                linear.bias = torch.nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                                 requires_grad=w.requires_grad)  # fmt: skip
    for edge in edges:
        for r in spec.linears(edge):
            if layers[0].get_submodule(r).bias is None:
                raise QtoolError(f"transform.symmetrize: {r} has no bias even with {switched}; set symmetrize: false")
    return switched


# config class -> handler. The recipe's ``transform:`` union is built from the keys, in this order.
METHODS: dict[type[StageConfig], TransformMethod] = {
    NoTransform: Identity(),
    HadamardConfig: Hadamard(),
    SmoothQuantConfig: SmoothQuant(),
    OstQuantConfig: OstQuant(),
    OutlierTuneConfig: OutlierTune(),
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


def apply_scales(
    model: torch.nn.Module, spec: ArchSpec, scales: dict[str, torch.Tensor], mappings: tuple[str, ...]
) -> None:
    """Smooth ``model`` with stored scales in the order ``smoothquant_scales`` applied them (layer by layer, edges
    in ``mappings`` order): up_proj is both a reader (gate_up) and a producer (down_proj), and the two roundings of
    its weight to the model dtype only reproduce the run's bit for bit in the same order."""
    shapes = Shapes.of(model.config)
    layers = decoder_layers(model, spec)
    rank = {m: j for j, m in enumerate(mappings)}
    for key in sorted(scales, key=lambda k: (int(k.split(".")[0]), rank[k.split(".", 1)[1]])):
        i, edge = key.split(".", 1)
        apply_smoothing(LayerView(layers[int(i)], spec, shapes), spec.edge(edge), scales[key])
