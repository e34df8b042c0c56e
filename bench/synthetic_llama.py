"""Write a random-initialised ~1.2B Llama-shaped checkpoint (bf16, every dimension a multiple of 256) for the speed
and memory targets of qtool's integer kernels, where SmolLM2-135M is too small to tell (``docs/runtimes.md``).

Shapes are TinyLlama-1.1B's (hidden 2048, MLP 5632, 22 layers, 32 query / 4 KV heads of 64) with SmolLM2's
tokenizer and vocabulary (49,152), so the WikiText-2 text ``qtool bench`` scores tokenizes; the weights are
``initializer_range`` normals, so the perplexity is meaningless and only the speeds and memory are read::

    python bench/synthetic_llama.py bench/out/llama-1b-random
    qtool quantize -r recipes/w4a16-rtn.yaml -m bench/out/llama-1b-random --run-dir bench/out/llama-1b-w4 \\
        --set scheme.weights.group_size=128 --set calibration.n_samples=2 --until-stage pack
    qtool bench bench/out/llama-1b-w4 --runtime qtool,qtool-dense --threads 1 --ppl-tokens 1024 --json out.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

SMOLLM2 = Path(__file__).resolve().parents[2] / "shared" / "assets" / "models" / "smollm2-135m-instruct-q4_1-gguf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--tokenizer", default=str(SMOLLM2), help="a model whose tokenizer to copy (SmolLM2's)")
    parser.add_argument("--layers", type=int, default=22)
    args = parser.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from qtool.loading import load_tokenizer, resolve_source

    tokenizer = load_tokenizer(resolve_source(args.tokenizer))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: {n / 1e9:.2f}B parameters, bf16")


if __name__ == "__main__":
    main()
