"""Numeric contracts of qtool.algorithms.losses: KL-Top, MSE, shifted next-token cross-entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qtool.algorithms.losses import ce_loss, kl_top, mse_loss

pytestmark = pytest.mark.numeric

VOCAB = 50


def _logits(seed: int, shape: tuple[int, ...] = (2, 7, VOCAB)) -> torch.Tensor:
    return 3.0 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _full_kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """``KL(P_t ‖ P_s)`` over the full vocabulary, mean over positions, with ``F.kl_div``."""
    log_ps = F.log_softmax(student.double(), -1).reshape(-1, teacher.shape[-1])
    log_pt = F.log_softmax(teacher.double(), -1).reshape(-1, teacher.shape[-1])
    return F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)


@pytest.mark.parametrize("renormalize", [True, False])
def test_kl_top_zero_for_equal_logits(renormalize: bool) -> None:
    t = _logits(0)
    assert kl_top(t, t.clone(), k=10, renormalize=renormalize).item() == pytest.approx(0.0, abs=1e-7)


def test_kl_top_positive_and_shift_invariant() -> None:
    t, s = _logits(0), _logits(1)
    for k in (1, 5, 20, VOCAB):
        if k > 1:
            assert kl_top(t, s, k=k).item() > 1e-3
    # one token: both renormalized distributions are a point mass, so the loss vanishes.
    assert kl_top(t, s, k=1).item() == pytest.approx(0.0, abs=1e-7)
    assert kl_top(t, t + 5.0, k=10).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("renormalize", [True, False])
def test_kl_top_full_vocab_equals_kl_div(renormalize: bool) -> None:
    t, s = _logits(2), _logits(3)
    got = kl_top(t, s, k=VOCAB, renormalize=renormalize)
    assert got.dtype == torch.float32 and got.shape == ()
    assert got.item() == pytest.approx(_full_kl(t, s).item(), abs=1e-6)


def test_kl_top_k_clipped_to_vocab() -> None:
    t, s = _logits(4), _logits(5)
    assert torch.equal(kl_top(t, s, k=VOCAB + 100), kl_top(t, s, k=VOCAB))
    with pytest.raises(ValueError):
        kl_top(t, s, k=0)
    with pytest.raises(ValueError):
        kl_top(t, s[..., :-1], k=5)


def test_kl_top_partial_sum_matches_manual() -> None:
    t, s = _logits(6, (3, VOCAB)), _logits(7, (3, VOCAB))
    k = 8
    idx = t.topk(k, dim=-1).indices
    lt = F.log_softmax(t, -1).gather(-1, idx)
    ls = F.log_softmax(s, -1).gather(-1, idx)
    partial = (lt.exp() * (lt - ls)).sum(-1).mean()
    assert kl_top(t, s, k=k, renormalize=False).item() == pytest.approx(partial.item(), abs=1e-6)
    rt, rs = lt - lt.logsumexp(-1, keepdim=True), ls - ls.logsumexp(-1, keepdim=True)
    renorm = (rt.exp() * (rt - rs)).sum(-1).mean()
    assert kl_top(t, s, k=k).item() == pytest.approx(renorm.item(), abs=1e-6)


def test_kl_top_gradient_reaches_student_only() -> None:
    t = _logits(8).requires_grad_(True)
    s = _logits(9).requires_grad_(True)
    kl_top(t, s, k=10).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_kl_top_bf16_inputs() -> None:
    t, s = _logits(10).bfloat16(), _logits(11).bfloat16().requires_grad_(True)
    got = kl_top(t, s, k=VOCAB)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert got.item() == pytest.approx(_full_kl(t.float(), s.detach().float()).item(), abs=1e-5)
    got.backward()
    assert s.grad.dtype == torch.bfloat16


def test_mse_loss() -> None:
    t = _logits(12, (4, 16)).requires_grad_(True)
    s = _logits(13, (4, 16)).requires_grad_(True)
    got = mse_loss(t, s)
    assert got.item() == pytest.approx(((s - t) ** 2).mean().item(), rel=1e-6)
    got.backward()
    assert t.grad is None and s.grad is not None
    assert mse_loss(t, t.detach().clone()).item() == 0.0


def test_ce_loss_matches_cross_entropy_on_shifted_tensors() -> None:
    logits = _logits(14, (2, 9, VOCAB))
    labels = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(15))
    want = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    assert ce_loss(logits, labels).item() == pytest.approx(want.item(), rel=1e-6)
    labels[0, 3:] = -100
    want = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert ce_loss(logits, labels).item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(ValueError):
        ce_loss(logits, labels[:, :-1])
