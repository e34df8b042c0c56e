"""Load a causal LM and its tokenizer from a local HF directory, a GGUF file, or a hub id.

``resolve_source`` turns what the user typed into a ``ModelSource`` without loading weights (cheap; used by
``qtool validate``); ``load_model`` loads it. ``model_identity`` fingerprints a source for the run directory.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    if tokenizer is not None and _looks_local(tokenizer) and not Path(tokenizer).expanduser().exists():
        raise QtoolError(f"model.tokenizer: {tokenizer} does not exist; pass a tokenizer directory or a hub id")
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
    if p.suffix == ".gguf" or _looks_local(model):
        raise QtoolError(f"model: {model} does not exist; pass an existing directory, .gguf file or hub id")
    return ModelSource("hub", model, None, tokenizer)


def _looks_local(name: str) -> bool:
    """A path rather than a hub id (``org/name``): starts with ``.``, ``/`` or ``~``, or has more than one ``/``."""
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1]


@functools.lru_cache(maxsize=8)
def load_config(src: ModelSource, trust_remote_code: bool = False):
    """The transformers config, without loading weights (cached: reading a GGUF header parses the whole file)."""
    from transformers import AutoConfig

    if src.kind == "gguf":  # its header is the config: a damaged file must fail as one, naming it
        _check_gguf(Path(src.path) / src.gguf_file)
    try:
        if src.kind == "gguf":
            return AutoConfig.from_pretrained(src.path, gguf_file=src.gguf_file)
        return AutoConfig.from_pretrained(src.path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise QtoolError(f"model: cannot read the config of {src.path}: {_first_line(e)}") from e
    except Exception as e:  # noqa: BLE001 - a malformed config.json or GGUF header raises many kinds
        raise QtoolError(f"model: {src.path}: {_first_line(e)}") from e


def load_model(src: ModelSource, dtype: str = "float32", trust_remote_code: bool = False, kernels: bool = False):
    """Load ``(model, tokenizer)`` in eval mode on CPU, gradients off for all parameters. ``kernels``: a packed
    checkpoint's linears that an integer kernel can hold stay packed (``qtool.models.kernels``); otherwise dense."""
    from transformers import AutoModelForCausalLM

    from qtool.arch import spec_for

    spec_for(load_config(src, trust_remote_code))  # refuse unsupported architectures before loading weights
    kwargs = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if src.kind == "gguf":
        kwargs["gguf_file"] = src.gguf_file
        # the header was parsed for load_config already: a copy spares transformers a second parse (~8 s on SmolLM2)
        kwargs["config"] = copy.deepcopy(load_config(src, trust_remote_code))
    log.info("loading model %s (%s, %s)", src.path, src.kind, dtype)
    from qtool.formats.registry import format_of  # the formats' readers build models: imported on use

    try:
        packed = format_of(load_config(src, trust_remote_code))
        if packed is not None:
            model = packed.load(src.path, DTYPES[dtype], trust_remote_code, kernels)
        else:
            model = AutoModelForCausalLM.from_pretrained(src.path, **kwargs)
    except QtoolError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to read the user's checkpoint is bad input
        raise QtoolError(f"model: cannot load {src.path}: {_first_line(e)}") from e
    model.eval()
    model.requires_grad_(False)
    return model, load_tokenizer(src, trust_remote_code)


def source_config_json(src: ModelSource) -> dict[str, Any] | None:
    """The source's own ``config.json`` as written (a local directory, or a hub model's cached copy), ``None`` for a
    GGUF file (its config is derived from the header) or when none can be read."""
    if src.kind == "gguf":
        return None
    try:
        if src.kind == "dir":
            path = Path(src.path) / "config.json"
        else:
            from transformers.utils import cached_file

            path = Path(cached_file(src.path, "config.json", local_files_only=True))
        raw = json.loads(path.read_text())
    except (
        OSError,
        ValueError,
        TypeError,
    ):  # a hub copy not in the cache, an unreadable file: the loaded config serves
        return None
    return raw if isinstance(raw, dict) else None


def load_tokenizer(src: ModelSource, trust_remote_code: bool = False):
    """The tokenizer of ``src`` (or ``src.tokenizer``); a ``QtoolError`` naming the field when it cannot load."""
    from transformers import AutoTokenizer

    field, where = ("model.tokenizer", src.tokenizer) if src.tokenizer else ("model", src.path)
    try:
        if src.tokenizer:
            return AutoTokenizer.from_pretrained(src.tokenizer, trust_remote_code=trust_remote_code)
        if src.kind == "gguf":
            return AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
        return AutoTokenizer.from_pretrained(src.path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a missing or broken tokenizer
        raise QtoolError(f"{field}: cannot load a tokenizer from {where}: {_first_line(e)}") from None


def check_weight_files(src: ModelSource) -> None:
    """Cheap checks of a local checkpoint's weight files, before anything loads or is written: a directory has
    some, each safetensors header parses and its tensors fit in the file (a truncated download fails here), a GGUF
    file's header and tensor table parse and its tensors fit. Hub sources are checked when they download."""
    if src.kind == "hub":
        return
    if src.kind == "gguf":
        _check_gguf(Path(src.path) / src.gguf_file)
        return
    files = sorted(p for p in Path(src.path).iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    if not files:
        raise QtoolError(
            f"model: {src.path} has a config.json but no weight files (*.safetensors, *.bin); "
            "point --model at a complete checkpoint"
        )
    for f in files:
        if f.suffix == ".safetensors":
            _check_safetensors(f)


def _check_safetensors(path: Path) -> None:
    """Parse the header (8-byte length + JSON) and check every tensor's byte range lies inside the file."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("header length past the end of the file")
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
        why = _first_line(e)
        raise QtoolError(f"model: {path} is not a readable safetensors file ({why}); re-download it") from None
    if 8 + n + end > size:
        raise QtoolError(
            f"model: {path} is truncated ({size} bytes, its header describes {8 + n + end}); re-download it"
        )


def _check_gguf(path: Path) -> None:
    stat = path.stat()
    _check_gguf_once(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _check_gguf_once(name: str, size: int, mtime_ns: int) -> None:
    """Parsing a GGUF's tensor table reads the whole header (seconds for a large file): once per file version."""
    path = Path(name)
    try:
        import gguf

        reader = gguf.GGUFReader(str(path))
        for t in reader.tensors:
            if int(t.data_offset) + int(t.n_bytes) > size:
                raise ValueError(f"tensor {t.name} runs past the end of the file")
    except QtoolError:
        raise
    except Exception as e:  # noqa: BLE001 - the GGUF reader raises many kinds on a corrupt file
        raise QtoolError(f"model: {path} is not a readable GGUF file ({_first_line(e)}); re-download it") from None


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


def check_finite(model: torch.nn.Module) -> None:
    """Refuse a loaded model whose parameters hold NaN or Inf (a damaged file or a diverged training run):
    quantization would spread them into every scale they touch."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            bad = int((~torch.isfinite(p)).sum())
            raise QtoolError(f"model: {name} holds {bad} NaN/Inf values; the checkpoint is damaged (re-download it)")


def scan_weights(src: ModelSource) -> None:
    """``check_finite`` without loading the model (``qtool validate``): safetensors tensors are read one at a
    time; GGUF tensors are dequantized one at a time. Hub sources are skipped (not local until loaded)."""
    if src.kind == "hub":
        return
    if src.kind == "gguf":
        import gguf
        import numpy as np

        for t in gguf.GGUFReader(str(Path(src.path) / src.gguf_file)).tensors:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
            if not np.isfinite(values).all():
                raise QtoolError(f"model: GGUF tensor {t.name} holds NaN/Inf values; the file is damaged")
        return
    from safetensors import safe_open

    for f in sorted(Path(src.path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                t = st.get_tensor(key)
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise QtoolError(f"model: {f.name} tensor {key} holds NaN/Inf values; the file is damaged")
