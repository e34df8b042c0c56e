"""Dense bit-packing of small signed integers into int32 words (compressed-tensors' ``pack-quantized`` layout).

Each value is offset to unsigned (``q + 2**(bits-1)``) and written into a little-endian bit stream, value ``i`` at
bits ``i*bits .. i*bits+bits-1``; word ``k`` holds stream bits ``32k .. 32k+31``, bit 0 least significant. Values
straddle words when 32 is not a multiple of ``bits`` (3-bit). For 2/4/8 bits this is the classic "32 // bits values
per int32, lowest first" layout.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Bit widths the dense layout holds.
PACKABLE_BITS = range(1, 9)

_WORD_MASK = (1 << 32) - 1


def pack_to_int32(q: Tensor, bits: int, *, packed_dim: int = 1) -> Tensor:
    """Pack ``q: [rows, cols]`` int8 (values in the signed ``bits`` range) densely into int32 along ``packed_dim``.

    ``packed_dim=1`` gives ``[rows, ceil(cols * bits / 32)]``; ``packed_dim=0`` packs columns of ``q`` instead
    (used for zero points), giving ``[ceil(rows * bits / 32), cols]``. Raises ValueError for bits outside 1..8.
    """
    _check_bits(bits)
    if q.dtype != torch.int8 or q.ndim != 2:
        raise ValueError(f"expected a 2-D int8 tensor, got shape {tuple(q.shape)} dtype {q.dtype}")
    if packed_dim not in (0, 1):
        raise ValueError(f"packed_dim must be 0 or 1, got {packed_dim}")
    values = q.T if packed_dim == 0 else q
    rows, cols = values.shape
    blocks = math.ceil(cols / 32)  # 32 values fill exactly `bits` words
    unsigned = torch.zeros(rows, blocks * 32, dtype=torch.int64, device=q.device)
    unsigned[:, :cols] = values.to(torch.int64) + (1 << (bits - 1))
    unsigned = unsigned.view(rows, blocks, 32)
    words = torch.zeros(rows, blocks, bits, dtype=torch.int64, device=q.device)
    for e in range(32):
        start = e * bits
        word, offset = divmod(start, 32)
        v = unsigned[:, :, e]
        words[:, :, word] |= (v << offset) & _WORD_MASK
        if offset + bits > 32:  # the high bits spill into the next word
            words[:, :, word + 1] |= v >> (32 - offset)
    words = words.view(rows, blocks * bits)[:, : math.ceil(cols * bits / 32)]
    packed = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return (packed.T if packed_dim == 0 else packed).contiguous()


def unpack_from_int32(packed: Tensor, bits: int, shape: tuple[int, int] | torch.Size, *, packed_dim: int = 1) -> Tensor:
    """Inverse of ``pack_to_int32``: ``packed`` int32 -> int8 tensor of ``shape`` (the shape before packing)."""
    _check_bits(bits)
    if packed.dtype != torch.int32 or packed.ndim != 2:
        raise ValueError(f"expected a 2-D int32 tensor, got shape {tuple(packed.shape)} dtype {packed.dtype}")
    if packed_dim not in (0, 1):
        raise ValueError(f"packed_dim must be 0 or 1, got {packed_dim}")
    shape = (int(shape[0]), int(shape[1]))
    words = packed.T if packed_dim == 0 else packed
    rows, cols = (shape[1], shape[0]) if packed_dim == 0 else shape
    n_words = math.ceil(cols * bits / 32)
    if tuple(words.shape) != (rows, n_words):
        raise ValueError(f"packed tensor {tuple(packed.shape)} does not hold a {shape} tensor of {bits}-bit values")
    blocks = math.ceil(cols / 32)
    padded = torch.zeros(rows, blocks * bits, dtype=torch.int64, device=packed.device)
    padded[:, :n_words] = words.to(torch.int64) & _WORD_MASK
    padded = padded.view(rows, blocks, bits)
    out = torch.empty(rows, blocks, 32, dtype=torch.int64, device=packed.device)
    value_mask = (1 << bits) - 1
    for e in range(32):
        word, offset = divmod(e * bits, 32)
        v = padded[:, :, word] >> offset
        if offset + bits > 32:
            v = v | (padded[:, :, word + 1] << (32 - offset))
        out[:, :, e] = v & value_mask
    values = (out.view(rows, blocks * 32)[:, :cols] - (1 << (bits - 1))).to(torch.int8)
    return (values.T if packed_dim == 0 else values).contiguous()


def _check_bits(bits: int) -> None:
    if bits not in PACKABLE_BITS:
        raise ValueError(
            f"dense int32 packing holds 1..8-bit integers, not {bits}-bit; store such values unpacked (int8)"
        )
