"""Distillation losses on targets moved across tokenizers, from one or several teachers.

Two kinds of unit per student position (``targets``):

- **token** (a 1:1 piece): the existing sparse divergence (``helpers.kd.losses``) between the
  teacher's mapped top-k + tail and the student's fold over the same ids, tempered alike. Filler
  columns (teacher log-prob -inf) are empty categories on both sides.
- **piece** (the last student token of a multi-token piece): the same divergence between two
  Bernoulli distributions, {the piece, anything else}, with the teacher's and the student's
  probabilities of the whole piece by the chain rule (the student's: the sum of its log-probs of
  the piece's tokens). A student that gives every piece the teacher's probability has zero loss.

``KD = Σ_t Σ_units w_t · d / Σ_t Σ_units w_t`` over counted positions, with per-example teacher
weights ``w_t`` (``fuse``): one teacher with weight 1 is plain KD; MinCE is a one-hot weight. For
forward KL the weighted sum of divergences has the gradient of the divergence to the weighted
mixture of the teachers, so weighting the losses fuses the distributions. The loss is
``alpha · T² · KD + (1 - alpha) · CE`` on the student's tokens of the text, as ``kd_loss``; with
identical tokenizers (every position a token unit, the identity map) it equals ``kd_loss``.
"""
from __future__ import annotations

import math

import torch

from ..kd.losses import KINDS, _divergence, _fold_student, _log1mexp, _normaliser_and_tail, fold_teacher
from .targets import PIECE, TOKEN

_PIECE_CAP = math.log1p(-1e-6)  # a piece probability of exactly 1 (fp32 rounding) would leave "else" at -inf


def _bernoulli(logp: torch.Tensor, T: float) -> torch.Tensor:
    logp = logp.clamp(max=_PIECE_CAP)
    return torch.log_softmax(torch.stack([logp, _log1mexp(logp)], dim=-1) / T, dim=-1)


def piece_logprobs(token_logprobs: torch.Tensor, piece_len: torch.Tensor) -> torch.Tensor:
    """Per position j, the sum of ``token_logprobs[j - piece_len[j] + 1 : j + 1]`` (chain rule;
    fp64 running sums, so long sequences lose no precision): [B, L]."""
    c = torch.nn.functional.pad(token_logprobs.double().cumsum(-1), (1, 0))
    end = torch.arange(1, token_logprobs.shape[-1] + 1, device=token_logprobs.device).expand_as(piece_len)
    start = (end - piece_len.long()).clamp_min(0)
    return (c.gather(-1, end) - c.gather(-1, start)).to(token_logprobs.dtype)


def cross_kd_loss(kind: str, student_logits, target_ids, mask, teachers: dict, *, T: float = 1.0,
                  alpha: float = 0.5, beta: float = 0.5) -> tuple[torch.Tensor, dict]:
    """``alpha · T² · KD + (1 - alpha) · CE`` with KD over token and piece units of every teacher.

    ``teachers`` holds stacked per-teacher arrays (already shifted like ``targets``):
    ``topk_ids`` [n, B, L, k], ``topk_logprobs`` [n, B, L, k] (-inf: no category), ``tail_logprobs``,
    ``unit``, ``piece_logprob``, ``piece_len`` [n, B, L] and ``weight`` [n, B]. Returns the loss and
    its parts: ``ce``, ``kd`` and ``kd_<t>`` (teacher t's unweighted mean over its units).
    """
    if kind not in KINDS or kind == "ce":
        raise ValueError(f"cross-tokenizer KD needs a divergence, one of {', '.join(k for k in KINDS if k != 'ce')}; "
                         f"got {kind!r}")
    z = student_logits.float()
    n_teachers = teachers["topk_ids"].shape[0]
    # the first teacher's pass over the vocabulary also gives the normaliser (as in kd_loss)
    lse1, outside0 = (_normaliser_and_tail(z, teachers["topk_ids"][0].long()) if n_teachers
                      else (torch.logsumexp(z, dim=-1), None))
    tok_lp = z.gather(-1, target_ids.long().unsqueeze(-1)).squeeze(-1) - lse1
    m = mask.to(z.dtype)
    ce = -(tok_lp * m).sum() / m.sum().clamp_min(1.0)
    num = den = z.new_zeros(())
    parts = {"ce": ce.item()}
    for t in range(n_teachers):
        ids, t_lp = teachers["topk_ids"][t].long(), teachers["topk_logprobs"][t].float()
        unit, w = teachers["unit"][t], teachers["weight"][t].to(z.dtype).unsqueeze(-1)
        live = torch.isfinite(t_lp)
        outside = outside0 if t == 0 else _normaliser_and_tail(z, ids)[1]
        at_k = torch.where(live, z.gather(-1, ids), float("-inf"))
        lq = _fold_student(z, ids, lse1, T, at_k=at_k, outside=outside)
        lp = fold_teacher(t_lp, T, teachers["tail_logprobs"][t])
        d_tok = _divergence(kind, lp, lq, beta)
        s_piece = piece_logprobs(tok_lp, teachers["piece_len"][t])
        t_piece = torch.nan_to_num(teachers["piece_logprob"][t].float(), nan=-1.0)
        d_piece = _divergence(kind, _bernoulli(t_piece, T), _bernoulli(s_piece, T), beta)
        is_tok, is_piece = (unit == TOKEN).to(z.dtype) * m, (unit == PIECE).to(z.dtype) * m
        d = torch.where(is_tok > 0, d_tok, 0.0) + torch.where(is_piece > 0, d_piece, 0.0)
        units = is_tok + is_piece
        num = num + (w * units * d).sum()
        den = den + (w * units).sum()
        parts[f"kd_{t}"] = ((units * d).sum() / units.sum().clamp_min(1.0)).item()
    kd = torch.where(den > 0, num / den.clamp_min(1e-12), num.new_zeros(()))
    parts["kd"] = kd.item()
    return alpha * T * T * kd + (1 - alpha) * ce, parts
