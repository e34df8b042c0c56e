"""The pinned token-level perplexity (docs/metrics.md; GPTQ/QuaRot/OSTQuant papers' definition).

Tokenize the corpus once, cut it into non-overlapping windows of ``seqlen`` tokens, drop the last partial window,
and average the next-token NLL over every predicted token (``seqlen - 1`` per window): ``ppl = exp(mean NLL)``.
A token budget keeps the first ``max_tokens // seqlen`` windows, so numbers at one budget are comparable.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from qtool.errors import QtoolError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float  # mean NLL per predicted token, nats
    seqlen: int
    windows: int
    predicted_tokens: int
    corpus_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def default_seqlen(model, requested: int | None = None) -> int:
    """``requested``, else 2048 or the model's context if smaller."""
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    if requested is None:
        return min(2048, context)
    if requested > context:
        raise QtoolError(f"evaluate.seqlen: {requested} exceeds the model's context of {context}; use ≤ {context}")
    return requested


@torch.no_grad()
def token_perplexity(
    model,
    ids: torch.Tensor,
    seqlen: int,
    max_tokens: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Perplexity:
    """``ids: [N] int64`` -> ``Perplexity``. ``progress(done, total)`` is called after each window."""
    windows = ids.numel() // seqlen
    if max_tokens is not None:
        windows = min(windows, max_tokens // seqlen)
    if windows < 1:
        raise QtoolError(
            f"evaluate: a token budget of {max_tokens} and {ids.numel()} corpus tokens give no full window of "
            f"{seqlen}; raise max_tokens or lower seqlen"
        )
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64)
    for w in range(windows):
        x = ids[w * seqlen : (w + 1) * seqlen].unsqueeze(0).to(device)
        logits = model(x, use_cache=False).logits[0, :-1].float()
        total += F.cross_entropy(logits, x[0, 1:], reduction="sum").double().cpu()
        if progress:
            progress(w + 1, windows)
    predicted = windows * (seqlen - 1)
    nll = (total / predicted).item()
    log.info("perplexity %.4f over %d windows of %d", math.exp(nll), windows, seqlen)
    return Perplexity(math.exp(nll), nll, seqlen, windows, predicted, ids.numel())
