"""Stage 5: write a packed checkpoint other tools load, in the format ``pack.format`` names
(``qtool.formats.registry.PACKED_FORMATS``; today compressed-tensors: safetensors + config.json + tokenizer).

Quantized linears come from the quantize stage's layer checkpoints (exact integers and scales, and the facts each
method recorded, never re-derived from float weights or the recipe); every other tensor (embeddings, norms,
lm_head) comes from the model as the earlier stages left it. Output is deterministic: an interrupted-and-resumed run
produces files bit-identical to an uninterrupted one.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from qtool.context import StageConfig, StageContext
from qtool.formats.layers import LAYERS, read_layer
from qtool.formats.pack_job import PackJob
from qtool.formats.registry import PACKED_FORMATS
from qtool.formats.run_dir import PACKED_MODEL
from qtool.loading import DTYPES, source_config_json
from qtool.stages.base import Stage


class PackConfig(StageConfig):
    format: Literal[tuple(PACKED_FORMATS)] = "compressed-tensors"  # type: ignore[valid-type]
    dtype: Literal["model", "float32", "bfloat16", "float16"] = Field(
        "model", description="dtype of unquantized tensors and scales; 'model' keeps the recipe's model.dtype"
    )
    max_shard_bytes: int = Field(5 * 2**30, gt=0, description="split safetensors into shards of at most this size")


class Pack(Stage):
    name = "pack"
    sections = ("pack",)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        cfg: PackConfig = ctx.config
        layers_dir = ctx.reader.path("quantize") / LAYERS
        job = PackJob(
            model=ctx.model,
            spec=ctx.spec,
            tokenizer=ctx.tokenizer,
            scheme=ctx.recipe.scheme,
            layer=lambda i: read_layer(layers_dir, i),
            out=ctx.out / PACKED_MODEL,
            dtype=None if cfg.dtype == "model" else DTYPES[cfg.dtype],
            max_shard_bytes=cfg.max_shard_bytes,
            source_config=source_config_json(ctx.source),
        )
        return PACKED_FORMATS[cfg.format].write(job)
