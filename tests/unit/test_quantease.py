"""QuantEase: the coordinate step is the exact minimiser on the grid, quantized sweeps never raise the layer
objective, and the result is never worse than its starting point."""

from __future__ import annotations

import itertools

import pytest
import torch

from qtool.algorithms.gptq import gptq_quantize
from qtool.algorithms.objective import output_error
from qtool.algorithms.quantease import quantease_quantize, relaxed_schedule
from qtool.algorithms.quantizer import compute_qparams, rtn_quantize
from qtool.schemes import QuantArgs

pytestmark = pytest.mark.numeric

W3_CHANNEL = QuantArgs(bits=3, symmetric=True, granularity="channel")
W3_G32 = QuantArgs(bits=3, symmetric=False, granularity="group", group_size=32)


def _problem(seed: int, out: int = 96, inn: int = 128, tokens: int = 2048):
    """A weight and the Hessian of correlated inputs with a few outlier channels (as real layers have)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(inn, inn, generator=g) * 0.2 + torch.eye(inn)
    x = torch.randn(tokens, inn, generator=g) @ mix
    x[:, :3] *= 15.0
    h = x.T.double() @ x.double()
    return torch.randn(out, inn, generator=g), h


@pytest.mark.parametrize("args", [W3_CHANNEL, W3_G32], ids=["channel", "g32"])
def test_quantized_sweeps_from_gptq_never_raise_the_objective(args):
    for seed in range(3):
        w, h = _problem(seed)
        start = gptq_quantize(w, h, args, act_order=True)
        res = quantease_quantize(w, h, args, init=start, iterations=10, relax_every=0, exact=True)
        f0 = output_error(w, start.dequantize(), h)
        assert res.initial_objective == pytest.approx(f0, rel=1e-7)  # float32 differences: measured 2e-9
        trace = [f0, *res.history]
        # each sweep's f (float64, exact=True) <= the previous one's: measured worst ratio 1.0, allowed 1 + 1e-6
        assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(trace)), trace
        assert res.objective <= f0  # exact: the best quantized state is returned
        assert res.objective == pytest.approx(output_error(w, res.weight.dequantize(), h), rel=1e-7)
        # it does improve on GPTQ here: measured 0.86-0.92 of GPTQ's f over these seeds and both grids
        assert res.objective < 0.97 * f0
        assert torch.equal(res.weight.scale, start.scale)  # same grid as its starting point


def test_each_column_is_set_to_its_best_grid_value():
    """After one quantized sweep in natural order, column j holds the grid value minimising f with the columns
    before it as updated and the ones after it as they started (brute force over the grid, tiny problem)."""
    w, h = _problem(7, out=3, inn=5, tokens=64)
    args = QuantArgs(bits=2, symmetric=True, granularity="channel")
    start = rtn_quantize(w, args)
    res = quantease_quantize(w, h, args, init=start, iterations=1, relax_every=0, act_order=False, block_size=2)
    scale = start.scale.float()
    current = start.dequantize().clone()
    for j in range(w.shape[1]):
        for r in range(w.shape[0]):
            best = min(
                range(args.qmin, args.qmax + 1),
                key=lambda q: output_error(w[r : r + 1], _with(current[r : r + 1], j, q * scale[r]), h),
            )
            current[r, j] = best * scale[r]
    assert torch.equal(res.weight.dequantize(), current)


def _with(row: torch.Tensor, j: int, value: torch.Tensor) -> torch.Tensor:
    out = row.clone()
    out[0, j] = value
    return out


def test_from_rtn_thirty_sweeps_reach_gptq():
    """The issue's claim: from RTN, 30 sweeps give a layer error <= GPTQ's on >= 90% of linears."""
    wins = 0
    for seed in range(10):
        w, h = _problem(100 + seed)
        gptq = output_error(w, gptq_quantize(w, h, W3_G32, act_order=True).dequantize(), h)
        res = quantease_quantize(w, h, W3_G32, iterations=30, relax_every=3)
        wins += res.objective <= gptq
    assert wins >= 9  # measured: 10 of 10, at 0.84-0.91 of GPTQ's f


def test_rtn_start_uses_the_rtn_grid_and_dead_columns_keep_their_value():
    w, h = _problem(3)
    h[5, :] = 0
    h[:, 5] = 0  # input 5 never active
    res = quantease_quantize(w, h, W3_G32, iterations=5)
    scale, zp = compute_qparams(w, W3_G32)
    assert torch.equal(res.weight.scale, scale) and torch.equal(res.weight.zero_point, zp)
    assert torch.equal(res.weight.q[:, 5], rtn_quantize(w, W3_G32).q[:, 5])
    q = res.weight.q
    assert int(q.min()) >= W3_G32.qmin and int(q.max()) <= W3_G32.qmax


def test_relaxed_schedule_ends_quantized():
    s = relaxed_schedule(30, 3, final_quantized=4)
    assert [t for t, r in enumerate(s) if r] == [1, 4, 7, 10, 13, 16, 19, 22, 25]
    assert relaxed_schedule(5, 0, 4) == [False] * 5


@pytest.mark.parametrize("structure", ["unstructured", "structured"])
def test_outlier_aware_variant_beats_plain(structure):
    w, h = _problem(11)
    w[torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) < 0.005] *= 12.0  # heavy-tailed weights
    plain = quantease_quantize(w, h, W3_CHANNEL, iterations=20, relax_every=0)
    res = quantease_quantize(w, h, W3_CHANNEL, iterations=20, outlier_fraction=0.02, outlier_structure=structure)
    outliers = res.weight.outliers
    assert outliers is not None and outliers.values.dtype == torch.float16
    assert res.objective == pytest.approx(output_error(w, res.weight.dequantize(), h), rel=1e-9)
    if structure == "structured":
        cols = outliers.cols.unique()
        assert len(cols) <= round(0.02 * w.shape[1]) and outliers.count <= len(cols) * w.shape[0]
    else:
        assert outliers.count <= round(0.02 * w.numel())
    # measured: unstructured 0.096, structured 0.87 of the plain objective (AVX-512 and AVX2 alike)
    assert res.objective < (0.5 if structure == "unstructured" else 0.95) * plain.objective


def test_bad_arguments():
    w, h = _problem(0, out=8, inn=64)
    with pytest.raises(ValueError, match="outlier_fraction"):
        quantease_quantize(w, h, W3_CHANNEL, outlier_fraction=0.6)
    with pytest.raises(ValueError, match="Hessian"):
        quantease_quantize(w, h[:10, :10], W3_CHANNEL)
    with pytest.raises(ValueError, match="init"):
        quantease_quantize(w, h, W3_G32, init=rtn_quantize(w, W3_CHANNEL))
