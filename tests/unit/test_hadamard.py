"""Numeric contracts of qtool.algorithms.hadamard."""

from __future__ import annotations

import math

import pytest
import torch

from qtool.algorithms.hadamard import (
    fast_hadamard,
    hadamard_factors,
    hadamard_matrix,
    orthonormal_hadamard,
    random_orthogonal,
    random_signs,
)

pytestmark = pytest.mark.numeric

CONSTRUCTIBLE = [1, 2, 4, 8, 12, 20, 24, 28, 36, 40, 44, 48, 60, 64, 576, 1536]
NOT_CONSTRUCTIBLE = [3, 5, 6, 7, 10, 172]
FAST_SIZES = [1, 2, 8, 12, 20, 24, 28, 36, 64, 128, 576, 1536]


@pytest.mark.parametrize("n", CONSTRUCTIBLE)
def test_hadamard_matrix_is_hadamard(n: int) -> None:
    h = hadamard_matrix(n)
    assert h is not None
    assert h.shape == (n, n) and h.dtype == torch.float64
    assert torch.equal(h.abs(), torch.ones(n, n, dtype=torch.float64))
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", NOT_CONSTRUCTIBLE)
def test_not_constructible(n: int) -> None:
    assert hadamard_matrix(n) is None
    assert orthonormal_hadamard(n) is None
    assert hadamard_factors(n) is None


@pytest.mark.parametrize(
    ("n", "factors"),
    [
        (1, (1, 1)),
        (64, (1, 64)),
        (12, (12, 1)),
        (24, (12, 2)),
        (36, (36, 1)),
        (576, (36, 16)),
        (1536, (12, 128)),
        (5120, (20, 256)),
        (14336, (28, 512)),
        # 5503 is a prime = 3 mod 4, so Paley I reaches 5504 and 11008 = 5504 * 2 is constructible.
        (11008, (5504, 2)),
    ],
)
def test_hadamard_factors(n: int, factors: tuple[int, int]) -> None:
    assert hadamard_factors(n) == factors


@pytest.mark.parametrize("n", [24, 48, 576, 1536])
def test_matrix_is_kron_of_factors(n: int) -> None:
    factors = hadamard_factors(n)
    assert factors is not None
    m, p = factors
    h_m, h_p = hadamard_matrix(m), hadamard_matrix(p)
    assert h_m is not None and h_p is not None
    assert torch.equal(hadamard_matrix(n), torch.kron(h_m, h_p))


def test_hadamard_matrix_deterministic_and_cloned() -> None:
    a = hadamard_matrix(12)
    a.zero_()
    b, c = hadamard_matrix(12), hadamard_matrix(12)
    assert torch.equal(b, c) and b.abs().min().item() == 1.0


@pytest.mark.parametrize("bad", [0, -4])
def test_invalid_order_raises(bad: int) -> None:
    with pytest.raises(ValueError):
        hadamard_matrix(bad)


@pytest.mark.parametrize("n", [1, 12, 64, 576])
def test_orthonormal_hadamard(n: int) -> None:
    q = orthonormal_hadamard(n)
    assert q is not None and q.dtype == torch.float64
    assert torch.allclose(q, hadamard_matrix(n) / math.sqrt(n), rtol=0, atol=0)
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("d", FAST_SIZES)
@pytest.mark.parametrize("lead", [(), (7,), (3, 5)])
def test_fast_hadamard_matches_dense_float64(d: int, lead: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(*lead, d, generator=gen, dtype=torch.float64)
    y = fast_hadamard(x)
    assert y.shape == x.shape and y.dtype == torch.float64
    torch.testing.assert_close(y, x @ orthonormal_hadamard(d), rtol=0, atol=1e-12)


@pytest.mark.parametrize("d", [12, 64, 576, 1536])
def test_fast_hadamard_float32(d: int) -> None:
    x = torch.randn(4, 3, d, generator=torch.Generator().manual_seed(0))
    y = fast_hadamard(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, x @ orthonormal_hadamard(d).float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("d", [20, 128])
def test_fast_hadamard_bfloat16(d: int) -> None:
    x = torch.randn(6, d, generator=torch.Generator().manual_seed(1)).bfloat16()
    y = fast_hadamard(x)
    assert y.dtype == torch.bfloat16
    ref = x.double() @ orthonormal_hadamard(d)
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=2e-2)


@pytest.mark.parametrize("d", [8, 12, 40, 576, 1536])
def test_fast_hadamard_inverse_by_transpose(d: int) -> None:
    x = torch.randn(2, 3, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    back = fast_hadamard(x) @ orthonormal_hadamard(d).T
    torch.testing.assert_close(back, x, rtol=0, atol=1e-12)
    assert torch.linalg.vector_norm(fast_hadamard(x), dim=-1).allclose(torch.linalg.vector_norm(x, dim=-1))


def test_fast_hadamard_sylvester_is_involution() -> None:
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(fast_hadamard(fast_hadamard(x)), x, rtol=0, atol=1e-12)


def test_fast_hadamard_empty_batch_and_autograd() -> None:
    assert fast_hadamard(torch.zeros(0, 12)).shape == (0, 12)
    x = torch.randn(2, 24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fast_hadamard, (x,))


@pytest.mark.parametrize("d", [3, 10, 172])
def test_fast_hadamard_raises_without_hadamard(d: int) -> None:
    with pytest.raises(ValueError, match=f"order {d}"):
        fast_hadamard(torch.zeros(2, d))


@pytest.mark.parametrize("n", [1, 5, 64])
def test_random_orthogonal(n: int) -> None:
    q = random_orthogonal(n, torch.Generator().manual_seed(0))
    assert q.shape == (n, n) and q.dtype == torch.float64
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(q, random_orthogonal(n, torch.Generator().manual_seed(0)))
    if n > 1:
        assert not torch.allclose(q, random_orthogonal(n, torch.Generator().manual_seed(1)))


def test_random_signs() -> None:
    s = random_signs(1000, torch.Generator().manual_seed(0))
    assert s.shape == (1000,) and s.dtype == torch.float64
    assert torch.equal(s.abs(), torch.ones(1000, dtype=torch.float64))
    assert 400 < int((s > 0).sum()) < 600
    assert torch.equal(s, random_signs(1000, torch.Generator().manual_seed(0)))
    assert not torch.equal(s, random_signs(1000, torch.Generator().manual_seed(1)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_hadamard_on_cuda() -> None:
    x = torch.randn(3, 1536, dtype=torch.float64, device="cuda")
    y = fast_hadamard(x)
    assert y.device == x.device
    torch.testing.assert_close(y.cpu(), x.cpu() @ orthonormal_hadamard(1536), rtol=0, atol=1e-12)
