"""``qtool bench``: one model in each runtime that can execute it, side by side — prefill and batch-1 decode speed,
peak memory, load time, and the perplexity on a fixed WikiText-2 test slice computed from that runtime's own logits
(so a fast path's cost in quality shows next to its speed).

Runtimes (``RUNTIMES``):

- ``transformers``: ``AutoModelForCausalLM.from_pretrained`` as a user would call it (compressed-tensors decompresses
  a packed checkpoint to dense; a GGUF is dequantized by transformers' GGUF loader), bf16;
- ``qtool``: qtool's loader with its integer kernels (``qtool.models.kernels``: packed int4/int8 linears stay
  packed), bf16 activations;
- ``qtool-dense``: qtool's loader, every linear decompressed (the reference path ``qtool eval`` uses), bf16;
- ``vllm``: vLLM's CPU build (``make runtime-vllm``: its own virtualenv, found at ``.cache/runtimes/vllm`` or
  ``$QTOOL_VLLM_PYTHON``) with ``VLLM_CPU_INT4_W4A8=0``, i.e. W4A16 kept W4A16; ``vllm-w4a8``: vLLM's default, which
  quantizes activations to int8 in front of its int4 kernel where the CPU has AMX. vLLM runs in its own interpreter
  (``qtool/runtimes/vllm_worker.py``, which imports nothing from qtool); the token ids come from here;
- ``llamacpp``: llama.cpp (``make runtime-llamacpp``: built from source, found at ``.cache/runtimes/llamacpp`` or
  ``$QTOOL_LLAMACPP_DIR``) through llama-cpp-python's bindings; a GGUF runs as given, a checkpoint directory is first
  converted by llama.cpp's ``convert_hf_to_gguf.py`` (bf16: its dequantized weights).

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

RUNTIMES = ("transformers", "qtool", "qtool-dense", "vllm", "vllm-w4a8", "llamacpp")
VLLM_W4A8 = {"vllm": "0", "vllm-w4a8": "1"}  # VLLM_CPU_INT4_W4A8 per vLLM runtime
# preloaded into vLLM's process as its CPU guide asks (tcmalloc: Debian's libtcmalloc-minimal4)
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
SETTINGS = {"prompt_tokens": 512, "new_tokens": 128, "ppl_seqlen": 512, "ppl_tokens": 8192, "repeats": 3,
            "dtype": "bfloat16"}  # fmt: skip
GGUF_OUTTYPE = {"bfloat16": "bf16", "float32": "f32"}  # llama.cpp's converter type for each --dtype


def _load(runtime: str, model: str, dtype: str) -> tuple[Any, Any]:
    from qtool.loading import load_model, load_tokenizer, resolve_source

    src = resolve_source(model)
    if runtime == "qtool":
        return load_model(src, dtype, kernels=True)
    if runtime == "qtool-dense":
        return load_model(src, dtype)
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": getattr(torch, dtype)}
    if src.kind == "gguf":
        kwargs["gguf_file"] = src.gguf_file
    lm = AutoModelForCausalLM.from_pretrained(src.path, **kwargs).eval()
    return lm, load_tokenizer(src)


def measure(runtime: str, model: str, threads: int, data_dir: str | None, settings: dict[str, int]) -> dict[str, Any]:
    """One runtime's row (in this process): load seconds, prefill and decode tok/s (medians over ``repeats``),
    WikiText-2 test perplexity over ``ppl_tokens`` tokens in windows of ``ppl_seqlen``, peak RSS."""
    import torch

    from qtool.eval.perplexity import token_perplexity

    torch.set_num_threads(threads)
    start = time.perf_counter()
    lm, tok = _load(runtime, model, settings["dtype"])
    load_s = time.perf_counter() - start
    ids = eval_ids(tok, data_dir, settings)
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


def eval_ids(tok: Any, data_dir: str | None, settings: dict[str, int]) -> Any:
    """The token ids every runtime scores and prompts with: the start of WikiText-2 test (``[N] int64``)."""
    from qtool.data import load_text, tokenize
    from qtool.eval.tasks import default_data_dir

    root = Path(data_dir) if data_dir else default_data_dir()
    if root is None:
        raise ValueError("no evaluation data: pass --data-dir or set QTOOL_DATA_DIR")
    text = load_text(root / "wikitext-2-raw-v1" / "wiki.test.raw", field="--data-dir")
    return tokenize(tok, text[: 12 * settings["ppl_tokens"]])  # the first ppl_tokens tokens of WikiText-2 test


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
    if runtime in VLLM_W4A8:
        return _vllm(runtime, model, threads, data_dir, settings)
    if runtime == "llamacpp":
        return _llamacpp(runtime, model, threads, data_dir, settings)
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
    return _row(proc, runtime, model)


def _row(proc: subprocess.CompletedProcess, runtime: str, model: str) -> dict[str, Any]:
    """The child's JSON row (its last stdout line), or its last stderr line as the error."""
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    try:
        row = json.loads(last)
    except json.JSONDecodeError:
        lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
        return {"runtime": runtime, "model": model, "error": lines[-1] if lines else f"exit code {proc.returncode}"}
    return {"runtime": runtime, "model": model, **row}


PROJECT = Path(__file__).resolve().parents[1]  # where `make runtime-*` builds (an editable install's checkout)


def vllm_python() -> Path | None:
    """vLLM's interpreter: ``$QTOOL_VLLM_PYTHON``, else the one ``make runtime-vllm`` builds in the project."""
    if os.environ.get("QTOOL_VLLM_PYTHON"):
        return Path(os.environ["QTOOL_VLLM_PYTHON"])
    built = PROJECT / ".cache" / "runtimes" / "vllm" / "bin" / "python"
    return built if built.is_file() else None


def llamacpp_dir() -> Path | None:
    """``make runtime-llamacpp``'s directory (build, virtualenv, sources): ``$QTOOL_LLAMACPP_DIR`` or the project's."""
    if os.environ.get("QTOOL_LLAMACPP_DIR"):
        return Path(os.environ["QTOOL_LLAMACPP_DIR"])
    built = PROJECT / ".cache" / "runtimes" / "llamacpp"
    return built if (built / ".installed").is_file() else None


def _job(src: Any, data_dir: str | None, settings: dict[str, Any]) -> dict[str, Any]:
    """The token ids an external runtime's worker scores and prompts with (the same as the in-process rows')."""
    from qtool.loading import load_tokenizer

    ids = eval_ids(load_tokenizer(src), data_dir, settings)
    seqlen, decode_prompt = settings["ppl_seqlen"], 16
    return {
        "ppl_windows": [ids[w * seqlen : (w + 1) * seqlen].tolist() for w in range(settings["ppl_tokens"] // seqlen)],
        "prompt_ids": ids[: settings["prompt_tokens"]].tolist(),
        "decode_ids": ids[:decode_prompt].tolist(),
        "new_tokens": settings["new_tokens"],
        "repeats": settings["repeats"],
        # the longest sequence the worker runs, plus one: its context (vLLM's max_model_len, llama.cpp's n_ctx)
        "context": max(settings["prompt_tokens"], seqlen, decode_prompt + settings["new_tokens"]) + 1,
    }


def _run_worker(
    name: str, python: Path, job: dict[str, Any], env: dict[str, str], tmp: Path
) -> subprocess.CompletedProcess:
    path = tmp / "job.json"
    path.write_text(json.dumps(job))
    worker = Path(__file__).parent / "runtimes" / f"{name}_worker.py"
    return subprocess.run([str(python), str(worker), str(path)], capture_output=True, text=True, env=env, check=False)


def _vllm(runtime: str, model: str, threads: int, data_dir: str | None, settings: dict[str, Any]) -> dict[str, Any]:
    """One vLLM row: the token ids made here, measured by ``runtimes/vllm_worker.py`` in vLLM's interpreter."""
    import tempfile

    from qtool.loading import resolve_source

    python = vllm_python()
    if python is None or not python.is_file():
        where = f"QTOOL_VLLM_PYTHON={python} does not exist" if python else "vLLM is not installed"
        return {"runtime": runtime, "model": model, "error": f"{where}: run `make runtime-vllm` (docs/runtimes.md)"}
    src = resolve_source(model)
    if src.kind != "dir":
        return {"runtime": runtime, "model": model,
                "error": f"vLLM is measured on checkpoint directories only, not a {src.kind} source"}  # fmt: skip
    job = {"model": src.path, "dtype": settings["dtype"], **_job(src, data_dir, settings)}
    env = {
        **os.environ,
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_INT4_W4A8": VLLM_W4A8[runtime],
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}"),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine in the worker's process: its RSS is the row's
        "OMP_NUM_THREADS": str(threads),
    }
    preload = [str(p) for p in (TCMALLOC, *python.parent.parent.glob("lib/libiomp5.so")) if p.is_file()]
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    with tempfile.TemporaryDirectory(prefix="qtool-bench-") as tmp:
        row = _row(_run_worker("vllm", python, job, env, Path(tmp)), runtime, model)
    if "error" not in row:
        row["vllm_cpu_int4_w4a8"] = VLLM_W4A8[runtime]
    return row


def _llamacpp(runtime: str, model: str, threads: int, data_dir: str | None, settings: dict[str, Any]) -> dict[str, Any]:
    """One llama.cpp row: a GGUF runs as it is; a checkpoint directory (compressed-tensors included) goes through
    llama.cpp's own converter first (``--outtype`` bf16 or f32 as ``settings["dtype"]``: the converter dequantizes
    packed integer weights exactly, then stores them in that type)."""
    import tempfile

    from qtool.loading import resolve_source

    root = llamacpp_dir()
    if root is None or not (root / "venv" / "bin" / "python").is_file():
        where = f"QTOOL_LLAMACPP_DIR={root} holds no build" if root else "llama.cpp is not built"
        return {"runtime": runtime, "model": model, "error": f"{where}: run `make runtime-llamacpp` (docs/runtimes.md)"}
    python = root / "venv" / "bin" / "python"
    bindings = max(root.glob("llama_cpp_python-*/"), key=lambda p: p.name)
    env = {**os.environ, "PYTHONPATH": str(bindings), "LLAMA_CPP_LIB_PATH": str(root / "build" / "bin"),
           "OMP_NUM_THREADS": str(threads)}  # fmt: skip
    src = resolve_source(model)
    if src.kind == "hub":
        return {"runtime": runtime, "model": model, "error": "llama.cpp is measured on local checkpoints only"}
    with tempfile.TemporaryDirectory(prefix="qtool-bench-") as tmp:
        convert_s = 0.0
        if src.kind == "gguf":
            gguf, kind = Path(src.path) / src.gguf_file, "as given"
        else:
            outtype = GGUF_OUTTYPE[settings["dtype"]]
            gguf, kind = Path(tmp) / f"model-{outtype}.gguf", f"converted to {outtype}"
            convert = bindings / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
            start = time.perf_counter()
            proc = subprocess.run([str(python), str(convert), src.path, "--outfile", str(gguf), "--outtype", outtype],
                                  capture_output=True, text=True, env=env, check=False)  # fmt: skip
            convert_s = time.perf_counter() - start
            if proc.returncode != 0:
                lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
                reason = lines[-1] if lines else f"exit code {proc.returncode}"
                return {"runtime": runtime, "model": model, "error": f"llama.cpp's converter refused it: {reason}"}
        job = {"gguf": str(gguf), "gguf_type": kind, "threads": threads, "kv_f32": settings["dtype"] == "float32",
               **_job(src, data_dir, settings)}  # fmt: skip
        row = _row(_run_worker("llamacpp", python, job, env, Path(tmp)), runtime, model)
    if "error" not in row:
        row["convert_s"] = convert_s  # llama.cpp's converter, before its load_s
    return row


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
