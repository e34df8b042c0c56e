"""The table of packed formats: ``pack.format`` takes its keys, the pack stage calls ``write``, and qtool's loader
(``qtool.loading``) asks each format whether it ``detect``s a checkpoint's config and then calls its
``load``. A new format is one module (or package) in ``qtool/formats/`` plus one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from qtool.formats.compressed_tensors import reader as ct_reader
from qtool.formats.compressed_tensors import writer as ct_writer
from qtool.formats.pack_job import PackJob


@dataclass(frozen=True)
class PackedFormat:
    """``write(job) -> summary`` (``bytes``, ``bf16_bytes``, ``tensors``, ``quantized_linear_bytes``,
    ``quantized_linear_bf16_bytes``); ``detect(config) -> bool``; ``load(path, dtype, trust_remote_code, kernels)
    -> model`` (eval mode, with what runs online attached; dense, or with ``kernels`` the linears an integer kernel of
    ``qtool.models.kernels`` can hold left packed)."""

    write: Callable[[PackJob], dict[str, Any]]
    detect: Callable[[Any], bool]
    load: Callable[[str, torch.dtype, bool, bool], torch.nn.Module]


PACKED_FORMATS: dict[str, PackedFormat] = {
    "compressed-tensors": PackedFormat(ct_writer.write_packed, ct_reader.detect, ct_reader.load_packed),
}


def format_of(config) -> PackedFormat | None:
    """The packed format whose checkpoint ``config`` describes, or ``None`` for a plain (unquantized) model."""
    return next((f for f in PACKED_FORMATS.values() if f.detect(config)), None)
