"""Write a qtool model source (e.g. the SmolLM2 GGUF) as a full-precision Hugging Face directory, for tools that
cannot read GGUF (``bench/llmc_awq.py``). Usage: ``python bench/export_fp.py SOURCE OUT``."""

from __future__ import annotations

import sys

import torch

from qtool.loading import load_model, resolve_source


def main() -> None:
    src = resolve_source(sys.argv[1])
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_model(src, "float32")
    config = model.config
    if hasattr(config, "quantization_config"):  # a GGUF source: the weights are dequantized already
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(sys.argv[2])
    tokenizer.save_pretrained(sys.argv[2])


if __name__ == "__main__":
    main()
