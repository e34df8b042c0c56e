"""The run directory's layout, which the pipeline writes and loaders, ``qtool status`` and ``qtool eval`` read.

```
runs/<name>/
  recipe.yaml   run.json
  01-calibrate/ 02-outliers/ 03-transform/ 04-quantize/ 05-pack/ 06-evaluate/   (NN-<stage>.tmp/ while running)
  05-pack/model/                                                               the packed checkpoint
```
"""

from __future__ import annotations

import os
from pathlib import Path

# The pipeline's stages in order; ``qtool.pipeline`` checks that its stage table matches.
STAGE_ORDER = ("calibrate", "outliers", "transform", "quantize", "pack", "evaluate")
STAGE_DIRS = {name: f"{i + 1:02d}-{name}" for i, name in enumerate(STAGE_ORDER)}
RUN_JSON = "run.json"
RECIPE = "recipe.yaml"
PACKED_MODEL = "model"  # inside the pack stage's directory


def is_run_dir(path: Path) -> bool:
    return (path / RUN_JSON).is_file()


def refusal(path: Path) -> str | None:
    """Why ``path`` may not be used as a run directory, or ``None``: qtool writes and deletes stage directories in
    a run directory, so it never takes a filesystem root or the home directory, nor an existing directory with
    other content that is not a qtool run (``run.json``)."""
    resolved = path.expanduser().resolve()
    if resolved == Path(resolved.anchor) or resolved == Path.home().resolve():
        return f"{path} is {'the filesystem root' if resolved == Path(resolved.anchor) else 'your home directory'}"
    if resolved.exists() and not resolved.is_dir():
        return f"{path} exists and is not a directory"
    if resolved.is_dir() and not is_run_dir(resolved) and any(resolved.iterdir()):
        return f"{path} exists, is not empty and is not a qtool run directory (no {RUN_JSON})"
    ancestor = next(p for p in (resolved, *resolved.parents) if p.exists())
    if not ancestor.is_dir():
        return f"{path} cannot be created: {ancestor} is a file"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{path} cannot be written: {ancestor} is not writable"
    return None


def stage_dir(run_dir: Path, stage: str) -> Path:
    return run_dir / STAGE_DIRS[stage]


def partial_dir(run_dir: Path, stage: str) -> Path:
    """Where a stage writes before it commits (``NN-name.tmp``)."""
    return run_dir / f"{STAGE_DIRS[stage]}.tmp"


def packed_model_dir(run_dir: Path) -> Path:
    return stage_dir(run_dir, "pack") / PACKED_MODEL
