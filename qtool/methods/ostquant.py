"""The transform stage's ``ostquant`` method (config and handler): learn OSTQuant's orthogonal + scaling transforms,
then fuse them.

Run: R_res and R_ov start from randomized Hadamards (the ``hadamard`` method's R1/R2; with ``init: womi`` composed
with the eigenvectors of the weights' covariance, ``ostquant.weight_covariances``), scales from 1; online R3/R4
are the fixed Hadamards of the ``hadamard`` method. The student quantizes as the recipe's scheme does (weights RTN
with a straight-through estimator unless ``train_weight_quant: false``, activations and KV cache dynamically), the
teacher is the unquantized model, and only the transforms train (``qtool.methods.ostquant_train``; rotation
steps within the ``max_angle`` trust region). Training state is checkpointed every
``checkpoint_every`` iterations inside the stage's uncommitted directory, so a killed run resumes mid-training.
Afterwards the transforms are fused into the weights in float64 (``qtool.algorithms.ostquant.fuse``) and the
quantize stage runs GPTQ or RTN on them.

Artifacts: ``ostquant.safetensors`` (every learned tensor, float32, plus the online rotations' kinds and the loss
curve as metadata) and ``rotations.safetensors`` for stored online matrices; ``apply`` fuses them again on resume.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from qtool.algorithms.ostquant import (
    LATER_TRANSFORMS,
    OstShapes,
    OstTransforms,
    clip_ratios,
    fuse,
    weight_covariances,
    womi_rotation,
)
from qtool.algorithms.rotation import build_rotations, make_rotation
from qtool.algorithms.stiefel import orthogonality_error
from qtool.arch import GATED_MLP_EDGES, ArchSpec, decoder_layers
from qtool.artifacts import load_tensors, save_tensors
from qtool.context import StageConfig, StageContext
from qtool.errors import QtoolError
from qtool.methods import quantize as quantize_methods
from qtool.methods.base import TransformMethod
from qtool.methods.ostquant_train import Student, TrainSettings, train
from qtool.models.online import CLIP_ATTR, attach_rotations, online_rotations
from qtool.models.quantizers import attach_quantizers, detach_quantizers
from qtool.schemes import Scheme
from qtool.targets import plan_targets

TRANSFORMS = "ostquant.safetensors"
CHECKPOINT = "training-checkpoint.pt"


class OstQuantConfig(StageConfig):
    """OSTQuant (arXiv 2501.13987): learned orthogonal + scaling transforms, KL-Top loss. Budget knobs:
    ``n_samples`` × ``seqlen`` training tokens, ``iterations`` (one window per iteration)."""

    method: Literal["ostquant"]
    n_samples: int = Field(32, gt=0, description="calibration windows used for training (the first N)")
    seqlen: int = Field(256, gt=1, description="tokens per training window (a prefix of each calibration window)")
    iterations: int = Field(100, gt=0)
    loss: Literal["kl_top", "mse", "ce"] = "kl_top"
    top_k: int = Field(1000, gt=0, description="KL-Top: teacher's top-k tokens (clipped to the vocabulary)")
    lr_rotation: float = Field(2e-3, gt=0, description="Cayley Adam learning rate of R_res and R_ov (cosine decay)")
    lr_scale: float = Field(1e-2, gt=0, description="Adam learning rate of the log-scales (cosine decay)")
    max_angle: float | None = Field(
        0.05,
        gt=0,
        lt=math.pi,
        description="trust region: largest rotation (radians) of any plane of R_res/R_ov in one step (null: no cap)",
    )
    init: Literal["hadamard", "womi"] = Field(
        "hadamard",
        description="start of R_res/R_ov: randomized Hadamards (hadamard), or the paper's weight-outlier-minimizing "
        "init (womi): eigenvectors of the weights' covariance times the randomized Hadamard",
    )
    learn_rotation: bool = Field(True, description="train R_res/R_ov (false: they stay the Hadamard init)")
    learn_scaling: bool = Field(True, description="train S_attn, S_ffn, S_ov, S_u|d (false: they stay 1)")
    learn_qk_scaling: bool = Field(
        False,
        description="also train S_qk (query/key scales per RoPE pair; they act only through the KV cache quantizer); "
        "needs learn_scaling",
    )
    learn_clipping: bool = Field(
        True,
        description="train a clipping ratio per layer for each dynamic activation quantizer (4 input sites) and the "
        "KV cache, starting from the scheme's clip_ratio; no effect without activation/KV quantization",
    )
    lr_clip: float = Field(5e-3, gt=0, description="Adam learning rate of the clipping ratios (cosine decay)")
    checkpoint_every: int = Field(10, gt=0, description="iterations between training checkpoints")
    train_weight_quant: bool = Field(
        True,
        description="fake-quantize weights (RTN) in the student; false trains against activation/KV quantization "
        "only, as SpinQuant does when GPTQ quantizes the weights afterwards",
    )
    weight_error: Literal["rtn", "gptq"] = Field(
        "rtn",
        description="the student's weight error (with train_weight_quant): rtn as is, or gptq — RTN's error scaled per "
        "input column by the share GPTQ leaves in the output (sqrt of the column's conditional variance over its "
        "variance, from the student's input Hessians, refreshed every checkpoint_every iterations)",
    )
    online_rotations: tuple[Literal["r3", "r4"], ...] = Field(
        ("r3", "r4"),
        description="fixed online Hadamards; [] keeps the checkpoint free of online ops (W4A16 for vLLM)",
    )
    activation_checkpointing: bool = Field(
        False,
        description="recompute each decoder layer in the backward pass (SmolLM2 on CPU: -43% RSS, ~1.9x the time)",
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="student forward precision (bfloat16: autocast; transforms stay float32)"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="training device (auto: cuda when present)")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> OstQuantConfig:
        if self.weight_error == "gptq" and not self.train_weight_quant:
            raise ValueError("weight_error: gptq shapes the student's weight error; set train_weight_quant: true")
        if self.learn_qk_scaling and not self.learn_scaling:
            raise ValueError("learn_qk_scaling trains one of the scales; set learn_scaling: true")
        return self


class OstQuant(TransformMethod):
    config = OstQuantConfig
    artifacts = (TRANSFORMS,)
    fingerprint_sections = ("scheme",)  # trains against the scheme's quantizers: a scheme change must retrain

    def run(self, ctx: StageContext, cfg: OstQuantConfig) -> dict[str, Any]:
        return run_ostquant(ctx, cfg)

    def apply(self, ctx: StageContext, cfg: OstQuantConfig) -> None:
        apply_ostquant(ctx, ctx.reader.path("transform") / TRANSFORMS)

    def draws_from_seed(self, cfg: OstQuantConfig) -> bool:
        return True

    def check_recipe(self, recipe: Any) -> None:
        t = recipe.transform
        if recipe.scheme.static_activations:
            raise ValueError(
                "scheme.input_activations: ostquant trains its transforms against dynamic activation quantizers, and "
                "static scales are calibrated only after it; set dynamic: true (granularity token)"
            )
        if (
            t.weight_error == "gptq"
            and quantize_methods.method_for(recipe.quantize).error_feedback(recipe.quantize) is None
        ):
            raise ValueError(
                "transform.weight_error: gptq trains the transforms for GPTQ's weight error but quantize.method is "
                f"{recipe.quantize.method}; set quantize.method: gptq or transform.weight_error: rtn"
            )

    def check_fit(self, recipe: Any, spec: ArchSpec, config: Any = None) -> None:
        """Training reads prefixes of the calibration windows (no more than calibration provides), on a device
        that exists, for a layer whose edges the transforms are defined on."""
        t, cal = recipe.transform, recipe.calibration
        if t.n_samples > cal.n_samples:
            raise QtoolError(
                f"transform.n_samples: {t.n_samples} exceeds calibration.n_samples={cal.n_samples}; "
                f"use ≤ {cal.n_samples} or raise calibration.n_samples"
            )
        if t.seqlen > cal.seqlen:
            raise QtoolError(
                f"transform.seqlen: {t.seqlen} exceeds calibration.seqlen={cal.seqlen}; use ≤ {cal.seqlen}"
            )
        if t.device == "cuda" and not torch.cuda.is_available():
            raise QtoolError("transform.device: cuda, but torch sees no CUDA device; use auto or cpu")
        if spec.edges != GATED_MLP_EDGES:
            raise QtoolError(
                f"transform.method: ostquant's transforms are defined for attention + gated-MLP layers, not the "
                f"{spec.family} family's edges; use transform.method: hadamard"
            )


def run_ostquant(ctx: StageContext, cfg: OstQuantConfig) -> dict[str, Any]:
    """Train, store and fuse; returns the summary. R3/R4 are the ``hadamard`` method's fixed online rotations."""
    model, spec = ctx.model, ctx.spec
    online_tensors, kinds = build_rotations(model.config, cfg.online_rotations, cfg.seed, True)
    online = online_rotations(kinds, online_tensors)
    r4 = online.get("r4")
    t = _init(model, spec, cfg, ctx.recipe.scheme)
    attach_rotations(model, spec, online)
    plan = plan_targets(decoder_layers(model, spec), spec, ctx.recipe.scheme)
    attach_quantizers(model, spec, plan, ctx.recipe.scheme)  # the student quantizes as the scheme will
    # weights: RTN fake-quantized in the student, or left in full precision (train_weight_quant: false)
    targets = [{tg.name: tg.args for tg in row} if cfg.train_weight_quant else {} for row in plan]
    device = _device(cfg.device)
    teacher = ctx.reference_model().to(device)
    model.to(device)
    t.to(device)
    windows = ctx.calibration_windows()[: cfg.n_samples, : cfg.seqlen].to(device)
    settings = TrainSettings(
        iterations=cfg.iterations,
        lr_rotation=cfg.lr_rotation,
        lr_scale=cfg.lr_scale,
        max_angle=cfg.max_angle,
        loss=cfg.loss,
        top_k=cfg.top_k,
        learn_rotation=cfg.learn_rotation,
        learn_scaling=cfg.learn_scaling,
        learn_qk_scaling=cfg.learn_qk_scaling,
        learn_clipping=cfg.learn_clipping and _quantizes_activations(ctx.recipe.scheme),
        lr_clip=cfg.lr_clip,
        checkpoint_every=cfg.checkpoint_every,
        weight_error=cfg.weight_error,
        **(quantize_methods.method_for(ctx.recipe.quantize).error_feedback(ctx.recipe.quantize) or {}),
    )
    start = time.time()
    try:
        with Student(
            model,
            spec,
            t,
            targets,
            r4.dense().float().to(device) if r4 else None,
            checkpointing=cfg.activation_checkpointing,
            dtype=getattr(torch, cfg.dtype),
        ) as student:
            losses = train(
                student,
                lambda ids: teacher(ids, use_cache=False).logits,
                windows,
                settings,
                ctx.out / CHECKPOINT,
                lambda i, n, loss: ctx.progress(f"ostquant {cfg.loss} {loss:.4f}", i, n),
            )
    finally:
        model.to("cpu")
        t.to("cpu")
    seconds = time.time() - start
    detach_quantizers(model, spec)  # the quantize stage attaches its own (after the outlier stats)
    tensors = {k: v.detach().float().contiguous() for k, v in t.state_dict().items()}
    save_tensors(
        ctx.out / TRANSFORMS,
        {**tensors, **{f"online.{k}": v for k, v in online_tensors.items()}},
        metadata={"kinds": json.dumps(kinds), "losses": json.dumps(losses)},
    )
    (ctx.out / CHECKPOINT).unlink(missing_ok=True)
    fuse(model, spec, t, r4.dense() if r4 else None)
    _set_clip_ratios(model, spec, t)
    ortho = max(
        orthogonality_error(t.r_res.detach().double()), max(orthogonality_error(r) for r in t.r_ov.detach().double())
    )
    ctx.log.info(
        "ostquant: %d iterations on %s (%s) in %.1fs, loss %.4f -> %.4f",
        len(losses),
        device,
        cfg.dtype,
        seconds,
        losses[0],
        losses[-1],
    )
    headline = f"ostquant: {cfg.loss} {losses[0]:.4f} → {losses[-1]:.4f} in {seconds:.0f}s, ‖RᵀR−I‖max {ortho:.1e}"
    return {
        "method": "ostquant",
        "headline": headline,
        "rotations": kinds,
        "loss": cfg.loss,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_curve": losses[:: max(1, len(losses) // 50)],
        "train_seconds": round(seconds, 1),
        "device": str(device),
        "orthogonality_error": ortho,
        **(_clip_summary(t) if settings.learn_clipping else {}),
    }


def apply_ostquant(ctx: StageContext, path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        kinds = json.loads(f.metadata()["kinds"])
    tensors = load_tensors(path)
    online = {k.removeprefix("online."): v for k, v in tensors.items() if k.startswith("online.")}
    rotations = online_rotations(kinds, online)
    r4 = rotations.get("r4")
    t = OstTransforms(OstShapes.of(ctx.model.config, ctx.spec), tensors["r_res"])
    missing, _ = t.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("online.")}, strict=False)
    absent = sorted(set(missing) - LATER_TRANSFORMS)  # a file from an older qtool lacks only transforms added since
    if absent:
        raise QtoolError(f"{path}: missing transform tensors {absent}; rerun with --from-stage transform")
    attach_rotations(ctx.model, ctx.spec, rotations)
    fuse(ctx.model, ctx.spec, t, r4.dense() if r4 else None)
    _set_clip_ratios(ctx.model, ctx.spec, t)


def _init(model: torch.nn.Module, spec: ArchSpec, cfg: OstQuantConfig, scheme: Scheme) -> OstTransforms:
    sh = OstShapes.of(model.config, spec)
    gen = torch.Generator().manual_seed(cfg.seed)
    r_res, _ = make_rotation(sh.hidden, gen)
    r_ov = torch.stack([make_rotation(sh.head_dim, gen)[0] for _ in range(sh.layers)])
    if cfg.init == "womi":
        c_res, c_ov = weight_covariances(model, spec)
        r_res, r_ov = womi_rotation(c_res, r_res), womi_rotation(c_ov, r_ov)
    act, kv = scheme.input_activations, scheme.kv_cache
    return OstTransforms(
        sh,
        r_res,
        r_ov,
        clip_act=act.clip_ratio if act else 1.0,
        clip_kv=kv.clip_ratio if kv else 1.0,
    )


def _quantizes_activations(scheme: Scheme) -> bool:
    return scheme.input_activations is not None or scheme.kv_cache is not None


def _set_clip_ratios(model: torch.nn.Module, spec, t: OstTransforms) -> None:
    """Mark every quantizer site with its clipping ratio (``CLIP_ATTR``), which the quantize stage applies."""
    for path, ratio in clip_ratios(t, spec).items():
        setattr(model.get_submodule(path), CLIP_ATTR, ratio)


def _clip_summary(t: OstTransforms) -> dict[str, Any]:
    def stats(p: torch.Tensor) -> dict[str, float]:
        return {"min": round(p.min().item(), 4), "mean": round(p.mean().item(), 4), "max": round(p.max().item(), 4)}

    return {"clip_act": stats(t.clip_act.detach()), "clip_kv": stats(t.clip_kv.detach())}


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)
