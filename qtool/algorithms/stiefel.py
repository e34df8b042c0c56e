"""Riemannian optimizers for square orthogonal parameters (the Stiefel manifold ``St(n, n) = O(n)``).

OSTQuant (arXiv 2501.13987) and SpinQuant learn rotations ``R`` that must stay exactly orthogonal, so that the
transform they fuse into the weights stays an equivalence. Following Li, Fuxin & Todorovic, "Efficient Riemannian
Optimization on the Stiefel Manifold via the Cayley Transform" (ICLR 2020), each step here

1. projects the Euclidean gradient ``G`` onto the tangent space at ``X``: ``proj_X(G) = G − X sym(Xᵀ G)``
   (``sym(A) = (A + Aᵀ)/2``; for square orthogonal ``X`` this equals ``X skew(Xᵀ G)``);
2. turns a momentum direction ``D`` (``n × n``) into the skew-symmetric ``W = D Xᵀ − X Dᵀ``;
3. moves along the exact Cayley retraction ``X_new = (I + (lr/2) W)⁻¹ (I − (lr/2) W) X`` (``retract``), whose first
   order term is ``X − lr W X = X − lr (D − X Dᵀ X)``; for a tangent ``D`` this is ``X − 2 lr D``;
4. transports the momentum to the tangent space at ``X_new`` by projection: ``M ← M − X_new sym(X_newᵀ M)``.

``(I + aW)`` is always invertible for skew ``W`` (its eigenvalues are ``1 + i a λ``) and the Cayley factor is
exactly orthogonal, so ``X_new`` is orthogonal up to float64 round-off. All linear algebra runs in float64; results
are cast back to the parameter's dtype. For parameters below float64, the incoming iterate is first pulled back onto
the manifold by one Newton–Schulz polar step ``X ← X (3I − XᵀX)/2`` (it squares the orthogonality error, so the
float32 rounding of each step does not accumulate across steps). Parameters may carry leading batch dimensions
``[..., n, n]``: every matrix of the batch is an independent point on ``O(n)``.

The optimizers assume the parameters start orthogonal (e.g. a Hadamard or random orthogonal matrix): the retraction
keeps ``XᵀX`` where it starts, it does not correct a non-orthogonal start.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["CayleyAdam", "CayleySGD", "orthogonality_error", "project_tangent", "retract"]


def _mt(x: Tensor) -> Tensor:
    """Transpose of the last two dimensions."""
    return x.transpose(-2, -1)


def _sym(a: Tensor) -> Tensor:
    """Symmetric part ``(A + Aᵀ)/2`` of ``[..., n, n]``."""
    return 0.5 * (a + _mt(a))


def _eye_like(x: Tensor) -> Tensor:
    """``I_n`` for ``x: [..., n, n]`` (broadcastable over the batch), same dtype and device."""
    return torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)


def orthogonality_error(r: Tensor) -> float:
    """``‖RᵀR − I‖_max`` (largest absolute entry) computed in float64, for ``r: [..., n, p]`` (max over the batch)."""
    r64 = r.detach().to(torch.float64)
    eye = torch.eye(r64.shape[-1], dtype=torch.float64, device=r64.device)
    return (_mt(r64) @ r64 - eye).abs().max().item()


def project_tangent(x: Tensor, g: Tensor) -> Tensor:
    """Projection of ``g`` onto the tangent space of the Stiefel manifold at ``x``: ``g − x sym(xᵀ g)``.

    ``x, g: [..., n, p]`` with ``xᵀx = I``; the result ``ξ`` satisfies ``xᵀξ + ξᵀx = 0``.
    """
    return g - x @ _sym(_mt(x) @ g)


def retract(x: Tensor, w: Tensor, step: float) -> Tensor:
    """Exact Cayley retraction ``(I + (step/2) W)⁻¹ (I − (step/2) W) X``.

    ``x: [..., n, p]`` orthogonal columns (``p = n`` for square orthogonal matrices), ``w: [..., n, n]``
    skew-symmetric (``Wᵀ = −W``, only the skew part is meaningful). The inverse is applied with
    ``torch.linalg.solve`` in float64 (no fixed-point approximation), so ``XᵀX`` is preserved to float64 round-off.
    Returns a tensor of ``x``'s shape and dtype. ``step = 0`` returns ``x`` (cast through float64).
    """
    if w.shape[-1] != w.shape[-2] or w.shape[-1] != x.shape[-2]:
        raise ValueError(
            f"retract needs w: [..., n, n] matching x: [..., n, p]; got {tuple(w.shape)}, {tuple(x.shape)}"
        )
    x64, w64 = x.to(torch.float64), w.to(torch.float64)
    return _cayley64(x64, w64, float(step)).to(x.dtype)


def _cayley64(x: Tensor, w: Tensor, step: float) -> Tensor:
    """Float64 Cayley retraction on float64 inputs (see ``retract``)."""
    a = (0.5 * step) * w
    eye = _eye_like(w)
    return torch.linalg.solve(eye + a, x - a @ x)


def _angle_cap(w: Tensor, lr: float, max_angle: float) -> Tensor:
    """Factor ``≤ 1`` per matrix of ``w: [..., n, n]`` (skew) that keeps the Cayley step's largest rotation angle
    at most ``max_angle``: the eigenvalues of ``W`` are ``±iσ``, and the Cayley factor with ``a = (lr/2) W`` turns
    the plane of ``σ`` by ``2 atan(lr σ / 2)``, so the step is scaled to ``lr σ_max ≤ 2 tan(max_angle / 2)``."""
    sigma = torch.linalg.matrix_norm(w, ord=2)
    limit = 2.0 * math.tan(0.5 * max_angle)
    return (limit / (lr * sigma).clamp_min(1e-300)).clamp(max=1.0)


def _newton_schulz(x: Tensor) -> Tensor:
    """One Newton–Schulz polar step ``X (3I − XᵀX)/2``: if ``XᵀX = I + E`` the result has error ``O(‖E‖²)``."""
    return x @ (1.5 * _eye_like(x) - 0.5 * (_mt(x) @ x))


def _check_max_angle(max_angle: float | None) -> None:
    if max_angle is not None and not 0.0 < max_angle < math.pi:
        raise ValueError(f"invalid max_angle {max_angle} (radians, in (0, pi))")


class _CayleyOptimizer(torch.optim.Optimizer):
    """Shared step loop: tangent-projected gradient, momentum direction, Cayley retraction, projection transport.

    Subclasses implement ``_direction``, which updates the per-parameter state and returns the float64 direction
    ``D`` and the float64 momentum ``M`` to transport; the transported ``M`` is written back to
    ``state[self._momentum_key]`` (kept in the parameter's dtype so that ``load_state_dict``, which casts floating
    state to the parameter dtype, restores exactly what was saved).

    ``max_angle`` (radians, default None = no cap) is a trust region on each step: the skew direction ``W`` of a
    matrix is scaled down so that no plane turns by more than ``max_angle``. Adam's direction has entries of RMS ≈ 1
    whatever the gradient's rank, so a gradient dominated by one direction (a massive-activation channel) would
    otherwise turn one plane by ``≈ lr·n`` radians in a single step (0.96 rad for SmolLM2's 576-wide R_res at
    lr 2e-3). The momentum is not rescaled.
    """

    _momentum_key = "momentum"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after checking that every parameter is a floating ``[..., n, n]`` tensor."""
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for p in params:
            if p.ndim < 2 or p.shape[-1] != p.shape[-2]:
                raise ValueError(f"{type(self).__name__} needs square [..., n, n] parameters; got {tuple(p.shape)}")
            if not p.is_floating_point() or p.is_complex():
                raise ValueError(f"{type(self).__name__} needs real floating parameters; got {p.dtype}")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One Riemannian step for every parameter with a gradient (parameters whose ``.grad`` is None are skipped).

        ``closure`` (optional) re-evaluates the loss with gradients enabled; its value is returned.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                self._update(p, group)
        return loss

    def _update(self, p: Tensor, group: dict[str, Any]) -> None:
        """Update one parameter in place: ``X_new = Cayley(X, W = D Xᵀ − X Dᵀ, lr)``, then transport ``M``."""
        x = p.detach().to(torch.float64)
        if p.dtype != torch.float64:
            x = _newton_schulz(x)
        g = project_tangent(x, p.grad.detach().to(torch.float64))
        state = self.state[p]
        d, m = self._direction(p, state, g, group)
        dxt = d @ _mt(x)
        w = dxt - _mt(dxt)  # D Xᵀ − X Dᵀ with one matmul
        lr = float(group["lr"])
        if group.get("max_angle") is not None and lr > 0:
            w = w * _angle_cap(w, lr, group["max_angle"])[..., None, None]
        x_new = _cayley64(x, w, lr)
        p.copy_(x_new)
        state[self._momentum_key].copy_(project_tangent(x_new, m))

    def _direction(self, p: Tensor, state: dict[str, Any], g: Tensor, group: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Return ``(D, M)`` in float64 from the projected gradient ``g``; updates ``state`` (except ``M``)."""
        raise NotImplementedError


class CayleyAdam(_CayleyOptimizer):
    """Riemannian Adam on ``O(n)`` with the exact Cayley retraction (Li et al., ICLR 2020, Algorithm 2 in spirit).

    For each parameter ``X: [..., n, n]`` with Euclidean gradient ``G`` and step ``t``:

    - ``g = proj_X(G)`` (tangent projection);
    - first moment, a matrix: ``M ← β₁ M + (1 − β₁) g``;
    - second moment, **one scalar per matrix** (not elementwise): ``v ← β₂ v + (1 − β₂) mean(g²)``. A scalar
      rescales the whole tangent vector, so the direction stays tangent and equivariant under rotations of the
      coordinates; an elementwise second moment would distort it off the tangent space;
    - ``D = M̂ / (√v̂ + ε)`` with ``M̂ = M / (1 − β₁ᵗ)``, ``v̂ = v / (1 − β₂ᵗ)``;
    - ``W = D Xᵀ − X Dᵀ`` (skew), ``X ← (I + (lr/2) W)⁻¹ (I − (lr/2) W) X``;
    - vector transport by projection: ``M ← M − X_new sym(X_newᵀ M)``;
    - with ``max_angle``, ``W`` is first scaled down so no plane turns by more than ``max_angle``
      (see ``_CayleyOptimizer``).

    Since ``D`` has entries of RMS ≈ 1, the first-order move ``lr (D − X Dᵀ X) = 2 lr D`` has entries of size
    ≈ ``2 lr``. State per parameter: ``step`` (int), ``exp_avg`` (parameter shape and dtype), ``exp_avg_sq``
    (shape ``[...]``, the batch dimensions, parameter dtype).
    """

    _momentum_key = "exp_avg"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        max_angle: float | None = None,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        if eps < 0.0:
            raise ValueError(f"invalid eps {eps}")
        _check_max_angle(max_angle)
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "max_angle": max_angle})

    def _direction(self, p: Tensor, state: dict[str, Any], g: Tensor, group: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Adam direction ``D = M̂ / (√v̂ + ε)`` (float64) and the updated first moment ``M`` (float64)."""
        beta1, beta2 = group["betas"]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros(p.shape[:-2], dtype=p.dtype, device=p.device)
        state["step"] += 1
        t = state["step"]
        m = state["exp_avg"].to(torch.float64).mul(beta1).add(g, alpha=1.0 - beta1)
        v = state["exp_avg_sq"].to(torch.float64).mul(beta2).add(g.square().mean(dim=(-2, -1)), alpha=1.0 - beta2)
        state["exp_avg_sq"].copy_(v)
        denom = (v / (1.0 - beta2**t)).sqrt().add(group["eps"])
        d = (m / (1.0 - beta1**t)) / denom[..., None, None]
        return d, m


class CayleySGD(_CayleyOptimizer):
    """Riemannian momentum SGD on ``O(n)`` with the exact Cayley retraction.

    For each parameter ``X: [..., n, n]``: ``g = proj_X(G)``, ``M ← μ M + g`` (PyTorch's heavy-ball convention, no
    dampening; ``μ = 0`` gives plain Riemannian gradient descent), ``W = M Xᵀ − X Mᵀ``,
    ``X ← (I + (lr/2) W)⁻¹ (I − (lr/2) W) X``, then ``M ← M − X_new sym(X_newᵀ M)`` (projection transport).
    To first order ``X_new ≈ X − 2 lr M`` (for tangent ``M``), i.e. ``−lr`` times the Riemannian gradient of the
    canonical metric ``⟨ξ, η⟩ = ½ tr(ξᵀη)`` on ``O(n)``. State per parameter: ``momentum_buffer`` (parameter shape
    and dtype).
    """

    _momentum_key = "momentum_buffer"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.9,
        max_angle: float | None = None,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"invalid momentum {momentum}")
        _check_max_angle(max_angle)
        super().__init__(params, {"lr": lr, "momentum": momentum, "max_angle": max_angle})

    def _direction(self, p: Tensor, state: dict[str, Any], g: Tensor, group: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Heavy-ball direction ``D = M = μ M + g`` (float64)."""
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        m = state["momentum_buffer"].to(torch.float64).mul(group["momentum"]).add(g)
        return m, m
