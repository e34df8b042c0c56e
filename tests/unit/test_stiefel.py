"""Numeric contracts of qtool.algorithms.stiefel: exact Cayley retraction, CayleyAdam / CayleySGD on O(n)."""

from __future__ import annotations

import copy

import pytest
import torch

from qtool.algorithms.hadamard import random_orthogonal
from qtool.algorithms.stiefel import CayleyAdam, CayleySGD, orthogonality_error, project_tangent, retract

pytestmark = pytest.mark.numeric


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: one thread avoids OpenMP contention on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _skew(n: int, seed: int) -> torch.Tensor:
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a - a.T


def _procrustes(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``A: [16, 64]`` random and ``B = Q₀ A`` for a random rotation ``Q₀`` (det +1), float64."""
    g = torch.Generator().manual_seed(seed)
    q0 = random_orthogonal(16, g)
    if torch.linalg.det(q0) < 0:
        q0[:, 0] = -q0[:, 0]
    a = torch.randn(16, 64, generator=g, dtype=torch.float64)
    return a, q0 @ a


@pytest.mark.parametrize("step", [1e-3, 1e-2, 0.1, 1.0])
@pytest.mark.parametrize("n", [8, 37])
def test_retract_keeps_orthogonality(n: int, step: float) -> None:
    x = random_orthogonal(n, torch.Generator().manual_seed(n))
    w = _skew(n, seed=n + 1)
    y = retract(x, w, step)
    assert y.dtype == torch.float64 and y.shape == (n, n)
    assert orthogonality_error(y) <= 1e-12
    assert not torch.allclose(y, x)


def test_retract_first_order_and_zero_step() -> None:
    x = random_orthogonal(12, torch.Generator().manual_seed(3))
    w = _skew(12, seed=4)
    assert torch.allclose(retract(x, w, 0.0), x, atol=0, rtol=0)
    h = 1e-5
    assert torch.allclose((retract(x, w, h) - retract(x, w, -h)) / (2 * h), -w @ x, atol=1e-6)


def test_retract_batched_and_dtype() -> None:
    x = torch.stack([random_orthogonal(6, torch.Generator().manual_seed(s)) for s in range(3)])
    w = torch.stack([_skew(6, seed=s) for s in range(3)])
    y = retract(x.float(), w, 0.5)
    assert y.dtype == torch.float32 and y.shape == (3, 6, 6)
    assert orthogonality_error(y) <= 1e-6
    with pytest.raises(ValueError):
        retract(x, w[..., :5], 0.1)


def test_orthogonality_error() -> None:
    assert orthogonality_error(torch.eye(10)) == 0.0
    x = random_orthogonal(10, torch.Generator().manual_seed(0))
    assert orthogonality_error(x) < 1e-13
    y = x.clone()
    y[2, 3] += 1e-3
    assert orthogonality_error(y) > 1e-4


def test_project_tangent() -> None:
    x = random_orthogonal(9, torch.Generator().manual_seed(1))
    g = torch.randn(9, 9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    xi = project_tangent(x, g)
    assert torch.allclose(x.T @ xi + xi.T @ x, torch.zeros(9, 9, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(project_tangent(x, xi), xi, atol=1e-12)


def _train(opt_cls, dtype: torch.dtype, steps: int, **kw) -> tuple[float, float, float]:
    """Minimize ``‖R A − B‖_F²`` from ``R = I``; returns (initial loss, final loss, worst orthogonality error)."""
    a, b = _procrustes()
    a, b = a.to(dtype), b.to(dtype)
    r = torch.nn.Parameter(torch.eye(16, dtype=dtype))
    opt = opt_cls([r], **kw)
    first, worst = None, 0.0
    for _ in range(steps):
        opt.zero_grad()
        loss = (r @ a - b).square().sum()
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
        worst = max(worst, orthogonality_error(r))
    assert r.dtype == dtype
    return first, (r @ a - b).square().sum().item(), worst


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.float64, 1e-10)])
def test_cayley_adam_procrustes(dtype: torch.dtype, tol: float) -> None:
    first, last, worst = _train(CayleyAdam, dtype, steps=300, lr=0.05)
    assert last * 100 <= first
    assert worst <= tol


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.float64, 1e-10)])
def test_cayley_sgd_procrustes(dtype: torch.dtype, tol: float) -> None:
    first, last, worst = _train(CayleySGD, dtype, steps=300, lr=1e-3, momentum=0.9)
    assert last * 10 <= first
    assert worst <= tol


@pytest.mark.parametrize("opt_cls", [CayleyAdam, CayleySGD])
def test_state_dict_round_trip(opt_cls) -> None:
    a, b = (t.float() for t in _procrustes(seed=1))
    r1 = torch.nn.Parameter(torch.eye(16))
    opt1 = opt_cls([r1], lr=1e-3)

    def step(r, opt) -> None:
        opt.zero_grad()
        (r @ a - b).square().sum().backward()
        opt.step()

    for _ in range(5):
        step(r1, opt1)
    r2 = torch.nn.Parameter(r1.detach().clone())
    opt2 = opt_cls([r2], lr=0.5)
    opt2.load_state_dict(copy.deepcopy(opt1.state_dict()))
    assert opt2.param_groups[0]["lr"] == 1e-3
    for _ in range(5):
        step(r1, opt1)
        step(r2, opt2)
    assert torch.equal(r1, r2)


def test_skips_params_without_grad_and_zero_grad() -> None:
    used = torch.nn.Parameter(torch.eye(4))
    unused = torch.nn.Parameter(torch.eye(5))
    opt = CayleyAdam([used, unused], lr=0.1)
    (used * torch.arange(16.0).reshape(4, 4)).sum().backward()
    opt.step()
    assert not torch.equal(used.detach(), torch.eye(4))
    assert torch.equal(unused.detach(), torch.eye(5))
    assert unused not in opt.state
    opt.zero_grad()
    assert used.grad is None


def test_rejects_non_square_and_bad_hparams() -> None:
    with pytest.raises(ValueError):
        CayleyAdam([torch.nn.Parameter(torch.zeros(3, 4))])
    with pytest.raises(ValueError):
        CayleySGD([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError):
        CayleyAdam([torch.nn.Parameter(torch.eye(3))], betas=(1.0, 0.9))
    with pytest.raises(ValueError):
        CayleySGD([torch.nn.Parameter(torch.eye(3))], momentum=1.0)


def test_batched_parameter() -> None:
    r = torch.nn.Parameter(torch.eye(6).repeat(3, 1, 1))
    target = torch.stack([random_orthogonal(6, torch.Generator().manual_seed(s)) for s in range(3)]).float()
    opt = CayleyAdam([r], lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        (r - target).square().sum().backward()
        opt.step()
    assert opt.state[r]["exp_avg_sq"].shape == (3,)
    assert orthogonality_error(r) <= 1e-6


def _max_turn(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Largest rotation angle (radians) of ``before -> after`` per matrix: eigenvalues of ``beforeᵀ after``."""
    return torch.linalg.eigvals(before.transpose(-2, -1) @ after).angle().abs().amax(dim=-1)


@pytest.mark.parametrize("opt_cls", [CayleyAdam, CayleySGD])
def test_max_angle_caps_a_one_plane_step(opt_cls) -> None:
    """A one-plane gradient under Adam's normalization turns one plane by ≈ lr·n radians; ``max_angle`` bounds the
    turn of every matrix of a batch exactly (Cayley angle 2·atan(lr σ / 2)) and leaves small steps alone."""
    n = 48
    x0 = torch.stack([random_orthogonal(n, torch.Generator().manual_seed(s)) for s in range(2)])
    u, v = torch.randn(2, n, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a = u @ v.T - v @ u.T  # one plane: a tangent gradient A·X with A skew of rank 2
    grad = torch.stack([a @ x0[0], 1e-6 * (a @ x0[1])])  # second matrix: a tiny gradient (matters for SGD)

    def one_step(**kw) -> torch.Tensor:
        p = torch.nn.Parameter(x0.clone())
        p.grad = grad.clone()
        opt_cls([p], lr=0.02 if opt_cls is CayleyAdam else 0.5, **kw).step()
        return _max_turn(x0, p.detach())

    free, capped = one_step(), one_step(max_angle=0.05)
    assert free[0] > 0.3  # uncapped: a large turn in one plane
    torch.testing.assert_close(capped[0], torch.tensor(0.05, dtype=torch.float64), rtol=1e-9, atol=0)
    if opt_cls is CayleySGD:  # SGD's tiny-gradient matrix turns by far less than the cap: left unchanged
        assert free[1] < 0.05
        torch.testing.assert_close(capped[1], free[1], rtol=1e-9, atol=0)
    with pytest.raises(ValueError, match="max_angle"):
        opt_cls([torch.nn.Parameter(torch.eye(3))], max_angle=4.0)
