"""Stage 2: outlier statistics. Only ``none`` exists in this release: the stage is skipped explicitly."""

from __future__ import annotations

from typing import Any, Literal

from qtool.stages.base import Stage, StageConfig, StageContext


class OutliersConfig(StageConfig):
    method: Literal["none"] = "none"


class Outliers(Stage):
    name = "outliers"
    sections = ("outliers",)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        ctx.log.info("outliers: method 'none', no statistics computed")
        return {"method": "none"}
