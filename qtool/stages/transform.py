"""Stage 3: equivalent transforms (rotations, smoothing). Only ``none`` exists in this release: skipped explicitly."""

from __future__ import annotations

from typing import Any, Literal

from qtool.stages.base import Stage, StageConfig, StageContext


class TransformConfig(StageConfig):
    method: Literal["none"] = "none"


class Transform(Stage):
    name = "transform"
    sections = ("transform",)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        ctx.log.info("transform: method 'none', weights left as loaded")
        return {"method": "none"}
