"""Text for calibration and evaluation: local files in the formats our users have.

Formats:
- ``wikitext``: a WikiText raw file (``wiki.test.raw``). Rows are rebuilt as the HF ``Salesforce/wikitext`` dataset
  has them (blank lines become ``""``, others keep their ``"\\n"``) and joined with ``"\\n\\n"``, as the GPTQ,
  QuaRot and OSTQuant evaluation code does.
- ``raw``: the file as it is (UTF-8 text).
- ``jsonl``: one JSON object per line (``.jsonl`` or ``.jsonl.gz``); documents are the ``text_field`` values
  joined with ``"\\n\\n"``.
``auto`` picks ``wikitext`` for ``wiki.*.raw``, ``jsonl`` for ``.jsonl``/``.jsonl.gz``, else ``raw``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from pathlib import Path

import torch

from qtool.errors import QtoolError

log = logging.getLogger(__name__)

FORMATS = ("auto", "wikitext", "raw", "jsonl")


def detect_format(path: Path) -> str:
    name = path.name
    if name.startswith("wiki.") and name.endswith(".raw"):
        return "wikitext"
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    return "raw"


def load_text(
    path: str | Path,
    fmt: str = "auto",
    text_field: str = "text",
    field: str = "file",
    span: tuple[float, float] = (0.0, 1.0),
) -> str:
    """Read a text corpus, keeping the ``span`` fraction of its characters (``(0, 0.5)``: the first half).
    ``field`` names the recipe field in error messages."""
    text = _read(path, fmt, text_field, field)
    a, b = span
    return text if (a, b) == (0.0, 1.0) else text[int(a * len(text)) : int(b * len(text))]


def _read(path: str | Path, fmt: str, text_field: str, field: str) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise QtoolError(f"{field}: file {path} does not exist; pass an existing text or jsonl file")
    fmt = detect_format(p) if fmt == "auto" else fmt
    if fmt == "wikitext":
        lines = _decode(p, field).split("\n")[:-1]
        text = "\n\n".join(line + "\n" if line.strip() else "" for line in lines)
    elif fmt == "raw":
        text = _decode(p, field)
    elif fmt == "jsonl":
        text = "\n\n".join(_jsonl_texts(p, text_field, field))
    else:
        raise QtoolError(f"{field}: unknown format '{fmt}'; use one of {', '.join(FORMATS)}")
    if "\x00" in text:
        raise QtoolError(f"{field}: {path} holds NUL bytes, so it is binary, not text; pass a text or jsonl file")
    if not text.strip():
        raise QtoolError(f"{field}: {path} holds no text; pass a non-empty text or jsonl file")
    return text


def _decode(p: Path, field: str) -> str:
    data = p.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise QtoolError(
            f"{field}: {p} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); pass a UTF-8 file"
        ) from None


def _jsonl_texts(p: Path, text_field: str, field: str) -> list[str]:
    opener = gzip.open if p.suffix == ".gz" else open
    texts = []
    try:
        with opener(p, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise QtoolError(f"{field}: {p} line {i} is not JSON ({e.msg}); pass a jsonl file") from None
                if not isinstance(row, dict) or text_field not in row:
                    raise QtoolError(f"{field}: {p} line {i} has no '{text_field}' field; set text_field")
                if not isinstance(row[text_field], str):
                    raise QtoolError(f"{field}: {p} line {i}: '{text_field}' is not a string; set text_field")
                texts.append(row[text_field])
    except (UnicodeDecodeError, EOFError, OSError) as e:  # not UTF-8, a truncated or corrupt .gz
        raise QtoolError(f"{field}: {p} cannot be read as jsonl ({type(e).__name__}); pass UTF-8 jsonl") from None
    return texts


def check_span(span: tuple[float, float]) -> tuple[float, float]:
    a, b = span
    if not 0.0 <= a < b <= 1.0:
        raise ValueError(f"span must be [start, end] fractions with 0 ≤ start < end ≤ 1, got [{a}, {b}]")
    return span


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Tokenize a whole corpus once (with the tokenizer's usual special tokens, e.g. one BOS). Returns ``[N]`` int64."""
    saved = getattr(tokenizer, "model_max_length", None)
    tokenizer.model_max_length = int(1e30)  # silence the "sequence longer than max length" warning: we window it
    try:
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
    finally:
        if saved is not None:
            tokenizer.model_max_length = saved
    return ids.to(torch.int64)


def sample_windows(ids: torch.Tensor, n_samples: int, seqlen: int, generator: torch.Generator) -> torch.Tensor:
    """``n_samples`` windows of ``seqlen`` tokens at seeded random offsets (GPTQ-style). ``[N] -> [n, seqlen]``."""
    if ids.numel() <= seqlen:
        raise QtoolError(
            f"calibration.seqlen: {seqlen} tokens requested but the calibration text has only {ids.numel()}; "
            "lower seqlen or use a larger file"
        )
    starts = torch.randint(0, ids.numel() - seqlen, (n_samples,), generator=generator)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
