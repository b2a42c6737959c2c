"""Speculative decoding (Leviathan et al. 2023, "Fast inference from transformers via speculative
decoding"; Chen et al. 2023, "Accelerating large language model decoding with speculative sampling").

One iteration, for every row of the batch at once:

1. the drafter proposes g ≤ γ tokens d_1..d_g and its distribution q_1..q_g;
2. the target reads, in ONE forward pass with its KV cache, the last committed token (on the first
   iteration the whole prompt) followed by d_1..d_g; the logits at input slot j (the last committed
   token being slot 0) give p_{j+1}, the target's distribution for the token after slot j, so p_i
   scores d_i and p_{g+1} is the bonus distribution;
3. d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)) (greedy: iff d_i is the target's
   argmax), in order, until the first rejection;
4. at the first rejection, position i, the token is drawn from norm(max(0, p_i − q_i))
   (``residual_distribution``; greedy: the target's argmax); when all g drafts are accepted, a bonus
   token is drawn from p_{g+1}. So every iteration commits between 1 and g + 1 tokens per row,
   and the output has exactly the target's distribution;
5. both caches are rolled back to the committed tokens: a rejected slot is masked in the row's
   attention mask (later tokens get position ids that skip it), and only the tail that every row
   discarded is cropped (see ``drafters.RowCache``). At batch 1 that is an exact crop.

A row stops at an end-of-sequence token or after ``max_new_tokens`` tokens; tokens after either are
never committed and the drafts beyond them are not counted as evaluated.

Statistics (``SpecStats``), per iteration and in total: drafted (proposals per row), evaluated
(positions examined: the drafts up to and including the first rejection, never past a row's eos
or limit), accepted, committed, target calls (forward passes; the prompt is read by the first),
drafter calls (``propose``) and its model forward passes, acceptance counts per draft position,
and wall time split between the drafter (propose, commit) and the target (scoring, acceptance,
rollback). α = accepted ÷ evaluated, with a Wilson interval (``acceptance_rate``): the estimate of
the per-position acceptance probability E[Σ_x min(p(x), q(x))] of the papers. Accepted ÷ drafted is
a different, smaller number (drafts after a rejection are never looked at) and is reported only as
``accepted_per_drafted``.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from statistics import NormalDist

import torch

from ..backends.capture import (
    eos_ids,  # noqa: F401  (re-exported: the same rule as the teacher's generation)
    left_pad,
    prompt_ids,
)
from ..models import tokenizer_fingerprint
from .drafters import Drafter, RowCache, Sampling


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p − q)) over the last axis: where a rejected draft's token is replaced from.
    (Where p ≤ q everywhere, which a rejection makes impossible up to rounding, p itself.)"""
    r = (p - q).clamp_(min=0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp(min=1e-30), p)


def acceptance_rate(accepted: int, evaluated: int, confidence: float = 0.95) -> tuple[float, float, float]:
    """α = accepted ÷ evaluated positions and its Wilson score interval: (α, low, high); NaNs when
    nothing was evaluated."""
    if evaluated <= 0:
        return math.nan, math.nan, math.nan
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    a = accepted / evaluated
    centre = (a + z * z / (2 * evaluated)) / (1 + z * z / evaluated)
    half = z * math.sqrt(a * (1 - a) / evaluated + z * z / (4 * evaluated ** 2)) / (1 + z * z / evaluated)
    return a, max(0.0, centre - half), min(1.0, centre + half)


def expected_tokens_per_call(alpha: float, gamma: int) -> float:
    """Tokens per target call predicted by Leviathan et al. for i.i.d. acceptance α and γ drafts:
    (1 − α^(γ+1)) / (1 − α)."""
    return gamma + 1.0 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


@dataclass
class SpecStats:
    """What one ``speculative_generate`` run did (see the module docstring for the definitions).
    ``iterations`` holds one dict per iteration with per-row lists ``drafted``, ``evaluated``,
    ``accepted``, ``committed`` and ``target_cached`` (valid slots in the target's cache after the
    rollback; equals prompt + generated − 1), ``cache_slots``/``cache_length`` (the target's
    mask width and KV length, equal), and ``drafter_s``/``target_s``."""

    gamma: int
    batch: int
    drafter: str = ""
    iterations: list[dict] = field(default_factory=list)
    drafted: int = 0
    evaluated: int = 0
    accepted: int = 0
    generated: int = 0
    target_calls: int = 0
    row_calls: int = 0  # Σ over target calls of the rows still generating
    drafter_calls: int = 0
    drafter_forwards: int = 0
    evaluated_at: list[int] = field(default_factory=list)  # [γ]: rows that examined draft j+1
    accepted_at: list[int] = field(default_factory=list)  # [γ]: rows that accepted draft j+1
    drafter_seconds: float = 0.0
    target_seconds: float = 0.0
    seconds: float = 0.0

    def alpha(self, confidence: float = 0.95) -> tuple[float, float, float]:
        """(α, low, high): accepted ÷ evaluated positions with its Wilson interval."""
        return acceptance_rate(self.accepted, self.evaluated, confidence)

    def alpha_at(self) -> list[float]:
        """Acceptance rate at each draft position (accepted ÷ evaluated there)."""
        return [a / e if e else math.nan for a, e in zip(self.accepted_at, self.evaluated_at)]

    def tokens_per_target_call(self) -> float:
        """E[tokens per target call]: committed tokens ÷ row-calls of the target."""
        return self.generated / self.row_calls if self.row_calls else math.nan

    def accepted_per_drafted(self) -> float:
        """Accepted ÷ drafted tokens (NOT α: drafts after a rejection are never examined)."""
        return self.accepted / self.drafted if self.drafted else math.nan

    def tokens_per_second(self) -> float:
        return self.generated / self.seconds if self.seconds else math.nan

    def summary(self, confidence: float = 0.95) -> dict:
        """One flat row for a table."""
        a, lo, hi = self.alpha(confidence)
        out = {k: v for k, v in asdict(self).items() if k not in ("iterations", "evaluated_at", "accepted_at")}
        out.update({"alpha": a, "alpha_low": lo, "alpha_high": hi,
                    "tokens_per_target_call": self.tokens_per_target_call(),
                    "predicted_tokens_per_target_call":
                        math.nan if math.isnan(a) else expected_tokens_per_call(a, self.gamma),
                    "accepted_per_drafted": self.accepted_per_drafted(),
                    "tokens_per_second": self.tokens_per_second()})
        return out


class _Clock:
    """Wall-time marks; on a GPU, CUDA events (read once at the end, no sync in the loop)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1000 if self.cuda else b - a


def check_drafter(target, drafter: Drafter, tokenizer=None) -> None:
    """Refuse, in one line, a drafter whose vocabulary (or, when it names one, tokenizer) is not the
    target's: speculative decoding compares p and q token id by token id."""
    vocab = target.config.get_text_config().vocab_size
    name = getattr(drafter, "name", type(drafter).__name__)
    theirs = getattr(drafter, "vocab_size", None)
    if theirs is not None and theirs != vocab:
        raise ValueError(f"drafter {name!r} has a vocabulary of {theirs} token ids but the target has {vocab}: "
                         "speculative decoding needs a drafter with the target's tokenizer")
    if tokenizer is not None and len(tokenizer) > vocab:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the target's vocabulary only {vocab}: "
                         "it is not the target's tokenizer")
    other = getattr(drafter, "tokenizer", None)
    if tokenizer is not None and other is not None and tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer):
        raise ValueError(f"drafter {name!r} uses a different tokenizer from the target's: "
                         "speculative decoding needs a drafter with the target's tokenizer")


@torch.inference_mode()
def speculative_decode(target, drafter: Drafter, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                       gamma: int, max_new_tokens: int, sampling: Sampling,
                       eos: list[int]) -> tuple[list[list[int]], SpecStats]:
    """The loop, on token ids: left-padded ``input_ids`` [B, T] and mask -> (new tokens per row, up
    to and including an eos id, stats)."""
    if not (isinstance(gamma, int) and gamma >= 1):
        raise ValueError(f"gamma must be an integer ≥ 1, got {gamma!r}")
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise ValueError(f"max_new_tokens must be an integer ≥ 1, got {max_new_tokens!r}")
    check_drafter(target, drafter)
    dev = target.device
    input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev).long()
    B = input_ids.shape[0]
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("speculative_decode needs left-padded prompts (every row's last token is real)")
    clock, start = _Clock(dev), time.perf_counter()
    stats = SpecStats(gamma=gamma, batch=B, drafter=getattr(drafter, "name", type(drafter).__name__),
                      evaluated_at=[0] * gamma, accepted_at=[0] * gamma)
    forwards0 = getattr(drafter, "forwards", 0)
    eos_t = torch.tensor(sorted(set(eos)), dtype=torch.long, device=dev)
    eos_set = set(eos)
    cols = torch.arange(gamma + 1, device=dev)
    rows_t = torch.arange(B, device=dev)
    state = RowCache(target, B)
    # committed tokens the target has not read yet, and their mask (None: all real)
    pending, pending_mask = input_ids, attention_mask
    left = torch.full((B,), max_new_tokens, dtype=torch.long, device=dev)  # tokens a row may still add; 0: done
    out: list[list[int]] = [[] for _ in range(B)]
    active = [True] * B
    later = []
    drafter.reset(input_ids, attention_mask)

    while any(active):
        m0 = clock.mark()
        # 1. draft (never more than the longest remaining row can still use)
        g = min(gamma, max(max_new_tokens - len(o) for o, a in zip(out, active) if a) - 1)
        asked = g > 0  # a drafter asked to propose hears what was committed, even if it proposed nothing
        if asked:
            drafts, q = drafter.propose(g, sampling)
            stats.drafter_calls += 1
            if drafts.ndim != 2 or drafts.shape[0] != B or drafts.shape[1] > g:
                raise ValueError(f"drafter {stats.drafter} proposed a tensor of shape {tuple(drafts.shape)}; "
                                 f"expected [{B}, ≤{g}]")
            g = drafts.shape[1]
            drafts, q = drafts.to(dev), (None if q is None else q.to(dev))
        else:
            drafts, q = input_ids.new_zeros(B, 0), None
        m1 = clock.mark()

        # 2. score: slot 0 is the last committed token (first iteration: the whole prompt), then the
        # g drafts; logits at slot j are p for the token after it, so logits[:, i - 1] score draft i
        real = drafts >= 0
        ids = torch.cat([pending, drafts.clamp(min=0)], 1)
        slot_mask = None if pending_mask is None else torch.cat([pending_mask, torch.ones_like(drafts)], 1)
        logits = state.forward(ids, slot_mask, logits_to_keep=g + 1)
        stats.target_calls += 1
        n_real = real.long().cumprod(1).sum(1)  # proposals before the first "no proposal" (-1)

        # 3. accept drafts in order until the first rejection; 4. then the residual (or bonus) token
        if not sampling.do_sample:
            best = logits.argmax(-1)  # [B, g + 1]
            ok = (drafts == best[:, :g]) & real
            n_acc = ok.long().cumprod(1).sum(1)
            extra = best[rows_t, n_acc]
        else:
            if q is not None and (q.shape[:2] != drafts.shape or q.shape[-1] != logits.shape[-1]):
                raise ValueError(f"drafter {stats.drafter} returned q of shape {tuple(q.shape)}; expected "
                                 f"[{B}, {g}, {logits.shape[-1]}] (the target's vocabulary)")
            p = sampling.probs(logits)  # [B, g + 1, V]
            safe = drafts.clamp(min=0)
            p_x = p[:, :g].gather(-1, safe[..., None])[..., 0]
            q_x = q.gather(-1, safe[..., None])[..., 0] if q is not None else torch.ones_like(p_x)
            u = torch.rand(B, g, device=dev, generator=sampling.generator)
            ok = (u * q_x < p_x) & real  # u < p/q, i.e. accept with probability min(1, p/q)
            n_acc = ok.long().cumprod(1).sum(1)
            # q at the first rejected position: the drafter's q, one-hot on a deterministic draft, zero
            # where nothing was proposed or everything was accepted (then the residual is p itself)
            at = n_acc.clamp(max=max(g - 1, 0))
            q_rej = torch.zeros_like(p[:, 0])
            if g:
                if q is not None:
                    q_rej = q[rows_t, at].float()
                else:
                    q_rej.scatter_(-1, safe[rows_t, at][:, None], 1.0)
                q_rej *= (n_acc < n_real)[:, None].to(q_rej.dtype)
            extra = torch.multinomial(residual_distribution(p[rows_t, n_acc], q_rej), 1,
                                      generator=sampling.generator)[:, 0]

        # the row's candidate tokens: accepted drafts then the extra token; cut at eos and the limit
        cand = torch.cat([drafts.clamp(min=0), extra[:, None]], 1)
        cand[rows_t, n_acc] = extra
        upto = cols[:g + 1][None] <= n_acc[:, None]
        is_eos = torch.isin(cand, eos_t) & upto
        eos_len = torch.where(is_eos.any(1), is_eos.long().argmax(1) + 1, g + 2)  # g + 2: no eos
        n_commit = torch.minimum(torch.minimum(n_acc + 1, eos_len), left)
        evaluated = torch.minimum(n_acc + (n_acc < n_real).long(), n_commit)
        accepted = torch.minimum(n_acc, n_commit)
        drafted = n_real * (left > 0).long()
        left = torch.where(eos_len <= n_commit, 0, left - n_commit)
        per_pos = torch.stack([(cols[:g][None] < evaluated[:, None]).sum(0),
                               (cols[:g][None] < accepted[:, None]).sum(0)])
        # 5. roll the target back: the pending slots stay for rows that committed something, draft
        # slot i stays iff draft i was committed and is not the last committed token (that one is
        # read next time, as slot 0)
        was_read = (pending_mask.bool() if pending_mask is not None else torch.ones_like(pending, dtype=torch.bool))
        keep = torch.cat([was_read & (n_commit > 0)[:, None], cols[1:g + 1][None] < n_commit[:, None]], 1)
        pending, pending_mask = cand.gather(1, (n_commit - 1).clamp(min=0)[:, None]), None

        # the one host sync of the iteration
        info = torch.cat([cand.flatten(), n_commit, evaluated, accepted, drafted, per_pos.flatten()]).tolist()
        w = g + 1
        cand_l = [info[b * w:(b + 1) * w] for b in range(B)]
        o = B * w
        n_commit_l, evaluated_l, accepted_l, drafted_l = (info[o + k * B:o + (k + 1) * B] for k in range(4))
        o += 4 * B
        for j in range(g):
            stats.evaluated_at[j] += info[o + j]
            stats.accepted_at[j] += info[o + g + j]
        widest = max(n_commit_l)
        # slots [pending P | drafts g]: the drafts after the widest kept one go for every row
        state.keep(keep, keep.shape[1] - g + max(widest - 1, 0))
        new = [c[:n] for c, n in zip(cand_l, n_commit_l)]
        stats.row_calls += sum(active)
        for b, toks in enumerate(new):
            if toks:
                out[b].extend(toks)
                if toks[-1] in eos_set or len(out[b]) >= max_new_tokens:
                    active[b] = False
        m2 = clock.mark()
        if asked:
            drafter.commit(new)
        m3 = clock.mark()
        later.append((m0, m1, m2, m3, state.valid))  # read after the loop, without a sync here
        stats.iterations.append({"drafted": drafted_l, "evaluated": evaluated_l, "accepted": accepted_l,
                                 "committed": n_commit_l, "cache_slots": state.mask.shape[1],
                                 "cache_length": state.length()})
        stats.drafted += sum(drafted_l)
        stats.evaluated += sum(evaluated_l)
        stats.accepted += sum(accepted_l)
        stats.generated += sum(n_commit_l)

    for it, (m0, m1, m2, m3, valid) in zip(stats.iterations, later):
        it["target_cached"] = valid.tolist()
        it["drafter_s"] = clock.seconds(m0, m1) + clock.seconds(m2, m3)
        it["target_s"] = clock.seconds(m1, m2)
        stats.drafter_seconds += it["drafter_s"]
        stats.target_seconds += it["target_s"]
    stats.drafter_forwards = getattr(drafter, "forwards", 0) - forwards0
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    stats.seconds = time.perf_counter() - start
    return out, stats


def speculative_generate(target, drafter: Drafter, tokenizer, prompts: list[str], *, gamma: int,
                         max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
                         top_p: float = 1.0, seed: int = 0) -> tuple[list[dict], SpecStats]:
    """Generate for a batch of prompt texts with ``drafter`` proposing ``gamma`` tokens per target
    call. Greedy output equals the target's greedy ``generate``; sampled output has exactly the
    target's distribution (temperature, top_p). Rows like ``transformers_engine.generate_with_capture``'s:
    ``token_ids`` (up to and including eos), ``response``, ``finished``, ``stop`` ("eos"/"cap")."""
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    check_drafter(target, drafter, tokenizer)
    dev = target.device
    ids = prompt_ids(tokenizer, prompts)
    if not all(ids):
        raise ValueError(f"prompt {next(i for i, x in enumerate(ids) if not x)} is empty after tokenisation")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids, mask = left_pad(ids, pad, dev)
    generator = torch.Generator(device=dev).manual_seed(seed)
    sampling = Sampling(do_sample=do_sample, temperature=temperature, top_p=top_p, generator=generator)
    eos = eos_ids(target, tokenizer)
    new, stats = speculative_decode(target, drafter, input_ids, mask, gamma=gamma, max_new_tokens=max_new_tokens,
                                    sampling=sampling, eos=eos)
    rows = []
    for seq in new:
        finished = bool(seq) and seq[-1] in eos
        rows.append({"token_ids": seq, "finished": finished, "stop": "eos" if finished else "cap",
                     "response": tokenizer.decode(seq, skip_special_tokens=True).strip()})
    return rows, stats
