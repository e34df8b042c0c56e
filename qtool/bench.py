"""``qtool bench``: one model in each runtime that can execute it, side by side — prefill and batch-1 decode speed,
peak memory, load time, and the perplexity on a fixed WikiText-2 test slice computed from that runtime's own logits
(so a fast path's cost in quality shows next to its speed).

Runtimes (``RUNTIMES``):

- ``transformers``: ``AutoModelForCausalLM.from_pretrained`` as a user would call it (compressed-tensors decompresses
  a packed checkpoint to dense; a GGUF is dequantized by transformers' GGUF loader), bf16;
- ``qtool``: qtool's loader with its integer kernels (``qtool.models.kernels``: packed int4/int8 linears stay
  packed), bf16 activations;
- ``qtool-dense``: qtool's loader, every linear decompressed (the reference path ``qtool eval`` uses), bf16.

Each runtime is measured in a child process of its own (``python -m qtool.bench``), so its load time and peak
resident memory are its own; the threads are set with ``torch.set_num_threads``. A runtime that cannot load the
model is reported with the first line of the reason. The dense source model (``baseline``) is measured in the same
run through transformers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RUNTIMES = ("transformers", "qtool", "qtool-dense")
SETTINGS = {"prompt_tokens": 512, "new_tokens": 128, "ppl_seqlen": 512, "ppl_tokens": 8192, "repeats": 3}


def _load(runtime: str, model: str) -> tuple[Any, Any]:
    from qtool.loading import load_model, load_tokenizer, resolve_source

    src = resolve_source(model)
    if runtime == "qtool":
        return load_model(src, "bfloat16", kernels=True)
    if runtime == "qtool-dense":
        return load_model(src, "bfloat16")
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.bfloat16}
    if src.kind == "gguf":
        kwargs["gguf_file"] = src.gguf_file
    lm = AutoModelForCausalLM.from_pretrained(src.path, **kwargs).eval()
    return lm, load_tokenizer(src)


def measure(runtime: str, model: str, threads: int, data_dir: str | None, settings: dict[str, int]) -> dict[str, Any]:
    """One runtime's row (in this process): load seconds, prefill and decode tok/s (medians over ``repeats``),
    WikiText-2 test perplexity over ``ppl_tokens`` tokens in windows of ``ppl_seqlen``, peak RSS."""
    import torch

    from qtool.data import load_text, tokenize
    from qtool.eval.perplexity import token_perplexity
    from qtool.eval.tasks import default_data_dir

    torch.set_num_threads(threads)
    start = time.perf_counter()
    lm, tok = _load(runtime, model)
    load_s = time.perf_counter() - start
    root = Path(data_dir) if data_dir else default_data_dir()
    if root is None:
        raise ValueError("no evaluation data: pass --data-dir or set QTOOL_DATA_DIR")
    text = load_text(root / "wikitext-2-raw-v1" / "wiki.test.raw", field="--data-dir")
    ids = tokenize(tok, text[: 12 * settings["ppl_tokens"]])  # the first ppl_tokens tokens of WikiText-2 test
    ppl = token_perplexity(lm, ids, settings["ppl_seqlen"], settings["ppl_tokens"])
    prompt = ids[: settings["prompt_tokens"]].unsqueeze(0)
    with torch.no_grad():
        lm(prompt[:, :16])  # warm-up
        prefill = [_timed(lambda: lm(prompt, use_cache=False)) for _ in range(settings["repeats"])]
        decode = [_decode(lm, prompt[:, :16], settings["new_tokens"]) for _ in range(settings["repeats"])]
    return {
        "runtime": runtime,
        "model": model,
        "load_s": load_s,
        "prefill_tok_s": prompt.shape[1] / statistics.median(prefill),
        "decode_tok_s": statistics.median(decode),
        "ppl": ppl.ppl,
        "ppl_predicted_tokens": ppl.predicted_tokens,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "kernel_linears": _kernel_linears(lm),
    }


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _decode(lm: Any, ids: Any, n: int) -> float:
    """Greedy tok/s over the tokens after the first (the first carries the prompt's forward), KV cache on."""
    import torch

    marks: list[float] = []

    class Clock:
        def put(self, value: Any) -> None:
            marks.append(time.perf_counter())

        def end(self) -> None:
            pass

    lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                pad_token_id=0, streamer=Clock())  # fmt: skip
    return (len(marks) - 2) / (marks[-1] - marks[1])


def _kernel_linears(lm: Any) -> int:
    from qtool.models.kernels import Int4Linear, Int8Linear

    return sum(isinstance(m, (Int4Linear, Int8Linear)) for m in lm.modules())


def run_bench(
    model: str,
    runtimes: list[str],
    baseline: str | None,
    threads: int,
    data_dir: str | None = None,
    settings: dict[str, int] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every runtime (and the baseline through transformers) in a child process; rows in order, a runtime that
    failed as ``{"runtime", "model", "error"}``."""
    settings = {**SETTINGS, **(settings or {})}
    jobs = [("baseline", baseline)] if baseline else []
    jobs += [(r, model) for r in runtimes]
    rows = []
    for label, target in jobs:
        if progress:
            progress(label)
        runtime = "transformers" if label == "baseline" else label
        row = _child(runtime, target, threads, data_dir, settings)
        row["label"] = label
        rows.append(row)
    return {"model": model, "threads": threads, "settings": settings, "rows": rows}


def _child(runtime: str, model: str, threads: int, data_dir: str | None, settings: dict[str, int]) -> dict[str, Any]:
    job = json.dumps({"runtime": runtime, "model": model, "threads": threads, "data_dir": data_dir,
                      "settings": settings})  # fmt: skip
    env_threads = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run(
        [sys.executable, "-m", "qtool.bench", job],
        capture_output=True,
        text=True,
        env={**os.environ, **env_threads},
        check=False,
    )
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    try:
        return json.loads(last)
    except json.JSONDecodeError:
        lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
        return {"runtime": runtime, "model": model, "error": lines[-1] if lines else f"exit code {proc.returncode}"}


def _worker(job: dict[str, Any]) -> None:
    try:
        row = measure(job["runtime"], job["model"], job["threads"], job["data_dir"], job["settings"])
    except Exception as e:  # noqa: BLE001 - any failure is this runtime's answer, reported as one line
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        row = {"runtime": job["runtime"], "model": job["model"], "error": f"{type(e).__name__}: {message}"}
    if "ppl" in row and not math.isfinite(row["ppl"]):
        row["error"] = "non-finite perplexity"
    print(json.dumps(row))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    _worker(json.loads(sys.argv[1]))
