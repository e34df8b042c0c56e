"""llm-compressor's AWQ on the windows of a qtool run, for the side-by-side row of ``docs/methods/awq.md``.

Runs in llm-compressor's own virtualenv (it pins transformers <= 5.17) and does not import qtool. The steps of
the measured comparison (``bench/llmc-awq.json``)::

    python3 -m venv .venv-llmc && .venv-llmc/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1
    .venv/bin/python bench/export_fp.py ../shared/assets/models/smollm2-135m-instruct-q4_1-gguf bench/out/smollm2-fp
    .venv/bin/qtool quantize -r recipes/w4a16-awq.yaml --model bench/out/smollm2-fp \
        --set calibration.n_samples=16 --until-stage calibrate --run-dir bench/out/llmc/qtool
    cp bench/out/llmc/qtool/01-calibrate/inputs.safetensors bench/out/llmc/windows.safetensors
    OMP_NUM_THREADS=1 /usr/bin/time -v .venv-llmc/bin/python bench/llmc_awq.py --model bench/out/smollm2-fp \
        --windows bench/out/llmc/windows.safetensors --out bench/out/llmc/llmc-awq
    OMP_NUM_THREADS=1 /usr/bin/time -v .venv/bin/qtool quantize -r recipes/w4a16-awq.yaml \
        --model bench/out/smollm2-fp --set calibration.n_samples=16 --until-stage pack \
        --run-dir bench/out/llmc/qtool-t2048   # beside it; then --set quantize.loss_tokens=1024, 512
    .venv/bin/qtool eval --model bench/out/llmc/llmc-awq --seqlen 2048 --max-tokens 40960

Input: a full-precision Hugging Face model directory (``bench/export_fp.py`` writes SmolLM2's from the GGUF) and the
calibration windows of a qtool run, so both tools see the same tokens. Recipe: ``AWQModifier()`` (duo scaling,
grid 20, its Llama mappings) + ``QuantizationModifier`` int asymmetric weights in groups (W4A16_ASYM at the chosen
bits and group size), ``lm_head`` ignored. Prints one JSON line: wall seconds, peak RSS, the output directory.
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--windows", required=True, help="a qtool run's 01-calibrate/inputs.safetensors")
    p.add_argument("--out", required=True)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    a = p.parse_args()

    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.pipelines.cache import IntermediatesCache
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None  # CPU: pinning needs an accelerator

    ids = next(iter(load_file(a.windows).values()))
    n, seqlen = ids.shape
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    weights = QuantizationArgs(num_bits=a.bits, type="int", symmetric=False, strategy="group", group_size=a.group_size)
    recipe = [
        AWQModifier(duo_scaling=True),
        QuantizationModifier(
            config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}, ignore=["lm_head"]
        ),
    ]
    t0 = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=n, max_seq_length=seqlen)
    wall = time.perf_counter() - t0
    model.save_pretrained(a.out, save_compressed=True)
    tokenizer.save_pretrained(a.out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"tool": "llm-compressor", "windows": [n, seqlen], "oneshot_s": round(wall, 1),
                      "peak_rss_bytes": peak, "out": a.out}))  # fmt: skip


if __name__ == "__main__":
    main()
