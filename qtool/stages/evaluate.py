"""Stage 6: evaluation of the quantized model (and the FP model for comparison), in the results format that
``qtool eval --json`` writes and ``qtool regress`` reads (``qtool/eval/results.py``).

The recipe's ``dataset`` is scored with the pinned token perplexity (``docs/metrics.md``) under the metric name
``name`` (default ``wikitext2`` for ``wiki.test.raw``); ``tasks`` adds lm-evaluation-harness tasks through the same
code as ``qtool eval``. Writes ``results.json`` (quantized) and ``results-fp.json`` (FP, cached across runs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from qtool import __version__
from qtool.artifacts import write_json
from qtool.context import StageConfig, StageContext
from qtool.data import check_span, file_sha256, load_text, tokenize
from qtool.eval.perplexity import default_seqlen, token_perplexity
from qtool.stages.base import Stage

log = logging.getLogger(__name__)

RESULTS = "results.json"
FP_RESULTS = "results-fp.json"


class EvaluateConfig(StageConfig):
    """Perplexity on held-out text (WikiText-2 test) plus optional lm-eval tasks. ``max_tokens`` is the token
    budget: the first ``max_tokens // seqlen`` windows are scored, and the budget is recorded with every number."""

    dataset: str = Field(description="evaluation text (e.g. wiki.test.raw); never the calibration file")
    name: str | None = Field(None, description="metric name of the perplexity; default wikitext2 or the file stem")
    format: Literal["auto", "wikitext", "raw", "jsonl"] = "auto"
    text_field: str = "text"
    seqlen: int | None = Field(None, gt=1, description="default: 2048, or the model's context if smaller")
    max_tokens: int | None = Field(None, gt=1, description="token budget; null scores the whole corpus")
    span: tuple[float, float] = Field((0.0, 1.0), description="fraction of the text's characters to score")
    compare_fp: bool = Field(True, description="also score the unquantized model (cached across runs)")
    tasks: tuple[str, ...] = Field((), description="lm-eval tasks as in `qtool eval --tasks` (piqa, arc_easy, …)")
    limit: int | None = Field(None, gt=0, description="lm-eval tasks: score the first N documents")
    batch_size: int = Field(8, gt=0, description="lm-eval tasks: batch size")
    data_dir: str | None = Field(None, description="lm-eval task data; default as `qtool eval --data-dir`")

    @field_validator("span")
    @classmethod
    def _span(cls, v: tuple[float, float]) -> tuple[float, float]:
        return check_span(v)

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from qtool.eval.tasks import TASKS

        unknown = [t for t in v if t not in TASKS or TASKS[t].kind != "lm_eval"]
        if unknown:
            known = ", ".join(t for t, s in TASKS.items() if s.kind == "lm_eval")
            raise ValueError(f"unknown lm-eval task {unknown[0]!r}; use {known}")
        return v

    def metric_name(self) -> str:
        if self.name:
            return self.name
        stem = Path(self.dataset).name
        return "wikitext2" if stem == "wiki.test.raw" else stem.split(".")[0]


class Evaluate(Stage):
    name = "evaluate"
    sections = ("evaluate",)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        cfg: EvaluateConfig | None = ctx.config
        if cfg is None:
            ctx.log.info("evaluate: no evaluate section in the recipe; nothing scored")
            return {"skipped": True}
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
        quant = self._score(ctx, ctx.model, ids, seqlen, info, "quantized")
        write_json(ctx.out / RESULTS, quant)
        ppl = quant["metrics"][cfg.metric_name()]["token_ppl"]
        summary = {"ppl": ppl["value"], "seqlen": seqlen, "tokens": ppl["n"], "metrics": quant["metrics"]}
        if cfg.compare_fp:
            fp = self._fp(ctx, ids, seqlen, info)
            write_json(ctx.out / FP_RESULTS, fp)
            summary["fp_ppl"] = fp["metrics"][cfg.metric_name()]["token_ppl"]["value"]
            summary["fp_metrics"] = fp["metrics"]
        return summary

    def _score(self, ctx: StageContext, model, ids, seqlen: int, info: dict[str, Any], label: str) -> dict:
        """Results document for ``model``: the recipe's perplexity plus the lm-eval tasks."""
        from qtool.eval.results import SCHEMA, evaluate, perplexity_entry, versions

        cfg: EvaluateConfig = ctx.config
        task = f"evaluate {label}"
        ppl = token_perplexity(model, ids, seqlen, cfg.max_tokens, lambda d, t: ctx.progress(task, d, t))
        metric, extra = perplexity_entry(ppl, cfg.max_tokens)
        name = cfg.metric_name()
        doc = {
            "schema": SCHEMA,
            "versions": versions(),
            "model": {
                "source": ctx.recipe.model.source,
                "model_identity": ctx.shared["model_identity"],
                "recipe": ctx.recipe.name,
                "variant": label,
            },
            "settings": {"seqlen": seqlen, "max_tokens": cfg.max_tokens, "limit": cfg.limit},
            "tasks": {name: {**info, **extra}},
            "metrics": {name: metric},
        }
        if cfg.tasks:
            lm = evaluate(
                model,
                ctx.tokenizer,
                list(cfg.tasks),
                task_data_dir(cfg),
                cfg.limit,
                cfg.batch_size,
                progress=ctx.progress,
            )
            doc["tasks"].update(lm["tasks"])
            doc["metrics"].update(lm["metrics"])
        return doc

    def _fp(self, ctx: StageContext, ids, seqlen: int, info: dict[str, Any]) -> dict:
        """FP results, cached by (model identity, dtype, data hash, evaluate config, qtool version)."""
        cfg: EvaluateConfig = ctx.config
        key = json.dumps(
            [ctx.shared["model_identity"], ctx.recipe.model.dtype, info, cfg.model_dump(mode="json"), __version__],
            sort_keys=True,
        )
        path = cache_dir() / "fp-results" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
        cached = _read_cached(path, key)
        if cached is not None:
            ctx.log.info("evaluate: FP results from cache %s", path)
            return cached
        ref = ctx.reference_model()
        doc = self._score(ctx, ref, ids, seqlen, info, "fp")
        del ref
        write_json(path, {"key": key, "sha256": _digest(key, doc), "results": doc})
        return doc


def _digest(key: str, doc: dict) -> str:
    return hashlib.sha256((key + json.dumps(doc, sort_keys=True)).encode()).hexdigest()


def _read_cached(path: Path, key: str) -> dict | None:
    """A cache entry whose key and checksum hold, else ``None`` (absent, from an older qtool, corrupt or edited:
    the FP model is scored again and the entry rewritten)."""
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text())
        if entry["key"] == key and entry["sha256"] == _digest(key, entry["results"]):
            return entry["results"]
    except (ValueError, KeyError, TypeError):
        pass
    log.warning("evaluate: FP cache entry %s is damaged or edited; scoring the FP model again", path)
    return None


def task_data_dir(cfg: EvaluateConfig) -> Path:
    """Where ``evaluate.tasks`` read their data (checked by ``qtool validate`` before anything runs)."""
    from qtool.errors import QtoolError
    from qtool.eval.tasks import default_data_dir

    found = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
    if found is None:
        raise QtoolError("evaluate.data_dir: no task data found; set evaluate.data_dir or QTOOL_DATA_DIR")
    return found


def cache_dir() -> Path:
    """``$QTOOL_CACHE_DIR``, else ``$XDG_CACHE_HOME/qtool``, else ``~/.cache/qtool``."""
    if os.environ.get("QTOOL_CACHE_DIR"):
        return Path(os.environ["QTOOL_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qtool"
