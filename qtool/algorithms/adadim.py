"""AdaDim (Heo et al., ICLR 2024, "Rethinking Channel Dimensions to Isolate Outliers for Low-bit Weight Quantization
of Large Language Models"): per linear, weight groups along the input dimension or along the output dimension,
whichever gives the lower calibration output error.

For a weight ``W: [out, in]`` and group size ``g``:

- axis ``input`` (the paper's per-OC, every other tool's "group" quantization): ``g`` consecutive input columns of
  one output row share a scale, scales ``[out, in / g]``;
- axis ``output`` (per-IC): ``g`` consecutive output rows of one input column share a scale, scales
  ``[out / g, in]`` — a block ``(g, 1)`` grid (``QuantArgs(granularity="block")``). An activation outlier channel
  ``j`` multiplies input column ``j``; grouping along the output dimension keeps that column's weights in groups of
  their own instead of spreading the column's sensitivity over every row's groups.

The selection criterion is the linear's calibration output error ``tr(ΔW Σ ΔWᵀ)`` (``Σ = XᵀX``), which needs no
forward pass, or the reference implementation's sub-block criterion: the mean squared error of the output of the
module that reads the linear's input (attention for q/k/v, the MLP for gate/up), computed by the caller.
"""

from __future__ import annotations

from typing import Literal

from qtool.schemes import QuantArgs

Axis = Literal["input", "output"]
AXES: tuple[Axis, ...] = ("input", "output")


def output_axis_args(weights: QuantArgs, out_features: int, fallback: str = "error") -> QuantArgs | None:
    """The per-input-channel counterpart of a scheme's weight arguments for a linear with ``out_features`` rows.

    Group size ``g`` -> block ``(g, 1)``; a per-channel scheme (one scale per row) -> block ``(out, 1)`` (one scale
    per input column). When ``g`` does not divide ``out_features``, ``fallback`` decides as the scheme's
    ``group_fallback`` does along the input axis: ``channel`` -> block ``(out, 1)``, ``ignore`` -> ``None`` (the
    linear keeps its input-axis groups), ``error`` -> ``ValueError``. Per-tensor grids have no output axis
    (``ValueError``)."""
    if weights.granularity == "channel":
        rows = out_features
    elif weights.granularity == "group":
        assert weights.group_size is not None
        rows = weights.group_size
        if out_features % rows:
            if fallback == "ignore":
                return None
            if fallback != "channel":
                raise ValueError(f"group_size {rows} does not divide out_features={out_features}")
            rows = out_features
    else:
        raise ValueError(f"granularity '{weights.granularity}' has no output axis; use group or channel weights")
    return weights.model_copy(update={"granularity": "block", "group_size": None, "block_structure": (rows, 1)})


def axis_of(args: QuantArgs) -> Axis:
    """Which axis a linear's weight groups run along."""
    return "output" if args.granularity == "block" else "input"


def choose(errors: dict[str, float]) -> str:
    """The candidate with the lowest error; ties go to the earlier candidate (``input`` first by default), so a
    linear whose axes are equally good keeps today's grid. A non-finite error never wins."""
    best = None
    for axis, err in errors.items():
        if err == err and err != float("inf") and (best is None or err < errors[best]):
            best = axis
    if best is None:
        raise ValueError(f"no candidate has a finite error ({errors})")
    return best
