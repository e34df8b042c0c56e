"""A Hugging Face checkpoint directory: ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` shards with
``model.safetensors.index.json``), ``config.json``, generation config and tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from qtool.artifacts import save_tensors, write_json
from qtool.errors import QtoolError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
CONFIG = "config.json"


def write_shards(out: Path, tensors: dict[str, torch.Tensor], max_bytes: int) -> list[int]:
    """Write the tensors in sorted key order, a new shard whenever ``max_bytes`` would be exceeded; returns the
    file sizes. Deterministic: the same tensors give byte-identical files."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    if len(shards) == 1:
        names = [SINGLE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map = {k: name for name, shard in zip(names, shards, strict=True) for k in shard}
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        write_json(out / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    for name, shard in zip(names, shards, strict=True):
        save_tensors(out / name, shard, metadata={"format": "pt"})
    return [(out / name).stat().st_size for name in names]


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (sharded or not). The index is untrusted input: a shard it names
    must be a plain file name inside ``path``."""
    index = path / INDEX
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [SINGLE]
    for name in files:
        if not isinstance(name, str) or Path(name).name != name or name in (".", "..") or "\\" in name:
            raise QtoolError(f"model: {index} names {name!r}, not a file of {path}; the checkpoint is malformed")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(path / name)))
    return state


def config_dict(config) -> dict[str, Any]:
    """A transformers config as ``config.json`` content, without the loader's run-time keys (the source path and
    the attention implementation chosen at load time)."""
    out = config.to_dict()
    for key in [k for k in out if k == "_name_or_path" or k.startswith("_attn_implementation")]:
        del out[key]
    return out
