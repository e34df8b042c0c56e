"""One ``qtool bench`` row measured in llama.cpp, run by the interpreter of ``make runtime-llamacpp`` (its virtualenv,
with the llama-cpp-python sdist's ctypes bindings on ``PYTHONPATH`` and the built libraries at
``LLAMA_CPP_LIB_PATH``). Imports nothing from qtool; ``qtool.bench`` converts the checkpoint to GGUF and passes the
token ids in a JSON job file, so every runtime scores exactly the same tokens.

    python llamacpp_worker.py JOB.json   ->   one JSON row on the last line of stdout

Measured: load seconds, perplexity from llama.cpp's logits at every position of each window (float64 log-softmax
of its float32 logits), prefill tok/s (a ``prompt_tokens`` prompt in one batch, all positions' logits as the other
runtimes compute them), batch-1 greedy decode tok/s (``new_tokens`` single-token steps after a short prompt, KV
cache on), peak RSS. The KV cache is llama.cpp's default f16, or f32 where the job asks (``--dtype float32``).
"""

from __future__ import annotations

import resource
import statistics
import time

from worker_io import serve, timed


def main(job: dict) -> dict:
    import numpy as np
    from llama_cpp import Llama

    windows: list[list[int]] = job["ppl_windows"]
    start = time.perf_counter()
    llm = Llama(
        model_path=job["gguf"],
        n_ctx=job["context"],
        n_batch=job["context"],
        n_ubatch=job["context"],
        n_threads=job["threads"],
        n_threads_batch=job["threads"],
        logits_all=True,
        seed=0,
        # the KV cache in f32 for a float32 fidelity run (llama.cpp's default is f16); GGML_TYPE_F32 = 0
        **({"type_k": 0, "type_v": 0} if job.get("kv_f32") else {}),
        verbose=False,
    )
    load_s = time.perf_counter() - start

    nll, predicted = 0.0, 0
    for window in windows:
        llm.reset()
        llm.eval(window)
        logits = llm.scores[: len(window) - 1].astype(np.float64)
        top = logits.max(axis=1, keepdims=True)
        logz = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        nll -= float((logits[np.arange(len(window) - 1), window[1:]] - logz).sum())
        predicted += len(window) - 1

    def prefill() -> None:
        llm.reset()
        llm.eval(job["prompt_ids"])

    def decode() -> float:
        llm.reset()
        llm.eval(job["decode_ids"])
        marks = []
        for _ in range(job["new_tokens"]):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
            marks.append(time.perf_counter())
        return (len(marks) - 1) / (marks[-1] - marks[0])

    llm.reset()
    llm.eval(job["decode_ids"])  # warm-up
    prefill_s = [timed(prefill) for _ in range(job["repeats"])]
    decode_tok_s = [decode() for _ in range(job["repeats"])]
    import llama_cpp

    return {
        "load_s": load_s,
        "prefill_tok_s": len(job["prompt_ids"]) / statistics.median(prefill_s),
        "decode_tok_s": statistics.median(decode_tok_s),
        "ppl": float(np.exp(nll / predicted)),
        "ppl_predicted_tokens": predicted,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "version": f"llama-cpp-python {llama_cpp.__version__}",
        "gguf_type": job.get("gguf_type", ""),
    }


if __name__ == "__main__":
    serve(main)
