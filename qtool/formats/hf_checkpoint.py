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


def config_dict(config, architecture: str, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """``config.json`` content for a model derived from a source checkpoint: what the source's own ``config.json``
    said (``source``; every key kept as it was written), updated where the model's config now differs (a transform
    that unties the embeddings, the stored dtype), plus what transformers writes for non-default settings
    (``to_diff_dict``: no id2label, return_dict and other defaults a full dump would invent). ``architectures``
    names the model class (``architecture``, e.g. ``LlamaForCausalLM``) where the source gave none — a GGUF source
    has no such field, and converters (llama.cpp's) and runtimes (vLLM) pick the model by it. Loader run-time keys
    (``_name_or_path``, ``_attn_implementation``, anything starting with ``_``) are dropped."""
    current = config.to_dict()
    out = dict(source or {})
    for key, value in config.to_diff_dict().items():
        out[key] = value
    for key in list(out):
        if key in current and out[key] != current[key] and not _same_json(out[key], current[key]):
            out[key] = current[key]
    for key in [k for k in out if k.startswith("_")]:
        del out[key]
    if "dtype" in out and "torch_dtype" in out:
        out["torch_dtype"] = out["dtype"]  # transformers 4's name for it: both say how the tensors are stored
    if not out.get("architectures"):
        out["architectures"] = [architecture]
    return out


def _same_json(a: Any, b: Any) -> bool:
    """Equal once written as JSON (tuples and lists, int and float keys of a parsed file, ...)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


# transformers' "no limit" sentinel for model_max_length (int(1e30)), written when a tokenizer came without one
_NO_MAX_LENGTH = int(1e29)


# transformers 5 names its tokenizers.json-backed class "TokenizersBackend", a name no 4.x release resolves (llama.cpp's
# converter pins transformers 4.57); "PreTrainedTokenizerFast" is the same class in 5 and its ancestor in 4
_PORTABLE_TOKENIZER_CLASS = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def save_tokenizer(tokenizer: Any, out: Path, context: int | None) -> None:
    """The tokenizer files (chat template included) as transformers writes them, with ``model_max_length`` the
    model's context where the tokenizer has none (a GGUF source: transformers would write its 1e30 sentinel) and a
    ``tokenizer_class`` that transformers 4 resolves too."""
    saved = tokenizer.model_max_length
    if context and (saved is None or saved > _NO_MAX_LENGTH):
        tokenizer.model_max_length = int(context)
    try:
        tokenizer.save_pretrained(out)
    finally:
        tokenizer.model_max_length = saved
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    if config.get("tokenizer_class") in _PORTABLE_TOKENIZER_CLASS:
        config["tokenizer_class"] = _PORTABLE_TOKENIZER_CLASS[config["tokenizer_class"]]
        write_json(path, config)
