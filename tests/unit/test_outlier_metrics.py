"""Outlier metrics (kurtosis, absmax, MMR, QSUR, outlier channels) and the PNG report plots."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from qtool.algorithms.outlier_metrics import ActivationStats, outlier_channels, qsur, weight_stats
from qtool.report.plots import plot_channel_heatmap, plot_heatmaps_side_by_side, plot_layer_metric

pytestmark = pytest.mark.numeric

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _sylvester(n: int) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix of order ``n`` (a power of two), float64."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def _random_orthogonal(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _stats(x: torch.Tensor, covariance: bool = True) -> dict:
    s = ActivationStats(x.shape[-1], covariance=covariance)
    s.add(x)
    return s.finalize()


def test_kurtosis_gaussian_and_laplace() -> None:
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(4000, 256, generator=g)
    assert abs(_stats(gauss, covariance=False)["kurtosis"]) < 0.05
    laplace = torch.distributions.Laplace(0.0, 1.0)
    torch.manual_seed(1)
    lap = laplace.sample((4000, 256))
    assert abs(_stats(lap, covariance=False)["kurtosis"] - 3.0) < 0.3


def test_streaming_equals_single_add_and_input_untouched() -> None:
    g = torch.Generator().manual_seed(2)
    chunks = [torch.randn(3, n, 48, generator=g) * 2 + 0.5 for n in (5, 17, 1, 40)]
    copies = [c.clone() for c in chunks]
    streamed = ActivationStats(48)
    for c in chunks:
        streamed.add(c)
    whole = ActivationStats(48)
    whole.add(torch.cat([c.reshape(-1, 48) for c in chunks]))
    a, b = streamed.finalize(), whole.finalize()
    assert a["tokens"] == b["tokens"] == 3 * 63
    for key in ("absmax", "kurtosis", "mmr"):
        assert a[key] == pytest.approx(b[key], rel=1e-10, abs=1e-10), key
    # the covariance takes a float32 product per add() (summed in float64): float32 round-off only
    assert a["qsur"] == pytest.approx(b["qsur"], rel=1e-5)
    assert torch.equal(streamed.channel_absmax, whole.channel_absmax)
    for c, orig in zip(chunks, copies, strict=True):
        assert torch.equal(c, orig)


def test_absmax_channel_absmax_and_mmr_exact() -> None:
    x = torch.full((10, 8), 0.5)
    x[:, 1] = -1.0  # channel absmax: 0.5 (x6), 1.0, 100.0 -> lower median 0.5
    x[3, 5] = -100.0
    s = ActivationStats(8, covariance=False)
    s.add(x)
    m = s.finalize()
    expected = torch.tensor([0.5, 1.0, 0.5, 0.5, 0.5, 100.0, 0.5, 0.5])
    assert s.channel_absmax.dtype == torch.float32
    assert torch.equal(s.channel_absmax, expected)
    assert m["absmax"] == 100.0
    assert m["mmr"] == 200.0
    assert m["qsur"] is None
    assert m["tokens"] == 10


def test_qsur_isotropic_is_one() -> None:
    d = 64
    assert qsur(torch.zeros(d), 3.7 * torch.eye(d, dtype=torch.float64)) == pytest.approx(1.0, abs=1e-12)


def test_qsur_diagonal_closed_form() -> None:
    d = 8
    var = torch.ones(d, dtype=torch.float64)
    var[2] = 100.0
    # geometric mean of sqrt(lambda) = 10^(1/8); max_j sqrt(Sigma_jj) = 10
    assert qsur(torch.zeros(d), torch.diag(var)) == pytest.approx(10 ** (1 / d) / 10, rel=1e-12)
    mean = torch.zeros(d, dtype=torch.float64)
    mean[0] = 40.0  # extent along axis 0: 1 + 40 / sqrt(8) > 10
    assert qsur(mean, torch.diag(var)) == pytest.approx(10 ** (1 / d) / (1 + 40 / math.sqrt(d)), rel=1e-12)


def test_qsur_not_rotation_invariant() -> None:
    d = 16
    var = torch.full((d,), 0.01, dtype=torch.float64)
    var[0] = 25.0
    cov = torch.diag(var)
    q = _random_orthogonal(d, seed=3)
    before, after = qsur(torch.zeros(d), cov), qsur(torch.zeros(d), q @ cov @ q.T)
    assert abs(after - before) > 1e-3
    assert 0.0 < before <= 1.0 and 0.0 < after <= 1.0


def test_hadamard_rotation_raises_qsur_of_spike() -> None:
    d = 32
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4096, d, generator=g, dtype=torch.float64)
    x[:, 7] *= 50.0  # one outlier coordinate
    h = _sylvester(d)
    plain, rotated = _stats(x), _stats(x @ h)
    assert rotated["qsur"] > plain["qsur"] * 5
    assert rotated["mmr"] < plain["mmr"]


def test_weight_stats_matches_activation_stats() -> None:
    g = torch.Generator().manual_seed(5)
    w = torch.randn(96, 32, generator=g)
    w[:, 4] *= 30.0
    metrics, absmax = weight_stats(w)
    ref = ActivationStats(32)
    ref.add(w)
    assert metrics == ref.finalize()
    assert torch.equal(absmax, ref.channel_absmax)
    assert torch.equal(absmax, w.abs().amax(dim=0))


def test_outlier_channels_planted() -> None:
    g = torch.Generator().manual_seed(6)
    layers = [torch.rand(64, generator=g) + 0.5 for _ in range(4)]
    for i in (0, 1, 3):
        layers[i][11] = 80.0 + i  # outlier in 3 of 4 layers
    layers[2][11] = 1.0
    layers[1][40] = 15.0  # large, but below 20x median (~1.0): an outlier in 0 layers
    found = outlier_channels(layers, ratio=20.0, min_fraction=0.25)
    assert [r["channel"] for r in found] == [11]
    assert found[0]["layers"] == 3
    assert found[0]["max"] == pytest.approx(83.0)
    assert outlier_channels(layers, min_fraction=1.0) == []
    assert outlier_channels([]) == []


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 100 and data[:8] == PNG_SIGNATURE
    assert not list(path.parent.glob("*.tmp*"))


def test_plots_write_png(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(7)
    bars = tmp_path / "kurtosis.png"
    plot_layer_metric({"before": [3.0, 0.0, 120.0], "after": [0.5, 0.2, 1.0]}, "kurtosis", bars, "Kurtosis")
    _assert_png(bars)
    heat = tmp_path / "heat.png"
    m = torch.rand(4, 1500, generator=g)
    m[:, 77] = 300.0
    m[0, 3] = 0.0
    plot_channel_heatmap(m, heat, "down_proj input absmax")
    _assert_png(heat)
    pair = tmp_path / "sub" / "pair.png"
    plot_heatmaps_side_by_side(m, m.clamp_max(2.0), pair, "before / after rotation")
    _assert_png(pair)
