"""Stage 5: write a compressed-tensors checkpoint (safetensors + config.json + tokenizer) other tools load.

Quantized linears come from the quantize stage's layer checkpoints (exact integers and scales, never re-derived
from float weights); every other tensor (embeddings, norms, lm_head) comes from the model as the earlier stages left
it. Output is deterministic: tensors are written in sorted order, so an interrupted-and-resumed run produces files
bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from qtool.algorithms.packing import compress_linear, format_for, quantization_config
from qtool.artifacts import save_tensors, write_json
from qtool.models.arch import decoder_layers, head_dim_of
from qtool.models.loading import DTYPES
from qtool.models.online import describe
from qtool.stages.base import Stage, StageConfig, StageContext
from qtool.stages.quantize import LAYERS, load_layer

MODEL_DIR = "model"
# config.json section for what runs online in the model (rotations, dynamic quantizers) and the file holding any
# stored online rotation matrix; read back by qtool's loader (qtool/models/packed.py).
QTOOL_SECTION = "qtool"
ONLINE_TENSORS = "qtool_online.safetensors"


class PackConfig(StageConfig):
    format: Literal["compressed-tensors"] = "compressed-tensors"
    dtype: Literal["model", "float32", "bfloat16", "float16"] = Field(
        "model", description="dtype of unquantized tensors and scales; 'model' keeps the recipe's model.dtype"
    )
    max_shard_bytes: int = Field(5 * 2**30, gt=0, description="split safetensors into shards of at most this size")


class Pack(Stage):
    name = "pack"
    sections = ("pack",)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        cfg: PackConfig = ctx.config
        out = ctx.out / MODEL_DIR
        dtype = None if cfg.dtype == "model" else DTYPES[cfg.dtype]
        tensors, groups, linear_bytes, linear_params = self._collect(ctx, dtype)
        sizes = write_shards(out, tensors, cfg.max_shard_bytes)
        config = ctx.model.config.to_dict()
        for key in [k for k in config if k == "_name_or_path" or k.startswith("_attn_implementation")]:
            del config[key]
        if dtype is not None:
            config["dtype"] = cfg.dtype
        config["quantization_config"] = _quantization_config(groups, ctx)
        online, matrices = describe(ctx.model)
        if online["inputs"] or online["attention"]:
            config[QTOOL_SECTION] = {"version": 1, "online": online}
            if matrices:
                save_tensors(out / ONLINE_TENSORS, matrices, metadata={"format": "pt"})
        write_json(out / "config.json", config)
        if getattr(ctx.model, "generation_config", None) is not None:
            ctx.model.generation_config.save_pretrained(out)
        ctx.tokenizer.save_pretrained(out)
        ctx.log.info("pack: %d tensors, %.1f MB in %s", len(tensors), sum(sizes) / 1e6, out)
        return {
            "bytes": sum(sizes),
            "bf16_bytes": _bf16_bytes(ctx.model),
            "tensors": len(tensors),
            "quantized_linear_bytes": linear_bytes,  # packed weights + scales + zero points
            "quantized_linear_bf16_bytes": 2 * linear_params,
        }

    def _collect(self, ctx: StageContext, dtype: torch.dtype | None):
        """State dict with each quantized linear's weight replaced by its compressed tensors."""
        state = {k: v for k, v in ctx.model.state_dict().items()}
        if getattr(ctx.model.config, "tie_word_embeddings", False):
            state.pop(f"{ctx.spec.lm_head}.weight", None)  # tied to the embedding; transformers re-ties on load
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        groups: dict[str, tuple[Any, list[str]]] = {}
        linear_bytes = linear_params = 0
        ckpt_dir = ctx.reader.path("quantize") / LAYERS
        for i, _ in enumerate(decoder_layers(ctx.model, ctx.spec)):
            for name, qw in load_layer(ckpt_dir / f"{i:03d}.safetensors").items():
                full = f"{ctx.spec.layers}.{i}.{name}"
                del state[f"{full}.weight"]
                if dtype is not None:
                    qw = dataclasses.replace(qw, scale=qw.scale.to(dtype))
                for key, t in compress_linear(qw, format_for(qw.args, ctx.recipe.scheme.input_activations)).items():
                    state[f"{full}.{key}"] = t
                    linear_bytes += t.numel() * t.element_size()
                linear_params += qw.q.numel()
                key = json.dumps(qw.args.model_dump(mode="json"), sort_keys=True)
                groups.setdefault(key, (qw.args, []))[1].append(full)
        return state, list(groups.values()), linear_bytes, linear_params


def _quantization_config(groups: list[tuple[Any, list[str]]], ctx: StageContext) -> dict[str, Any]:
    """The compressed-tensors ``quantization_config``.

    With one set of weight arguments the config reads as llm-compressor writes it: ``targets: [Linear]`` and every
    unquantized linear (lm_head included) in ``ignore``, which vLLM maps onto its fused qkv/gate-up modules. With
    several (e.g. g32 linears plus the per-channel fallback of a linear whose in_features 32 does not divide), one
    config group per set, each listing its modules by full name.
    """
    actorder = ctx.recipe.quantize.method == "gptq" and ctx.recipe.quantize.act_order
    scheme = ctx.recipe.scheme
    extra = dict(
        actorder=actorder,
        input_activations=scheme.input_activations,
        kv_cache=scheme.kv_cache,
        head_dim=head_dim_of(ctx.model.config),
    )
    quantized = {name for _, names in groups for name in names}
    linears = [n for n, m in ctx.model.named_modules() if isinstance(m, torch.nn.Linear)]
    ignore = [n for n in linears if n not in quantized]
    if len(groups) == 1:
        args = groups[0][0]
        return quantization_config(args, ["Linear"], ignore, format_for(args, scheme.input_activations), **extra)
    merged: dict[str, Any] = {}
    for i, (args, names) in enumerate(groups):
        qc = quantization_config(args, names, ignore, format_for(args, scheme.input_activations), **extra)
        merged = merged or {**qc, "config_groups": {}}  # all groups share the bit width, hence the format
        merged["config_groups"][f"group_{i}"] = qc["config_groups"]["group_0"]
    return merged


def write_shards(out: Path, tensors: dict[str, torch.Tensor], max_bytes: int) -> list[int]:
    """Write ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` + index when over ``max_bytes``)."""
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
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map = {k: name for name, shard in zip(names, shards, strict=True) for k in shard}
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    for name, shard in zip(names, shards, strict=True):
        save_tensors(out / name, shard, metadata={"format": "pt"})
    return [(out / name).stat().st_size for name in names]


def _bf16_bytes(model: torch.nn.Module) -> int:
    """Size of the same model stored in bfloat16 (tied weights once): the usual unquantized baseline."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * 2
    return total
