"""Hadamard matrices, a fast Hadamard transform, and random orthogonal matrices for rotation-based quantization.

A Hadamard matrix of order ``n`` is an ``n x n`` matrix ``H`` with entries ``+-1`` and ``H @ H.T == n * I``; the
orthonormal version ``H / sqrt(n)`` is the rotation applied to weights/activations. ``hadamard_matrix`` combines
three classical constructions:

- **Sylvester**: ``H_1 = [1]``, ``H_2k = [[H_k, H_k], [H_k, -H_k]]``, giving every power of two. Entry
  ``(i, j)`` is ``(-1) ** popcount(i & j)``; the matrix is symmetric.
- **Paley I** (``q`` prime, ``q = 3 mod 4``, order ``q + 1``): with the Jacobsthal matrix
  ``Q[i, j] = legendre(j - i, q)`` (skew-symmetric for these ``q``) and the skew conference matrix
  ``S = [[0, 1^T], [-1, Q]]`` (``S @ S.T = q * I``), ``H = I + S``.
- **Paley II** (``q`` prime, ``q = 1 mod 4``, order ``2 (q + 1)``): ``Q`` is symmetric, the conference matrix
  ``C = [[0, 1^T], [1, Q]]`` is symmetric with ``C @ C.T = q * I``, and
  ``H = C (x) [[1, -1], [-1, -1]] + I (x) [[1, 1], [1, -1]]``.
- **Kronecker products**: ``H_m (x) H_p`` is a Hadamard matrix of order ``m * p``. For ``n = m * p`` the split
  (see ``hadamard_factors``) takes ``p`` as the *largest* power of two such that ``m`` is 1 or a Paley order;
  ``hadamard_matrix(n)`` is then exactly ``kron(hadamard_matrix(m), sylvester(p))``.

Orders reachable this way include 12, 20, 24, 28, 36, 40, 44, 48, 60, 576 (36 x 16), 1536 (12 x 128),
5120 (20 x 256), 14336 (28 x 512), 11008 (5504 x 2, Paley I with q = 5503). Orders such as 3, 6, 10 (no Hadamard
matrix exists) and 172 (exists, but needs e.g. a Williamson construction) give ``None``.

``fast_hadamard`` applies ``orthonormal_hadamard(d)`` to the last dimension of a tensor without forming the
``d x d`` matrix: the last dimension is viewed as ``[m, p]``, a fast Walsh-Hadamard butterfly (``O(p log p)``)
handles the Sylvester factor and a small dense matmul the ``H_m`` factor. For a row vector ``x`` and
``M = kron(A, B)``, ``(x @ M).view(m, p) == A.T @ x.view(m, p) @ B``.
"""

from __future__ import annotations

import functools
import logging
import math
import operator

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "fast_hadamard",
    "hadamard_factors",
    "hadamard_matrix",
    "orthonormal_hadamard",
    "random_orthogonal",
    "random_signs",
]


def _check_order(n: int) -> int:
    n = operator.index(n)
    if n < 1:
        raise ValueError(f"matrix order must be a positive integer, got {n}")
    return n


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    if q % 2 == 0:
        return q == 2
    return all(q % k for k in range(3, math.isqrt(q) + 1, 2))


def _paley_kind(m: int) -> int | None:
    """1 or 2 if order ``m`` is reachable by Paley I / Paley II (I preferred), else None."""
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return 1
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return 2
    return None


@functools.lru_cache(maxsize=64)
def _sylvester(p: int) -> torch.Tensor:
    """Sylvester Hadamard matrix of power-of-two order ``p`` (float64, symmetric)."""
    idx = torch.arange(p, dtype=torch.int64)
    bits = idx[:, None] & idx[None, :]
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return (1 - 2 * parity).to(torch.float64)


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = legendre(j - i, q)`` for an odd prime ``q`` (float64, entries 0 on the diagonal, +-1 elsewhere)."""
    squares = torch.arange(1, (q - 1) // 2 + 1, dtype=torch.int64) ** 2 % q
    chi = -torch.ones(q, dtype=torch.float64)
    chi[squares] = 1.0
    chi[0] = 0.0
    idx = torch.arange(q, dtype=torch.int64)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _conference(q: int, skew: bool) -> torch.Tensor:
    """Conference matrix ``[[0, 1^T], [+-1, Q]]`` of order ``q + 1`` (skew for Paley I, symmetric for Paley II)."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1.0
    c[1:, 0] = -1.0 if skew else 1.0
    c[1:, 1:] = _jacobsthal(q)
    return c


def _paley(m: int, kind: int) -> torch.Tensor:
    if kind == 1:
        return torch.eye(m, dtype=torch.float64) + _conference(m - 1, skew=True)
    conf = _conference(m // 2 - 1, skew=False)
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(conf, a) + torch.kron(torch.eye(m // 2, dtype=torch.float64), b)


def hadamard_factors(n: int) -> tuple[int, int] | None:
    """Split ``n = m * p`` with ``p`` the largest power of two such that order ``m`` is 1 or a Paley order.

    Returns ``(m, p)``; ``(1, n)`` for powers of two; ``None`` when no construction here reaches ``n``.
    """
    n = _check_order(n)
    p = n & -n  # largest power of two dividing n
    m = n // p
    while p >= 1:
        if m == 1 or _paley_kind(m) is not None:
            return m, p
        m, p = m * 2, p // 2
    return None


@functools.lru_cache(maxsize=16)
def _hadamard_cached(n: int) -> torch.Tensor | None:
    factors = hadamard_factors(n)
    if factors is None:
        logger.debug("no Hadamard construction for order %d", n)
        return None
    m, p = factors
    if m == 1:
        return _sylvester(p)
    kind = _paley_kind(m)
    assert kind is not None
    base = _paley(m, kind)
    return base if p == 1 else torch.kron(base, _sylvester(p))


def hadamard_matrix(n: int) -> torch.Tensor | None:
    """Unnormalized +-1 Hadamard matrix of order ``n`` (float64, ``H @ H.T == n * I``), or ``None``.

    Equal to ``kron(hadamard_matrix(m), sylvester(p))`` for ``(m, p) = hadamard_factors(n)``. Deterministic; the
    construction is cached and a fresh copy is returned.
    """
    h = _hadamard_cached(_check_order(n))
    return None if h is None else h.clone()


def orthonormal_hadamard(n: int) -> torch.Tensor | None:
    """``hadamard_matrix(n) / sqrt(n)`` in float64 (orthogonal), or ``None``; the matrix ``fast_hadamard`` applies."""
    h = hadamard_matrix(n)
    return None if h is None else h / math.sqrt(n)


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """``x @ sylvester(p)`` along the last dimension (``p`` a power of two) by butterfly stages.

    ``sylvester(p)`` is a Kronecker product of ``H_2`` factors, one per bit of the index; each stage applies
    ``H_4 = H_2 (x) H_2`` to two bits at once (radix 4, fewer passes over memory), plus one radix-2 stage when
    ``log2(p)`` is odd. Out-of-place (autograd-friendly), ``O(p log p)`` work per row.
    """
    p = x.shape[-1]
    lead = x.shape[:-1]
    rows = math.prod(lead)
    y = x.reshape(rows, p)
    h = 1
    while 4 * h <= p:
        x0, x1, x2, x3 = y.view(rows, p // (4 * h), 4, h).unbind(2)
        s0, d0, s1, d1 = x0 + x1, x0 - x1, x2 + x3, x2 - x3
        y = torch.stack((s0 + s1, d0 + d1, s0 - s1, d0 - d1), dim=2)
        h *= 4
    if 2 * h <= p:
        a, b = y.view(rows, p // (2 * h), 2, h).unbind(2)
        y = torch.stack((a + b, a - b), dim=2)
    return y.reshape(*lead, p)


def fast_hadamard(x: torch.Tensor) -> torch.Tensor:
    """``x @ orthonormal_hadamard(d).to(x.dtype)`` for ``d = x.shape[-1]``, without forming the ``d x d`` matrix.

    Works for any leading shape and device. float64 inputs are computed in float64, everything else in float32;
    the result has ``x``'s dtype. Raises ``ValueError`` if no Hadamard matrix of order ``d`` can be built.
    """
    if not x.is_floating_point():
        raise TypeError(f"fast_hadamard needs a floating-point tensor, got {x.dtype}")
    if x.ndim == 0:
        raise ValueError("fast_hadamard needs a tensor with at least one dimension")
    d = x.shape[-1]
    factors = hadamard_factors(d) if d >= 1 else None
    if factors is None:
        raise ValueError(
            f"no Hadamard matrix of order {d} can be built (needs d = m * 2^k with m = 1, q + 1 for a prime "
            f"q = 3 mod 4, or 2 (q + 1) for a prime q = 1 mod 4)"
        )
    m, p = factors
    work_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    lead = x.shape[:-1]
    y = x.to(work_dtype).reshape(*lead, m, p)
    if p > 1:
        y = _fwht(y)
    if m > 1:  # the 1/sqrt(d) scale rides along with the small H_m factor
        base = _hadamard_cached(m)
        assert base is not None
        y = torch.matmul((base.T / math.sqrt(d)).to(device=x.device, dtype=work_dtype), y)
    else:
        y = y * (1.0 / math.sqrt(d))
    return y.reshape(*lead, d).to(x.dtype)


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-random ``n x n`` orthogonal matrix (float64, CPU) from ``generator`` (a CPU generator).

    QR of a standard Gaussian matrix, with the column signs fixed by ``Q @ diag(sign(diag(R)))`` so the result is
    Haar-distributed and a function of the generator state alone.
    """
    n = _check_order(n)
    g = torch.randn(n, n, generator=generator, dtype=torch.float64, device="cpu")
    q, r = torch.linalg.qr(g)
    signs = torch.sign(torch.diagonal(r))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs[None, :]


def random_signs(n: int, generator: torch.Generator) -> torch.Tensor:
    """Vector of ``n`` independent uniform +-1 values (float64, CPU) from ``generator`` (a CPU generator)."""
    n = _check_order(n)
    bits = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64, device="cpu")
    return (2 * bits - 1).to(torch.float64)
