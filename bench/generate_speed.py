"""Batch-1 decode and prefill speed of a packed checkpoint on qtool's integer kernels against the same checkpoint
decompressed to dense bf16 (and float32), side by side in one process, alternating, one thread by default.

    .venv/bin/python bench/generate_speed.py RUN_DIR_OR_PACKED_DIR [--threads 1] [--prompt-tokens 512]
        [--new-tokens 128] [--repeats 3] [--out bench/generate-speed.json]

Prefill: one forward over a ``--prompt-tokens`` prompt (WikiText-2-free: token ids cycled from the tokenizer's
vocabulary, seeded). Decode: ``--new-tokens`` greedy tokens after a 16-token prompt with the KV cache (end-of-sequence
ignored), tok/s over the tokens after the first. Medians over ``--repeats``; weight bytes are the parameters and
buffers each model holds.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def _bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


@torch.no_grad()
def _prefill(model, ids) -> float:
    start = time.perf_counter()
    model(ids)
    return ids.shape[1] / (time.perf_counter() - start)


@torch.no_grad()
def _decode(model, ids, n: int) -> float:
    marks: list[float] = []

    class Clock:
        def put(self, value):
            marks.append(time.perf_counter())

        def end(self):
            pass

    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                   pad_token_id=0, streamer=Clock())  # fmt: skip
    return (len(marks) - 2) / (marks[-1] - marks[1])  # marks[0]: the prompt; marks[1]: the first new token


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from qtool.loading import load_model, resolve_source
    from qtool.models.kernels import Int4Linear, Int8Linear

    src = resolve_source(a.model)
    models = {
        "kernels (bf16 activations)": load_model(src, "bfloat16", kernels=True)[0],
        "dense bf16": load_model(src, "bfloat16")[0],
        "dense float32": load_model(src, "float32")[0],
    }
    vocab = models["dense bf16"].config.vocab_size
    g = torch.Generator().manual_seed(0)
    long_ids = torch.randint(100, vocab, (1, a.prompt_tokens), generator=g)
    short_ids = long_ids[:, :16]
    runs: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "decode": []} for k in models}
    for m in models.values():  # warm-up
        _prefill(m, short_ids)
    for _ in range(a.repeats):
        for name, m in models.items():
            runs[name]["prefill"].append(_prefill(m, long_ids))
            runs[name]["decode"].append(_decode(m, short_ids, a.new_tokens))
    rows = {}
    for name, m in models.items():
        rows[name] = {
            "prefill_tok_s": statistics.median(runs[name]["prefill"]),
            "decode_tok_s": statistics.median(runs[name]["decode"]),
            "weight_bytes": _bytes(m),
            "kernel_linears": sum(isinstance(x, (Int4Linear, Int8Linear)) for x in m.modules()),
        }
    base = rows["dense bf16"]
    doc = {
        "model": a.model,
        "threads": a.threads,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "prompt_tokens": a.prompt_tokens,
        "new_tokens": a.new_tokens,
        "repeats": a.repeats,
        "rows": rows,
        "kernels_over_dense_bf16": {
            k: rows["kernels (bf16 activations)"][k] / base[k]
            for k in ("prefill_tok_s", "decode_tok_s", "weight_bytes")
        },
    }
    text = json.dumps(doc, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
