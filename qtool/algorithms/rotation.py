"""QuaRot-style equivalent rotations of a decoder-only model, fused into its weights.

Row-vector convention: a linear computes ``y = x Wᵀ`` with ``W: [out, in]``. For an orthogonal ``R``:

- a linear that *reads* a rotated input ``x R`` keeps its output when ``W <- W R`` (input side);
- a linear whose output is to be rotated (``y R``) gets ``W <- Rᵀ W`` and ``b <- b R`` (output side).

The rotations (QuaRot, Ashkboos et al. 2024):

- **R1** (hidden × hidden) rotates the residual stream: embeddings (``E <- E R1``), the inputs of the readers of
  every ``norm`` edge (q/k/v, gate/up) and of lm_head, the outputs of the residual writers (o_proj, down_proj).
  RMSNorm commutes with it once its gain is fused into the following linears (``W <- W diag(γ)``, ``γ <- 1``),
  since ``‖x R‖ = ‖x‖``. A tied lm_head is untied only when the final norm's gain is not all ones (otherwise
  embedding and head stay one tensor).
- **R2** (head_dim × head_dim) rotates each value head of the ``heads`` edge: v_proj output side per KV head,
  o_proj input side per attention head (all heads of a GQA group see the same ``R2``).
- **R4** (intermediate × intermediate) is applied online to the ``gated`` edge's input (down_proj's,
  ``x -> x R4``), so its readers get ``W_down <- W_down R4`` here. **R3** needs no weight change (queries
  and keys are both rotated online after RoPE).

Edges and projections come from the family table (``qtool.arch``), so fused q/k/v or gate/up weights
(Phi-3) are rotated by their row blocks. All arithmetic runs in float64 on copies of the touched weights, which
are cast back to their dtype once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from qtool.algorithms.hadamard import hadamard_matrix, orthonormal_hadamard, random_orthogonal, random_signs
from qtool.arch import ArchSpec, LayerView, Shapes, decoder_layers, head_dim_of

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


def build_rotations(
    config, rotations: tuple[str, ...], seed: int, random: bool = True
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The matrices of ``rotations`` (a subset of ``r1 r2 r3 r4``) for a model with transformers ``config``:
    float64 tensors and ``{name: {"kind", "size"}}``. Online R3/R4 of a size with a Hadamard are plain fast
    Hadamards (kind ``hadamard``, nothing stored); the others are drawn from ``seed`` (``make_rotation``; an online
    one without a Hadamard is stored as kind ``matrix``)."""
    gen = torch.Generator().manual_seed(seed)
    hd = head_dim_of(config)
    sizes = {"r1": config.hidden_size, "r2": hd, "r3": hd, "r4": config.intermediate_size}
    tensors, kinds = {}, {}
    for name in sorted(set(rotations)):
        n, online = sizes[name], name in ("r3", "r4")
        if online and hadamard_matrix(n) is not None:  # a plain fast Hadamard, nothing to store
            kinds[name] = {"kind": "hadamard", "size": n}
            continue
        tensors[name], kind = make_rotation(n, gen, random)  # online ones get here only without a Hadamard
        kinds[name] = {"kind": "matrix" if online else kind, "size": n}
    return tensors, kinds


@torch.no_grad()
def rotate_model(model: nn.Module, spec: ArchSpec, rot: FusedRotations) -> None:
    """Fuse norm gains (when R1 is given) and the rotations ``rot`` into ``model``'s weights, in place."""
    if rot.r1 is not None:
        rotate_embeddings(model, spec, rot.r1)
    shapes = Shapes.of(model.config)
    for layer in decoder_layers(model, spec):
        _rotate_layer(LayerView(layer, spec, shapes), spec, rot)


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


def _rotate_layer(view: LayerView, spec: ArchSpec, rot: FusedRotations) -> None:
    """The rotations of one decoder layer, by edge: R1 fuses each ``norm`` edge's gain into its readers and
    rotates their input side and the residual writers' output side; R2 rotates each ``heads`` edge (producer rows
    and reader columns per head); R4 folds into the readers of each ``gated`` edge."""
    names = [name for name, _ in spec.projections]
    w = {name: view.get(f"{name}.weight").double() for name in names}
    b = {name: view.get(f"{name}.bias").double() for name in names if view.has(f"{name}.bias")}
    if rot.r1 is not None:
        for edge in spec.edges_of("norm"):
            gain = view.get(f"{edge.producer}.weight").double()
            for name in edge.readers:
                w[name] = (w[name] * gain) @ rot.r1
            view.set(f"{edge.producer}.weight", torch.ones_like(gain))
        for name in spec.residual_writers:
            w[name] = rot.r1.T @ w[name]
            if name in b:
                b[name] = b[name] @ rot.r1
    if rot.r2 is not None:
        hd = rot.r2.shape[0]
        for edge in spec.edges_of("heads"):
            v = edge.producer
            w[v] = (rot.r2.T @ w[v].unflatten(0, (-1, hd))).flatten(0, 1)
            if v in b:
                b[v] = (b[v].unflatten(0, (-1, hd)) @ rot.r2).flatten()
            for name in edge.readers:
                w[name] = (w[name].unflatten(1, (-1, hd)) @ rot.r2).flatten(1, 2)
    if rot.r4 is not None:
        for edge in spec.edges_of("gated"):
            for name in edge.readers:
                w[name] = w[name] @ rot.r4
    for name, value in w.items():
        view.set(f"{name}.weight", value)
    for name, value in b.items():
        view.set(f"{name}.bias", value)


def write_param(param: Tensor, value: Tensor) -> None:
    """Cast the float64 result back to the parameter's dtype, once."""
    param.data.copy_(value.to(param.dtype))


def _set_tied(model: nn.Module, tied: bool) -> None:
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None and hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = tied
