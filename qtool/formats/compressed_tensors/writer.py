"""The compressed-tensors checkpoint writer: the pack stage's ``compressed-tensors`` format.

Quantized linears are stored from the layer checkpoints' integers (``qtool.formats.layers``) in the layout of
``layout``; every other tensor comes from the model as the earlier stages left it; ``config.json`` gets the
``quantization_config`` (one config group per distinct weight arguments, facts and input quantizer) and, when
anything runs online, the ``qtool`` section (``qtool.formats.online``). Static per-tensor input scales are stored
per linear as ``input_scale`` (``layout``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import torch

from qtool.arch import decoder_layers, head_dim_of
from qtool.artifacts import write_json
from qtool.formats.compressed_tensors.layout import (
    OUTLIER_KEYS,
    OUTLIER_PREFIX,
    activation_args,
    compress_linear,
    format_for,
    quantization_config,
    reader_version,
)
from qtool.formats.hf_checkpoint import CONFIG, config_dict, save_tokenizer, write_shards
from qtool.formats.layers import LinearFacts
from qtool.formats.online import QTOOL_SECTION, write_online
from qtool.formats.online import VERSION as ONLINE_VERSION
from qtool.formats.pack_job import PackJob
from qtool.schemes import QuantArgs

log = logging.getLogger(__name__)


def write_packed(job: PackJob) -> dict[str, Any]:
    """Write the compressed-tensors checkpoint of ``job`` into ``job.out``; returns the pack summary (bytes, the
    bf16 baseline, tensor count, bytes of the quantized linears)."""
    dtype = job.dtype
    tensors, groups, linear_bytes, linear_params, outliers = _collect(job, dtype)
    sizes = write_shards(job.out, tensors, job.max_shard_bytes)
    config = config_dict(job.model.config, type(job.model).__name__, job.source_config)
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
    config["quantization_config"] = _config_for(groups, job)
    write_online(job.out, job.model, config)
    if outliers:
        section = config.setdefault(QTOOL_SECTION, {"version": ONLINE_VERSION})
        section["sparse_outliers"] = {"format": "csr", "keys": [OUTLIER_PREFIX + k for k in OUTLIER_KEYS],
                                      "linears": sorted(outliers)}  # fmt: skip
    write_json(job.out / CONFIG, config)
    if getattr(job.model, "generation_config", None) is not None:
        job.model.generation_config.save_pretrained(job.out)
    save_tokenizer(job.tokenizer, job.out, getattr(job.model.config, "max_position_embeddings", None))
    log.info("pack: %d tensors, %.1f MB in %s", len(tensors), sum(sizes) / 1e6, job.out)
    return {
        "bytes": sum(sizes),
        "bf16_bytes": _bf16_bytes(job.model),
        "tensors": len(tensors),
        "quantized_linear_bytes": linear_bytes,  # packed weights + scales + zero points
        "quantized_linear_bf16_bytes": 2 * linear_params,
        # stored bits per quantized weight: integers, scales, zero points and 16-bit outliers with their indices
        "effective_bits": round(8 * linear_bytes / max(linear_params, 1), 4),
        "outliers": sum(outliers.values()),
    }


@dataclasses.dataclass
class _Group:
    """Linears that share one config group: the same weight arguments, facts and input quantizer."""

    args: QuantArgs
    facts: LinearFacts
    names: list[str]
    inputs: QuantArgs | None = None


def _collect(job: PackJob, dtype: torch.dtype | None):
    """State dict with each quantized linear's weight replaced by its compressed tensors."""
    state = dict(job.model.state_dict())
    if getattr(job.model.config, "tie_word_embeddings", False):
        state.pop(f"{job.spec.lm_head}.weight", None)  # tied to the embedding; transformers re-ties on load
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    groups: dict[str, _Group] = {}
    outliers: dict[str, int] = {}
    linear_bytes = linear_params = 0
    for i, _ in enumerate(decoder_layers(job.model, job.spec)):
        ckpt = job.layer(i)
        for name, qw in ckpt.weights.items():
            full = f"{job.spec.layers}.{i}.{name}"
            del state[f"{full}.weight"]
            if dtype is not None:
                qw = dataclasses.replace(qw, scale=qw.scale.to(dtype))
            hook = getattr(job.model.get_submodule(full), "qtool_input", None)
            act = hook.quant if hook is not None else None
            for key, t in compress_linear(qw, format_for(qw.args, act)).items():
                state[f"{full}.{key}"] = t
                linear_bytes += t.numel() * t.element_size()
            if name in ckpt.inputs and ckpt.inputs[name][0].granularity == "tensor":
                p = ckpt.inputs[name][1]
                state[f"{full}.input_scale"] = p.scale.to(qw.scale.dtype).reshape(1)
                if p.zero_point is not None:
                    state[f"{full}.input_zero_point"] = p.zero_point.to(torch.int8).reshape(1)
            linear_params += qw.q.numel()
            if qw.outliers is not None:
                outliers[full] = qw.outliers.count
            facts = ckpt.facts[name]
            key = json.dumps([qw.args.model_dump(mode="json"), facts.actorder, activation_args(act)], sort_keys=True)
            groups.setdefault(key, _Group(qw.args, facts, [], act)).names.append(full)
    return state, list(groups.values()), linear_bytes, linear_params, outliers


def _config_for(groups: list[_Group], job: PackJob) -> dict[str, Any]:
    """The ``quantization_config``.

    With one config group the config reads as llm-compressor writes it: ``targets: [Linear]`` and every
    unquantized linear (lm_head included) in ``ignore``, which vLLM maps onto its fused qkv/gate-up modules. With
    several (e.g. g32 linears plus the per-channel fallback of a linear whose in_features 32 does not divide), one
    config group per set, each listing its modules by full name.
    """
    scheme = job.scheme
    extra: dict[str, Any] = dict(kv_cache=scheme.kv_cache, head_dim=head_dim_of(job.model.config))
    quantized = {name for g in groups for name in g.names}
    linears = [n for n, m in job.model.named_modules() if isinstance(m, torch.nn.Linear)]
    ignore = [n for n in linears if n not in quantized]
    # all groups share the bit width and whether inputs are quantized (input_overrides needs input_activations),
    # hence the format
    fmt = format_for(groups[0].args, groups[0].inputs)
    extra["version"] = reader_version([g.args.bits for g in groups], fmt)
    if len(groups) == 1:
        g = groups[0]
        return quantization_config(
            g.args, ["Linear"], ignore, fmt, actorder=g.facts.actorder, input_activations=g.inputs, **extra
        )
    merged: dict[str, Any] = {}
    for i, g in enumerate(groups):
        qc = quantization_config(
            g.args, g.names, ignore, fmt, actorder=g.facts.actorder, input_activations=g.inputs, **extra
        )
        merged = merged or {**qc, "config_groups": {}}
        merged["config_groups"][f"group_{i}"] = qc["config_groups"]["group_0"]
    return merged


def _bf16_bytes(model: torch.nn.Module) -> int:
    """Size of the same model stored in bfloat16 (tied weights once): the usual unquantized baseline."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * 2
    return total
