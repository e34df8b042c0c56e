"""Outlier statistics of linear-layer inputs and weights: absmax, excess kurtosis, max-median ratio and QSUR.

Everything here is a pure tensor function (no model, no I/O). Conventions, for ``X: [tokens, d]`` (an activation
matrix, or a weight ``[out, in]`` read as ``out`` samples of ``in`` channels):

- ``absmax``: ``max |x|`` over all elements.
- ``kurtosis``: *excess* kurtosis over all elements, ``E[(x - mu)^4] / sigma^4 - 3`` with the global mean ``mu`` and
  the population standard deviation ``sigma``; 0 for a Gaussian, 3 for a Laplace distribution, large when a few
  elements dominate. Computed from the streamed raw moments ``sum x^k`` (``k = 1..4``) in float64.
- ``mmr``: max-median ratio of the per-channel absmax vector ``a``: ``max(a) / median(a)``, ``median`` being
  ``torch.median`` (the lower median for even ``d``). ``inf`` when the median is 0.
- ``qsur``: OSTQuant's quantization space utilization rate, normalized (see ``qsur``), from the channel mean and the
  population covariance ``X^T X / n - mu mu^T``. It is only meaningful with more samples than channels
  (``tokens > d``); with fewer, the covariance is singular and QSUR collapses towards 0.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

# Eigenvalues of the covariance are clamped from below at this fraction of the largest one (rank-deficient or
# slightly negative eigenvalues from round-off would otherwise send log(lambda) to -inf / nan).
_EIG_FLOOR = 1e-12


class ActivationStats:
    """Streaming accumulator of outlier statistics for one linear input of feature size ``d``.

    ``add`` may be called any number of times with tensors ``[..., d]`` (e.g. as the body of a forward-pre-hook: it
    never modifies its argument); ``finalize`` then returns the metrics of all rows seen so far. Accumulators are
    float64, on the CPU, or on the GPU when the first rows come from CUDA (later rows are moved there). Streaming is
    exact up to float64 round-off: several ``add`` calls give the same result as one ``add`` of their concatenation.
    With ``covariance=True`` a ``d x d`` float64 ``X^T X`` is kept (8 d^2 bytes) and QSUR is reported.
    """

    def __init__(self, d: int, covariance: bool = True) -> None:
        if d <= 0:
            raise ValueError(f"feature size must be positive, got {d}")
        self.d = d
        self.covariance = covariance
        self.tokens = 0
        self._moments = torch.zeros(4, dtype=torch.float64)  # sum x, x^2, x^3, x^4 over all elements
        self._absmax = torch.zeros(d, dtype=torch.float64)
        self._sum = torch.zeros(d, dtype=torch.float64)
        self._xtx = torch.zeros(d, d, dtype=torch.float64) if covariance else None

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        """Accumulate the rows of ``x: [..., d]`` (any float dtype or device; ``x`` itself is left untouched)."""
        if x.shape[-1] != self.d:
            raise ValueError(f"expected last dimension {self.d}, got shape {tuple(x.shape)}")
        if x.numel() == 0:
            return
        if self.tokens == 0 and x.device.type == "cuda":
            self._to(x.device)
        x = x.detach().reshape(-1, self.d).to(device=self._absmax.device, dtype=torch.float64)
        x2 = x * x
        self._moments += torch.stack([x.sum(), x2.sum(), (x2 * x).sum(), (x2 * x2).sum()])
        torch.maximum(self._absmax, x.abs().amax(dim=0), out=self._absmax)
        self._sum += x.sum(dim=0)
        if self._xtx is not None:  # float32 product per batch (fast), float64 sum across batches
            xf = x.to(torch.float32)
            self._xtx += (xf.T @ xf).to(torch.float64)
        self.tokens += x.shape[0]

    @torch.no_grad()
    def merge(self, other: ActivationStats) -> None:
        """Add another accumulator's rows (e.g. another shard of the calibration windows) to this one; the result is
        that of ``add``-ing both sets of rows, up to float64 round-off."""
        if other.d != self.d or (other._xtx is None) != (self._xtx is None):
            raise ValueError(
                f"cannot merge statistics of {other.d} features into {self.d}, or with and without covariance"
            )
        if other.tokens == 0:
            return
        if self.tokens == 0 and other._absmax.device != self._absmax.device:
            self._to(other._absmax.device)
        dev = self._absmax.device
        self._moments += other._moments.to(dev)
        torch.maximum(self._absmax, other._absmax.to(dev), out=self._absmax)
        self._sum += other._sum.to(dev)
        if self._xtx is not None:
            self._xtx += other._xtx.to(dev)
        self.tokens += other.tokens

    def _to(self, device: torch.device) -> None:
        """Move the accumulators (only done before the first rows, to follow a CUDA input)."""
        self._moments, self._absmax, self._sum = (t.to(device) for t in (self._moments, self._absmax, self._sum))
        if self._xtx is not None:
            self._xtx = self._xtx.to(device)

    @property
    def channel_absmax(self) -> Tensor:
        """Per-channel ``max |x|`` over all rows seen, float32 ``[d]`` on the CPU."""
        return self._absmax.to(device="cpu", dtype=torch.float32)

    def mean(self) -> Tensor:
        """Per-channel mean, float64 ``[d]`` on the CPU."""
        self._require_tokens()
        return self._sum.cpu() / self.tokens

    def cov(self) -> Tensor:
        """Population covariance ``X^T X / n - mu mu^T``, float64 ``[d, d]`` on the CPU (needs ``covariance=True``)."""
        if self._xtx is None:
            raise ValueError("covariance was not accumulated (covariance=False)")
        mu = self.mean()
        c = self._xtx.cpu() / self.tokens - torch.outer(mu, mu)
        return (c + c.T) / 2

    def finalize(self) -> dict:
        """Metrics as plain Python: ``absmax``, ``kurtosis``, ``mmr``, ``qsur`` (``None`` without covariance),
        ``tokens``."""
        self._require_tokens()
        absmax = self._absmax.cpu()
        return {
            "absmax": float(absmax.max()),
            "kurtosis": _excess_kurtosis(self._moments.cpu(), self.tokens * self.d),
            "mmr": _max_median_ratio(absmax),
            "qsur": qsur(self.mean(), self.cov()) if self._xtx is not None else None,
            "tokens": self.tokens,
        }

    def _require_tokens(self) -> None:
        if self.tokens == 0:
            raise ValueError("no rows accumulated; call add() first")


def _excess_kurtosis(moments: Tensor, n: int) -> float:
    """Excess kurtosis from raw sums ``[sum x, sum x^2, sum x^3, sum x^4]`` of ``n`` elements; nan if constant."""
    m1, r2, r3, r4 = (float(v) / n for v in moments)
    var = r2 - m1 * m1
    if var <= 0.0:
        return float("nan")
    m4 = r4 - 4.0 * m1 * r3 + 6.0 * m1 * m1 * r2 - 3.0 * m1**4
    return m4 / (var * var) - 3.0


def _max_median_ratio(channel_absmax: Tensor) -> float:
    """``max / torch.median`` (lower median) of a per-channel absmax vector; inf when the median is 0."""
    med = float(torch.median(channel_absmax))
    top = float(channel_absmax.max())
    if med <= 0.0:
        return float("inf") if top > 0.0 else float("nan")
    return top / med


def qsur(mean: Tensor, cov: Tensor) -> float:
    """Normalized quantization space utilization rate (OSTQuant, arXiv 2501.13987, Sec. 3).

    For a distribution with mean ``mu`` and covariance ``Sigma`` (eigenvalues ``lambda_i``) in ``d`` dimensions,
    QSUR is the volume of the Gaussian ellipsoid ``{x : (x - mu)^T Sigma^-1 (x - mu) <= c^2}`` divided by the volume
    of the smallest zero-centred hypercube with equal sides that encloses it (the range a symmetric per-tensor /
    per-token quantizer spans). The ellipsoid reaches ``|mu_j| + c sqrt(Sigma_jj)`` along axis ``j``, so::

        QSUR_raw = [pi^(d/2) / Gamma(d/2 + 1)] * c^d * prod_i sqrt(lambda_i) / (2 max_j(|mu_j| + c sqrt(Sigma_jj)))^d

    which is astronomically small for large ``d``. Its maximum, reached by the zero-mean isotropic Gaussian (the
    ellipsoid is then a ball inscribed in the cube), is ``pi^(d/2) / Gamma(d/2 + 1) / 2^d``; dividing by it and
    taking the d-th root gives the value returned here::

        qsur = (prod_i sqrt(lambda_i))^(1/d) / max_j(sqrt(Sigma_jj) + |mu_j| / c),   c = sqrt(d)

    (``c = sqrt(d)`` is the typical radius of a d-dimensional standard Gaussian). The result is in ``(0, 1]``,
    equals 1 exactly for an isotropic zero-mean distribution, is invariant to a common scaling of the data and to
    permutations/sign flips of the channels, but NOT to rotations: a rotation that spreads the variance evenly over
    the axes (e.g. Hadamard on a distribution with outlier channels) lowers ``max_j Sigma_jj`` and raises QSUR.

    Computed in float64. ``prod_i lambda_i = det(Sigma)``, so the geometric mean comes from a Cholesky
    log-determinant of ``Sigma + eps I`` with ``eps = 1e-12 * trace(Sigma) / d`` (about 10x faster than an
    eigendecomposition for d = 1536); if the factorization fails, eigenvalues clamped from below at
    ``max(lambda) * 1e-12`` are used. A zero covariance gives 0.0.
    """
    cov = cov.detach().to(device="cpu", dtype=torch.float64)
    mean = mean.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    d = cov.shape[0]
    if cov.shape != (d, d) or mean.numel() != d:
        raise ValueError(f"qsur needs mean [d] and cov [d, d], got {tuple(mean.shape)} and {tuple(cov.shape)}")
    cov = (cov + cov.T) / 2
    trace = float(cov.diagonal().sum())
    if trace <= 0.0:
        return 0.0
    chol, info = torch.linalg.cholesky_ex(cov + torch.eye(d, dtype=torch.float64) * (trace / d * _EIG_FLOOR))
    if int(info) == 0:
        log_det = 2.0 * float(torch.log(chol.diagonal()).sum())
    else:
        lam = torch.linalg.eigvalsh(cov)
        top = float(lam.max())
        if top <= 0.0:
            return 0.0
        log_det = float(torch.log(lam.clamp_min(top * _EIG_FLOOR)).sum())
    geo = math.exp(0.5 * log_det / d)
    extent = cov.diagonal().clamp_min(0.0).sqrt() + mean.abs() / math.sqrt(d)
    return min(1.0, geo / float(extent.max()))


def weight_stats(w: Tensor, covariance: bool | None = None) -> tuple[dict, Tensor]:
    """Metrics of a weight ``[out, in]``: rows are samples, in-features are channels.

    The channel absmax is the per-column absmax and QSUR uses the column mean and the covariance over rows, exactly
    as ``ActivationStats(in).add(w)`` would. Returns ``(metrics, channel_absmax)`` with ``channel_absmax`` float32
    ``[in]``. QSUR needs ``out > in`` to be meaningful (see the module docstring): by default (``covariance=None``)
    it is computed only when ``out >= 2 * in`` and is ``None`` otherwise.
    """
    if w.dim() != 2:
        raise ValueError(f"weight_stats expects a 2-D weight [out, in], got shape {tuple(w.shape)}")
    if covariance is None:
        covariance = w.shape[0] >= 2 * w.shape[1]
    stats = ActivationStats(w.shape[1], covariance=covariance)
    stats.add(w)
    return stats.finalize(), stats.channel_absmax


def outlier_channels(channel_absmax: list[Tensor], ratio: float = 20.0, min_fraction: float = 0.25) -> list[dict]:
    """Channels that are outliers in many layers, from per-layer channel-absmax vectors of one input kind.

    A channel ``j`` is an outlier in a layer when its absmax is ``>= ratio * median`` of that layer's channel absmax
    (``torch.median``, lower median). Channels that are outliers in at least ``max(1, ceil(min_fraction * layers))``
    layers are returned as ``{"channel": j, "layers": count, "max": absmax over all layers}``, sorted by count
    descending, then max descending, then channel index.
    """
    if not channel_absmax:
        return []
    sizes = {int(v.numel()) for v in channel_absmax}
    if len(sizes) != 1:
        raise ValueError(f"all channel-absmax vectors must have the same size, got {sorted(sizes)}")
    a = torch.stack([v.detach().to(device="cpu", dtype=torch.float64).reshape(-1) for v in channel_absmax])
    med = a.median(dim=1).values
    counts = (a >= ratio * med[:, None]).sum(dim=0)
    need = max(1, math.ceil(min_fraction * a.shape[0] - 1e-9))
    peak = a.amax(dim=0)
    rows = [
        {"channel": int(j), "layers": int(counts[j]), "max": float(peak[j])}
        for j in torch.nonzero(counts >= need).flatten().tolist()
    ]
    rows.sort(key=lambda r: (-r["layers"], -r["max"], r["channel"]))
    return rows
