"""Distillation losses on sparse (top-k) teacher distributions.

The teacher's full-vocabulary logits are never materialised: for each target position the store
holds the teacher's k most likely token ids and their log-probabilities (at T = 1).

Mass outside the top-k. The teacher's remaining mass ``1 - sum(top-k probs)`` is kept as one
extra "tail" category, and the student's distribution is folded the same way: its probabilities
at the teacher's k ids, plus one tail category holding everything else. Every divergence is
then computed exactly between these two (k + 1)-category distributions. Nothing is
renormalised away, the loss is a true divergence (zero iff the folded distributions agree), and
with k = vocabulary size it equals the full-vocabulary loss exactly (the tests check this).
A teacher tail below 1e-6 is taken as zero: at that size it is rounding noise of the stored
(fp16) log-probabilities, not information.

Temperature T. The student is softened exactly (softmax of logits / T over the full vocabulary,
then folded). The teacher's top-k log-probs are divided by T and the tail is treated as one
lump whose log-mass is divided by T too, then renormalised; this is exact when T = 1 or when
the tail is empty (k = vocabulary size), an approximation otherwise. KD terms are scaled by T².

Positions. ``student_logits[b, t]`` must already be aligned with target ``t`` (the caller shifts:
logits at position i predict token i + 1); ``mask`` marks the positions that count (solution
tokens: prompt and padding are 0). Every loss is a mean over the counted tokens.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KINDS = ("forward_kl", "reverse_kl", "jsd", "ce")
_TINY = 1e-30
_TAIL_FLOOR = 1e-6


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def _log1mexp(logsum: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable; -inf-safe (tiny floor) when x = 0."""
    x = logsum.clamp(max=0.0)
    out = torch.where(x > -math.log(2), torch.log((-torch.expm1(x)).clamp_min(_TINY)),
                      torch.log1p(-torch.exp(x).clamp(max=1 - 1e-7)))
    return out


def fold_teacher(topk_logprobs: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """Teacher log-probs over k + 1 categories (top-k, tail) at temperature T: [..., k + 1]."""
    lp = topk_logprobs.float()
    tail = _log1mexp(torch.logsumexp(lp, dim=-1))
    # a tail below 1e-6 is rounding noise of the stored log-probs (k = vocabulary size, or a
    # confident teacher): make it exactly negligible so that tempering cannot inflate it
    tail = torch.where(tail < math.log(_TAIL_FLOOR), torch.full_like(tail, math.log(_TINY)), tail)
    full = torch.cat([lp, tail.unsqueeze(-1)], dim=-1)
    if T != 1.0:
        full = torch.log_softmax(full / T, dim=-1)
    return full


def _student_lse(z: torch.Tensor, T: float, lse1: torch.Tensor | None = None) -> torch.Tensor:
    """log-sum-exp of the (float) student logits at temperature T, reusing the T = 1 value."""
    if T == 1.0 and lse1 is not None:
        return lse1
    return torch.logsumexp(z / T if T != 1.0 else z, dim=-1)


def fold_student(student_logits: torch.Tensor, topk_ids: torch.Tensor, T: float = 1.0,
                 _lse: torch.Tensor | None = None) -> torch.Tensor:
    """Student log-probs over the teacher's top-k ids plus a tail category: [..., k + 1].

    Only the k gathered logits and one log-sum-exp per position are formed; the full
    log-softmax over the vocabulary is never materialised.
    """
    z = student_logits.float()
    lse = _student_lse(z, T) if _lse is None else _lse
    at_k = z.gather(-1, topk_ids.long()) / T - lse.unsqueeze(-1)
    tail = _log1mexp(torch.logsumexp(at_k, dim=-1))
    return torch.cat([at_k, tail.unsqueeze(-1)], dim=-1)


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position over the last axis, 0·log 0 = 0."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def forward_kl(student_logits, topk_ids, topk_logprobs, mask, T: float = 1.0) -> torch.Tensor:
    """KL(teacher || student), mean over counted tokens (not yet scaled by T²)."""
    return _masked_mean(_kl(fold_teacher(topk_logprobs, T), fold_student(student_logits, topk_ids, T)), mask)


def reverse_kl(student_logits, topk_ids, topk_logprobs, mask, T: float = 1.0) -> torch.Tensor:
    """KL(student || teacher): mode-seeking."""
    return _masked_mean(_kl(fold_student(student_logits, topk_ids, T), fold_teacher(topk_logprobs, T)), mask)


def _jsd(lp: torch.Tensor, lq: torch.Tensor, beta: float) -> torch.Tensor:
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")
    lm = torch.logsumexp(torch.stack([lp + math.log(beta), lq + math.log(1 - beta)]), dim=0)
    return beta * _kl(lp, lm) + (1 - beta) * _kl(lq, lm)


def jsd(student_logits, topk_ids, topk_logprobs, mask, T: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence: β·KL(p‖m) + (1-β)·KL(q‖m), m = β·p + (1-β)·q,
    p the teacher, q the student. β → 0 approaches forward KL up to scale, β → 1 reverse KL."""
    lp, lq = fold_teacher(topk_logprobs, T), fold_student(student_logits, topk_ids, T)
    return _masked_mean(_jsd(lp, lq, beta), mask)


def cross_entropy(student_logits, target_ids, mask, _lse: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the target tokens (T = 1), mean over counted tokens."""
    z = student_logits.float()
    lse = torch.logsumexp(z, dim=-1) if _lse is None else _lse
    return _masked_mean(lse - z.gather(-1, target_ids.long().unsqueeze(-1)).squeeze(-1), mask)


def kd_loss(kind: str, student_logits, target_ids, mask, topk_ids=None, topk_logprobs=None, *,
            T: float = 1.0, alpha: float = 0.5, beta: float = 0.5) -> tuple[torch.Tensor, dict]:
    """``alpha · T² · KD + (1 - alpha) · CE``; ``kind="ce"`` is cross-entropy alone.

    The student's logits are upcast and reduced (log-sum-exp) once and shared by both terms.
    Returns the loss and its parts (floats) for logging.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; choose one of {', '.join(KINDS)}")
    z = student_logits.float()
    lse1 = torch.logsumexp(z, dim=-1)
    if kind == "ce" or alpha == 0.0:
        ce = cross_entropy(z, target_ids, mask, _lse=lse1)
        return ce, {"ce": ce.item(), "kd": float("nan")}
    if topk_ids is None or topk_logprobs is None:
        raise ValueError(f"loss {kind!r} needs the teacher's top-k ids and log-probs")
    # one gather for the target and the teacher's k ids (one sparse backward instead of two)
    picked = z.gather(-1, torch.cat([target_ids.long().unsqueeze(-1), topk_ids.long()], dim=-1))
    ce = _masked_mean(lse1 - picked[..., 0], mask)
    at_k = picked[..., 1:] / T - _student_lse(z, T, lse1).unsqueeze(-1)
    lq = torch.cat([at_k, _log1mexp(torch.logsumexp(at_k, dim=-1)).unsqueeze(-1)], dim=-1)
    lp = fold_teacher(topk_logprobs, T)
    if kind == "forward_kl":
        kd = _masked_mean(_kl(lp, lq), mask)
    elif kind == "reverse_kl":
        kd = _masked_mean(_kl(lq, lp), mask)
    else:
        kd = _masked_mean(_jsd(lp, lq, beta), mask)
    loss = alpha * T * T * kd + (1 - alpha) * ce
    return loss, {"ce": ce.item(), "kd": kd.item()}
