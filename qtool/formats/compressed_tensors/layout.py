"""The compressed-tensors layout (format 0.20) of quantized linears and its ``quantization_config``: what
``writer`` stores and ``reader`` decodes.

Facts this module encodes, checked against compressed-tensors 0.20.0:

- ``pack-quantized`` (``PackedQuantizationCompressor``) handles int weights of 1..8 bits, which covers every
  qtool scheme; llm-compressor writes it for W4A16, W3A16 *and* W8A16 (``int-quantized`` needs quantized
  activations, ``naive-quantized`` is only the fallback). Per linear it stores, without the module prefix:
  ``weight_packed`` int32 ``[out, ceil(in * bits / 32)]``, ``weight_scale`` ``[out, n_groups]`` / ``[out, 1]`` /
  ``[1]`` in the model dtype, ``weight_shape`` int64 ``[2]`` = ``(out, in)``, and for asymmetric grids
  ``weight_zero_point``: int32 packed along dim 0, ``[ceil(out * bits / 32), n_groups or 1]``, for group and channel,
  plain int8 ``[1]`` for tensor.
- Packing is dense (``qtool.formats.intpack``): each value is offset to unsigned (``q + 2**(bits-1)``) and
  written into a little-endian bit stream; values straddle words when 32 is not a multiple of ``bits``
  (3-bit). For 2/4/8 bits this is the classic "pack_factor = 32 // bits values per int32, lowest first" layout
  that every compressed-tensors release and vLLM read; the dense 3-bit layout is new in compressed-tensors 0.20
  (earlier releases packed 10 values per int32 with 2 padding bits, or refused 3-bit), so 3-bit checkpoints need
  compressed-tensors >= 0.20 to load.
- Loading with transformers 5 + compressed-tensors 0.20: symmetric checkpoints and per-tensor asymmetric ones load
  both ways; asymmetric group/channel ones only with ``CompressedTensorsConfig(dequantize=True)``, because the
  default compressed load builds ``weight_zero_point`` unpacked (``[out, n_groups]`` int8) and rejects the packed
  tensor (llm-compressor issue #1618; checkpoints llm-compressor writes have the same packed zero points).
- ``naive-quantized`` stores ``weight`` int8 ``[out, in]``, ``weight_scale`` and (asymmetric) ``weight_zero_point``
  int8 unpacked. ``int-quantized`` (``IntQuantizationCompressor``) is the same layout; compressed-tensors picks it
  (before ``pack-quantized``) for int weights whose scheme also quantizes input activations, so W8A8 and W4A4
  checkpoints store one int8 per weight.
- Per-input-channel grids (AdaDim's groups along the output dimension) are compressed-tensors ``strategy: block``
  with ``block_structure: [g, 1]``: ``weight_scale`` ``[out / g, in]``, an asymmetric ``weight_zero_point`` stored
  unpacked int8 ``[out / g, in]`` (compressed-tensors packs zero points for group and channel only). Its
  ``PackedQuantizationCompressor`` decompresses them to our weights bit for bit (``tests/unit/test_packing.py``);
  such linears get their own config group, listed by full name.
- Activation and KV-cache schemes are recorded as ``input_activations`` (``strategy: token``, ``dynamic: true``)
  and ``kv_cache_scheme`` (qtool's per-head grouping as ``strategy: group`` with ``group_size: head_dim``: the
  only form compressed-tensors accepts for dynamic quantization).
- Static per-tensor input quantization is ``input_activations`` with ``strategy: tensor``, ``dynamic: false`` and,
  per linear, ``input_scale`` ``[1]`` in the weight scale's dtype (asymmetric: ``input_zero_point`` int8 ``[1]``):
  what compressed-tensors initializes for such a scheme and vLLM serves as static W8A8. compressed-tensors cannot
  initialize per-channel activation scales (its ``initialize_qparams`` needs two observed dimensions for
  ``channel``), so static per-channel inputs are left out of ``quantization_config`` (such a group reads as
  weight-only there) and live only in the ``qtool`` section, their scales in ``qtool_online.safetensors``.
- Scales are stored in the model's dtype (``quantizer.scale_dtype_for``): compressed-tensors creates
  ``weight_scale`` with the weight's dtype and decompresses as ``(q.to(s.dtype) - zp.to(s.dtype)) * s`` in that
  dtype. ``QuantizedWeight.dequantize(scale.dtype)`` does the same operations, so the two agree bit for bit.
- Weights kept in 16 bits beside the grid (GWQ, outlier-aware QuantEase) have no compressed-tensors equivalent.
  qtool stores them per linear in the same shard as ``weight_outlier_row_ptr`` int32 ``[out + 1]``,
  ``weight_outlier_col`` int16 ``[k]`` and ``weight_outlier_value`` float16/bfloat16 ``[k]`` (CSR), and lists the
  linears under ``qtool.sparse_outliers`` in config.json; qtool's reader adds them to the decompressed weight.
  A loader that reads only the dense part would be wrong, so these keys are deliberately *not* compressed-tensors
  parameters: transformers reports them as unexpected keys (see ``docs/runtimes.md``).
- Config targets: a plain string matches a module whose full dotted name *equals* it (or a module class name such
  as ``Linear``); ``re:<regex>`` uses ``re.match`` (anchored at the start only, so end regexes with ``$``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import regex
import torch
from torch import Tensor

from qtool.algorithms.quantizer import QuantizedWeight, SparseOutliers
from qtool.errors import QtoolError
from qtool.formats.intpack import PACKABLE_BITS, pack_to_int32, unpack_from_int32
from qtool.schemes import QuantArgs

PACK_QUANTIZED = "pack-quantized"
NAIVE_QUANTIZED = "naive-quantized"
INT_QUANTIZED = "int-quantized"
FORMATS = (PACK_QUANTIZED, NAIVE_QUANTIZED, INT_QUANTIZED)
UNPACKED = (NAIVE_QUANTIZED, INT_QUANTIZED)
# "version" in config.json: the oldest compressed-tensors release whose decompressor reproduces the checkpoint bit
# for bit (``make compat-ct``): 0.17.0 (vLLM 0.32's pin) for everything qtool writes except dense 3-bit packing,
# new in 0.20.0. compressed-tensors records the version but does not check it when loading.
COMPRESSED_TENSORS_VERSION = "0.20.0"
OLDEST_READER_VERSION = "0.17.0"


def reader_version(bits: list[int], fmt: str) -> str:
    """The ``version`` to record for linears of these bit widths in format ``fmt``."""
    dense = fmt == PACK_QUANTIZED and any(32 % b for b in bits)  # 3, 5, 6 bits straddle words
    return COMPRESSED_TENSORS_VERSION if dense else OLDEST_READER_VERSION


OUTLIER_PREFIX = "weight_outlier_"
OUTLIER_KEYS = ("row_ptr", "col", "value")
_REGEX_SECONDS = 1.0  # per match of a config target against one module name


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
    if qw.outliers is not None:  # qtool's sparse 16-bit part (module docstring): no compressed-tensors equivalent
        for key, t in qw.outliers.to_csr(*qw.shape).items():
            out[f"{OUTLIER_PREFIX}{key}"] = t
    return out


def quantization_config(
    weight_args: QuantArgs,
    targets: list[str],
    ignore: list[str],
    fmt: str,
    *,
    actorder: str | None = None,
    input_activations: QuantArgs | None = None,
    kv_cache: QuantArgs | None = None,
    head_dim: int | None = None,
    version: str = COMPRESSED_TENSORS_VERSION,
) -> dict[str, Any]:
    """The ``quantization_config`` block of config.json for one scheme (config group ``group_0``).

    ``targets``: full dotted module names (exact match) or ``re:`` regexes (``re.match``, end them with ``$``);
    ``ignore``: names or regexes excluded from the targets (e.g. ``lm_head``). ``actorder`` records the column order
    a method used (GPTQ's ``"weight"``: activation order with static groups); it does not change the stored layout.
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
    if weight_args.block_structure is not None:
        weights["block_structure"] = list(weight_args.block_structure)
    if actorder:
        weights["actorder"] = actorder
    scheme = {
        "targets": list(targets),
        "weights": weights,
        "input_activations": activation_args(input_activations),
        "output_activations": None,
        "format": fmt,
    }
    return {
        "config_groups": {"group_0": scheme},
        "format": fmt,
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "kv_cache_scheme": activation_args(kv_cache, head_dim),
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": version,
    }


def activation_args(args: QuantArgs | None, head_dim: int | None = None) -> dict[str, Any] | None:
    """compressed-tensors ``QuantizationArgs`` of an activation or KV-cache quantizer, ``None`` for one it cannot
    express (static per channel). compressed-tensors allows only token/tensor/group strategies for dynamic
    quantization, so qtool's per-head KV grouping is written as ``group`` with ``group_size = head_dim`` (the same
    grouping)."""
    if args is None:
        return None
    if args.static:
        if args.granularity != "tensor":
            return None
        return {"num_bits": args.bits, "type": "int", "symmetric": args.symmetric, "strategy": "tensor",
                "group_size": None, "dynamic": False, "observer": args.observer}  # fmt: skip
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


# --- decoding ------------------------------------------------------------------------------------------------


def decompress_linears(
    state: dict[str, Tensor],
    qc: dict[str, Any],
    linear_types: dict[str, str],
    dtype: torch.dtype,
    take: Callable[[str, QuantizedWeight], bool] | None = None,
) -> None:
    """Replace, in ``state``, every quantized linear's stored tensors by its dense ``weight`` in ``dtype`` — except
    those that ``take(name, quantized_weight)`` takes (returns true for: an integer kernel holding it), which are
    only removed from ``state``. One linear at a time: a caller that converts what it
    takes holds one linear's unpacked integers at once, never the whole model's.

    ``qc``: the checkpoint's ``quantization_config``; ``linear_types``: module name -> class name of every linear of
    the model (config targets may name a class, e.g. ``Linear``). Decompression is compressed-tensors' own
    arithmetic (``QuantizedWeight.dequantize`` in the scale dtype), so the weights are bit-identical to its."""
    for prefix in sorted(k.removesuffix(".weight_scale") for k in state if k.endswith(".weight_scale")):
        args = _weight_args(group_for(prefix, linear_types, qc)["weights"])
        qw = _quantized(state, prefix, args)
        if take is None or not take(prefix, qw):
            state[f"{prefix}.weight"] = qw.dequantize(qw.scale.dtype).to(dtype)


def input_quant_of(name: str, linear_types: dict[str, str], qc: dict[str, Any]) -> QuantArgs | None:
    """The int input quantizer a checkpoint's config gives linear ``name`` (``None``: none): dynamic, or static per
    tensor (its scale is the linear's ``input_scale``)."""
    group = group_for(name, linear_types, qc, required=False)
    act = (group or {}).get("input_activations")
    if not (act and act.get("type", "int") == "int"):
        return None
    static = act.get("dynamic") is False
    if static and act.get("strategy") != "tensor":
        return None
    return QuantArgs(
        bits=act["num_bits"],
        symmetric=act["symmetric"],
        granularity=act["strategy"],
        group_size=act.get("group_size") if act["strategy"] == "group" else None,
        dynamic=not static,
    )


def group_for(prefix: str, linear_types: dict[str, str], qc: dict, required: bool = True) -> dict | None:
    """The config group whose targets match module ``prefix`` (and that ``ignore`` does not exclude)."""
    ignored = any(_hit(p, prefix, linear_types) for p in qc.get("ignore", []))
    for group in qc["config_groups"].values():
        if not ignored and any(_hit(t, prefix, linear_types) for t in group["targets"]):
            return group
    if required:
        raise QtoolError(f"model: {prefix} is quantized but no config group of quantization_config targets it")
    return None


def _hit(target: str, prefix: str, linear_types: dict[str, str]) -> bool:
    """compressed-tensors' target rule. A checkpoint's config is untrusted: its regexes run with a time limit (a
    catastrophically backtracking pattern would otherwise hang the loader)."""
    if not isinstance(target, str):
        raise QtoolError(f"model: quantization_config target {target!r} is not a string; the config is malformed")
    if target.startswith("re:"):
        try:
            return regex.match(target[3:], prefix, timeout=_REGEX_SECONDS) is not None
        except TimeoutError:
            raise QtoolError(
                f"model: quantization_config target {target!r} takes over {_REGEX_SECONDS}s to match a module name; "
                "the config is malformed"
            ) from None
        except regex.error as e:
            raise QtoolError(f"model: quantization_config target {target!r} is not a valid regex ({e})") from None
    return target in (prefix, linear_types.get(prefix))


def _weight_args(w: dict) -> QuantArgs:
    block = w.get("block_structure") if w["strategy"] == "block" else None
    return QuantArgs(
        bits=w["num_bits"],
        symmetric=w["symmetric"],
        granularity=w["strategy"],
        group_size=w.get("group_size") if w["strategy"] == "group" else None,
        block_structure=tuple(block) if block is not None else None,
    )


def _quantized(state: dict[str, Tensor], prefix: str, args: QuantArgs) -> QuantizedWeight:
    """Linear ``prefix``'s stored tensors, removed from ``state``, as a ``QuantizedWeight``."""
    if f"{prefix}.weight_packed" in state:
        shape = tuple(int(x) for x in state.pop(f"{prefix}.weight_shape").tolist())
        q = unpack_from_int32(state.pop(f"{prefix}.weight_packed"), args.bits, shape)
    else:  # int-quantized / naive-quantized: one int8 per weight
        q = state.pop(f"{prefix}.weight")
    scale = state.pop(f"{prefix}.weight_scale")
    zp = state.pop(f"{prefix}.weight_zero_point", None)
    if zp is not None and zp.dtype == torch.int32:
        zp = unpack_from_int32(zp, args.bits, tuple(scale.shape), packed_dim=0)
    outliers = None
    csr = {k: state.pop(f"{prefix}.{OUTLIER_PREFIX}{k}", None) for k in OUTLIER_KEYS}
    if any(t is not None for t in csr.values()):
        try:
            if any(t is None for t in csr.values()):
                raise ValueError("an outlier array is missing")
            outliers = SparseOutliers.from_csr(csr["row_ptr"], csr["col"], csr["value"], tuple(q.shape))
        except ValueError as e:
            raise QtoolError(f"model: {prefix}: {e}; the checkpoint is damaged") from None
    return QuantizedWeight(q=q, scale=scale, zero_point=zp, args=args, outliers=outliers)
