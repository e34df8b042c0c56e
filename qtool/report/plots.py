"""PNG plots of outlier statistics (matplotlib, Agg canvas, no global pyplot state).

matplotlib is imported lazily inside each function, so importing this module is cheap and does not require it.
Figures are built as ``matplotlib.figure.Figure`` objects rendered by ``FigureCanvasAgg`` and written atomically:
to ``<name>.png.part`` next to ``path`` first, then ``os.replace``-d onto ``path``.

Heatmaps use a logarithmic colour scale (values ``<= 0`` are clipped to a small positive floor). When a matrix has
more channels than fit the figure's pixel width, columns are max-pooled into bins first, so that a single outlier
channel stays visible instead of being dropped by image resampling; the x axis keeps channel units.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

_DPI = 120
# Heatmaps with more columns than this are max-pooled down to at most this many columns before drawing (about the
# pixel width of one heatmap panel: 12 in at 120 dpi for a single heatmap, half of 16 in for a pair).
_MAX_HEATMAP_COLUMNS = 1024
_MAX_PAIR_COLUMNS = 640
# Log scales clip non-positive values to this fraction of the smallest positive one (or to 1e-8 if none).
_LOG_FLOOR_FRACTION = 0.1
_LOG_FLOOR_DEFAULT = 1e-8


def _new_figure(width: float, height: float) -> Figure:
    """A detached Agg figure with constrained layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> None:
    """Write ``fig`` as PNG to ``path`` atomically (temporary sibling file, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")  # the suffix a stage commit drops if a kill leaves it behind
    try:
        fig.savefig(tmp, format="png", dpi=_DPI)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    logger.debug("wrote %s", path)


def _log_floor(values: np.ndarray) -> float:
    """A small positive value below every positive finite entry of ``values``."""
    pos = values[np.isfinite(values) & (values > 0)]
    return float(pos.min()) * _LOG_FLOOR_FRACTION if pos.size else _LOG_FLOOR_DEFAULT


def plot_layer_metric(series: dict[str, list[float]], metric: str, path: Path, title: str, log: bool = True) -> None:
    """Grouped bar chart of a per-layer metric: x = layer index, one bar colour per series.

    ``series`` maps a legend label to per-layer values (``None`` entries are left out), e.g.
    ``{"attn input": [...], "down_proj input": [...]}`` or ``{"before": [...], "after": [...]}``. With ``log`` the y
    axis is log-scaled and values ``<= 0`` are clipped to a small positive floor.
    """
    arrays = {k: np.array([np.nan if v is None else float(v) for v in vals], dtype=float) for k, vals in series.items()}
    floor = _log_floor(np.concatenate([*arrays.values(), np.empty(0)]))
    n_layers = max((a.size for a in arrays.values()), default=0)
    fig = _new_figure(10, 4)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(arrays))
    for i, (label, vals) in enumerate(arrays.items()):
        if log:
            vals = np.where(vals <= 0, floor, vals)
        x = np.arange(vals.size) + (i - (len(arrays) - 1) / 2) * width
        ax.bar(x, vals, width=width, label=label)
    if log:
        ax.set_yscale("log")
    _integer_layer_ticks(ax, n_layers, axis="x")
    ax.set_xlabel("layer")
    ax.set_ylabel(metric)
    ax.set_title(title)
    if arrays:
        ax.legend()
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def _integer_layer_ticks(ax: Axes, n_layers: int, axis: str) -> None:
    """Integer ticks for a layer axis (every layer when there are few)."""
    from matplotlib.ticker import MaxNLocator

    target = ax.xaxis if axis == "x" else ax.yaxis
    if 0 < n_layers <= 32:
        step = 1 if n_layers <= 16 else 2
        (ax.set_xticks if axis == "x" else ax.set_yticks)(range(0, n_layers, step))
    else:
        target.set_major_locator(MaxNLocator(integer=True))


def _heatmap_data(matrix: torch.Tensor | np.ndarray, max_columns: int) -> tuple[np.ndarray, int]:
    """``[layers, channels]`` as float64 numpy, columns max-pooled to at most ``max_columns``.

    Returns the (possibly pooled) array and the original channel count.
    """
    a = matrix.detach().to("cpu", torch.float64).numpy() if isinstance(matrix, torch.Tensor) else np.asarray(matrix)
    a = np.atleast_2d(a.astype(np.float64))
    if a.ndim != 2:
        raise ValueError(f"heatmap expects a [layers, channels] matrix, got shape {a.shape}")
    channels = a.shape[1]
    if channels > max_columns:
        binsize = math.ceil(channels / max_columns)
        pad = (-channels) % binsize
        a = np.pad(a, ((0, 0), (0, pad)), constant_values=-np.inf)
        a = a.reshape(a.shape[0], -1, binsize).max(axis=2)
    return a, channels


def _log_norm(*arrays: np.ndarray) -> Any:
    """A ``LogNorm`` spanning the positive finite values of all ``arrays`` (smaller values are drawn at ``vmin``)."""
    from matplotlib.colors import LogNorm

    allv = np.concatenate([a.ravel() for a in arrays])
    pos = allv[np.isfinite(allv) & (allv > 0)]
    vmin = float(pos.min()) if pos.size else _LOG_FLOOR_DEFAULT
    vmax = float(pos.max()) if pos.size else vmin
    if vmax <= vmin:
        vmax = vmin * 10
    return LogNorm(vmin=vmin, vmax=vmax, clip=True)


def _draw_heatmap(ax: Axes, data: np.ndarray, channels: int, norm: Any, title: str, xlabel: str) -> Any:
    """Draw one heatmap on ``ax`` in channel units; returns the image for a colorbar."""
    clipped = np.where(np.isfinite(data) & (data > 0), data, norm.vmin)
    layers = data.shape[0]
    image = ax.imshow(
        clipped,
        aspect="auto",
        interpolation="nearest",
        norm=norm,
        cmap="viridis",
        extent=(-0.5, channels - 0.5, layers - 0.5, -0.5),
    )
    _integer_layer_ticks(ax, layers, axis="y")
    pooled = data.shape[1] != channels
    ax.set_xlabel(f"{xlabel} (max over bins of {math.ceil(channels / data.shape[1])})" if pooled else xlabel)
    ax.set_ylabel("layer")
    ax.set_title(title)
    return image


def plot_channel_heatmap(matrix: torch.Tensor, path: Path, title: str, xlabel: str = "channel") -> None:
    """Heatmap of a ``[layers, channels]`` channel-absmax matrix: log colour scale, colorbar, y = layer."""
    data, channels = _heatmap_data(matrix, _MAX_HEATMAP_COLUMNS)
    norm = _log_norm(data)
    fig = _new_figure(12, max(3.0, min(10.0, 1.5 + 0.18 * data.shape[0])))
    ax = fig.add_subplot()
    image = _draw_heatmap(ax, data, channels, norm, title, xlabel)
    fig.colorbar(image, ax=ax, label="absmax")
    _save(fig, path)


def plot_heatmaps_side_by_side(before: torch.Tensor, after: torch.Tensor, path: Path, title: str) -> None:
    """Two ``[layers, channels]`` channel-absmax heatmaps ("before" and "after") sharing one log colour scale."""
    a, ca = _heatmap_data(before, _MAX_PAIR_COLUMNS)
    b, cb = _heatmap_data(after, _MAX_PAIR_COLUMNS)
    norm = _log_norm(a, b)
    fig = _new_figure(16, max(3.5, min(10.0, 2.0 + 0.18 * max(a.shape[0], b.shape[0]))))
    axes = fig.subplots(1, 2)
    _draw_heatmap(axes[0], a, ca, norm, "before", "channel")
    image = _draw_heatmap(axes[1], b, cb, norm, "after", "channel")
    fig.colorbar(image, ax=list(axes), label="absmax")
    fig.suptitle(title)
    _save(fig, path)
