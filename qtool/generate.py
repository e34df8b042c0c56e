"""Greedy text generation from a loaded model (``qtool generate``): the prompt through the tokenizer's chat template
when it has one, greedy decoding with a KV cache (transformers' ``generate``), tokens streamed to a callback."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass
class Generation:
    tokens: list[int]  # the new tokens
    text: str
    prompt_tokens: int
    prefill_s: float  # the prompt's forward and the first new token
    decode_s: float  # every later token


def prompt_ids(tokenizer: Any, prompt: str, chat: bool = True) -> torch.Tensor:
    """``[1, n]`` token ids: ``prompt`` as one user turn of the tokenizer's chat template (when ``chat`` and it has
    one, with the assistant turn opened), else the plain text with the tokenizer's special tokens."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    return ids


@torch.no_grad()
def greedy(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int = 128,
    chat: bool = True,
    on_text: Callable[[str], None] | None = None,
) -> Generation:
    """Greedy decoding of up to ``max_new_tokens`` (stops at the end-of-sequence token); ``on_text`` receives the
    decoded text as it grows (whole words where the tokenizer allows)."""
    from transformers.generation.streamers import BaseStreamer

    ids = prompt_ids(tokenizer, prompt, chat)
    times: list[float] = []
    new: list[int] = []
    shown = 0

    class _Stream(BaseStreamer):
        def put(self, value: torch.Tensor) -> None:
            nonlocal shown
            if not times:  # the first call carries the prompt
                times.append(time.perf_counter())
                return
            times.append(time.perf_counter())
            new.extend(int(t) for t in value.reshape(-1))
            if on_text is not None:
                text = tokenizer.decode(new, skip_special_tokens=True)
                cut = text.rfind(" ") if not text.endswith(("\n", ".", "!", "?")) else len(text)
                if cut > shown:
                    on_text(text[shown:cut])
                    shown = cut

        def end(self) -> None:
            nonlocal shown
            if on_text is not None:
                text = tokenizer.decode(new, skip_special_tokens=True)
                if len(text) > shown:
                    on_text(text[shown:])
                shown = len(text)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start = time.perf_counter()
    model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        streamer=_Stream(),
    )
    first = times[1] if len(times) > 1 else time.perf_counter()
    return Generation(
        tokens=new,
        text=tokenizer.decode(new, skip_special_tokens=True),
        prompt_tokens=ids.shape[1],
        prefill_s=first - start,
        decode_s=(times[-1] - first) if len(times) > 2 else 0.0,
    )
