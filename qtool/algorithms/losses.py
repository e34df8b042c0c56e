"""Training losses between a full-precision teacher and a fake-quantized student (OSTQuant, arXiv 2501.13987).

All losses compute in float32 (bf16/fp16 inputs are upcast) and detach the teacher side, so gradients reach the
student (and through it the learned rotations and scales) only. Each returns a 0-dim float32 tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ce_loss", "kl_top", "mse_loss"]


def kl_top(teacher_logits: Tensor, student_logits: Tensor, k: int = 1000, renormalize: bool = True) -> Tensor:
    """KL-Top: ``KL(P_teacher ‖ P_student)`` restricted to the teacher's top-``k`` tokens, mean over positions.

    Shapes: ``teacher_logits, student_logits: [..., vocab]`` (equal shapes); every leading index is a position.
    ``k`` is clipped to ``vocab``. Per position, with ``S`` the indices of the ``k`` largest teacher logits and
    ``log p(i) = z_i − logsumexp_{j ∈ vocab} z_j`` the full-vocabulary log-softmax (teacher ``p_t``, student ``p_s``):

    - ``renormalize=True`` (default): both distributions are renormalized over ``S``,
      ``log p̃(i) = log p(i) − logsumexp_{j ∈ S} log p(j)`` (which equals ``z_i − logsumexp_{j ∈ S} z_j``, the
      softmax of the gathered logits, and is computed that way), and the loss is the proper KL divergence
      ``Σ_{i ∈ S} p̃_t(i) (log p̃_t(i) − log p̃_s(i)) ≥ 0`` between the two top-``k`` distributions. It is 0 iff the
      student's logits on ``S`` equal the teacher's up to a per-position constant; with ``k = vocab`` it is the
      full KL divergence.
    - ``renormalize=False``: the un-renormalized full-vocabulary probabilities are used, giving the partial KL sum
      ``Σ_{i ∈ S} p_t(i) (log p_t(i) − log p_s(i))`` (the top-``k`` terms of the full KL; it can be negative for
      ``k < vocab``, and it equals the full KL for ``k = vocab``).

    The teacher is detached; the result is a 0-dim float32 tensor (mean of the per-position KL).
    """
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"kl_top needs equal shapes; got teacher {tuple(teacher_logits.shape)}, "
            f"student {tuple(student_logits.shape)}"
        )
    if k < 1:
        raise ValueError(f"kl_top needs k >= 1; got {k}")
    teacher = teacher_logits.detach()
    k = min(int(k), teacher.shape[-1])
    idx = teacher.topk(k, dim=-1, sorted=False).indices
    t_top = teacher.gather(-1, idx).float()
    s_top = student_logits.gather(-1, idx).float()
    if renormalize:
        log_pt = torch.log_softmax(t_top, dim=-1)
        log_ps = torch.log_softmax(s_top, dim=-1)
    else:
        log_pt = t_top - teacher.float().logsumexp(dim=-1, keepdim=True)
        log_ps = s_top - student_logits.float().logsumexp(dim=-1, keepdim=True)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=-1)
    return kl.mean()


def mse_loss(teacher: Tensor, student: Tensor) -> Tensor:
    """Mean squared error ``mean((student − teacher)²)`` over all elements, in float32, teacher detached.

    ``teacher, student``: equal shapes (hidden states ``[..., hidden]`` or logits ``[..., vocab]``).
    """
    if teacher.shape != student.shape:
        raise ValueError(
            f"mse_loss needs equal shapes; got teacher {tuple(teacher.shape)}, student {tuple(student.shape)}"
        )
    return F.mse_loss(student.float(), teacher.detach().float())


def ce_loss(student_logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Next-token cross-entropy with the causal shift, mean over the predicted (non-ignored) tokens, in float32.

    Shapes: ``student_logits: [..., seq, vocab]``, ``labels: [..., seq]`` (int64). Position ``t`` predicts token
    ``t + 1``: ``CE(logits[..., :-1, :], labels[..., 1:])``; labels equal to ``ignore_index`` are left out of the
    mean (HF convention, ``-100``).
    """
    if student_logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"ce_loss needs labels of shape logits[..., :-1]; got logits {tuple(student_logits.shape)}, "
            f"labels {tuple(labels.shape)}"
        )
    logits = student_logits[..., :-1, :].float()
    target = labels[..., 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=ignore_index)
