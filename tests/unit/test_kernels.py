"""qtool's integer-kernel linears hold the packed integers and scales exactly as stored: with bf16 scales the
kernel's weight (read back through an identity input) equals the dequantized weight bit for bit."""

from __future__ import annotations

import pytest
import torch

from qtool.algorithms.quantizer import QuantizedWeight, SparseOutliers, rtn_quantize
from qtool.models.kernels import Int4Linear, Int8Linear, int_mm_is_exact, kernel_for
from qtool.schemes import QuantArgs

pytestmark = pytest.mark.numeric


def _args(bits=4, symmetric=True, granularity="group", group_size=32):
    return QuantArgs(bits=bits, symmetric=symmetric, granularity=granularity,
                     group_size=group_size if granularity == "group" else None)  # fmt: skip


@pytest.mark.parametrize(
    "args",
    [
        _args(),
        _args(group_size=64),
        _args(group_size=128),
        _args(granularity="channel"),
        _args(bits=8, granularity="channel"),
    ],  # fmt: skip
    ids=["w4-g32", "w4-g64", "w4-g128", "w4-channel", "w8-channel"],
)
def test_symmetric_kernels_hold_the_weight_exactly(args):
    torch.manual_seed(0)
    w = torch.randn(48, 512)  # per channel: one scale over 512 columns = the kernel's 256-groups, scale repeated
    qw = rtn_quantize(w, args, scale_dtype=torch.bfloat16)
    cls, why = kernel_for(qw)
    assert cls is (Int4Linear if args.bits == 4 else Int8Linear), why
    m = cls.from_quantized(qw)
    got = m(torch.eye(512, dtype=torch.bfloat16)).T
    assert torch.equal(got, qw.dequantize(torch.bfloat16))  # exact: identity rows, one product each


def test_int8_kernel_takes_a_weight_read_at_any_alignment():
    """safetensors hands back tensors that are only 8-byte aligned; aten's int8 weight kernel segfaults on such a
    weight (a W8A8 checkpoint crashed ``qtool bench``), so the kernel linear holds its own aligned copy."""
    torch.manual_seed(0)
    qw = rtn_quantize(torch.randn(48, 512), _args(bits=8, granularity="channel"), scale_dtype=torch.bfloat16)
    buf = torch.empty(qw.q.numel() + 8, dtype=torch.int8)
    q = buf[8:].view(qw.q.shape).copy_(qw.q)  # 8 bytes past torch's 64-byte-aligned allocation
    assert q.data_ptr() % 64 == 8
    m = Int8Linear.from_quantized(QuantizedWeight(q=q, scale=qw.scale, zero_point=None, args=qw.args))
    assert m.q.data_ptr() % 64 == 0
    got = m(torch.eye(512, dtype=torch.bfloat16)).T
    assert torch.equal(got, qw.dequantize(torch.bfloat16))


def test_w8a8_runs_int8_products_equal_to_the_float_simulation():
    """With a symmetric 8-bit per-token input quantizer the int8 kernel quantizes the input itself and multiplies
    integers (``torch._int_mm``): the same numbers as fake quantization followed by a float64 matmul, to float32
    rounding (measured 5.1e-8 relative), and clearly closer than the bf16 simulation."""
    from qtool.algorithms.actquant import fake_quantize_dynamic

    torch.manual_seed(0)
    w_args = _args(bits=8, granularity="channel")
    qw = rtn_quantize(torch.randn(96, 172), w_args, scale_dtype=torch.float32)
    act = QuantArgs(bits=8, symmetric=True, granularity="token", dynamic=True)
    m = Int8Linear.from_quantized(qw)
    if not int_mm_is_exact():  # oneDNN's int8 GEMM without VNNI saturates: the kernel declines
        assert not m.take_input_quant(act)
        pytest.skip("torch._int_mm is not exact on this CPU (no VNNI)")
    assert m.take_input_quant(act)
    for other in (QuantArgs(bits=8, symmetric=False, granularity="token", dynamic=True),  # zero points
                  QuantArgs(bits=8, symmetric=True, granularity="group", group_size=43, dynamic=True)):  # fmt: skip
        assert not Int8Linear.from_quantized(qw).take_input_quant(other)
    x = torch.randn(9, 172) * torch.linspace(0.1, 20, 172)
    ref = fake_quantize_dynamic(x, act).double() @ qw.dequantize(torch.float64).T
    got = m(x)
    assert got.dtype == torch.float32
    rel = float((got.double() - ref).norm() / ref.norm())
    assert rel < 1e-5, rel  # measured 5.1e-8 (AVX-512 and AVX2)
    got_bf16 = m(x.to(torch.bfloat16)).double()  # bf16 in: the integers can differ only by x's own bf16 rounding
    sim_bf16 = (fake_quantize_dynamic(x.to(torch.bfloat16), act) @ qw.dequantize(torch.bfloat16).T).double()
    assert (got_bf16 - ref).norm() < (sim_bf16 - ref).norm()


def test_asymmetric_int4_and_float32_scales_match_to_bf16_precision():
    """The kernel keeps scale and offset in bf16: with float32 scales or zero points the weight moves by a bf16
    rounding of the scale (measured max 0.0165 on |w| <= 4.3), and the outputs stay within 0.3% of float32."""
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    x = torch.randn(7, 256)
    for args in (_args(symmetric=False, group_size=64), _args()):
        qw = rtn_quantize(w, args, scale_dtype=torch.float32)
        m = Int4Linear.from_quantized(qw, bias=torch.ones(64))
        ref = x @ qw.dequantize(torch.float32).T + 1
        got = m(x)
        assert got.dtype == torch.float32 and got.shape == (7, 64)
        rel = float((got - ref).norm() / ref.norm())
        assert rel < 0.004, rel  # measured 0.0021-0.0024 (bf16 activations and scales)


def test_what_no_kernel_holds_stays_dense_with_a_reason():
    torch.manual_seed(0)
    cases = [
        (torch.randn(40, 64), _args(), "multiple of 16"),  # int4 kernel tiles 16 output rows
        (torch.randn(48, 172), _args(granularity="channel"), "32-column"),  # 172 = no 32-column pieces
        (torch.randn(48, 64), _args(bits=3), "3-bit"),
        (torch.randn(48, 64), _args(bits=8, group_size=32), "per-channel"),
    ]
    for w, args, reason in cases:
        cls, why = kernel_for(rtn_quantize(w, args))
        assert cls is None and reason in why, why
    qw = rtn_quantize(torch.randn(48, 64), _args())
    outliers = SparseOutliers.from_dense(torch.eye(48, 64), torch.float16)
    with_outliers = QuantizedWeight(qw.q, qw.scale, None, qw.args, outliers)
    assert kernel_for(with_outliers)[0] is None
