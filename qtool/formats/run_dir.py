"""The run directory's layout, which the pipeline writes and loaders, ``qtool status`` and ``qtool eval`` read.

```
runs/<name>/
  recipe.yaml   run.json
  01-calibrate/ 02-outliers/ 03-transform/ 04-quantize/ 05-pack/ 06-evaluate/   (NN-<stage>.tmp/ while running)
  05-pack/model/                                                               the packed checkpoint
```
"""

from __future__ import annotations

from pathlib import Path

# The pipeline's stages in order; ``qtool.pipeline`` checks that its stage table matches.
STAGE_ORDER = ("calibrate", "outliers", "transform", "quantize", "pack", "evaluate")
STAGE_DIRS = {name: f"{i + 1:02d}-{name}" for i, name in enumerate(STAGE_ORDER)}
RUN_JSON = "run.json"
RECIPE = "recipe.yaml"
PACKED_MODEL = "model"  # inside the pack stage's directory


def is_run_dir(path: Path) -> bool:
    return (path / RUN_JSON).is_file()


def stage_dir(run_dir: Path, stage: str) -> Path:
    return run_dir / STAGE_DIRS[stage]


def partial_dir(run_dir: Path, stage: str) -> Path:
    """Where a stage writes before it commits (``NN-name.tmp``)."""
    return run_dir / f"{STAGE_DIRS[stage]}.tmp"


def packed_model_dir(run_dir: Path) -> Path:
    return stage_dir(run_dir, "pack") / PACKED_MODEL
