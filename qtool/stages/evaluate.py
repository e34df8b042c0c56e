"""Stage 6: evaluation — the pinned token perplexity of the quantized model, and of the FP model for comparison."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from qtool import __version__
from qtool.artifacts import write_json
from qtool.data import check_span, file_sha256, load_text, tokenize
from qtool.eval.perplexity import default_seqlen, token_perplexity
from qtool.stages.base import Stage, StageConfig, StageContext

METRICS = "metrics.json"


class EvaluateConfig(StageConfig):
    """Perplexity on held-out text (WikiText-2 test). ``max_tokens`` is the token budget: the first
    ``max_tokens // seqlen`` windows are scored, and the budget is recorded with every number."""

    dataset: str = Field(description="evaluation text (e.g. wiki.test.raw); never the calibration file")
    format: Literal["auto", "wikitext", "raw", "jsonl"] = "auto"
    text_field: str = "text"
    seqlen: int | None = Field(None, gt=1, description="default: 2048, or the model's context if smaller")
    max_tokens: int | None = Field(None, gt=1, description="token budget; null scores the whole corpus")
    span: tuple[float, float] = Field((0.0, 1.0), description="fraction of the text's characters to score")
    compare_fp: bool = Field(True, description="also score the unquantized model (cached across runs)")

    @field_validator("span")
    @classmethod
    def _span(cls, v: tuple[float, float]) -> tuple[float, float]:
        return check_span(v)


class Evaluate(Stage):
    name = "evaluate"
    sections = ("evaluate",)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        cfg: EvaluateConfig = ctx.config
        text = load_text(cfg.dataset, cfg.format, cfg.text_field, "evaluate.dataset", cfg.span)
        ids = tokenize(ctx.tokenizer, text)
        seqlen = default_seqlen(ctx.model, cfg.seqlen)
        info = {
            "dataset": str(cfg.dataset),
            "dataset_sha256": file_sha256(cfg.dataset),
            "seqlen": seqlen,
            "max_tokens": cfg.max_tokens,
            "span": list(cfg.span),
        }
        ctx.progress("evaluate quantized", 0, 1)
        quant = token_perplexity(ctx.model, ids, seqlen, cfg.max_tokens, _bar(ctx, "evaluate quantized"))
        metrics: dict[str, Any] = {**info, "quantized": {"wikitext2_ppl": quant.to_dict()}}
        if cfg.compare_fp:
            metrics["fp"] = {"wikitext2_ppl": self._fp(ctx, ids, seqlen, info)}
        write_json(ctx.out / METRICS, metrics)
        summary = {"ppl": quant.ppl, "seqlen": seqlen, "tokens": quant.predicted_tokens}
        if cfg.compare_fp:
            summary["fp_ppl"] = metrics["fp"]["wikitext2_ppl"]["ppl"]
        return summary

    def _fp(self, ctx: StageContext, ids, seqlen: int, info: dict[str, Any]) -> dict[str, Any]:
        """FP perplexity, cached by (model identity, dtype, data hash, seqlen, budget, qtool version)."""
        key = json.dumps([ctx.shared["model_identity"], ctx.recipe.model.dtype, info, __version__], sort_keys=True)
        path = cache_dir() / "fp-perplexity" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
        if path.is_file():
            ctx.log.info("evaluate: FP perplexity from cache %s", path)
            return json.loads(path.read_text())
        ctx.progress("evaluate FP", 0, 1)
        ref = ctx.reference_model()
        result = token_perplexity(ref, ids, seqlen, ctx.config.max_tokens, _bar(ctx, "evaluate FP")).to_dict()
        del ref
        write_json(path, result)
        return result


def cache_dir() -> Path:
    """``$QTOOL_CACHE_DIR``, else ``$XDG_CACHE_HOME/qtool``, else ``~/.cache/qtool``."""
    if os.environ.get("QTOOL_CACHE_DIR"):
        return Path(os.environ["QTOOL_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qtool"


def _bar(ctx: StageContext, task: str):
    return lambda done, total: ctx.progress(task, done, total)
