"""One ``qtool bench`` row measured in vLLM, run by vLLM's own interpreter (``make runtime-vllm``).

This file is executed as a script in vLLM's virtualenv and imports nothing from qtool (that virtualenv has its own
torch and transformers pins). ``qtool.bench`` tokenizes the evaluation text and the prompts itself and passes the
token ids here in a JSON job file, so every runtime scores exactly the same tokens.

    python vllm_worker.py JOB.json   ->   one JSON row on the last line of stdout

Measured: load seconds (``LLM(...)``), perplexity from vLLM's prompt logprobs over the given windows, prefill tok/s
(a ``prompt_tokens`` prompt, one new token), batch-1 decode tok/s (``new_tokens`` greedy tokens from a short prompt,
minus the same prompt with one token: the prefill and the per-request overhead cancel), peak RSS of this process and
its children. Prefix caching is off, so each repeat prefills again.
"""

from __future__ import annotations

import math
import resource
import statistics
import time

from worker_io import serve, timed


def main(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    windows: list[list[int]] = job["ppl_windows"]
    start = time.perf_counter()
    llm = LLM(
        model=job["model"],
        dtype=job.get("dtype", "bfloat16"),
        max_model_len=job["context"],
        enforce_eager=True,
        enable_prefix_caching=False,
        seed=0,
    )
    load_s = time.perf_counter() - start

    scoring = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], scoring, use_tqdm=False)
    nll, predicted = 0.0, 0
    for window, out in zip(windows, outs, strict=True):
        for pos, entry in enumerate(out.prompt_logprobs[1:], start=1):  # position 0 has no prediction
            nll -= entry[window[pos]].logprob
            predicted += 1

    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    many = SamplingParams(max_tokens=job["new_tokens"], temperature=0.0, ignore_eos=True)
    prompt = TokensPrompt(prompt_token_ids=job["prompt_ids"])
    short = TokensPrompt(prompt_token_ids=job["decode_ids"])
    llm.generate([short], one, use_tqdm=False)  # warm-up
    prefill, decode = [], []
    for _ in range(job["repeats"]):
        prefill.append(timed(lambda: llm.generate([prompt], one, use_tqdm=False)))
        first = timed(lambda: llm.generate([short], one, use_tqdm=False))
        full = timed(lambda: llm.generate([short], many, use_tqdm=False))
        decode.append((job["new_tokens"] - 1) / max(full - first, 1e-9))
    rss = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    import vllm

    return {
        "load_s": load_s,
        "prefill_tok_s": len(job["prompt_ids"]) / statistics.median(prefill),
        "decode_tok_s": statistics.median(decode),
        "ppl": math.exp(nll / predicted),
        "ppl_predicted_tokens": predicted,
        "peak_rss_mib": rss / 1024,
        "version": vllm.__version__,
    }


if __name__ == "__main__":
    serve(main)
