"""The calibration windows file: ``inputs.safetensors`` with ``input_ids`` int64 ``[n_samples, seqlen]``."""

from __future__ import annotations

from pathlib import Path

import torch

from qtool.artifacts import load_tensors, save_tensors

INPUTS = "inputs.safetensors"


def write_windows(stage_dir: Path, windows: torch.Tensor) -> None:
    save_tensors(stage_dir / INPUTS, {"input_ids": windows})


def read_windows(stage_dir: Path) -> torch.Tensor:
    """The committed calibration windows ``[n_samples, seqlen]`` int64."""
    return load_tensors(stage_dir / INPUTS)["input_ids"]
