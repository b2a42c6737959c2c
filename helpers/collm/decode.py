"""Co-LLM decoding: ``co_generate`` (greedy, a batch at a time, both models with KV caches; with an
assistant of another tokenizer, row by row by text: ``_co_generate_text`` with ``_Reader`` and
``_Text``), ``DecodeStats``, ``deferral_frequency``, and the runs over records: ``prompts_for``,
``decode_grid`` (every record under every threshold or random rate) and ``as_responses`` (rows in
the shape ``assess.score`` reads). Uses ``head`` and ``threshold``."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..backends.capture import eos_ids
from .head import _run, base_forward, cross_tokenizer
from .threshold import _defer, logit_threshold


ASST_CHUNK = 8  # across tokenizers: at most this many assistant tokens per deferral (fewer where a piece ends)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


@dataclass
class DecodeStats:
    base_calls: int = 0
    asst_calls: int = 0
    asst_tokens_read: int = 0
    seconds: float = 0.0


@torch.no_grad()
def co_generate(base, head, tok, asst, base_prompts: list[str], asst_prompts: list[str], *, eta_logit=None,
                random_prob=None, eta=None, seed: int = 0, max_new_tokens: int = 128, base_cache: bool = True,
                asst_cache: bool = True, stats: DecodeStats | None = None, asst_tok=None,
                asst_chunk: int = ASST_CHUNK, prefill: dict | None = None) -> list[dict]:
    """Greedy Co-LLM decoding of a batch. Row b defers token t to the assistant when its deferral
    logit is above ``eta_logit[b]`` (learned; +inf: never, −inf: always, exactly), or, with
    ``random_prob``, with probability random_prob[b]. ``eta`` is the same on the σ scale
    (σ > η), for callers that think in probabilities; it cannot express cuts above σ ≈ 1 − 1e-16.

    Thresholds are one value or one per row. The base reads ``base_prompts``, the assistant
    ``asst_prompts`` (its own strategy prompt, or the same), both followed by the tokens written
    so far. With caches, the assistant runs only at steps where some unfinished row defers, and
    then reads all tokens it has not seen in one forward pass. Returns per row: ``token_ids``,
    ``who`` (1 = assistant), ``logit`` (the deferral logit at each step), ``sigma``, ``response``,
    ``finished``.

    ``asst_tok``: the assistant's tokenizer when it differs from the base's (``asst_prompts`` then
    rendered with it); decoding then goes by text, row by row (see ``_co_generate_text``).

    ``prefill``: a dict shared by calls on the same ``base_prompts`` with the same base and head
    (``decode_grid`` passes one per batch): the base's pass over the prompts is run once and kept
    there, and each call goes on from a copy of it, so its tokens are those of a call without it.
    """
    given = [k for k, v in (("eta_logit", eta_logit), ("eta", eta), ("random_prob", random_prob)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"co_generate needs exactly one of eta_logit, eta, random_prob; got {given or 'none'}")
    if eta is not None:
        eta_logit = [logit_threshold(float(e)) for e in np.atleast_1d(np.asarray(eta, dtype=np.float64))]
    t0 = time.perf_counter()
    stats = stats if stats is not None else DecodeStats()
    dev = base.device
    B = len(base_prompts)
    if cross_tokenizer(tok, asst_tok) is not None:
        cuts = None if eta_logit is None else np.broadcast_to(np.asarray(eta_logit, dtype=np.float64), (B,))
        probs = None if random_prob is None else np.broadcast_to(np.asarray(random_prob, dtype=np.float64), (B,))
        rows = [_co_generate_text(base, head, tok, asst, asst_tok, bp, ap, cut=None if cuts is None else float(cuts[b]),
                                  random_prob=None if probs is None else float(probs[b]), seed=(seed, b),
                                  max_new_tokens=max_new_tokens, base_cache=base_cache, asst_cache=asst_cache,
                                  asst_chunk=asst_chunk, stats=stats)
                for b, (bp, ap) in enumerate(zip(base_prompts, asst_prompts))]
        stats.seconds += time.perf_counter() - t0
        return rows
    from ..models import add_special_tokens

    add = add_special_tokens(tok)
    enc_b = tok(base_prompts, return_tensors="pt", padding=True, add_special_tokens=add).to(dev)
    enc_a = tok(asst_prompts, return_tensors="pt", padding=True, add_special_tokens=add).to(asst.device)
    cut = None if eta_logit is None else torch.as_tensor(
        np.broadcast_to(np.asarray(eta_logit, dtype=np.float64), (B,)).copy(), dtype=torch.float64, device=dev)
    rprob = None if random_prob is None else torch.as_tensor(random_prob, dtype=torch.float32).expand(B)
    rng = torch.Generator().manual_seed(seed)
    eos = set([tok.eos_token_id] + ([] if base.generation_config.eos_token_id is None else
                                    np.atleast_1d(base.generation_config.eos_token_id).tolist()))
    eos_t = torch.tensor(sorted(eos), device=dev)
    pad = tok.pad_token_id

    gen = torch.empty((B, 0), dtype=torch.long, device=dev)
    who, lg = [], []
    finished = torch.zeros(B, dtype=torch.bool, device=dev)

    def base_step(past):
        ids = torch.cat([enc_b["input_ids"], gen], 1)
        mask = torch.cat([enc_b["attention_mask"], torch.ones_like(gen)], 1)
        pos = _positions(mask)
        if past is not None:
            ids, pos = ids[:, -1:], pos[:, -1:]
        logits, d, past = base_forward(base, head, ids, mask, pos, past, use_cache=base_cache)
        stats.base_calls += 1
        return logits[:, -1], d[:, -1].double(), (past if base_cache else None)

    a_past, a_seen = None, 0

    def asst_step():
        nonlocal a_past, a_seen
        g = gen.to(asst.device)
        ids = torch.cat([enc_a["input_ids"], g], 1)
        mask = torch.cat([enc_a["attention_mask"], torch.ones_like(g)], 1)
        pos = _positions(mask)
        if a_past is not None:
            ids, pos = ids[:, enc_a["input_ids"].shape[1] + a_seen:], pos[:, enc_a["input_ids"].shape[1] + a_seen:]
        out, cache = _run(asst, a_past, input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=asst_cache)
        stats.asst_calls += 1
        stats.asst_tokens_read += ids.shape[1]
        if asst_cache:
            a_past, a_seen = cache, g.shape[1]
        return out.logits[:, -1].to(dev)

    if prefill is not None and base_cache:
        if "base" not in prefill:
            prefill["base"] = base_step(None)
        b_logits, dlogit, b_past = copy.deepcopy(prefill["base"])
    else:
        b_logits, dlogit, b_past = base_step(None)
    for _ in range(max_new_tokens):
        if cut is not None:
            defer = _defer(dlogit, cut)
        else:
            defer = (torch.rand(B, generator=rng) < rprob).to(dev)
        defer &= ~finished
        token = b_logits.argmax(-1)
        if defer.any():
            token = torch.where(defer, asst_step().argmax(-1), token)
        token = torch.where(finished, torch.full_like(token, pad), token)
        who.append(defer)
        lg.append(dlogit)
        gen = torch.cat([gen, token[:, None]], 1)
        finished |= torch.isin(token, eos_t)
        if finished.all():
            break
        b_logits, dlogit, b_past = base_step(b_past if base_cache else None)

    who_t, lg_t, gen = torch.stack(who, 1).cpu(), torch.stack(lg, 1).cpu(), gen.cpu()
    rows = []
    for b in range(B):
        seq = gen[b].tolist()
        n = next((j + 1 for j, t in enumerate(seq) if t in eos), len(seq))
        rows.append({"token_ids": seq[:n], "who": who_t[b, :n].int().tolist(), "logit": lg_t[b, :n].tolist(),
                     "sigma": torch.sigmoid(lg_t[b, :n]).tolist(),
                     "finished": seq[n - 1] in eos if n else False,
                     "response": tok.decode(seq[:n], skip_special_tokens=True).strip()})
    stats.seconds += time.perf_counter() - t0
    return rows


# --------------------------------------------------------------------------- decoding across tokenizers
def _decode(tok, ids) -> str:
    # no clean-up of spaces around punctuation: the text of a token list must only grow as tokens are added
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class _Text:
    """The response of one row as text, and per character who wrote it and at which decision."""

    def __init__(self):
        self.text, self.who, self.step = "", [], []

    def add(self, s: str, who: int, step: int) -> None:
        self.text += s
        self.who += [who] * len(s)
        self.step += [step] * len(s)

    def at(self, i: int) -> tuple[int, int]:
        i = min(max(i, 0), len(self.text) - 1)
        return self.who[i], self.step[i]

    def segments(self) -> list[list]:
        """Runs of characters by writer: [[who, text], ...]."""
        out = []
        for c, w in zip(self.text, self.who):
            if out and out[-1][0] == w:
                out[-1][1] += c
            else:
                out.append([w, c])
        return out


class _Reader:
    """One model's side of a row decoded across tokenizers: its prompt ids, then token ids for the
    response text so far, each with its character span in the text and (who, decision) of its first
    character: the tokens it wrote itself, kept as written, and the other model's text as its own
    tokenizer splits it. A KV cache holds what it has read and is cut back where tokens change."""

    def __init__(self, model, tok, prompt: str, *, head=None, cache: bool = True, stats: DecodeStats):
        from ..models import add_special_tokens

        self.model, self.tok, self.head, self.cache, self.stats = model, tok, head, cache, stats
        self.prompt = tok(prompt, add_special_tokens=add_special_tokens(tok)).input_ids
        self.ids, self.spans, self.meta = [], [], []
        self.covered = 0     # characters of the text these tokens stand for
        self.pending = 0     # own tokens whose text is not out yet (a character still missing bytes)
        self.decoded = ""    # the decoded text of ``ids`` at the last whole character
        self.past, self.read, self.out = None, 0, None

    def step(self):
        """(next-token logits, deferral logit or None) after the prompt and the tokens so far,
        reading only what the cache has not."""
        if self.out is None:
            full = self.prompt + self.ids
            start = self.read if self.past is not None else 0
            dev = self.model.device
            ids = torch.tensor([full[start:]], device=dev)
            mask = torch.ones((1, len(full)), dtype=torch.long, device=dev)
            pos = torch.arange(start, len(full), device=dev)[None]
            if self.head is not None:
                logits, d, past = base_forward(self.model, self.head, ids, mask, pos, self.past, use_cache=self.cache)
                d = float(d[0, -1].double())
                self.stats.base_calls += 1
            else:
                out, past = _run(self.model, self.past, input_ids=ids, attention_mask=mask, position_ids=pos,
                                 use_cache=self.cache)
                logits, d = out.logits, None
                self.stats.asst_calls += 1
                self.stats.asst_tokens_read += ids.shape[1]
            if self.cache:
                self.past, self.read = past, len(full)
            self.out = (logits[0, -1], d)
        return self.out

    def write(self, token: int, row: _Text, who: int, step: int) -> None:
        """Append a token this model chose; its text joins the row once it ends on a whole character."""
        self.ids.append(token)
        self.meta.append((who, step))
        self.pending += 1
        self.out = None
        self.settle(row, who, step)

    def settle(self, row: _Text, who: int, step: int, final: bool = False) -> None:
        """Add the text of pending tokens to the row, unless it ends inside a character (``final``: anyway)."""
        if self.pending == 0:
            return
        text = _decode(self.tok, self.ids)
        if text.endswith("\ufffd") and not final:  # bytes of a character still to come
            return
        if not text.startswith(self.decoded):
            raise ValueError(f"decoding with {type(self.tok).__name__} {self.tok.name_or_path!r} rewrote earlier text "
                             f"({self.decoded[-20:]!r} became {text[-20:]!r}): Co-LLM across tokenizers needs "
                             "a decoder whose text only grows as tokens are added")
        start = len(row.text)
        row.add(text[len(self.decoded):], who, step)
        self.spans += [(start, len(row.text))] * self.pending
        self.pending, self.decoded, self.covered = 0, text, len(row.text)

    def ends_piece(self, row: _Text, token: int, other_tok) -> bool:
        """Whether the text so far ends a piece of the alignment of both tokenizations of it followed
        by the text of ``token`` (what this model writes next): a point to hand back at that splits
        no token of either tokenizer."""
        from ..fusion.align import align_texts

        nxt = _decode(self.tok, self.ids + [token])
        text = row.text + nxt[len(self.decoded):]
        if len(text) == len(row.text):  # nothing more (end-of-sequence, a special token)
            return True
        return any(p.end == len(row.text) for p in align_texts(other_tok, self.tok, text)[2])

    def sync(self, row: _Text) -> None:
        """Catch up with text the other model wrote: keep this model's tokens up to the last piece
        boundary between them and a re-tokenization of the whole text (a boundary both agree on),
        then the re-tokenization; the KV cache is cut back to the tokens kept."""
        from ..fusion.align import align_offsets, token_offsets

        n = len(row.text)
        if self.covered == n:
            return
        ids, spans = token_offsets(self.tok, row.text)
        k = j = 0
        for p in align_offsets(self.spans + [(self.covered, n)], spans, n):  # the new text as one stand-in token
            if p.a_end > len(self.ids):
                break
            k, j = p.a_end, p.b_end
        self.ids = self.ids[:k] + ids[j:]
        self.spans = self.spans[:k] + spans[j:]
        self.meta = self.meta[:k] + [row.at(a) for a, _ in spans[j:]]
        self.decoded, self.covered, self.out = _decode(self.tok, self.ids), n, None
        keep = len(self.prompt) + k
        if self.past is not None and self.read > keep:
            if getattr(self.past, "is_croppable", True):
                self.past.crop(keep - self.read)  # a negative count: remove that many positions
                self.read = keep
            else:
                self.past, self.read = None, 0


def _co_generate_text(base, head, tok, asst, asst_tok, base_prompt: str, asst_prompt: str, *, cut, random_prob,
                      seed, max_new_tokens: int, base_cache: bool, asst_cache: bool, asst_chunk: int,
                      stats: DecodeStats) -> dict:
    """One row of Co-LLM decoding across tokenizers, the response kept as text.

    At each decision the base reads its tokens of the text and gives logits and a deferral logit.
    Not deferring, it writes its greedy token. Deferring, the assistant takes its tokens of the
    text (``_Reader.sync``) and writes greedy tokens until the text ends a piece of the alignment of
    both tokenizations, judged with the token it would write next (``_Reader.ends_piece``), or it
    has written ``asst_chunk`` tokens; then the base syncs and decides again. A model's text
    joins the response only at whole characters (a byte-level token can end inside one), so the
    base hands over only there and the assistant goes on past ``asst_chunk`` until it gets there.

    ``max_new_tokens`` counts tokens written, each in its writer's tokenizer: never deferring
    (cut +inf) is the base's greedy ``generate`` token for token, always deferring (−inf) the
    assistant's greedy text; either model's end-of-sequence ends the row (the base's is put on
    its tokens when the assistant ends it). Provenance is per base token: ``who`` and ``logit`` of
    the decision that wrote its first character (a base token can straddle a point where the base
    handed over, when its tokenizer joins the characters there); ``segments`` has it exactly, per
    run of characters."""
    row, logits = _Text(), []
    b_side = _Reader(base, tok, base_prompt, head=head, cache=base_cache, stats=stats)
    a_side = _Reader(asst, asst_tok, asst_prompt, cache=asst_cache, stats=stats)
    eos_b, eos_a = set(eos_ids(base, tok)), set(eos_ids(asst, asst_tok))
    rng = np.random.default_rng(list(seed))
    budget, finished = max_new_tokens, False
    while budget > 0 and not finished:
        b_logits, d = b_side.step()
        step = len(logits)
        logits.append(d)
        if cut is not None:
            defer = cut < 0 if math.isinf(cut) else d > cut
        else:
            defer = bool(rng.random() < random_prob)
        if not defer or b_side.pending:  # the base cannot hand over inside a character
            t = int(b_logits.argmax())
            b_side.write(t, row, 0, step)
            budget -= 1
            finished = t in eos_b
            continue
        a_side.sync(row)
        written = 0
        while budget > 0:
            t = int(a_side.step()[0].argmax())
            if written and not a_side.pending and (written >= asst_chunk or a_side.ends_piece(row, t, tok)):
                break
            a_side.write(t, row, 1, step)
            written += 1
            budget -= 1
            if t in eos_a:
                finished = True
                break
        b_side.sync(row)
        if finished:
            b_side.ids.append(tok.eos_token_id)
            b_side.spans.append((len(row.text), len(row.text)))
            b_side.meta.append((1, step))
    for side, who in ((a_side, 1), (b_side, 0)):  # the cap can stop either inside a character
        side.settle(row, who, len(logits) - 1, final=True)
    b_side.sync(row)
    lg = torch.tensor([logits[s] for _, s in b_side.meta], dtype=torch.float64)
    return {"token_ids": list(b_side.ids), "who": [w for w, _ in b_side.meta], "logit": lg.tolist(),
            "sigma": torch.sigmoid(lg).tolist(), "finished": finished, "response": row.text.strip(),
            "segments": row.segments()}


def deferral_frequency(rows: list[dict]) -> float:
    """Share of generated tokens written by the assistant."""
    n = sum(len(r["who"]) for r in rows)
    return sum(sum(r["who"]) for r in rows) / max(n, 1)


def prompts_for(tok, records, assistant_strategy: str = "base", templates: dict | None = None, asst_tok=None):
    """The base sees the plain question; the assistant sees its strategy prompt (``base`` = the same),
    rendered with its own tokenizer's chat template when it has one (``asst_tok``)."""
    from ..data import plain_solution
    from ..models import prompt_text
    from ..prompts import student_messages, teacher_messages

    base = [prompt_text(tok, student_messages(r.question)) for r in records]
    asst = [prompt_text(asst_tok or tok, teacher_messages(assistant_strategy, r.question, plain_solution(r.solution),
                                                          templates)) for r in records]
    return base, asst


def decode_grid(base, head, tok, asst, records, settings: list[dict], *, assistant_strategy: str = "base",
                batch_size: int = 16, max_new_tokens: int = 128, seed: int = 0, progress: bool = True,
                stats: DecodeStats | None = None, asst_tok=None, asst_chunk: int = ASST_CHUNK) -> list[list[dict]]:
    """Decode every record under every setting (``{"eta_logit": threshold}``: defer when the
    deferral logit is above it, ±inf for never / always; or ``{"random_prob": p}``). Returns rows
    per setting, each in record order with an ``id``.

    Each batch holds one setting's rows, records in order, so a setting's generations depend only
    on the setting, the records and ``batch_size``, never on which other settings are in the grid:
    in bf16, batch shape and the assistant's chunked reads change rounding enough to flip greedy
    tokens, and two settings that must agree (a threshold of −inf and the assistant alone) would
    otherwise differ by where their rows fell. ``asst_tok``: the assistant's tokenizer when it
    differs from the base's (decoding by text, see ``co_generate``)."""
    for k, s in enumerate(settings):
        if len(s) != 1 or next(iter(s)) not in ("eta_logit", "random_prob"):
            raise ValueError(f"decode_grid setting {k} is {s!r}; give exactly one of 'eta_logit' (a deferral-logit "
                             "threshold) or 'random_prob'")
    from tqdm.auto import tqdm

    bp, ap = prompts_for(tok, records, assistant_strategy, asst_tok=asst_tok)
    out: list[list[dict]] = [[] for _ in settings]
    bar = tqdm(total=len(settings) * len(records), desc="co-decoding", unit="row", disable=not progress)
    for c in range(0, len(records), batch_size):
        prefill = {}  # the base's pass over this batch's prompts, run once for every setting
        for s, setting in enumerate(settings):
            (key, value), = setting.items()
            rows = co_generate(base, head, tok, asst, bp[c:c + batch_size], ap[c:c + batch_size],
                               **{key: float(value)}, seed=seed + c, max_new_tokens=max_new_tokens, stats=stats,
                               asst_tok=asst_tok, asst_chunk=asst_chunk, prefill=prefill)
            out[s] += [{"id": r.id, **row} for r, row in zip(records[c:c + batch_size], rows)]
            bar.update(len(rows))
    bar.close()
    return out


def as_responses(rows: list[dict]):
    """Co-LLM rows in the shape ``assess.score`` reads."""
    import pandas as pd

    return pd.DataFrame([{"id": r["id"], "response": r["response"], "n_tokens": len(r["token_ids"]),
                          "finished": r["finished"]} for r in rows])
