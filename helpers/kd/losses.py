"""Distillation losses on sparse (top-k) teacher distributions.

The teacher's full-vocabulary logits are never materialised: for each target position the store
holds the teacher's k most likely token ids, their log-probabilities (at T = 1), and the log of
the mass outside them (``tail_logprobs``, computed exactly in fp32 when the teacher ran).

One fold for both sides. Both distributions are first folded, at T = 1, into the same k + 1
categories: the teacher's k ids plus one "tail" category holding everything else.

- teacher: its stored top-k log-probs and its stored tail log-mass;
- student: its log-softmax at the teacher's k ids (the logits there minus the T = 1
  log-sum-exp, which the cross-entropy term shares), and as tail the log-sum-exp of its logits
  outside those ids minus the same log-sum-exp. The tail is computed exactly from the logits,
  never as log(1 - sum), which is fp32 noise when the tail is tiny.

Then both (k + 1)-way folds are tempered identically: ``log_softmax(fold / T)``. Every
divergence is computed exactly between these two (k + 1)-category distributions, so each loss
is a true divergence: zero iff the tempered folds agree, hence exactly zero (up to rounding)
for a student equal to its teacher at every T and k. The renormalisation also absorbs the fp16
rounding of the stored top-k values. When the ids cover the vocabulary (k >= V) the tail is
empty, exactly -inf on both sides (whatever ``tail_logprobs`` says), and every loss equals the
full-vocabulary loss at every T. With k < V and T != 1 the loss tempers the folded
distributions, not the fold of the tempered full ones (which the teacher's store cannot give).
KD terms are scaled by T².

Without a stored tail (``tail_logprobs=None``: tests, older callers) the teacher's tail is derived
from the top-k as log(1 - sum exp(top-k)) (exactly -inf when k >= V). A teacher tail of -inf with
k < V makes the reverse KL infinite, as it should be for a student that puts mass there.

Positions. ``student_logits[b, t]`` must already be aligned with target ``t`` (the caller shifts:
logits at position i predict token i + 1); ``mask`` marks the positions that count (solution
tokens: prompt and padding are 0). Every loss is a mean over the counted tokens. Positions with
mask 0 may hold filler (ids 0 repeated, log-probs -30, tail 0): their values stay finite, so
they contribute exactly nothing, to the loss and to the gradients.
"""
from __future__ import annotations

import math

import torch

from ..settings import LOSS_KINDS as KINDS  # declared once, with the other settings

_NEG_INF = float("-inf")


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0 (x > 0 is taken as 0), -inf at 0; stable on both sides of -log 2.
    Each branch sees only inputs where it is finite, so neither can leak a NaN."""
    x = x.clamp(max=0.0)
    near = x > -math.log(2)
    safe = torch.full_like(x, -1.0)
    a = torch.log(-torch.expm1(torch.where(near, x, safe)))
    b = torch.log1p(-torch.exp(torch.where(near, safe, x)))
    return torch.where(near, a, b)


def derived_tail(topk_logprobs: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """The teacher's tail log-mass derived from its top-k: log(1 - sum exp(top-k)), fp32, [...];
    exactly -inf when k >= ``vocab_size``. Used only when no stored tail is given."""
    lp = topk_logprobs.float()
    if vocab_size is not None and lp.shape[-1] >= vocab_size:
        return lp.new_full(lp.shape[:-1], _NEG_INF)
    return _log1mexp(torch.logsumexp(lp, dim=-1))


def fold_teacher(topk_logprobs: torch.Tensor, T: float = 1.0, tail_logprobs: torch.Tensor | None = None, *,
                 vocab_size: int | None = None) -> torch.Tensor:
    """Teacher log-probs over k + 1 categories (top-k, tail), tempered: [..., k + 1].

    ``log_softmax([top-k, tail] / T)``: renormalised at every T. The tail is ``tail_logprobs``
    (per position, T = 1) or, when None, derived from the top-k; it is -inf when k >= ``vocab_size``.
    """
    lp = topk_logprobs.float()
    if (vocab_size is not None and lp.shape[-1] >= vocab_size) or tail_logprobs is None:
        tail = derived_tail(lp, vocab_size)
    else:
        tail = tail_logprobs.float().to(lp.device)
    return torch.log_softmax(torch.cat([lp, tail.unsqueeze(-1)], dim=-1) / T, dim=-1)


def _fold_student(z: torch.Tensor, topk_ids: torch.Tensor, lse1: torch.Tensor, T: float,
                  at_k: torch.Tensor | None = None, outside: torch.Tensor | None = None) -> torch.Tensor:
    """Student fold from float logits ``z``, their T = 1 log-sum-exp ``lse1`` and (optionally)
    the logits already gathered at ``topk_ids``."""
    ids = topk_ids.long()
    if at_k is None:
        at_k = z.gather(-1, ids)
    at_k = at_k - lse1.unsqueeze(-1)
    if ids.shape[-1] >= z.shape[-1]:
        # the ids cover the vocabulary: the tail is empty (a constant, so no gradient flows into it)
        tail = at_k.new_full(at_k.shape[:-1], _NEG_INF)
    else:
        tail = (outside_logsumexp(z, ids) if outside is None else outside) - lse1
    return torch.log_softmax(torch.cat([at_k, tail.unsqueeze(-1)], dim=-1) / T, dim=-1)


class _LogSumExpInsideOut(torch.autograd.Function):
    """Both log-sum-exps a KD step needs, from one pass over the vocabulary: over all of ``z``
    (the T = 1 normaliser) and over the entries outside ``ids`` (the student's tail).

    Backward: the gradient of both is one dense term, softmax(z)·(g_all + g_out·e^(lse − out))
    outside the ids and softmax(z)·g_all at them, so it costs what the backward of a single
    ``logsumexp`` costs (rows whose tail is ~80 nats below the total, where e^(lse − out) would
    overflow, take the two terms separately)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, ids: torch.Tensor):
        m = z.amax(dim=-1, keepdim=True)
        e = (z - m).exp_()
        total = e.sum(dim=-1)
        e.scatter_(-1, ids, 0.0)
        outside = e.sum(dim=-1)
        del e
        m = m.squeeze(-1)
        lse, out = m + total.log(), m + outside.log()
        weak = outside < 1e-30  # the shifted tail underflowed: recompute shifted by its own maximum
        if weak.any():
            out[weak] = torch.logsumexp(z[weak].scatter(-1, ids[weak], _NEG_INF), dim=-1)
        ctx.save_for_backward(z, ids, lse, out)
        return lse, out

    @staticmethod
    def backward(ctx, g_lse: torch.Tensor, g_out: torch.Tensor):
        z, ids, lse, out = ctx.saved_tensors
        p = (z - lse.unsqueeze(-1)).exp_()
        at_ids = p.gather(-1, ids) * g_lse.unsqueeze(-1)
        gap = lse - out
        near = gap < 80.0
        scale = g_lse + torch.where(near, g_out * torch.exp(gap.clamp(max=80.0)), torch.zeros_like(g_out))
        grad = p.mul_(scale.unsqueeze(-1))
        if not near.all():
            far = ~near
            extra = (z[far] - out[far].unsqueeze(-1)).exp_().mul_(g_out[far].unsqueeze(-1))
            grad[far] += extra
        return grad.scatter_(-1, ids, at_ids), None


def logsumexp_inside_out(z: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logsumexp(z), log-sum-exp of z outside ids)`` over the last axis, in one pass, differentiable."""
    return _LogSumExpInsideOut.apply(z, ids.long())


def _normaliser_and_tail(z: torch.Tensor, topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The student's T = 1 log-sum-exp and, when the ids leave a tail, the log-sum-exp outside them
    (None when they cover the vocabulary: the tail is empty)."""
    if topk_ids.shape[-1] < z.shape[-1]:
        return logsumexp_inside_out(z, topk_ids)
    return torch.logsumexp(z, dim=-1), None


def outside_logsumexp(z: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The log-sum-exp of ``z`` over the entries not in ``ids`` (last axis), exact and differentiable."""
    return logsumexp_inside_out(z, ids)[1]


def fold_student(student_logits: torch.Tensor, topk_ids: torch.Tensor, T: float = 1.0,
                 _lse: torch.Tensor | None = None) -> torch.Tensor:
    """Student log-probs over the teacher's top-k ids plus a tail category, tempered: [..., k + 1].

    Folded at T = 1 (log-softmax at the k ids; the tail as the exact log-sum-exp outside them),
    then ``log_softmax(fold / T)`` exactly like the teacher's fold.
    """
    z = student_logits.float()
    lse1 = torch.logsumexp(z, dim=-1) if _lse is None else _lse
    return _fold_student(z, topk_ids, lse1, T)


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position over the last axis, 0·log 0 = 0.

    Where p = 0 both log-probs are replaced by 0 before the product, so an empty category
    (-inf on both sides) gives 0 and a zero gradient, never 0·inf = NaN.
    """
    p = logp.exp()
    live = p > 0
    return (p * (torch.where(live, logp, 0.0) - torch.where(live, logq, 0.0))).sum(-1)


def _jsd(lp: torch.Tensor, lq: torch.Tensor, beta: float) -> torch.Tensor:
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")
    # a category empty on both sides would make the mixture's log-sum-exp -inf with a NaN
    # gradient: give it finite stand-ins (its p and q are 0, so the value there does not count)
    empty = torch.isneginf(lp) & torch.isneginf(lq)
    a = torch.where(empty, 0.0, lp) + math.log(beta)
    b = torch.where(empty, 0.0, lq) + math.log(1 - beta)
    lm = torch.logsumexp(torch.stack([a, b]), dim=0)
    return beta * _kl(lp, lm) + (1 - beta) * _kl(lq, lm)


_TV_DEADZONE = 1e-6


def _tv(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """Total-variation distance ½·Σ|p − q| per position (an empty category contributes 0 and no
    gradient). For a drafter q of a target p, 1 − TV is exactly the acceptance probability of one
    speculative-decoding step, so this loss trains the acceptance rate directly.

    |·| has no gradient at 0 and rounding leaves p − q at ~1e-8 where the two agree, which would
    give a sign-noise gradient of size q; differences below ``_TV_DEADZONE`` (far below anything
    that moves an acceptance rate) count as 0, so a student equal to its teacher has zero value
    and zero gradient."""
    d = lp.exp() - lq.exp()
    d = torch.where(d.abs() > _TV_DEADZONE, d, torch.zeros_like(d))
    return 0.5 * d.abs().sum(-1)


def _divergence(kind: str, lp: torch.Tensor, lq: torch.Tensor, beta: float) -> torch.Tensor:
    if kind == "forward_kl":
        return _kl(lp, lq)
    if kind == "reverse_kl":
        return _kl(lq, lp)
    if kind == "tv":
        return _tv(lp, lq)
    return _jsd(lp, lq, beta)


def _folds(student_logits, topk_ids, topk_logprobs, T, tail_logprobs):
    z = student_logits.float()
    lse1, outside = _normaliser_and_tail(z, topk_ids)
    lq = _fold_student(z, topk_ids, lse1, T, outside=outside)
    lp = fold_teacher(topk_logprobs.to(z.device), T, tail_logprobs, vocab_size=z.shape[-1])
    return lp, lq


def forward_kl(student_logits, topk_ids, topk_logprobs, mask, T: float = 1.0, *,
               tail_logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) between the tempered folds, mean over counted tokens (not scaled by T²)."""
    lp, lq = _folds(student_logits, topk_ids, topk_logprobs, T, tail_logprobs)
    return _masked_mean(_kl(lp, lq), mask)


def reverse_kl(student_logits, topk_ids, topk_logprobs, mask, T: float = 1.0, *,
               tail_logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """KL(student || teacher): mode-seeking."""
    lp, lq = _folds(student_logits, topk_ids, topk_logprobs, T, tail_logprobs)
    return _masked_mean(_kl(lq, lp), mask)


def jsd(student_logits, topk_ids, topk_logprobs, mask, T: float = 1.0, beta: float = 0.5, *,
        tail_logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence: β·KL(p‖m) + (1-β)·KL(q‖m), m = β·p + (1-β)·q,
    p the teacher, q the student. β → 0 approaches forward KL up to scale, β → 1 reverse KL."""
    lp, lq = _folds(student_logits, topk_ids, topk_logprobs, T, tail_logprobs)
    return _masked_mean(_jsd(lp, lq, beta), mask)


def total_variation(student_logits, topk_ids, topk_logprobs, mask, T: float = 1.0, *,
                    tail_logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """Total-variation distance ½·Σ|p − q| between the tempered folds (1 − the acceptance rate of
    the student drafting for the teacher, on these categories)."""
    lp, lq = _folds(student_logits, topk_ids, topk_logprobs, T, tail_logprobs)
    return _masked_mean(_tv(lp, lq), mask)


def cross_entropy(student_logits, target_ids, mask, _lse: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the target tokens (T = 1), mean over counted tokens."""
    z = student_logits.float()
    lse = torch.logsumexp(z, dim=-1) if _lse is None else _lse
    return _masked_mean(lse - z.gather(-1, target_ids.long().unsqueeze(-1)).squeeze(-1), mask)


def kd_loss(kind: str, student_logits, target_ids, mask, topk_ids=None, topk_logprobs=None, *,
            T: float = 1.0, alpha: float = 0.5, beta: float = 0.5,
            tail_logprobs: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """``alpha · T² · KD + (1 - alpha) · CE``; ``kind="ce"`` is cross-entropy alone.

    ``tail_logprobs`` [...]: the teacher's log-mass outside its top-k per position (fp32, T = 1);
    None derives it from the top-k (see the module notes). The student's logits are upcast and
    reduced (log-sum-exp at T = 1) once and shared by both terms. Returns the loss and its parts
    (floats) for logging.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; choose one of {', '.join(KINDS)}")
    z = student_logits.float()
    if kind == "ce" or alpha == 0.0:
        ce = cross_entropy(z, target_ids, mask)
        return ce, {"ce": ce.item(), "kd": float("nan")}
    if topk_ids is None or topk_logprobs is None:
        raise ValueError(f"loss {kind!r} needs the teacher's top-k ids and log-probs")
    ce_t, kd_t = _per_position(kind, z, target_ids, topk_ids, topk_logprobs, tail_logprobs, T, beta)
    ce, kd = _masked_mean(ce_t, mask), _masked_mean(kd_t, mask)
    # alpha = 1: KD alone (0·CE would be NaN where the student gives a target token probability 0)
    loss = T * T * kd if alpha == 1.0 else alpha * T * T * kd + (1 - alpha) * ce
    return loss, {"ce": ce.item(), "kd": kd.item()}


def _per_position(kind, z, target_ids, topk_ids, topk_logprobs, tail_logprobs, T, beta):
    """Cross-entropy of the target and the KD divergence at every position, from float logits ``z``."""
    lse1, outside = _normaliser_and_tail(z, topk_ids)
    # one gather for the target and the teacher's k ids (one sparse backward instead of two)
    picked = z.gather(-1, torch.cat([target_ids.long().unsqueeze(-1), topk_ids.long()], dim=-1))
    lq = _fold_student(z, topk_ids, lse1, T, at_k=picked[..., 1:], outside=outside)
    lp = fold_teacher(topk_logprobs, T, tail_logprobs, vocab_size=z.shape[-1])
    return lse1 - picked[..., 0], _divergence(kind, lp, lq, beta)


class _ChunkedHeadLoss(torch.autograd.Function):
    """Loss through the LM head, a chunk of positions at a time, with the gradients of the hidden
    states and the head taken chunk by chunk in the forward pass (the fused linear cross-entropy
    pattern): each chunk's logits exist only while that chunk is processed, and nothing is
    recomputed (one forward and two backward matrix products, as for the full logits)."""

    @staticmethod
    def forward(ctx, h, w, b, rows, chunk, terms, scale_ce, scale_kd, sums):
        # a frozen head (LoRA leaves it alone) gets no gradient: one matrix product per chunk saved
        grad_h, grad_w = torch.zeros_like(h), torch.zeros_like(w) if w.requires_grad else None
        grad_b = None if b is None or not b.requires_grad else torch.zeros_like(b)
        total = ce_sum = kd_sum = 0.0
        contiguous = len(rows) > 0 and int(rows[-1] - rows[0]) == len(rows) - 1
        for s in range(0, len(rows), chunk):
            # a run of positions is a slice (views, no copies of the hidden states)
            r = slice(int(rows[s]), int(rows[min(s + chunk, len(rows)) - 1]) + 1) if contiguous else rows[s:s + chunk]
            with torch.enable_grad():
                z = torch.nn.functional.linear(h[r], w, b).detach().requires_grad_()
                ce_t, kd_t = terms(z.float(), r)
                part = scale_ce * ce_t.sum() + (scale_kd * kd_t.sum() if kd_t is not None else 0.0)
                (dz,) = torch.autograd.grad(part, z)
            grad_h[r] = dz @ w
            if grad_w is not None:
                grad_w.addmm_(dz.T, h[r])  # in place: no [V, H] temporary per chunk
            if grad_b is not None:
                grad_b += dz.sum(0)
            total += part.item()
            ce_sum += ce_t.sum().item()
            kd_sum += kd_t.sum().item() if kd_t is not None else 0.0
        ctx.grads = (grad_h, grad_w, grad_b)
        sums.update(ce=ce_sum, kd=kd_sum)
        return h.new_tensor(total, dtype=torch.float32)

    @staticmethod
    def backward(ctx, g):
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None
        g = g.to(grad_h.dtype)
        scaled = [None if x is None else x * g for x in (grad_h, grad_w, grad_b)]
        return (*scaled, None, None, None, None, None, None)


def chunked_kd_loss(kind: str, hidden, lm_head_weight, target_ids, mask, topk_ids=None, topk_logprobs=None, *,
                    T: float = 1.0, alpha: float = 0.5, beta: float = 0.5, tail_logprobs=None, lm_head_bias=None,
                    chunk: int = 512) -> tuple[torch.Tensor, dict]:
    """``kd_loss`` from the student's last hidden states [B, L, H] and its LM head [V, H], without
    ever holding fp32 logits for all positions: ``chunk`` counted positions at a time, the logits
    are computed, reduced to the per-position CE and divergence, differentiated and dropped
    (``_ChunkedHeadLoss``), so the peak holds one chunk of logits instead of B·L and no product is
    recomputed. Same values and gradients as ``kd_loss`` on the full logits (up to the order of the
    sums). ``hidden`` is already aligned with the targets (position j predicts token j + 1)."""
    if kind not in KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; choose one of {', '.join(KINDS)}")
    ce_only = kind == "ce" or alpha == 0.0
    if not ce_only and (topk_ids is None or topk_logprobs is None):
        raise ValueError(f"loss {kind!r} needs the teacher's top-k ids and log-probs")
    B, L = target_ids.shape
    flat = lambda x: None if x is None else x.reshape(B * L, *x.shape[2:])  # noqa: E731
    h, tgt, m = flat(hidden), flat(target_ids).long(), flat(mask).float()
    ids, lps, tails = flat(topk_ids), flat(topk_logprobs), flat(tail_logprobs)
    rows = (m > 0).nonzero().squeeze(-1)  # positions that count: the others need no logits at all
    n = float(m.sum().clamp_min(1.0))

    def terms(z, r):
        if ce_only:
            return torch.logsumexp(z, -1) - z.gather(-1, tgt[r].unsqueeze(-1)).squeeze(-1), None
        return _per_position(kind, z, tgt[r], ids[r], lps[r], None if tails is None else tails[r], T, beta)

    scale_ce, scale_kd = (1.0 if ce_only else 1 - alpha) / n, (0.0 if ce_only else alpha * T * T) / n
    sums: dict = {}
    loss = _ChunkedHeadLoss.apply(h, lm_head_weight, lm_head_bias, rows, chunk, terms, scale_ce, scale_kd, sums)
    return loss, {"ce": sums["ce"] / n, "kd": float("nan") if ce_only else sums["kd"] / n}
