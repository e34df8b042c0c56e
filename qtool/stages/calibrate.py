"""Stage 1: calibration windows — ``n_samples × seqlen`` token ids drawn from local text with a seeded generator."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from qtool.context import StageConfig, StageContext
from qtool.data import check_span, file_sha256, load_text, sample_windows, tokenize
from qtool.formats.calibration import write_windows
from qtool.stages.base import Stage


class CalibrationConfig(StageConfig):
    """Calibration text. Relative paths resolve against the current directory. Never calibrate on test text."""

    dataset: str = Field(description="text file (raw, wikitext) or jsonl(.gz) with a text field")
    format: Literal["auto", "wikitext", "raw", "jsonl"] = "auto"
    text_field: str = "text"
    n_samples: int = Field(128, gt=0, description="number of windows")
    seqlen: int = Field(2048, gt=1, description="tokens per window")
    seed: int = 0
    span: tuple[float, float] = Field(
        (0.0, 1.0), description="fraction of the text's characters to use, e.g. [0, 0.5]: the first half"
    )

    @field_validator("span")
    @classmethod
    def _span(cls, v: tuple[float, float]) -> tuple[float, float]:
        return check_span(v)


class Calibrate(Stage):
    name = "calibrate"
    sections = ("calibration",)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        cfg: CalibrationConfig = ctx.config
        ids = tokenize(
            ctx.tokenizer, load_text(cfg.dataset, cfg.format, cfg.text_field, "calibration.dataset", cfg.span)
        )
        gen = torch.Generator().manual_seed(cfg.seed)
        windows = sample_windows(ids, cfg.n_samples, cfg.seqlen, gen)
        write_windows(ctx.out, windows)
        ctx.log.info("calibration: %d windows of %d tokens from %s", cfg.n_samples, cfg.seqlen, cfg.dataset)
        return {"dataset_sha256": file_sha256(cfg.dataset), "corpus_tokens": ids.numel(), "tokens": windows.numel()}
