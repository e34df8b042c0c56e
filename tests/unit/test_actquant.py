"""Dynamic activation / KV-cache fake quantization: grids, error bounds, groupings and the straight-through grad."""

from __future__ import annotations

import pytest
import torch

from qtool.algorithms.actquant import fake_quantize_dynamic
from qtool.schemes import QuantArgs

pytestmark = pytest.mark.numeric

TOKEN4 = QuantArgs(bits=4, symmetric=True, granularity="token", dynamic=True)
HEAD4 = QuantArgs(bits=4, symmetric=False, granularity="head", dynamic=True)


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3


def test_symmetric_per_token_grid_and_error_bound():
    x = _x(2, 7, 64)
    y = fake_quantize_dynamic(x, TOKEN4)
    scale = x.abs().amax(-1, keepdim=True) / 7  # absmax lands exactly on qmax
    q = y / scale
    assert torch.allclose(q, q.round(), atol=1e-9)  # every value on the per-token grid
    assert q.min() >= -7 and q.max() <= 7
    assert ((y - x).abs() <= scale / 2 + 1e-12).all()
    assert torch.allclose(y.abs().amax(-1), x.abs().amax(-1))


def test_asymmetric_head_grouping_keeps_zero_and_range():
    x = _x(1, 4, 9, 8) + 1.0
    y = fake_quantize_dynamic(x, HEAD4)
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / 15
    assert ((y - x).abs() <= scale / 2 + 1e-12).all()
    assert fake_quantize_dynamic(torch.zeros(1, 1, 2, 8), HEAD4).eq(0).all()


def test_group_is_token_over_slices():
    x = _x(5, 32)
    g = QuantArgs(bits=4, symmetric=True, granularity="group", group_size=8, dynamic=True)
    expected = torch.cat([fake_quantize_dynamic(x[:, i : i + 8], TOKEN4) for i in range(0, 32, 8)], dim=1)
    assert torch.equal(fake_quantize_dynamic(x, g), expected)


def test_idempotent_and_8bit_finer_than_4bit():
    x = _x(3, 64)
    y = fake_quantize_dynamic(x, TOKEN4)
    assert torch.allclose(fake_quantize_dynamic(y, TOKEN4), y, atol=1e-12)
    a8 = TOKEN4.model_copy(update={"bits": 8})
    assert (fake_quantize_dynamic(x, a8) - x).abs().max() < (y - x).abs().max() / 8


def test_dtype_preserved_and_straight_through_gradient():
    x = _x(4, 16).float().requires_grad_(True)
    y = fake_quantize_dynamic(x, TOKEN4.model_copy(update={"clip_ratio": 1.0}))
    assert y.dtype == torch.float32
    y.sum().backward()
    # rounding passes the gradient straight through; the scale depends on x too, so allow its small share
    assert x.grad is not None and torch.isfinite(x.grad).all() and (x.grad > 0).float().mean() > 0.8


def test_group_size_must_divide():
    g = QuantArgs(bits=4, symmetric=True, granularity="group", group_size=24, dynamic=True)
    with pytest.raises(ValueError, match="does not divide"):
        fake_quantize_dynamic(_x(2, 64), g)


@pytest.mark.parametrize("args", [TOKEN4, HEAD4], ids=["symmetric-token", "asymmetric-head"])
def test_clip_tensor_is_clip_ratio_and_trains(args):
    """A ``clip`` tensor quantizes as ``clip_ratio`` does, and its gradient is the straight-through one through the
    scale (symmetric: ``sum_t absmax_t / qmax * sum_j g_j (q_j - u_j inside the grid, q_j where clamped)``)."""
    x = _x(3, 5, 16)
    g = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    clip = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    y = fake_quantize_dynamic(x, args, clip)
    assert torch.equal(y.detach(), fake_quantize_dynamic(x, args.model_copy(update={"clip_ratio": 0.8})))
    (y * g).sum().backward()
    assert clip.grad is not None and clip.grad.abs() > 1e-3
    if args.symmetric:
        absmax = x.abs().amax(-1, keepdim=True)
        scale = absmax * 0.8 / args.qmax
        u = x / scale
        inside = (u.round() >= args.qmin) & (u.round() <= args.qmax)
        q = u.round().clamp(args.qmin, args.qmax)
        expected = ((g * torch.where(inside, q - u, q)).sum(-1, keepdim=True) * absmax / args.qmax).sum()
        torch.testing.assert_close(clip.grad, expected, rtol=1e-10, atol=1e-12)
