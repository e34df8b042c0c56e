"""Quantization arguments and schemes: the one definition every stage and algorithm reads.

``QuantArgs`` describes how one tensor kind is quantized; ``Scheme`` says which linears get it. Presets are plain
data (``PRESETS``).

Integer grids follow compressed-tensors so that packed checkpoints decompress bit-exactly there:
the quantized value ``q`` lives in the signed range ``qrange(bits)``: ``[-2**(bits-1), 2**(bits-1) - 1]``;
symmetric scales are ``absmax / ((qmax - qmin) / 2)`` with zero point 0; asymmetric ones are
``(max - min) / (qmax - qmin)`` with an integer zero point in the same signed range.
Dequantization is ``(q - zero_point) * scale``.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

Granularity = Literal["tensor", "channel", "group", "block", "token", "head"]


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    """A scheme's name patterns: ``re:<regex>`` full-matches; a plain pattern matches the name or a
    ``.``-separated suffix of it."""
    for p in patterns:
        if p.startswith("re:"):
            if re.fullmatch(p[3:], name):
                return True
        elif name == p or name.endswith("." + p):
            return True
    return False


def qrange(bits: int, symmetric: bool = True) -> tuple[int, int]:
    """Signed integer range ``(qmin, qmax)`` for ``bits``; the same for symmetric and asymmetric grids."""
    del symmetric  # both use the signed grid; asymmetric shifts it with an integer zero point
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


class QuantArgs(BaseModel):
    """How one tensor kind is quantized.

    - ``granularity="group"`` with ``group_size=g``: one scale per ``g`` consecutive input channels,
      a weight ``[out, in]`` gets scales ``[out, in // g]``.
    - ``"block"`` with ``block_structure=(r, c)``: one scale per block of ``r`` output rows by ``c`` input columns,
      scales ``[out // r, in // c]`` (compressed-tensors' ``strategy: block``). ``(g, 1)`` is AdaDim's per-input-
      channel grouping: ``g`` consecutive output rows of one input column share a scale. Weights only, and chosen per
      linear by ``quantize: {method: adadim}``; a scheme's ``weights`` cannot ask for it directly.
    - ``"channel"``: one scale per output row, scales ``[out, 1]``.
    - ``"tensor"``: one scale, ``[1]``.
    - ``"token"``: activations only, one scale per token (row of the flattened ``[tokens, features]`` input);
      requires ``dynamic=True``. With ``dynamic=True``, ``"group"`` means one scale per token and per
      ``group_size`` consecutive features.
    - ``"head"``: KV cache only, one scale per token and attention head (QuaRot's KV grouping; the same as
      ``"group"`` with ``group_size = head_dim``).
    - ``observer``: ``minmax`` takes the range as is (times ``clip_ratio``); ``mse`` searches shrink factors of the
      range and keeps the one with the lowest reconstruction error (per scale group); ``percentile`` (static
      activations only) takes the ``percentile``-th percentile of ``|x|`` (asymmetric: of ``x`` at both ends) over
      the calibration sample instead of the extreme.
    - Static activations (``dynamic: false``, ``tensor`` or ``channel``: one scale per input feature) are calibrated
      once by the quantize stage (``qtool.algorithms.actquant.static_params``) and applied as fixed scales.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    bits: Literal[2, 3, 4, 5, 6, 8] = 4
    symmetric: bool = True
    granularity: Granularity = "group"
    group_size: int | None = Field(default=None, gt=0)
    dynamic: bool = False
    observer: Literal["minmax", "mse", "percentile"] = "minmax"
    clip_ratio: float = Field(default=1.0, gt=0.0, le=1.0)
    block_structure: tuple[int, int] | None = None
    percentile: float | None = Field(default=None, gt=50.0, le=100.0)

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        """``block_structure`` and ``percentile`` only where set: the dump of every other grid (recipe fingerprints,
        layer checkpoints) reads as before the fields existed."""
        out = handler(self)
        for key in ("block_structure", "percentile"):
            if getattr(self, key) is None:
                out.pop(key, None)
        return out

    @model_validator(mode="after")
    def _check(self) -> QuantArgs:
        if (self.granularity == "block") != (self.block_structure is not None):
            raise ValueError("granularity 'block' and block_structure [rows, cols] go together")
        if self.block_structure is not None and min(self.block_structure) < 1:
            raise ValueError(f"block_structure {list(self.block_structure)} must be two positive sizes")
        if self.granularity == "group" and self.group_size is None:
            raise ValueError("granularity 'group' needs group_size (e.g. 128); or use granularity 'channel'")
        if self.granularity != "group" and self.group_size is not None:
            raise ValueError(f"group_size is only meaningful with granularity 'group', not '{self.granularity}'")
        if self.granularity in ("token", "head") and not self.dynamic:
            raise ValueError(f"granularity '{self.granularity}' is computed per batch: set dynamic: true")
        if (self.observer == "percentile") != (self.percentile is not None):
            raise ValueError("observer 'percentile' and percentile (e.g. 99.99) go together")
        if self.observer == "percentile" and self.dynamic:
            raise ValueError("observer 'percentile' calibrates static scales: set dynamic: false")
        return self

    @property
    def grid(self) -> str:
        """Short name of a weight grid for reports: ``input g64`` (groups along the input dimension), ``output g64``
        (per input channel, groups of 64 rows: block ``(64, 1)``), ``channel``, ``tensor``, ``block 128x128``."""
        if self.granularity == "group":
            return f"input g{self.group_size}"
        if self.granularity == "block" and self.block_structure is not None:
            rows, cols = self.block_structure
            return f"output g{rows}" if cols == 1 else f"block {rows}x{cols}"
        return self.granularity

    @property
    def static(self) -> bool:
        """A calibrated, fixed activation scale (``dynamic: false``)."""
        return not self.dynamic

    @property
    def qmin(self) -> int:
        return qrange(self.bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, self.symmetric)[1]


class Scheme(BaseModel):
    """What to quantize and how.

    ``targets`` and ``ignore`` match linear-module names: a plain string matches a name equal to it or ending in
    ``.<string>`` (``down_proj``, ``layers.0.mlp.down_proj``); ``re:<regex>`` matches with ``re.fullmatch``. Only
    the linears of the decoder layers are candidates (``ArchSpec.layer_linears``: q/k/v/o/gate/up/down in a Llama,
    qkv_proj/o_proj/gate_up_proj/down_proj in a Phi-3), so the default ``re:.*`` quantizes all of them and the
    embeddings and lm_head never.
    ``group_fallback`` says what happens to a targeted linear whose ``in_features`` the group size does not divide
    (stories260K's down_proj has 172): ``error`` (default: validation names the layer and a size that works),
    ``channel`` (that linear gets per-channel scales) or ``ignore`` (it stays unquantized).

    ``input_activations`` (optional) quantizes the input of every targeted linear: on the fly (``dynamic: true``,
    granularity ``token``, ``group`` or ``tensor``) or with static scales the quantize stage calibrates
    (``dynamic: false``, granularity ``tensor`` or ``channel``: one scale per input feature). ``input_overrides``
    maps linear-name patterns (as ``targets``) to another input quantizer for the targeted linears they match, the
    first match winning (e.g. static q/k/v/gate/up, dynamic per-token o/down); linears that read one input (q/k/v,
    gate/up) must get the same one. ``kv_cache`` (optional) quantizes keys (after RoPE and any online rotation) and
    values per token, per head (``head``) or per ``group_size`` features within a head.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    weights: QuantArgs
    input_activations: QuantArgs | None = None
    input_overrides: dict[str, QuantArgs] = Field(default_factory=dict)
    kv_cache: QuantArgs | None = None
    targets: tuple[str, ...] = Field(
        ("re:.*",), description="linears to quantize among the decoder layers' (default: every one of them)"
    )
    ignore: tuple[str, ...] = ()
    group_fallback: Literal["error", "channel", "ignore"] = "error"

    @field_validator("targets", "ignore")
    @classmethod
    def _patterns_compile(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for p in patterns:
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as e:
                    raise ValueError(f"{p!r} is not a valid regular expression ({e})") from None
        return patterns

    @field_validator("weights")
    @classmethod
    def _static_weights(cls, w: QuantArgs) -> QuantArgs:
        if w.dynamic or w.granularity in ("token", "head"):
            raise ValueError("use granularity tensor, channel or group with dynamic: false")
        if w.observer == "percentile":
            raise ValueError("observer 'percentile' is for static activations; weights use minmax or mse")
        if w.granularity == "block":
            raise ValueError(
                "granularity block (groups along the output dimension) is chosen per linear by "
                "quantize: {method: adadim, candidates: [output]}; use granularity group or channel here"
            )
        return w

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        """``input_overrides`` only where set: recipes without them fingerprint as before the field existed."""
        out = handler(self)
        if not self.input_overrides:
            out.pop("input_overrides", None)
        return out

    @field_validator("input_activations")
    @classmethod
    def _activations(cls, a: QuantArgs | None) -> QuantArgs | None:
        if a is not None:
            _check_activation_args(a)
        return a

    @field_validator("input_overrides")
    @classmethod
    def _overrides(cls, overrides: dict[str, QuantArgs]) -> dict[str, QuantArgs]:
        cls._patterns_compile(tuple(overrides))
        for a in overrides.values():
            _check_activation_args(a)
        return overrides

    @model_validator(mode="after")
    def _overrides_need_activations(self) -> Scheme:
        if self.input_overrides and self.input_activations is None:
            raise ValueError("input_overrides changes input_activations for some linears: set input_activations too")
        return self

    def input_args_for(self, full_name: str) -> QuantArgs | None:
        """The input quantizer of targeted linear ``full_name``: the first matching ``input_overrides`` entry, else
        ``input_activations``."""
        for pattern, args in self.input_overrides.items():
            if matches(full_name, (pattern,)):
                return args
        return self.input_activations

    @property
    def static_activations(self) -> bool:
        """Whether any linear's inputs get calibrated static scales."""
        return any(a is not None and a.static for a in (self.input_activations, *self.input_overrides.values()))

    @field_validator("kv_cache")
    @classmethod
    def _dynamic_kv(cls, kv: QuantArgs | None) -> QuantArgs | None:
        if kv is not None and (not kv.dynamic or kv.granularity not in ("head", "group", "token")):
            raise ValueError("set dynamic: true with granularity head (per token and head) or group")
        return kv

    @property
    def name(self) -> str:
        a = self.input_activations.bits if self.input_activations else 16
        kv = f"KV{self.kv_cache.bits}" if self.kv_cache else ""
        return f"W{self.weights.bits}A{a}{kv}"


def _check_activation_args(a: QuantArgs) -> None:
    if a.dynamic and a.granularity not in ("token", "group", "tensor"):
        raise ValueError("dynamic activations: use granularity token, group or tensor")
    if not a.dynamic and a.granularity not in ("tensor", "channel"):
        raise ValueError(
            "static activations (dynamic: false) have one calibrated scale per tensor or per input channel: use "
            "granularity tensor or channel, or set dynamic: true"
        )
    if a.dynamic and a.observer != "minmax":
        raise ValueError(f"observer '{a.observer}' calibrates static scales; dynamic activations use minmax")


def _w(bits: int, group_size: int | None = 128) -> QuantArgs:
    if group_size is None:
        return QuantArgs(bits=bits, symmetric=True, granularity="channel")
    return QuantArgs(bits=bits, symmetric=True, granularity="group", group_size=group_size)


def _a(bits: int) -> QuantArgs:
    """Per-token dynamic symmetric activations (QuaRot, SmoothQuant, llm-compressor's W8A8)."""
    return QuantArgs(bits=bits, symmetric=True, granularity="token", dynamic=True)


def _kv(bits: int) -> QuantArgs:
    """Asymmetric per-token, per-head KV cache (QuaRot's KV grouping)."""
    return QuantArgs(bits=bits, symmetric=False, granularity="head", dynamic=True)


# Presets as data: the schemes llm-compressor, GPTQModel and the QuaRot/OSTQuant papers use. Weight-only group
# presets use g128; weight+activation presets use per-channel weights, as QuaRot and llm-compressor's W8A8 do.
# A recipe overrides any field (``scheme: {preset: W4A16, weights: {group_size: 64}}``).
PRESETS: dict[str, Scheme] = {
    "W4A16": Scheme(weights=_w(4)),
    "W3A16": Scheme(weights=_w(3)),
    "W8A16": Scheme(weights=_w(8, None)),
    "W8A8": Scheme(weights=_w(8, None), input_activations=_a(8)),
    "W4A8": Scheme(weights=_w(4, None), input_activations=_a(8)),
    "W4A4": Scheme(weights=_w(4, None), input_activations=_a(4)),
    "W4A4KV4": Scheme(weights=_w(4, None), input_activations=_a(4), kv_cache=_kv(4)),
    "W8A8KV8": Scheme(weights=_w(8, None), input_activations=_a(8), kv_cache=_kv(8)),
}
