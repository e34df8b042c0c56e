"""Outlier statistics of a model: measured layer by layer (``collect_stats``), written as the report of
``qtool.formats.outliers`` with PNG plots (``write_report``), and compared before/after a transform
(``compare_rows``). The outliers stage and the transform stage (before/after) both use it; ``qtool inspect`` shows it.

Inputs are measured per edge (``ArchSpec.edges``: q/k/v, o_proj, gate/up, down_proj in a Llama) as the quantizer
sees them: after any online rotation already attached. Weights are measured per linear.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from qtool.algorithms.outlier_metrics import outlier_channels, weight_stats
from qtool.arch import ArchSpec
from qtool.formats.outliers import OutlierReport, save_report
from qtool.models.observers import InputStatsObserver
from qtool.models.walker import LayerWalker

PLOTS = "plots"
METRICS = ("kurtosis", "mmr", "absmax", "qsur")


@torch.no_grad()
def collect_stats(
    model: nn.Module,
    spec: ArchSpec,
    input_ids: torch.Tensor,
    covariance_tokens: int = 4096,
    progress=None,
    task: str = "outlier stats",
) -> OutlierReport:
    """Run ``input_ids`` through ``model`` layer by layer and measure every layer's inputs and weights."""
    report = OutlierReport(tokens=int(input_ids.numel()))
    for step in LayerWalker(model, spec, input_ids, progress=progress, task=task):
        observer = InputStatsObserver(spec, covariance_tokens)
        step.run(observer, keep=True)  # measuring changes nothing: these outputs feed the next layer
        i = step.index
        row: dict[str, Any] = {"layer": i, "inputs": {}, "weights": {}}
        for edge in spec.edges:
            row["inputs"][edge.name] = observer.finalize(edge.name)
            report.channels[f"inputs.{edge.name}.{i}"] = observer.channel_absmax(edge.name)
        for name in spec.layer_linears:
            metrics, chan = weight_stats(step.layer.get_submodule(name).weight.detach())  # QSUR only if out >= 2·in
            row["weights"][name] = metrics
            report.channels[f"weights.{name}.{i}"] = chan
        report.layers.append(row)
    return report


def worst_rows(report: OutlierReport, top: int) -> list[dict[str, Any]]:
    """The ``top`` (layer, input) entries with the highest kurtosis."""
    rows = [
        {"layer": row["layer"], "input": kind, **{m: metrics[m] for m in METRICS}}
        for row in report.layers
        for kind, metrics in row["inputs"].items()
    ]
    return sorted(rows, key=lambda r: -r["kurtosis"])[:top]


def write_report(
    out: Path, report: OutlierReport, spec: ArchSpec, outlier_ratio: float, top: int, prefix: str = ""
) -> dict:
    """The report files and plots under ``out``; returns the stage summary (worst rows, recurring channels)."""
    from qtool.report.plots import plot_channel_heatmap, plot_layer_metric

    kinds = [edge.name for edge in spec.edges]
    recurring = {
        kind: outlier_channels(
            [report.channels[f"inputs.{kind}.{i}"] for i in range(len(report.layers))], ratio=outlier_ratio
        )[:20]
        for kind in kinds
    }
    save_report(out, report, recurring, prefix)
    plots = out / PLOTS
    plots.mkdir(exist_ok=True)
    for metric in ("kurtosis", "mmr"):
        series = {kind: report.series(kind, metric) for kind in kinds}
        plot_layer_metric(series, metric, plots / f"{prefix}inputs-{metric}.png", f"{prefix}input {metric} per layer")
    for kind in _heatmap_kinds(spec):
        plot_channel_heatmap(
            report.channel_matrix(kind), plots / f"{prefix}{kind}-channel-absmax.png", f"{kind} input channel absmax"
        )
    return {"worst": worst_rows(report, top), "outlier_channels": recurring, "tokens": report.tokens}


def _heatmap_kinds(spec: ArchSpec) -> list[str]:
    """Edges drawn as channel heatmaps: the residual stream's first reader (norm edge) and the MLP's gated input,
    where the massive outliers live."""
    return [spec.edges_of("norm")[0].name, *(e.name for e in spec.edges_of("gated"))]


def plot_before_after(out: Path, before: OutlierReport, after: OutlierReport, spec: ArchSpec) -> None:
    from qtool.report.plots import plot_heatmaps_side_by_side, plot_layer_metric

    plots = out / PLOTS
    for kind in _heatmap_kinds(spec):
        for metric in ("kurtosis", "mmr"):
            series = {"before": before.series(kind, metric), "after": after.series(kind, metric)}
            plot_layer_metric(series, metric, plots / f"before-after-{kind}-{metric}.png", f"{kind} input {metric}")
        plot_heatmaps_side_by_side(
            before.channel_matrix(kind),
            after.channel_matrix(kind),
            plots / f"before-after-{kind}-channel-absmax.png",
            f"{kind} input channel absmax",
        )


def compare_rows(before: list[dict], after: list[dict], kinds: list[str], top: int) -> list[dict[str, Any]]:
    """``top`` (layer, input) pairs with the highest kurtosis before, each with its metrics before and after."""
    rows = []
    for b, a in zip(before, after, strict=True):
        for kind in kinds:
            row: dict[str, Any] = {"layer": b["layer"], "input": kind}
            for m in METRICS:
                row[m] = [b["inputs"][kind][m], a["inputs"][kind][m]]
            rows.append(row)
    return sorted(rows, key=lambda r: -r["kurtosis"][0])[:top]
