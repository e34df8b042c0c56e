"""Stage 2: outlier statistics of every decoder layer's linear inputs (activations) and weights.

Method ``stats`` runs the first ``max_samples`` calibration windows through the model one decoder layer at a time
and measures, at the input of each input group (q/k/v, o_proj, gate/up, down_proj: linears that read the same
tensor share one entry), absmax, per-channel absmax, excess kurtosis, max-to-median channel ratio (MMR) and QSUR
(``docs/metrics.md``); the same metrics for every weight; and the channels that are outliers in many layers.
Writes ``stats.json``, ``channel_absmax.safetensors`` and PNG plots under ``plots/``.

Inputs are measured as the quantizer sees them: after any online rotation already attached (the transform stage
re-runs ``collect_stats`` after its transform to show before/after).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import Field

from qtool.algorithms.outlier_metrics import ActivationStats, outlier_channels, weight_stats
from qtool.artifacts import save_tensors, write_json
from qtool.models.arch import ArchSpec, decoder_layers
from qtool.models.sequential import capture_layer_inputs, run_layer
from qtool.stages.base import Progress, Stage, StageConfig, StageContext, no_progress
from qtool.stages.calibrate import calibration_inputs

STATS = "stats.json"
CHANNELS = "channel_absmax.safetensors"
PLOTS = "plots"
SCHEMA = "qtool.outliers/1"
METRICS = ("kurtosis", "mmr", "absmax", "qsur")


class OutliersConfig(StageConfig):
    """``stats``: outlier metrics per layer (``none`` skips the stage)."""

    method: Literal["none", "stats"] = "none"
    max_samples: int = Field(16, gt=0, description="calibration windows to measure (the first N)")
    covariance_tokens: int = Field(
        4096, ge=0, description="tokens per input whose covariance enters QSUR (0: no activation QSUR)"
    )
    outlier_ratio: float = Field(20.0, gt=1.0, description="a channel is an outlier when absmax ≥ ratio × median")
    top: int = Field(10, gt=0, description="rows of the worst-layers table")


def input_kinds(spec: ArchSpec) -> dict[str, str]:
    """Input kind -> the linear whose input is measured (the first of its input group)."""
    return {"qkv": spec.q_proj, "o_proj": spec.o_proj, "gate_up": spec.gate_proj, "down_proj": spec.down_proj}


@dataclass
class OutlierReport:
    """Per layer ``{"layer", "inputs": {kind: metrics}, "weights": {linear: metrics}}`` plus channel absmax
    vectors keyed ``inputs.<kind>.<layer>`` / ``weights.<linear>.<layer>``."""

    layers: list[dict[str, Any]] = field(default_factory=list)
    channels: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: int = 0

    def series(self, kind: str, metric: str, source: str = "inputs") -> list[float]:
        return [row[source][kind][metric] or 0.0 for row in self.layers]

    def channel_matrix(self, kind: str, source: str = "inputs") -> torch.Tensor:
        return torch.stack([self.channels[f"{source}.{kind}.{i}"] for i in range(len(self.layers))])


@torch.no_grad()
def collect_stats(
    model: nn.Module,
    spec: ArchSpec,
    input_ids: torch.Tensor,
    covariance_tokens: int = 4096,
    progress: Progress = no_progress,
    task: str = "outlier stats",
) -> OutlierReport:
    """Run ``input_ids`` through ``model`` layer by layer and measure every layer's inputs and weights."""
    layers = decoder_layers(model, spec)
    inputs = capture_layer_inputs(model, layers, input_ids)
    report = OutlierReport(tokens=int(input_ids.numel()))
    for i, layer in enumerate(layers):
        accs = {kind: _Tap(layer.get_submodule(name), covariance_tokens) for kind, name in input_kinds(spec).items()}
        try:
            inputs = run_layer(layer, inputs)
        finally:
            for tap in accs.values():
                tap.remove()
        row: dict[str, Any] = {"layer": i, "inputs": {}, "weights": {}}
        for kind, tap in accs.items():
            row["inputs"][kind] = tap.finalize()
            report.channels[f"inputs.{kind}.{i}"] = tap.acc.channel_absmax
        for name in spec.layer_linears:
            metrics, chan = weight_stats(layer.get_submodule(name).weight.detach())  # QSUR only if out >= 2·in
            row["weights"][name] = metrics
            report.channels[f"weights.{name}.{i}"] = chan
        report.layers.append(row)
        progress(task, i + 1, len(layers))
    return report


class _Tap:
    """A forward pre-hook feeding one linear's input into ``ActivationStats``; the covariance (for QSUR) uses the
    first ``covariance_tokens`` tokens only (a d×d product per token is the expensive part)."""

    def __init__(self, linear: nn.Module, covariance_tokens: int):
        self.acc = ActivationStats(linear.in_features, covariance=False)
        self.cov = ActivationStats(linear.in_features, covariance=True) if covariance_tokens else None
        self.budget = covariance_tokens
        self.handle = linear.register_forward_pre_hook(self)

    def __call__(self, _module: nn.Module, args: tuple) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1])
        self.acc.add(x)
        if self.cov is not None and self.budget > 0:
            self.cov.add(x[: self.budget])
            self.budget -= min(self.budget, x.shape[0])

    def finalize(self) -> dict[str, Any]:
        out = self.acc.finalize()
        out["qsur"] = self.cov.finalize()["qsur"] if self.cov is not None else None
        return out

    def remove(self) -> None:
        self.handle.remove()


def worst_rows(report: OutlierReport, top: int) -> list[dict[str, Any]]:
    """The ``top`` (layer, input) entries with the highest kurtosis."""
    rows = [
        {"layer": row["layer"], "input": kind, **{m: metrics[m] for m in METRICS}}
        for row in report.layers
        for kind, metrics in row["inputs"].items()
    ]
    return sorted(rows, key=lambda r: -r["kurtosis"])[:top]


def write_report(out: Path, report: OutlierReport, cfg: OutliersConfig, spec: ArchSpec, prefix: str = "") -> dict:
    """``stats.json`` + ``channel_absmax.safetensors`` + plots under ``out``; returns the stage summary."""
    from qtool.report.plots import plot_channel_heatmap, plot_layer_metric

    kinds = list(input_kinds(spec))
    recurring = {
        kind: outlier_channels(
            [report.channels[f"inputs.{kind}.{i}"] for i in range(len(report.layers))], ratio=cfg.outlier_ratio
        )[:20]
        for kind in kinds
    }
    doc = {"schema": SCHEMA, "tokens": report.tokens, "layers": report.layers, "outlier_channels": recurring}
    write_json(out / f"{prefix}{STATS}", doc)
    save_tensors(out / f"{prefix}{CHANNELS}", {k: v.float().contiguous() for k, v in report.channels.items()})
    plots = out / PLOTS
    plots.mkdir(exist_ok=True)
    for metric in ("kurtosis", "mmr"):
        series = {kind: report.series(kind, metric) for kind in kinds}
        plot_layer_metric(series, metric, plots / f"{prefix}inputs-{metric}.png", f"{prefix}input {metric} per layer")
    for kind in ("qkv", "down_proj"):
        plot_channel_heatmap(
            report.channel_matrix(kind), plots / f"{prefix}{kind}-channel-absmax.png", f"{kind} input channel absmax"
        )
    return {"worst": worst_rows(report, cfg.top), "outlier_channels": recurring, "tokens": report.tokens}


def read_report(path: Path, prefix: str = "") -> OutlierReport:
    from qtool.artifacts import load_tensors

    doc = json.loads((path / f"{prefix}{STATS}").read_text())
    return OutlierReport(doc["layers"], load_tensors(path / f"{prefix}{CHANNELS}"), doc["tokens"])


class Outliers(Stage):
    name = "outliers"
    sections = ("outliers",)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        cfg: OutliersConfig = ctx.config
        if cfg.method == "none":
            ctx.log.info("outliers: method 'none', no statistics computed")
            return {"method": "none"}
        ids = calibration_inputs(ctx)[: cfg.max_samples]
        report = collect_stats(ctx.model, ctx.spec, ids, cfg.covariance_tokens, ctx.progress)
        summary = write_report(ctx.out, report, cfg, ctx.spec)
        worst = summary["worst"][0]
        ctx.log.info(
            "outliers: worst input layer %d %s kurtosis %.1f", worst["layer"], worst["input"], worst["kurtosis"]
        )
        return {"method": "stats", **summary}
