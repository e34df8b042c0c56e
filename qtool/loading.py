"""Load a causal LM and its tokenizer from a local HF directory, a GGUF file, or a hub id.

``resolve_source`` turns what the user typed into a ``ModelSource`` without loading weights (cheap; used by
``qtool validate``); ``load_model`` loads it. ``model_identity`` fingerprints a source for the run directory.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from qtool.errors import QtoolError
from qtool.formats.run_dir import is_run_dir, packed_model_dir

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
_WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. ``kind`` is ``dir`` (local HF directory), ``gguf`` or ``hub``."""

    kind: str
    path: str  # directory, hub id, or the directory holding the GGUF file
    gguf_file: str | None = None
    tokenizer: str | None = None  # tokenizer dir/hub id; defaults to the model's own


def resolve_source(model: str, tokenizer: str | None = None) -> ModelSource:
    """Classify ``model``: a ``.gguf`` file, a directory holding config.json or exactly one .gguf, else a hub id."""
    p = Path(model).expanduser()
    if p.is_dir() and is_run_dir(p):  # a qtool run directory: its packed checkpoint
        packed = packed_model_dir(p)
        if not (packed / "config.json").is_file():
            raise QtoolError(f"model: run {model} has no packed model at {packed}; finish it with qtool quantize first")
        p = packed
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource("gguf", str(p.parent), p.name, tokenizer)
    if p.is_dir():
        if (p / "config.json").is_file():
            return ModelSource("dir", str(p), None, tokenizer)
        ggufs = sorted(q.name for q in p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", str(p), ggufs[0], tokenizer)
        raise QtoolError(
            f"model: directory {model} has no config.json and {len(ggufs)} .gguf files; "
            "point --model at an HF model directory or at one .gguf file"
        )
    if p.suffix == ".gguf" or model.startswith((".", "/", "~")) or os.sep in model.strip("/").split("/", 1)[-1]:
        raise QtoolError(f"model: {model} does not exist; pass an existing directory, .gguf file or hub id")
    return ModelSource("hub", model, None, tokenizer)


@functools.lru_cache(maxsize=8)
def load_config(src: ModelSource, trust_remote_code: bool = False):
    """The transformers config, without loading weights (cached: reading a GGUF header parses the whole file)."""
    from transformers import AutoConfig

    try:
        if src.kind == "gguf":
            return AutoConfig.from_pretrained(src.path, gguf_file=src.gguf_file)
        return AutoConfig.from_pretrained(src.path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise QtoolError(f"model: cannot read the config of {src.path}: {_first_line(e)}") from e
    except ValueError as e:
        raise QtoolError(f"model: {src.path}: {_first_line(e)}") from e


def load_model(src: ModelSource, dtype: str = "float32", trust_remote_code: bool = False):
    """Load ``(model, tokenizer)`` in eval mode on CPU, gradients off for all parameters."""
    from transformers import AutoModelForCausalLM

    from qtool.arch import spec_for

    spec_for(load_config(src, trust_remote_code))  # refuse unsupported architectures before loading weights
    kwargs = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if src.kind == "gguf":
        kwargs["gguf_file"] = src.gguf_file
    log.info("loading model %s (%s, %s)", src.path, src.kind, dtype)
    from qtool.formats.registry import format_of  # the formats' readers build models: imported on use

    try:
        packed = format_of(load_config(src, trust_remote_code))
        if packed is not None:
            model = packed.load(src.path, DTYPES[dtype], trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(src.path, **kwargs)
    except (OSError, ValueError) as e:
        raise QtoolError(f"model: cannot load {src.path}: {_first_line(e)}") from e
    model.eval()
    model.requires_grad_(False)
    return model, load_tokenizer(src, trust_remote_code)


def load_tokenizer(src: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    if src.tokenizer:
        return AutoTokenizer.from_pretrained(src.tokenizer, trust_remote_code=trust_remote_code)
    if src.kind == "gguf":
        return AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
    return AutoTokenizer.from_pretrained(src.path, trust_remote_code=trust_remote_code)


def model_identity(src: ModelSource, trust_remote_code: bool = False) -> str:
    """A stable fingerprint of the model: its config plus, per weight file, name, size and sha256 of its first and
    last MiB (hashing whole multi-GB checkpoints on every run would dominate small runs). Hub ids are
    fingerprinted by id and config, since their files are not local until loaded."""
    h = hashlib.sha256()
    config = load_config(src, trust_remote_code).to_dict()
    config.pop("transformers_version", None)
    config.pop("_name_or_path", None)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    if src.kind == "hub":
        h.update(src.path.encode())
    else:
        files = [Path(src.path) / src.gguf_file] if src.gguf_file else sorted(Path(src.path).iterdir())
        for f in files:
            if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES):
                h.update(f.name.encode())
                h.update(_edge_digest(f))
    return h.hexdigest()[:16]


def _edge_digest(path: Path, chunk: int = 1 << 20) -> bytes:
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(size - chunk, chunk))
            h.update(f.read(chunk))
    return h.digest()


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
