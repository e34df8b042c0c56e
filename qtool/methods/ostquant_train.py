"""Training OSTQuant's transforms: a fake-quantized student against the full-precision teacher.

The student is the model itself, run through ``torch.func.functional_call`` with every decoder layer's weights
replaced by ``ostquant.layer_weights`` (differentiable in the transform parameters) and, for quantized linears,
fake-quantized with a straight-through estimator; the residual rotation enters as a hook after the embeddings
(``x R_res``) and before the final norm (``x R_resᵀ``), which is exactly what fusing it into the embedding and
lm_head does, without multiplying the whole vocabulary matrix every step. Online R3/R4 and the dynamic activation
and KV-cache quantizers are the hooks of ``qtool.models.online`` (their rounding is straight-through too). Base
weights are frozen; only the transforms train: orthogonal matrices with ``CayleyAdam`` (they stay orthogonal),
log-scales with Adam, clipping ratios (optional) with Adam projected onto ``[CLIP_MIN, 1]``, all on a cosine
schedule. The clipping ratios reach the dynamic quantizers as ``learned_clip`` callables on their hooks.

Window ``it % n`` feeds iteration ``it``, so a run resumed from a checkpoint (transforms + optimizer states +
iteration) continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from qtool.algorithms.actquant import weight_fake_quant
from qtool.algorithms.gptq import residual_share
from qtool.algorithms.losses import ce_loss, kl_top, mse_loss
from qtool.algorithms.ostquant import OstTransforms, clip_sites, layer_parameters, layer_weights
from qtool.algorithms.stiefel import CayleyAdam
from qtool.arch import ArchSpec, LayerView, decoder_layers
from qtool.models.observers import HessianObserver
from qtool.models.walker import LayerWalker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    iterations: int = 100
    lr_rotation: float = 1e-3
    lr_scale: float = 1e-2
    max_angle: float | None = None  # trust region of each rotation step, radians (CayleyAdam ``max_angle``)
    loss: str = "kl_top"  # kl_top | mse | ce
    top_k: int = 1000
    learn_rotation: bool = True
    learn_scaling: bool = True
    learn_qk_scaling: bool = False  # S_qk too (with learn_scaling); off: it stays 1
    learn_clipping: bool = False
    lr_clip: float = 5e-3
    checkpoint_every: int = 10
    # "gptq": the student's weight error is RTN's scaled per input column by GPTQ's residual share
    # (``gptq.residual_share`` of the input Hessians over the first ``hessian_windows`` windows, refreshed every
    # ``checkpoint_every`` iterations)
    weight_error: Literal["rtn", "gptq"] = "rtn"
    gptq_damp: float = 0.01
    gptq_act_order: bool = True
    hessian_windows: int = 16


class _StudentLayer(nn.Module):
    """Stands in for decoder layer ``i`` while training: builds the layer's transformed, fake-quantized weights
    and runs the original layer with them (``torch.func.functional_call``), under activation checkpointing when
    asked (the weights are rebuilt inside the checkpoint, so the recomputation sees the same transforms)."""

    def __init__(self, student: Student, i: int, layer: nn.Module):
        super().__init__()
        self._student, self._i, self._layer = student, i, (layer,)  # tuple: not a registered submodule

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._layer[0], name)  # e.g. attention_type, read by the model's forward

    def get_submodule(self, target: str) -> nn.Module:
        """The original layer's submodules (hooks on them see the student's forward, which runs that layer)."""
        return self._layer[0].get_submodule(target) if target else self

    def forward(self, *args, **kwargs):
        if self._student.checkpointing and torch.is_grad_enabled():
            return checkpoint(self._run, *args, use_reentrant=False, **kwargs)
        return self._run(*args, **kwargs)

    def _run(self, *args, **kwargs):
        params = self._student.layer_parameters(self._i)
        return torch.func.functional_call(self._layer[0], params, args, kwargs)


class Student:
    """Forward of the transformed, fake-quantized model. ``targets[i]``: ``{linear name: weight QuantArgs}`` of
    decoder layer ``i``; ``r4``: the dense online rotation before down_proj (or None). ``checkpointing``: recompute
    each decoder layer in the backward pass instead of keeping its activations (memory for time);
    ``dtype``: compute dtype of the forward (``torch.bfloat16`` runs it under autocast, weights and transforms
    stay float32). The model's decoder layers are swapped for stand-ins, and its dynamic quantizers read their
    ``clip_ratio`` from ``t.clip_act``/``t.clip_kv``, until ``close()`` (or the end of a ``with Student(...)``
    block)."""

    def __init__(
        self,
        model: nn.Module,
        spec: ArchSpec,
        t: OstTransforms,
        targets,
        r4: Tensor | None,
        checkpointing: bool = False,
        dtype: torch.dtype = torch.float32,
    ):
        self.model, self.spec, self.t, self.targets, self.r4 = model, spec, t, targets, r4
        self.checkpointing, self.dtype = checkpointing, dtype
        self.layers = list(decoder_layers(model, spec))
        self.bases = [layer_parameters(LayerView(layer, spec, t.shapes)) for layer in self.layers]
        # per layer {linear name: [in] share of its RTN error kept} (``weight_error: gptq``); empty: plain RTN
        self.error_share: list[dict[str, Tensor]] = [{} for _ in self.layers]
        self._full_precision_weights = False
        self._container = model.get_submodule(spec.layers)
        for i, layer in enumerate(self.layers):
            self._container[i] = _StudentLayer(self, i, layer)
        embed, norm = model.get_submodule(spec.embed), model.get_submodule(spec.final_norm)
        self._handles = [
            embed.register_forward_hook(lambda _m, _a, out: out @ self.t.r_res.to(out.dtype)),
            norm.register_forward_pre_hook(lambda _m, a: (a[0] @ self.t.r_res.to(a[0].dtype).T, *a[1:])),
        ]
        self._clipped = self._install_clips()

    def _install_clips(self) -> list:
        """Point the dynamic quantizers of every layer at ``t.clip_act`` / ``t.clip_kv`` (a differentiable
        ``clip_ratio``); returns ``(hook or attention state, attribute)`` pairs, for ``close``."""
        touched = []
        for i, layer in enumerate(self.layers):
            for site, name in clip_sites(self.spec):
                module = layer.get_submodule(name)
                if site is None:
                    state = getattr(module, "qtool_attention", None)
                    if state is not None and state.kv_quant is not None:
                        state.learned_kv_clip = lambda i=i: self.t.clip_kv[i]
                        touched.append((state, "learned_kv_clip"))
                    continue
                hook = getattr(module, "qtool_input", None)
                if hook is not None and hook.quant is not None:
                    hook.learned_clip = lambda i=i, site=site: self.t.clip_act[i, site]
                    touched.append((hook, "learned_clip"))
        return touched

    def layer_parameters(self, i: int) -> dict[str, Tensor]:
        """Decoder layer ``i``'s transformed module parameters, quantized linears fake-quantized (straight-through)."""
        base = self.bases[i]
        params = {}
        dtype = next(iter(base.values())).dtype
        logical = layer_weights(base, self.t, i, self.spec, self.r4, dtype)
        for key, value in self.spec.join(logical).items():
            name = key.removesuffix(".weight")
            if key.endswith(".weight") and name in self.targets[i] and not self._full_precision_weights:
                quantized = weight_fake_quant(value, self.targets[i][name])
                share = self.error_share[i].get(name)
                value = quantized if share is None else value + (quantized - value) * share.to(value.dtype)
            params[key] = value
        return params

    @torch.no_grad()
    def refresh_error_share(self, windows: Tensor, damp: float, act_order: bool) -> None:
        """Set ``error_share`` from the input Hessians of the quantized linears over ``windows``: the inputs of the
        transformed model with full-precision weights (activation/KV quantizers as configured), so they depend on
        the transforms alone and a resumed run refreshes alike. Walks the student layer by layer
        (``LayerWalker``); linears that read one edge share one Hessian."""
        self._full_precision_weights = True
        try:
            with self._autocast(windows.device):
                for step in LayerWalker(self.model, self.spec, windows):
                    hessians = HessianObserver(self.spec, self.targets[step.index])
                    step.run(hessians, keep=True)
                    for edge, acc in hessians.acc.items():
                        share = residual_share(acc.hessian().cpu(), damp, act_order).to(acc.sum.device)
                        for name in hessians.members[edge]:
                            self.error_share[step.index][name] = share
        finally:
            self._full_precision_weights = False

    def _autocast(self, device: torch.device):
        """The student's compute precision for the decoder layers (``logits`` keeps the vocabulary projection in
        float32)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)

    def logits(self, ids: Tensor) -> Tensor:
        if self.dtype == torch.float32:
            return self.model(ids, use_cache=False).logits
        with self._autocast(ids.device):
            hidden = self.model.base_model(ids, use_cache=False).last_hidden_state
        # the vocabulary projection stays float32: bf16 logits (8 mantissa bits) would swamp the KL of the top-k
        return self.model.get_output_embeddings()(hidden.float())

    def __enter__(self) -> Student:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for i, layer in enumerate(self.layers):
            self._container[i] = layer
        for h in self._handles:
            h.remove()
        for obj, attr in self._clipped:
            setattr(obj, attr, None)


def _loss(settings: TrainSettings, teacher: Tensor, student: Tensor, ids: Tensor) -> Tensor:
    if settings.loss == "kl_top":
        return kl_top(teacher, student, settings.top_k)
    if settings.loss == "mse":
        return mse_loss(teacher, student)
    return ce_loss(student, ids)


def train(
    student: Student,
    teacher: Callable[[Tensor], Tensor],
    windows: Tensor,
    settings: TrainSettings,
    checkpoint: Path | None = None,
    progress: Callable[[int, int, float], None] = lambda i, n, loss: None,
) -> list[float]:
    """Optimize ``student.t`` on ``windows [n, seqlen]``; returns the loss of every iteration run. With
    ``checkpoint``, state is saved every ``settings.checkpoint_every`` iterations and resumed from if present."""
    t = student.t
    for p in t.orthogonal():
        p.requires_grad_(settings.learn_rotation)
    scales = [p for p in t.scales() if settings.learn_qk_scaling or p is not t.log_s_qk]
    for p in t.scales():
        p.requires_grad_(settings.learn_scaling)
    t.log_s_qk.requires_grad_(settings.learn_scaling and settings.learn_qk_scaling)
    for p in t.clips():
        p.requires_grad_(settings.learn_clipping)
    opt_r = None
    if settings.learn_rotation:
        opt_r = CayleyAdam(t.orthogonal(), lr=settings.lr_rotation, max_angle=settings.max_angle)
    opt_s = torch.optim.Adam(scales, lr=settings.lr_scale) if settings.learn_scaling else None
    opt_c = torch.optim.Adam(t.clips(), lr=settings.lr_clip) if settings.learn_clipping else None
    start, losses = _resume(checkpoint, t, opt_r, opt_s, opt_c)
    for it in range(start, settings.iterations):
        if settings.weight_error == "gptq" and it % settings.checkpoint_every == 0:  # resumes refresh alike
            student.refresh_error_share(
                windows[: settings.hessian_windows], settings.gptq_damp, settings.gptq_act_order
            )
        ids = windows[it % len(windows)].unsqueeze(0)
        with torch.no_grad():
            target = teacher(ids)
        loss = _loss(settings, target, student.logits(ids), ids)
        loss.backward()
        cosine = 0.5 * (1 + math.cos(math.pi * it / settings.iterations))
        for opt, lr in ((opt_r, settings.lr_rotation), (opt_s, settings.lr_scale), (opt_c, settings.lr_clip)):
            if opt is not None:
                for group in opt.param_groups:
                    group["lr"] = lr * cosine
                opt.step()
                opt.zero_grad(set_to_none=True)
        if opt_c is not None:
            t.project_clips()
        losses.append(float(loss.detach()))
        progress(it + 1, settings.iterations, losses[-1])
        if checkpoint is not None and ((it + 1) % settings.checkpoint_every == 0 or it + 1 == settings.iterations):
            _save(checkpoint, t, (opt_r, opt_s, opt_c), it + 1, losses)
    return losses


_OPTIMIZERS = ("opt_r", "opt_s", "opt_c")  # rotations, scales, clipping ratios


def _save(path: Path, t: OstTransforms, opts: tuple, iteration: int, losses: list[float]) -> None:
    state = {
        "transforms": t.state_dict(),
        **{key: opt.state_dict() if opt else None for key, opt in zip(_OPTIMIZERS, opts, strict=True)},
        "iteration": iteration,
        "losses": losses,
    }
    tmp = path.with_name(path.name + ".part")  # a stage commit drops it if a kill leaves it behind
    torch.save(state, tmp)
    os.replace(tmp, path)


def _resume(path: Path | None, t: OstTransforms, *opts) -> tuple[int, list[float]]:
    if path is None or not path.is_file():
        return 0, []
    state = torch.load(path, weights_only=True)
    missing = sorted(set(t.state_dict()) - set(state["transforms"]))
    if missing:  # an older qtool's checkpoint (transforms added since: LATER_TRANSFORMS): its optimizer states differ
        log.warning("ostquant: %s lacks transforms %s; training restarts", path, missing)
        return 0, []
    t.load_state_dict(state["transforms"])
    for key, opt in zip(_OPTIMIZERS, opts, strict=True):
        if opt is not None and state.get(key) is not None:
            opt.load_state_dict(state[key])
    log.info("ostquant: resumed at iteration %d from %s", state["iteration"], path)
    return int(state["iteration"]), list(state["losses"])
