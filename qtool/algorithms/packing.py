"""compressed-tensors checkpoint format (0.20) for quantized linear weights.

Facts this module encodes, checked against compressed-tensors 0.20.0:

- ``pack-quantized`` (``PackedQuantizationCompressor``) handles int weights of 1..8 bits, which covers every
  qtool scheme; llm-compressor writes it for W4A16, W3A16 *and* W8A16 (``int-quantized`` needs quantized
  activations, ``naive-quantized`` is only the fallback). Per linear it stores, without the module prefix:
  ``weight_packed`` int32 ``[out, ceil(in * bits / 32)]``, ``weight_scale`` ``[out, n_groups]`` / ``[out, 1]`` /
  ``[1]`` in the model dtype, ``weight_shape`` int64 ``[2]`` = ``(out, in)``, and for asymmetric grids
  ``weight_zero_point``: int32 packed along dim 0, ``[ceil(out * bits / 32), n_groups or 1]``, for group and channel,
  plain int8 ``[1]`` for tensor.
- Packing is dense: each value is offset to unsigned (``q + 2**(bits-1)``) and written into a little-endian bit
  stream, value ``i`` at bits ``i*bits .. i*bits+bits-1``; word ``k`` holds stream bits ``32k .. 32k+31``, bit 0
  least significant. Values straddle words when 32 is not a multiple of ``bits`` (3-bit). For 2/4/8 bits this is
  the classic "pack_factor = 32 // bits values per int32, lowest first" layout that every compressed-tensors release
  and vLLM read; the dense 3-bit layout is new in compressed-tensors 0.20 (earlier releases packed 10 values per
  int32 with 2 padding bits, or refused 3-bit), so 3-bit checkpoints need compressed-tensors >= 0.20 to load.
- Loading with transformers 5 + compressed-tensors 0.20: symmetric checkpoints and per-tensor asymmetric ones load
  both ways; asymmetric group/channel ones only with ``CompressedTensorsConfig(dequantize=True)``, because the
  default compressed load builds ``weight_zero_point`` unpacked (``[out, n_groups]`` int8) and rejects the packed
  tensor (llm-compressor issue #1618; checkpoints llm-compressor writes have the same packed zero points).
- ``naive-quantized`` stores ``weight`` int8 ``[out, in]``, ``weight_scale`` and (asymmetric) ``weight_zero_point``
  int8 unpacked. ``int-quantized`` (``IntQuantizationCompressor``) is the same layout; compressed-tensors picks it
  (before ``pack-quantized``) for int weights whose scheme also quantizes input activations, so W8A8 and W4A4
  checkpoints store one int8 per weight.
- Activation and KV-cache schemes are recorded as ``input_activations`` (``strategy: token``, ``dynamic: true``)
  and ``kv_cache_scheme`` (qtool's per-head grouping as ``strategy: group`` with ``group_size: head_dim``: the
  only form compressed-tensors accepts for dynamic quantization).
- Scales are stored in the model's dtype (``quantizer.scale_dtype_for``): compressed-tensors creates
  ``weight_scale`` with the weight's dtype and decompresses as ``(q.to(s.dtype) - zp.to(s.dtype)) * s`` in that
  dtype. ``QuantizedWeight.dequantize(scale.dtype)`` does the same operations, so the two agree bit for bit.
- Config targets: a plain string matches a module whose full dotted name *equals* it (or a module class name such
  as ``Linear``); ``re:<regex>`` uses ``re.match`` (anchored at the start only, so end regexes with ``$``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from qtool.algorithms.quantizer import QuantizedWeight
from qtool.schemes import QuantArgs

PACK_QUANTIZED = "pack-quantized"
NAIVE_QUANTIZED = "naive-quantized"
INT_QUANTIZED = "int-quantized"
FORMATS = (PACK_QUANTIZED, NAIVE_QUANTIZED, INT_QUANTIZED)
UNPACKED = (NAIVE_QUANTIZED, INT_QUANTIZED)
# The compressed-tensors release whose on-disk format this module writes; recorded as "version" in config.json.
COMPRESSED_TENSORS_VERSION = "0.20.0"
# Bit widths compressed-tensors' pack-quantized accepts.
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


def format_for(args: QuantArgs, activations: QuantArgs | None = None) -> str:
    """compressed-tensors format for weights quantized with ``args``: ``int-quantized`` when the inputs are
    quantized too, else ``pack-quantized`` for 1..8-bit ints."""
    if activations is not None:
        return INT_QUANTIZED
    return PACK_QUANTIZED if args.bits in PACKABLE_BITS else NAIVE_QUANTIZED


def compress_linear(qw: QuantizedWeight, fmt: str | None = None) -> dict[str, Tensor]:
    """State-dict entries of one quantized linear, without the module prefix (``weight_packed``, ``weight_scale``,
    ``weight_shape``, ``weight_zero_point`` when asymmetric), in ``fmt`` (default ``format_for(qw.args)``).

    Tensors are contiguous and ready for safetensors; the scale keeps ``qw.scale``'s dtype.
    """
    fmt = fmt or format_for(qw.args)
    args = qw.args
    out: dict[str, Tensor] = {}
    if fmt == PACK_QUANTIZED:
        out["weight_packed"] = pack_to_int32(qw.q, args.bits)
        out["weight_shape"] = torch.tensor(list(qw.shape), dtype=torch.int64)
    elif fmt in UNPACKED:
        out["weight"] = qw.q.contiguous()
    else:
        raise ValueError(f"unknown format '{fmt}'; qtool writes one of {FORMATS}")
    out["weight_scale"] = qw.scale.contiguous()
    if qw.zero_point is not None:
        if fmt == PACK_QUANTIZED and args.granularity in ("group", "channel"):
            out["weight_zero_point"] = pack_to_int32(qw.zero_point, args.bits, packed_dim=0)
        else:
            out["weight_zero_point"] = qw.zero_point.contiguous()
    return out


def quantization_config(
    weight_args: QuantArgs,
    targets: list[str],
    ignore: list[str],
    fmt: str,
    *,
    actorder: bool = False,
    input_activations: QuantArgs | None = None,
    kv_cache: QuantArgs | None = None,
    head_dim: int | None = None,
    version: str = COMPRESSED_TENSORS_VERSION,
) -> dict[str, Any]:
    """The ``quantization_config`` block of config.json for one scheme (config group ``group_0``).

    ``targets``: full dotted module names (exact match) or ``re:`` regexes (``re.match``, end them with ``$``);
    ``ignore``: names or regexes excluded from the targets (e.g. ``lm_head``). ``actorder=True`` records GPTQ's
    activation ordering with static groups (``"weight"``); it does not change the stored layout.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format '{fmt}'; qtool writes one of {FORMATS}")
    if weight_args.dynamic or weight_args.granularity == "token":
        raise ValueError("weights are quantized statically with tensor, channel or group granularity")
    if not targets:
        raise ValueError("quantization_config needs at least one target module")
    weights: dict[str, Any] = {
        "num_bits": weight_args.bits,
        "type": "int",
        "symmetric": weight_args.symmetric,
        "strategy": weight_args.granularity,
        "group_size": weight_args.group_size,
        "dynamic": False,
        "observer": weight_args.observer,
    }
    if actorder:
        weights["actorder"] = "weight"
    scheme = {
        "targets": list(targets),
        "weights": weights,
        "input_activations": _dynamic_args(input_activations),
        "output_activations": None,
        "format": fmt,
    }
    return {
        "config_groups": {"group_0": scheme},
        "format": fmt,
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "kv_cache_scheme": _dynamic_args(kv_cache, head_dim),
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": version,
    }


def _dynamic_args(args: QuantArgs | None, head_dim: int | None = None) -> dict[str, Any] | None:
    """compressed-tensors ``QuantizationArgs`` of a dynamic activation or KV-cache quantizer. compressed-tensors
    allows only token/tensor/group strategies for dynamic quantization, so qtool's per-head KV grouping is written
    as ``group`` with ``group_size = head_dim`` (the same grouping)."""
    if args is None:
        return None
    head = args.granularity == "head"
    return {
        "num_bits": args.bits,
        "type": "int",
        "symmetric": args.symmetric,
        "strategy": "group" if head else args.granularity,
        "group_size": head_dim if head else args.group_size,
        "dynamic": True,
        "observer": None,
    }


def _check_bits(bits: int) -> None:
    if bits not in PACKABLE_BITS:
        raise ValueError(
            f"pack-quantized holds 1..8-bit integers, not {bits}-bit; store such weights as {NAIVE_QUANTIZED}"
        )
