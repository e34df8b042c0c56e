"""Linears that compute from packed integer weights on CPU, without a dense copy of the weight.

- ``Int4Linear``: 4-bit weights (symmetric or asymmetric, groups or per channel) through PyTorch's CPU int4 kernel
  (``aten._weight_int4pack_mm_for_cpu``): the weight as 4-bit codes ``u`` in its packed tile layout, per group a
  bf16 scale ``d`` and offset ``m``, ``w = (u - 8) · d + m``; activations in bf16. qtool's codes ``q ∈ [-8, 7]``
  (``w = (q - z) · d``, ``z = 0`` when symmetric) are ``u = q + 8`` with ``m = -z · d``. The kernel takes groups
  of 32, 64, 128 or 256: a larger group (or one scale per row) is the same scale repeated over its pieces.
- ``Int8Linear``: 8-bit symmetric per-channel weights through ``aten._weight_int8pack_mm`` (``w = q · s``); with a
  W8A8 input quantizer (symmetric 8-bit per token) it quantizes the input itself and multiplies integers
  (``torch._int_mm``, exact int32 sums) where this CPU's int8 GEMM is exact (``int_mm_is_exact``).

Otherwise both are weight-only (W4A16 / W8A16): the input stays in floating point. The scales are rounded to bf16
(int4) or to the activation dtype (int8), so outputs match the dense dequantized model to bf16 precision, not bit
for bit; ``kernel_for`` says which quantized weights a kernel can hold and why not, and everything else stays dense.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn as nn
from torch import Tensor

from qtool.algorithms.actquant import symmetric_codes
from qtool.algorithms.quantizer import QuantizedWeight
from qtool.schemes import QuantArgs

INT4_GROUPS = (32, 64, 128, 256)  # the group sizes the CPU int4 kernel takes
log = logging.getLogger(__name__)
_INNER_K_TILES = 2  # the packed layout's k tiling (k must be a multiple of 16 · this)


def kernel_for(qw: QuantizedWeight, act: QuantArgs | None = None) -> tuple[type[nn.Module] | None, str]:
    """The kernel linear class that can hold ``qw`` exactly as stored (codes, scale per group), or ``None`` and the
    reason it stays dense. ``act``: the linear's dynamic input quantizer, if any — a W4A4 / W8A8 linear whose
    inputs ``Int8Linear`` can quantize itself runs as integer products (its codes held one per int8)."""
    args, (n, k) = qw.args, tuple(qw.q.shape)
    if qw.outliers is not None:
        return None, "16-bit outliers have no integer kernel"
    integer = args.bits <= 8 and args.symmetric and args.granularity == "channel"
    if act is not None and integer and runs_as_integers(act):
        return Int8Linear, ""
    if args.granularity not in ("group", "channel"):
        return None, f"{args.granularity} scales have no integer kernel (groups or per channel only)"
    if args.bits == 4:
        if n % 16:
            return None, f"int4 kernel: {n} output rows are not a multiple of 16"
        if _int4_group(k if args.granularity == "channel" else args.group_size) is None or k % (16 * _INNER_K_TILES):
            return None, f"int4 kernel: groups of {args.group_size or k} over {k} columns (needs 32-column pieces)"
        return Int4Linear, ""
    if args.bits == 8:
        if args.granularity != "channel" or not args.symmetric:
            return None, "int8 kernel: symmetric per-channel weights only"
        return Int8Linear, ""
    return None, f"{args.bits}-bit weights have no integer kernel"


def _int4_group(g: int) -> int | None:
    """The kernel group size that tiles groups of ``g`` columns (the largest supported divisor), or ``None``."""
    return next((s for s in reversed(INT4_GROUPS) if g % s == 0), None)


class Int4Linear(nn.Module):
    def __init__(
        self, packed: Tensor, scales_and_zeros: Tensor, group: int, shape: tuple[int, int], bias: Tensor | None
    ):
        super().__init__()
        self.out_features, self.in_features = shape
        self.group = group
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Tensor | None = None) -> Int4Linear:
        n, k = qw.q.shape
        g_stored = k if qw.args.granularity == "channel" else qw.args.group_size
        group = _int4_group(g_stored)
        codes = qw.q.to(torch.int32) + 8  # qtool's signed grid [-8, 7] -> the kernel's codes [0, 15]
        scale = qw.scale.to(torch.float32).reshape(n, -1)
        z = torch.zeros_like(scale) if qw.zero_point is None else qw.zero_point.to(torch.float32).reshape(n, -1)
        offset = -z * scale  # (q - z) s = (u - 8) s - z s
        repeat = g_stored // group
        d = scale.repeat_interleave(repeat, dim=1)  # [n, k / group]
        m = offset.repeat_interleave(repeat, dim=1)
        sz = torch.stack([d.T, m.T], dim=-1).to(torch.bfloat16).contiguous()  # [k / group, n, 2]
        packed = torch._convert_weight_to_int4pack_for_cpu(codes.contiguous(), _INNER_K_TILES)
        return cls(packed, sz, group, (n, k), bias)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        y = torch._weight_int4pack_mm_for_cpu(
            x.reshape(-1, self.in_features).to(torch.bfloat16), self.packed, self.group, self.scales_and_zeros
        )
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4, group={self.group}"


@functools.cache
def int_mm_is_exact() -> bool:
    """Whether ``torch._int_mm`` sums int8 products exactly on this CPU. oneDNN's int8 GEMM without VNNI (an
    AVX2-only CPU, or ``ONEDNN_MAX_CPU_ISA=AVX2``) pairs products in saturating int16 (``vpmaddubsw``) and returns
    wrong sums; there W8A8 keeps fake-quantized inputs in front of the int8 weight kernel."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (32, 256), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (256, 32), dtype=torch.int8, generator=g)
    a[0], b[:, 0] = 127, 127  # pairs of 127 · 127 (and of the u8-shifted 255 · 127) overflow int16
    a[1], b[:, 1] = -128, -128
    exact = torch.equal(torch._int_mm(a, b), a.to(torch.int32) @ b.to(torch.int32))
    if not exact:
        log.warning("torch._int_mm is not exact on this CPU (no VNNI): W8A8 runs its inputs fake-quantized")
    return exact


def runs_as_integers(quant: QuantArgs) -> bool:
    """Whether ``Int8Linear`` can quantize an input with ``quant`` itself and multiply integers: symmetric, at most
    8 bits, one scale per token (the W8A8 / W4A4 schemes of SmoothQuant, QuaRot, OSTQuant and vLLM), on a CPU whose
    int8 GEMM is exact."""
    return quant.bits <= 8 and quant.symmetric and quant.granularity == "token" and int_mm_is_exact()


class Int8Linear(nn.Module):
    def __init__(self, q: Tensor, scale: Tensor, bias: Tensor | None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Tensor | None = None) -> Int8Linear:
        # fresh (64-byte-aligned) copies: a tensor read by safetensors is only 8-byte aligned, and aten's int8
        # weight kernel segfaults on such a weight
        q = qw.q.to(torch.int8, copy=True).contiguous()
        return cls(q, qw.scale.reshape(-1).to(torch.float32, copy=True), bias)

    # the activation quantizer this kernel runs as integers (``take_input_quant``): None = weight-only
    act: QuantArgs | None = None

    def take_input_quant(self, quant: QuantArgs) -> bool:
        """Run the input's dynamic quantization here, as integer products (``torch._int_mm`` on int8-held codes:
        exact int32 sums, then one float32 multiply by both scales), if ``runs_as_integers(quant)``. The caller
        then drops its fake quantization of the input."""
        if not runs_as_integers(quant):
            return False
        self.act = quant
        return True

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.act is not None:
            y = self._int8_int8(x2)
        else:
            y = torch._weight_int8pack_mm(x2, self.q, self.scale.to(x2.dtype))
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def _int8_int8(self, x: Tensor) -> Tensor:
        """The input's per-token codes and scales in float32, exactly as ``fake_quantize_dynamic`` computes them."""
        xq, scale = symmetric_codes(x.to(torch.float32), self.act, self.act.clip_ratio)
        acc = torch._int_mm(xq.to(torch.int8), self.q.T)  # [rows, out] int32
        return (acc.to(torch.float32) * scale * self.scale).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"
