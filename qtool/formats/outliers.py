"""The outlier-statistics report: ``stats.json`` (schema ``qtool.outliers/1``) and ``channel_absmax.safetensors``.

``stats.json``: ``{"schema", "tokens", "layers": [{"layer", "inputs": {edge: metrics}, "weights": {linear:
metrics}}], "outlier_channels": {edge: [...]}}``; the tensors file holds each per-channel absmax vector, keyed
``inputs.<edge>.<layer>`` and ``weights.<linear>.<layer>``. The transform stage writes the same pair with the prefix
``after-`` for the transformed model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qtool.artifacts import load_tensors, save_tensors, write_json

STATS = "stats.json"
CHANNELS = "channel_absmax.safetensors"
SCHEMA = "qtool.outliers/1"


@dataclass
class OutlierReport:
    """Per layer ``{"layer", "inputs": {edge: metrics}, "weights": {linear: metrics}}`` plus channel absmax
    vectors keyed ``inputs.<edge>.<layer>`` / ``weights.<linear>.<layer>``."""

    layers: list[dict[str, Any]] = field(default_factory=list)
    channels: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: int = 0

    def series(self, kind: str, metric: str, source: str = "inputs") -> list[float]:
        return [row[source][kind][metric] or 0.0 for row in self.layers]

    def channel_matrix(self, kind: str, source: str = "inputs") -> torch.Tensor:
        return torch.stack([self.channels[f"{source}.{kind}.{i}"] for i in range(len(self.layers))])


def save_report(out: Path, report: OutlierReport, recurring: dict[str, list], prefix: str = "") -> None:
    doc = {"schema": SCHEMA, "tokens": report.tokens, "layers": report.layers, "outlier_channels": recurring}
    write_json(out / f"{prefix}{STATS}", doc)
    save_tensors(out / f"{prefix}{CHANNELS}", {k: v.float().contiguous() for k, v in report.channels.items()})


def load_report(path: Path, prefix: str = "") -> OutlierReport:
    doc = json.loads((path / f"{prefix}{STATS}").read_text())
    return OutlierReport(doc["layers"], load_tensors(path / f"{prefix}{CHANNELS}"), doc["tokens"])
