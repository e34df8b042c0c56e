"""Stage 2: outlier statistics of every decoder layer's linear inputs (activations) and weights.

Method ``stats`` runs the first ``max_samples`` calibration windows through the model one decoder layer at a time
and measures, at the input of each edge (q/k/v, o_proj, gate/up, down_proj in a Llama: linears that read the same
tensor share one entry), absmax, per-channel absmax, excess kurtosis, max-to-median channel ratio (MMR) and QSUR
(``docs/metrics.md``); the same metrics for every weight; and the channels that are outliers in many layers
(``qtool.report.outliers``). Writes ``stats.json``, ``channel_absmax.safetensors`` (``qtool.formats.outliers``)
and PNG plots under ``plots/``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from qtool.context import StageConfig, StageContext
from qtool.report.outliers import collect_stats, write_report
from qtool.stages.base import Stage

# the stage's method table: method -> whether it measures
MEASURES = {"none": False, "stats": True}


class OutliersConfig(StageConfig):
    """``stats``: outlier metrics per layer (``none`` skips the stage)."""

    method: Literal["none", "stats"] = "none"
    max_samples: int = Field(16, gt=0, description="calibration windows to measure (the first N)")
    covariance_tokens: int = Field(
        4096, ge=0, description="tokens per input whose covariance enters QSUR (0: no activation QSUR)"
    )
    outlier_ratio: float = Field(20.0, gt=1.0, description="a channel is an outlier when absmax ≥ ratio × median")
    top: int = Field(10, gt=0, description="rows of the worst-layers table")

    @property
    def measures(self) -> bool:
        return MEASURES[self.method]


class Outliers(Stage):
    name = "outliers"
    sections = ("outliers",)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        cfg: OutliersConfig = ctx.config
        if not cfg.measures:
            ctx.log.info("outliers: method 'none', no statistics computed")
            return {"method": "none"}
        ids = ctx.calibration_windows()[: cfg.max_samples]
        report = collect_stats(ctx.model, ctx.spec, ids, cfg.covariance_tokens, ctx.progress)
        summary = write_report(ctx.out, report, ctx.spec, cfg.outlier_ratio, cfg.top)
        worst = summary["worst"][0]
        ctx.log.info(
            "outliers: worst input layer %d %s kurtosis %.1f", worst["layer"], worst["input"], worst["kurtosis"]
        )
        return {"method": "stats", **summary}
