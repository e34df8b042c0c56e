"""The stage interface: what every pipeline stage is, and the context it runs in."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from qtool.artifacts import ArtifactReader
from qtool.formats.calibration import read_windows

if TYPE_CHECKING:
    from qtool.models.arch import ArchSpec
    from qtool.models.loading import ModelSource
    from qtool.recipe import Recipe

# progress(task, done, total): the CLI renders it as a Rich progress bar; library code only calls it.
Progress = Callable[[str, int, int], None]


def no_progress(task: str, done: int, total: int) -> None:
    return None


class StageConfig(BaseModel):
    """Base of every recipe section: frozen, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass
class StageContext:
    """Everything a stage may touch. No globals: the pipeline builds one per stage.

    ``out`` is the stage's uncommitted directory (``NN-name.tmp``) in ``run``, ``None`` in ``apply``.
    ``reference_model`` loads a fresh, untouched copy of the model (for full-precision comparisons).
    """

    config: Any
    recipe: Recipe
    model: torch.nn.Module
    tokenizer: Any
    spec: ArchSpec
    source: ModelSource
    reader: ArtifactReader
    out: Path | None
    generator: torch.Generator
    log: logging.Logger
    progress: Progress = no_progress
    reference_model: Callable[[], torch.nn.Module] | None = None
    shared: dict[str, Any] = field(default_factory=dict)

    def calibration_windows(self) -> torch.Tensor:
        """The calibrate stage's committed windows ``[n_samples, seqlen]`` int64."""
        return read_windows(self.reader.path("calibrate"))


class Stage:
    """A pipeline stage.

    - ``run(ctx)`` does the expensive work, writes its files under ``ctx.out`` and returns a JSON-able summary that
      goes into the manifest. It also leaves ``ctx.model`` in the state ``apply`` would produce.
    - ``apply(ctx, manifest)`` replays the stage's effect onto a freshly loaded model from its committed artifacts
      (cheap); this is what makes resume cheap.
    - ``sections`` are the recipe sections that enter the stage's fingerprint (``sections_for`` may add more for
      some methods).
    - ``partial_progress(dir)`` describes checkpoints an interrupted run left (the pipeline asks; it never reads a
      stage's folder itself).
    """

    name: ClassVar[str]
    sections: ClassVar[tuple[str, ...]]

    def sections_for(self, recipe: Recipe) -> tuple[str, ...]:
        return self.sections

    def run(self, ctx: StageContext) -> dict[str, Any]:
        raise NotImplementedError

    def apply(self, ctx: StageContext, manifest: dict[str, Any]) -> None:
        return None

    def partial_progress(self, partial_dir: Path) -> str | None:
        """What an interrupted run left in ``partial_dir`` (``NN-name.tmp``) that a rerun reuses, in words
        (``qtool status``); ``None``: nothing reusable to report."""
        return None
