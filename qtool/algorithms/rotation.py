"""QuaRot-style equivalent rotations of a decoder-only model, fused into its weights.

Row-vector convention: a linear computes ``y = x Wᵀ`` with ``W: [out, in]``. For an orthogonal ``R``:

- a linear that *reads* a rotated input ``x R`` keeps its output when ``W <- W R`` (input side);
- a linear whose output is to be rotated (``y R``) gets ``W <- Rᵀ W`` and ``b <- b R`` (output side).

The rotations (QuaRot, Ashkboos et al. 2024):

- **R1** (hidden × hidden) rotates the residual stream: embeddings (``E <- E R1``), the inputs of q/k/v, gate/up and
  lm_head, the outputs of o_proj and down_proj. RMSNorm commutes with it once its gain is fused into the following
  linears (``W <- W diag(γ)``, ``γ <- 1``), since ``‖x R‖ = ‖x‖``. A tied lm_head is untied only when the final
  norm's gain is not all ones (otherwise embedding and head stay one tensor).
- **R2** (head_dim × head_dim) rotates each value head: v_proj output side per KV head, o_proj input side per
  attention head (all heads of a GQA group see the same ``R2``).
- **R4** (intermediate × intermediate) is applied online to down_proj's input (``x -> x R4``), so its weight gets
  ``W_down <- W_down R4`` here. **R3** needs no weight change (queries and keys are both rotated online after RoPE).

All arithmetic runs in float64 on copies of the touched weights, which are cast back to their dtype once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from qtool.algorithms.hadamard import orthonormal_hadamard, random_orthogonal, random_signs
from qtool.models.arch import ArchSpec, decoder_layers

log = logging.getLogger(__name__)


@dataclass
class FusedRotations:
    """The fused rotations (float64) applied by ``rotate_model``; ``None`` leaves that part of the model alone."""

    r1: Tensor | None = None
    r2: Tensor | None = None
    r4: Tensor | None = None


def make_rotation(n: int, generator: torch.Generator, random: bool = True) -> tuple[Tensor, str]:
    """An ``n × n`` orthogonal float64 matrix and its kind.

    A Hadamard (``kind="hadamard"``, orthonormal; with ``random`` its rows are sign-flipped by a seeded random
    ``diag(s)``: ``R = diag(s) H / √n``), else (no Hadamard of order ``n`` exists in ``qtool.algorithms.hadamard``)
    a seeded Haar-random orthogonal matrix (``kind="random-orthogonal"``).
    """
    h = orthonormal_hadamard(n)
    if h is None:
        log.warning("no Hadamard matrix of order %d; using a seeded random orthogonal matrix instead", n)
        return random_orthogonal(n, generator), "random-orthogonal"
    if random:
        h = random_signs(n, generator).unsqueeze(1) * h
    return h, "hadamard"


@torch.no_grad()
def rotate_model(model: nn.Module, spec: ArchSpec, rot: FusedRotations) -> None:
    """Fuse norm gains (when R1 is given) and the rotations ``rot`` into ``model``'s weights, in place."""
    if rot.r1 is not None:
        rotate_embeddings(model, spec, rot.r1)
    for layer in decoder_layers(model, spec):
        _rotate_layer(model, layer, spec, rot)


def rotate_embeddings(model: nn.Module, spec: ArchSpec, r1: Tensor) -> None:
    """R1 on the embeddings and lm_head, the final norm's gain fused into lm_head (untied only when needed)."""
    embed = model.get_submodule(spec.embed)
    head = model.get_submodule(spec.lm_head)
    norm = model.get_submodule(spec.final_norm)
    tied = head.weight is embed.weight
    gain = norm.weight.detach().double()
    if tied and not torch.all(gain == 1):
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
        _set_tied(model, False)
        log.info("lm_head untied from the embeddings (the final norm's gain is fused into lm_head only)")
        tied = False
    write_param(embed.weight, embed.weight.double() @ r1)
    if not tied:
        write_param(head.weight, (head.weight.double() * gain) @ r1)
    norm.weight.fill_(1.0)


def _rotate_layer(model: nn.Module, layer: nn.Module, spec: ArchSpec, rot: FusedRotations) -> None:
    get = layer.get_submodule
    w = {name: get(name).weight.double() for name in spec.layer_linears}
    b = {name: get(name).bias.double() for name in spec.layer_linears if get(name).bias is not None}
    if rot.r1 is not None:
        for norm, group in ((spec.attn_norm, spec.input_groups[0][1]), (spec.mlp_norm, spec.input_groups[2][1])):
            gain = get(norm).weight.double()
            for name in group:
                w[name] = (w[name] * gain) @ rot.r1
            get(norm).weight.fill_(1.0)
        for name in (spec.o_proj, spec.down_proj):
            w[name] = rot.r1.T @ w[name]
            if name in b:
                b[name] = b[name] @ rot.r1
    if rot.r2 is not None:
        hd = rot.r2.shape[0]
        w[spec.v_proj] = (rot.r2.T @ w[spec.v_proj].unflatten(0, (-1, hd))).flatten(0, 1)
        if spec.v_proj in b:
            b[spec.v_proj] = (b[spec.v_proj].unflatten(0, (-1, hd)) @ rot.r2).flatten()
        w[spec.o_proj] = (w[spec.o_proj].unflatten(1, (-1, hd)) @ rot.r2).flatten(1, 2)
    if rot.r4 is not None:
        w[spec.down_proj] = w[spec.down_proj] @ rot.r4
    for name, value in w.items():
        write_param(get(name).weight, value)
    for name, value in b.items():
        write_param(get(name).bias, value)


def write_param(param: Tensor, value: Tensor) -> None:
    """Cast the float64 result back to the parameter's dtype, once."""
    param.data.copy_(value.to(param.dtype))


def _set_tied(model: nn.Module, tied: bool) -> None:
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None and hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = tied
