"""Evaluate a loaded model on registry tasks, and the results JSON that ``qtool eval --json``, the pipeline's evaluate
stage and ``qtool regress`` share.

Results document (``schema: qtool.results/1``)::

    {"schema": "qtool.results/1", "created": "2026-…Z",
     "versions": {"qtool": …, "torch": …, "transformers": …, "lm_eval": …, "datasets": …, "python": …},
     "model": {…identity: path, kind, model_identity hash…},
     "settings": {"limit": 200, "batch_size": 8, "seqlen": 2048, "max_tokens": null, "bootstrap_iters": 1000},
     "tasks": {"piqa": {"files": {"piqa/valid.jsonl": "<sha256>", …}, "limit": 200, "note": "…"},
               "wikitext2": {"files": {…}, "seqlen": 2048, "max_tokens": null, "windows": 140, "corpus_tokens": …}},
     "metrics": {"piqa": {"acc": {"value": 0.62, "stderr": 0.034, "n": 200}, "acc_norm": {…}},
                 "wikitext2": {"token_ppl": {"value": 20.9, "stderr": null, "n": 286580}}}}

Accuracies are fractions in [0, 1]; ``n`` is the number of documents scored, or of predicted tokens for perplexity.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

from qtool.data import detect_format, file_sha256, load_text, tokenize
from qtool.errors import QtoolError
from qtool.eval.lmeval import BOOTSTRAP_ITERS, offline, run_lm_eval
from qtool.eval.perplexity import Perplexity, default_seqlen, token_perplexity
from qtool.eval.tasks import TASKS_DIR, get_task, task_files

log = logging.getLogger(__name__)

SCHEMA = "qtool.results/1"
TEXT_PREFIX = "text:"  # task name of a user text file's perplexity: ``text:<path as given>``
_PACKAGES = {
    "qtool": "qtool",
    "torch": "torch",
    "transformers": "transformers",
    "lm_eval": "lm_eval",
    "datasets": "datasets",
    "compressed_tensors": "compressed-tensors",
}

Progress = Callable[[str, int, int], None]


def versions() -> dict[str, str | None]:
    """Versions of qtool and the libraries a number depends on (``None`` for one that is not installed)."""
    import qtool

    out: dict[str, str | None] = {"qtool": qtool.__version__, "python": platform.python_version()}
    for key, dist in _PACKAGES.items():
        if key == "qtool":
            continue
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
    return out


def evaluate(
    model,
    tokenizer,
    tasks: list[str],
    data_dir: str | Path | None,
    limit: int | None = None,
    batch_size: int = 1,
    seqlen: int | None = None,
    max_tokens: int | None = None,
    progress: Progress | None = None,
    model_info: dict | None = None,
    texts: Sequence[str | Path] = (),
    text_field: str = "text",
) -> dict:
    """Evaluate ``model`` on ``tasks`` (registry names) and on the user's own ``texts`` (text or jsonl files, token
    perplexity, reported as task ``text:<path as given>``) and return the results document (module docstring).

    Perplexity tasks use ``seqlen`` (default: ``default_seqlen``) and the ``max_tokens`` budget (default: the whole
    corpus); lm-eval tasks use ``limit`` (first N documents) and ``batch_size``. ``progress(task, done, total)``
    is called as perplexity windows finish and around each lm-eval batch of tasks. A ``.jsonl`` text is read from
    its ``text_field``; a ``wiki.*.raw`` file as WikiText; anything else as plain text (``qtool.data.load_text``).
    """
    data_dir = Path(data_dir) if data_dir is not None else None
    if tasks and data_dir is None:
        raise QtoolError("data: no evaluation data directory found; pass --data-dir (or set QTOOL_DATA_DIR)")
    files = {t: task_files(t, data_dir) for t in tasks}  # every file checked before any expensive work
    text_tasks = text_files(texts)
    started = time.time()
    metrics: dict[str, dict] = {}
    task_info: dict[str, dict] = {}
    with offline():
        for t in tasks:
            spec = get_task(t)
            task_info[t] = {
                "files": {str(p.relative_to(data_dir)): file_sha256(p) for p in files[t]},
                "note": spec.note,
            }
            if spec.kind == "perplexity":
                text = load_text(files[t][0], spec.text_format, field=f"tasks.{t}")
                metrics[t], extra = _perplexity(model, tokenizer, t, text, seqlen, max_tokens, progress)
                task_info[t].update(extra)
            else:
                yaml = TASKS_DIR / spec.yaml
                task_info[t].update(limit=limit, lm_eval_task=spec.lm_eval_task, yaml_sha256=file_sha256(yaml))
        lm_tasks = [t for t in tasks if get_task(t).kind == "lm_eval"]
        if lm_tasks:
            if progress:
                progress("lm-eval: " + ",".join(lm_tasks), 0, 1)
            metrics.update(run_lm_eval(model, tokenizer, lm_tasks, data_dir, limit, batch_size))
            if progress:
                progress("lm-eval: " + ",".join(lm_tasks), 1, 1)
        for name, path in text_tasks.items():
            fmt = detect_format(path)
            metrics[name], extra = _perplexity(
                model, tokenizer, name, load_text(path, fmt, text_field, "--text"), seqlen, max_tokens, progress
            )
            task_info[name] = {"files": {str(path): file_sha256(path)}, "format": fmt, **extra}
            if fmt == "jsonl":
                task_info[name]["text_field"] = text_field
    names = [*tasks, *text_tasks]
    log.info("evaluated %s in %.1f s", ",".join(names), time.time() - started)
    return {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_s": round(time.time() - started, 2),
        "versions": versions(),
        "model": dict(model_info or {}),
        "settings": {
            "limit": limit,
            "batch_size": batch_size,
            "seqlen": seqlen,
            "max_tokens": max_tokens,
            "bootstrap_iters": BOOTSTRAP_ITERS,
        },
        "tasks": task_info,
        "metrics": {t: metrics[t] for t in names},
    }


def text_files(texts: Sequence[str | Path]) -> dict[str, Path]:
    """``{"text:<path as given>": path}`` for the user's text files; a missing one is a ``QtoolError`` naming it."""
    out = {f"{TEXT_PREFIX}{p}": Path(p).expanduser() for p in texts}
    for path in out.values():
        if not path.is_file():
            raise QtoolError(f"--text: file {path} does not exist; pass an existing text or jsonl file")
    return out


def _perplexity(
    model, tokenizer, task: str, text: str, seqlen: int | None, max_tokens: int | None, progress: Progress | None
) -> tuple[dict, dict]:
    ids = tokenize(tokenizer, text)
    seq = default_seqlen(model, seqlen)
    report = (lambda done, total: progress(task, done, total)) if progress else None
    return perplexity_entry(token_perplexity(model, ids, seq, max_tokens, progress=report), max_tokens)


def perplexity_entry(ppl: Perplexity, max_tokens: int | None) -> tuple[dict, dict]:
    """``(metrics row, task info)`` of one token-perplexity measurement, as results documents hold them."""
    metric = {"token_ppl": {"value": ppl.ppl, "stderr": None, "n": ppl.predicted_tokens}}
    info = {
        "seqlen": ppl.seqlen,
        "max_tokens": max_tokens,
        "windows": ppl.windows,
        "corpus_tokens": ppl.corpus_tokens,
        "nll": ppl.nll,
    }
    return metric, info


def write_results(doc: dict, path: str | Path) -> Path:
    """Write the results document atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_results(path: str | Path, field: str = "results") -> dict:
    """Read and check a results (or baseline) document: ``metrics`` must be ``{task: {metric: {value, stderr, n}}}``."""
    p = Path(path)
    if not p.is_file():
        raise QtoolError(f"{field}: {path} does not exist; pass a JSON file written by `qtool eval --json`")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QtoolError(f"{field}: {path} is not JSON ({e}); pass a file written by `qtool eval --json`") from e
    metrics = doc.get("metrics") if isinstance(doc, dict) else None
    if not isinstance(metrics, dict) or not metrics:
        raise QtoolError(f"{field}: {path} has no 'metrics' object; pass a file written by `qtool eval --json`")
    for task, row in metrics.items():
        if not isinstance(row, dict):
            raise QtoolError(f"{field}: {path} metrics.{task} is not an object of metrics")
        for name, entry in row.items():
            _check_entry(entry, f"{field}: {path} metrics.{task}.{name}")
    return doc


def _check_entry(entry, where: str) -> None:
    if not isinstance(entry, dict) or not isinstance(entry.get("value"), (int, float)):
        raise QtoolError(f"{where} needs a numeric 'value' (with 'stderr' and 'n')")
    if not math.isfinite(entry["value"]):
        raise QtoolError(f"{where} is {entry['value']}, not a finite number")
    stderr = entry.get("stderr")
    if stderr is not None and not isinstance(stderr, (int, float)):
        raise QtoolError(f"{where}.stderr must be a number or null")


def metric_rows(doc: dict) -> list[tuple[str, str, dict]]:
    """``[(task, metric, {value, stderr, n}), …]`` in document order, for tables."""
    return [(task, name, entry) for task, row in doc["metrics"].items() for name, entry in row.items()]
