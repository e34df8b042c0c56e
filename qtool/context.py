"""What stages and methods run in: ``StageConfig`` (the base of every recipe section) and ``StageContext``
(everything a stage or a method handler may touch), with the progress callback type. Stages (``qtool.stages``) and
the method tables (``qtool.methods``) both import it; it imports neither."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict

from qtool.artifacts import ArtifactReader
from qtool.formats.calibration import read_windows

if TYPE_CHECKING:
    from qtool.arch import ArchSpec
    from qtool.loading import ModelSource

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
    recipe: Any  # qtool.recipe.Recipe (not imported: the recipe is built from the stages' configs)
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
