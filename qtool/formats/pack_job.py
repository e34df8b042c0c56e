"""What the pack stage hands a packed-format writer (``qtool.formats.PACKED_FORMATS``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qtool.arch import ArchSpec
from qtool.formats.layers import LayerCheckpoint
from qtool.schemes import Scheme


@dataclass
class PackJob:
    """``model``: as the earlier stages left it (transforms fused, online pieces attached, linears holding their
    dequantized weights); ``layer(i)``: the quantize stage's checkpoint of decoder layer ``i`` (the exact integers
    and scales to store); ``dtype``: of unquantized tensors and scales (``None``: the model's own);
    ``out``: the directory to write; ``source_config``: the source's ``config.json``, kept as written."""

    model: torch.nn.Module
    spec: ArchSpec
    tokenizer: Any
    scheme: Scheme
    layer: Callable[[int], LayerCheckpoint]
    out: Path
    dtype: torch.dtype | None
    max_shard_bytes: int
    source_config: dict[str, Any] | None = None  # the source's config.json as written (None: a GGUF source)
