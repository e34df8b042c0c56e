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

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Granularity = Literal["tensor", "channel", "group", "token"]


def qrange(bits: int, symmetric: bool = True) -> tuple[int, int]:
    """Signed integer range ``(qmin, qmax)`` for ``bits``; the same for symmetric and asymmetric grids."""
    del symmetric  # both use the signed grid; asymmetric shifts it with an integer zero point
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


class QuantArgs(BaseModel):
    """How one tensor kind is quantized.

    - ``granularity="group"`` with ``group_size=g``: one scale per ``g`` consecutive input channels,
      a weight ``[out, in]`` gets scales ``[out, in // g]``.
    - ``"channel"``: one scale per output row, scales ``[out, 1]``.
    - ``"tensor"``: one scale, ``[1]``.
    - ``"token"``: activations only, one scale per token (row of the flattened ``[tokens, features]`` input);
      requires ``dynamic=True``.
    - ``observer``: ``minmax`` takes the range as is (times ``clip_ratio``); ``mse`` searches shrink factors of the
      range and keeps the one with the lowest reconstruction error (per scale group).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    bits: Literal[2, 3, 4, 8] = 4
    symmetric: bool = True
    granularity: Granularity = "group"
    group_size: int | None = Field(default=None, gt=0)
    dynamic: bool = False
    observer: Literal["minmax", "mse"] = "minmax"
    clip_ratio: float = Field(default=1.0, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _check(self) -> QuantArgs:
        if self.granularity == "group" and self.group_size is None:
            raise ValueError("granularity 'group' needs group_size (e.g. 128); or use granularity 'channel'")
        if self.granularity != "group" and self.group_size is not None:
            raise ValueError(f"group_size is only meaningful with granularity 'group', not '{self.granularity}'")
        if self.granularity == "token" and not self.dynamic:
            raise ValueError("granularity 'token' is computed per batch: set dynamic: true")
        return self

    @property
    def qmin(self) -> int:
        return qrange(self.bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, self.symmetric)[1]


class Scheme(BaseModel):
    """What to quantize and how.

    ``targets`` and ``ignore`` match linear-module names: a plain string matches a name equal to it or ending in
    ``.<string>`` (``down_proj``, ``layers.0.mlp.down_proj``); ``re:<regex>`` matches with ``re.fullmatch``.
    ``group_fallback`` says what happens to a targeted linear whose ``in_features`` the group size does not divide
    (stories260K's down_proj has 172): ``error`` (default: validation names the layer and a size that works),
    ``channel`` (that linear gets per-channel scales) or ``ignore`` (it stays unquantized).
    Activation and KV-cache quantization are not part of this release; weights only.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    weights: QuantArgs
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    ignore: tuple[str, ...] = ()
    group_fallback: Literal["error", "channel", "ignore"] = "error"

    @property
    def name(self) -> str:
        return f"W{self.weights.bits}A16"


def _w(bits: int, group_size: int | None = 128) -> QuantArgs:
    if group_size is None:
        return QuantArgs(bits=bits, symmetric=True, granularity="channel")
    return QuantArgs(bits=bits, symmetric=True, granularity="group", group_size=group_size)


# Presets as data: the weight-only schemes llm-compressor and GPTQModel users know. Group presets use g128;
# a recipe overrides any field (``scheme: {preset: W4A16, weights: {group_size: 64}}``).
PRESETS: dict[str, Scheme] = {
    "W4A16": Scheme(weights=_w(4)),
    "W3A16": Scheme(weights=_w(3)),
    "W8A16": Scheme(weights=_w(8, None)),
}
