"""What every teacher engine shares: top-k capture of a distribution, the end-of-sequence rule,
repetition-loop detection, and the one row shape a generated or scored solution takes.

A row (one prompt's solution) holds ``token_ids`` (up to and including end-of-sequence),
``response`` (decoded, special tokens dropped), ``finished``, ``stop`` (``"eos"``, ``"loop"`` or
``"cap"``) and, with capture, per token: ``topk_ids`` [n, k] int32, ``topk_logprobs`` [n, k]
float16, ``tail_logprobs`` [n] float32 (the log of the mass outside the top-k) and
``token_logprobs`` [n] float32 (the token actually written), all of the raw distribution at
temperature 1.
"""
from __future__ import annotations

import re

import numpy as np
import torch

from ..models import add_special_tokens


def tail_logprob(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Log of the probability mass outside ``ids`` given full log-probs ``logp`` (fp32, [...]):
    the log-sum-exp of the log-probs outside the ids, exactly -inf when they cover the vocabulary."""
    logp = logp.float()
    if ids.shape[-1] >= logp.shape[-1]:
        return logp.new_full(logp.shape[:-1], float("-inf"))
    return torch.logsumexp(logp.scatter(-1, ids.long(), float("-inf")), dim=-1)


def topk_capture(logits: torch.Tensor, k: int, taken: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The capture of full-vocabulary ``logits`` [n, V] (any dtype): top-k ids and log-probs, the
    tail log-mass and, given the ``taken`` ids [n], their log-probs; on the logits' device."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    out = {"topk_ids": ids.to(torch.int32), "topk_logprobs": values.to(torch.float16),
           "tail_logprobs": tail_logprob(logp, ids)}
    if taken is not None:
        out["token_logprobs"] = logp.gather(-1, taken.long().to(logp.device)[..., None]).squeeze(-1)
    return out


def eos_ids(model=None, tokenizer=None, extra=()) -> list[int]:
    """End-of-sequence ids, the one rule of every engine: the generation config's (of ``model`` when
    given; engines without a ``transformers`` model read it with ``engine_eos``, or pass other ids as
    ``extra``), then the tokenizer's (when given). Llama 3.1 stops at three: ``<|eot_id|>``,
    ``<|eom_id|>`` and ``<|end_of_text|>``; its tokenizer names one."""
    eos = None if model is None else model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    for i in [*extra, *([] if tokenizer is None or tokenizer.eos_token_id is None else [tokenizer.eos_token_id])]:
        if i not in eos:
            eos.append(int(i))
    return eos


def engine_eos(tokenizer, *sources: str | None) -> list[int]:
    """``eos_ids`` for an engine that has no ``transformers`` model: the generation config of the
    first of ``sources`` (model ids or folders; None skipped) that has one, then the tokenizer's."""
    from ..models import generation_eos

    for source in sources:
        found = generation_eos(source) if source is not None else []
        if found:
            return eos_ids(tokenizer=tokenizer, extra=found)
    return eos_ids(tokenizer=tokenizer)


def text_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """The tokens a teacher reads for scored texts: each text, then end-of-sequence."""
    return [tokenizer(t, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for t in texts]


def left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as one left-padded batch: ``(input_ids, attention_mask)``, every row ending
    at the last column."""
    width = max(map(len, seqs))
    ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in seqs], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
    return ids, mask


def prompt_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Rendered prompt texts as token ids (special tokens only where no chat template wrote them)."""
    add = add_special_tokens(tokenizer)
    return [tokenizer(p, add_special_tokens=add).input_ids for p in prompts]


_DIGITS = re.compile(r"\d+(?:[.,]\d+)*")


def repetition_loop(text: str, *, repeats: int = 3, max_period: int = 4, min_words: int = 6) -> bool:
    """True when the last complete lines of ``text`` repeat a block of 1..``max_period`` lines
    ``repeats`` times in a row, numbers ignored ("the total is 4 + 2 = 6." then "... 6 + 2 = 8.")
    and blank lines skipped; the block must hold at least ``min_words`` words, so short list items
    or a repeated heading do not count. A line still being written is not looked at."""
    lines = [_DIGITS.sub("#", line.strip()) for line in text.split("\n")[:-1] if line.strip()]
    for period in range(1, max_period + 1):
        tail = lines[-repeats * period:]
        if len(tail) < repeats * period or sum(len(line.split()) for line in tail[:period]) < min_words:
            continue
        if all(tail[i] == tail[i + period] for i in range(len(tail) - period)):
            return True
    return False


def token_loop(ids: list[int], *, repeats: int = 3, max_period: int = 64, min_length: int = 48) -> bool:
    """True when the last max(``repeats``·p, ``min_length``) tokens are one block of p ≤ ``max_period``
    tokens repeated exactly (a loop inside one line, e.g. "2 2 2 2 ...")."""
    n = len(ids)
    for period in range(1, max_period + 1):
        length = max(repeats * period, min_length)
        if n < length:
            break
        tail = ids[n - length:]
        if tail[period:] == tail[:-period]:
            return True
    return False


LOOP_CHECK_EVERY = 8  # new tokens between two looks for a repetition loop


def looping(tokenizer, new_ids: list[int]) -> bool:
    """Whether a solution so far (its new token ids) has fallen into a repetition loop."""
    return token_loop(new_ids) or repetition_loop(tokenizer.decode(new_ids, skip_special_tokens=True))


def solution_row(tokenizer, seq: list[int], eos, *, looped_at: int | None = None,
                 capture: dict | None = None) -> dict:
    """The row of one generated solution: ``seq`` is its new tokens (possibly followed by padding),
    cut after the first end-of-sequence id (or at ``looped_at``, where a loop stop ended it);
    ``capture`` holds its per-token arrays (numpy or torch, at least as long as the cut)."""
    seq = list(seq[:looped_at]) if looped_at else list(seq)
    eos = set(eos)
    n = next((j + 1 for j, t in enumerate(seq) if t in eos), len(seq))
    stop = "eos" if seq and seq[n - 1] in eos else "loop" if looped_at else "cap"
    row = {"token_ids": seq[:n], "finished": stop == "eos", "stop": stop,
           "response": tokenizer.decode(seq[:n], skip_special_tokens=True).strip()}
    return {**row, **{key: _numpy(v[:n]) for key, v in (capture or {}).items()}}


def scored_row(tokenizer, text_ids: list[int], capture: dict) -> dict:
    """The row of one scored (teacher-forced) text: finished by construction."""
    return {"token_ids": list(text_ids), "finished": True, "stop": "eos",
            "response": tokenizer.decode(text_ids, skip_special_tokens=True).strip(),
            **{key: _numpy(v) for key, v in capture.items()}}


def _numpy(v) -> np.ndarray:
    return v.cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)


def decode_row(tokenizer, eos, logits: torch.Tensor, step, *, k: int, max_new_tokens: int, do_sample: bool = False,
               temperature: float = 1.0, top_p: float = 1.0, stop_loops: bool = False) -> dict:
    """One sequence decoded by the project's own rule on an engine's logits: ``logits`` [V] are the
    prompt's last position's, ``step(token)`` feeds a token and returns the next position's. Greedy
    takes the first highest logit; sampling applies the ``transformers`` temperature and top-p warpers
    and draws with the global torch generator (which ``build_store`` seeds). Returns the row."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    warpers = [TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)] if do_sample else []
    stops, new, caps, looped = set(eos), [], [], None
    for n in range(1, max_new_tokens + 1):
        logits = logits.float().cpu()
        if do_sample:
            scores = logits[None]
            for warp in warpers:
                scores = warp(None, scores)
            token = int(torch.multinomial(torch.softmax(scores, -1), 1))
        else:
            token = int(logits.argmax())
        caps.append(topk_capture(logits[None], k, torch.tensor([token])))
        new.append(token)
        if token in stops:
            break
        if stop_loops and n % LOOP_CHECK_EVERY == 0 and looping(tokenizer, new):
            looped = n
            break
        if n < max_new_tokens:
            logits = step(token)
    capture = {key: torch.cat([c[key] for c in caps]) for key in caps[0]} if caps else None
    return solution_row(tokenizer, new, eos, looped_at=looped, capture=capture)


class OneSequenceAtATime:
    """``generate`` and ``score`` for an engine that runs one sequence at a time over its own cache
    (the ExLlama engines): the engine gives ``_fits(n)`` (one line where n tokens do not fit),
    ``_begin()`` (an empty cache) and ``_forward(ids, last_only=...)`` (fp32 logits over its
    vocabulary, the cache extended by ``ids``); capture and decoding are this module's."""

    def generate(self, prompt_ids: list[list[int]], *, k: int, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, stop_loops: bool = False) -> list[dict]:
        self._fits(max(map(len, prompt_ids), default=0) + max_new_tokens)
        rows = []
        for prompt in prompt_ids:
            self._begin()
            rows.append(decode_row(self.tokenizer, self.eos, self._forward(list(prompt), last_only=True)[-1],
                                   lambda token: self._forward([token], last_only=True)[-1], k=k,
                                   max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                   top_p=top_p, stop_loops=stop_loops))
        return rows

    def score(self, prompt_ids: list[list[int]], text_ids: list[list[int]], *, k: int) -> list[dict]:
        self._fits(max((len(p) + len(t) for p, t in zip(prompt_ids, text_ids)), default=0))
        rows = []
        for prompt, text in zip(prompt_ids, text_ids):
            self._begin()
            # the logits at position j predict token j + 1: the text's tokens are predicted by the
            # positions from the prompt's last token to the text's second to last
            logits = self._forward(list(prompt) + list(text), last_only=False)
            rows.append(scored_row(self.tokenizer, text, topk_capture(logits[len(prompt) - 1:-1], k, torch.tensor(text))))
        return rows
