"""The pack stage's table of packed-format writers: ``pack.format`` takes its keys.

A writer takes a ``qtool.formats.pack_job.PackJob`` and returns the pack summary (``bytes``, ``bf16_bytes``,
``tensors``, ``quantized_linear_bytes``, ``quantized_linear_bf16_bytes``). A new format is one module in
``qtool/formats/`` plus one line here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qtool.formats import compressed_tensors
from qtool.formats.pack_job import PackJob

PACKED_FORMATS: dict[str, Callable[[PackJob], dict[str, Any]]] = {
    "compressed-tensors": compressed_tensors.write_packed,
}
