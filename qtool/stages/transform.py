"""Stage 3: equivalent transforms that make a model easier to quantize without changing what it computes.

The methods (``none``, ``hadamard``, ``smoothquant``, ``ostquant``) and their artifacts are the method table's
(``qtool.methods.transform``); this stage dispatches to it, and when the outliers stage measured the model, it
measures the transformed model again (``after-stats.json``) and compares (``before_after`` in the summary,
``plots/``).
"""

from __future__ import annotations

from typing import Any

from qtool.context import StageContext
from qtool.formats.outliers import load_report
from qtool.methods.transform import method_for
from qtool.report.outliers import collect_stats, compare_rows, plot_before_after, write_report
from qtool.stages.base import Stage


class Transform(Stage):
    name = "transform"
    sections = ("transform",)
    resumable = True  # OSTQuant's training checkpoint

    def sections_for(self, recipe) -> tuple[str, ...]:
        return (*self.sections, *method_for(recipe.transform).fingerprint_sections)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        method = method_for(ctx.config)
        summary = method.run(ctx, ctx.config)
        if method.changes_model and ctx.recipe.outliers.measures:
            summary["before_after"] = self._after_stats(ctx)
        return summary

    def apply(self, ctx: StageContext, manifest: dict[str, Any]) -> None:
        method_for(ctx.config).apply(ctx, ctx.config)

    def _after_stats(self, ctx: StageContext) -> list[dict[str, Any]]:
        """Outlier stats of the transformed model next to the outliers stage's, worst layers first."""
        ocfg = ctx.recipe.outliers
        ids = ctx.calibration_windows()[: ocfg.max_samples]
        after = collect_stats(ctx.model, ctx.spec, ids, ocfg.covariance_tokens, ctx.progress, "outlier stats after")
        write_report(ctx.out, after, ctx.spec, ocfg.outlier_ratio, ocfg.top, prefix="after-")
        before = load_report(ctx.reader.path("outliers"))
        plot_before_after(ctx.out, before, after, ctx.spec)
        return compare_rows(before.layers, after.layers, [e.name for e in ctx.spec.edges], ocfg.top)
