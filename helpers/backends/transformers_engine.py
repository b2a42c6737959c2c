"""The ``transformers`` back end: the default teacher engine and the reference the others are
checked against.

- ``generate_with_capture``: a logits processor inside ``transformers``' own ``generate`` records,
  at every step, the top-k token ids and log-probabilities of the teacher's raw distribution
  (temperature 1, before any sampling warper), the log of the mass outside the top-k (fp32,
  exact) and the log-probability of the token actually taken. The capture stays on the device
  until the batch ends, so it costs little beyond ``generate``.
- ``score_with_capture`` / ``score_ids``: teacher forcing of given texts, one forward pass per
  batch, the same quantities at every position of the text.

Generation can stop a row that has fallen into a repetition loop (``stop_loops``, see
``LoopStop``): small models decoding greedily often repeat one or a few lines for ever, and a
batch otherwise runs until its longest row hits ``max_new_tokens``.
"""
from __future__ import annotations

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria

from ..models import add_special_tokens
from . import continuous
from .capture import (
    LOOP_CHECK_EVERY,
    eos_ids,
    left_pad,
    looping,
    prompt_ids,
    scored_row,
    solution_row,
    tail_logprob,
    text_ids,
    topk_capture,
)


class TopKCapture(LogitsProcessor):
    """Records top-k log-probs of the scores it sees and returns them unchanged.

    ``transformers`` runs custom processors before the sampling warpers (temperature, top-p),
    so with no penalties configured the scores seen here are the model's raw logits.
    """

    def __init__(self, k: int):
        self.k = k
        self.topk_ids: list[torch.Tensor] = []
        self.topk_logprobs: list[torch.Tensor] = []
        self.tail_logprobs: list[torch.Tensor] = []
        self.taken_logprobs: list[torch.Tensor] = []
        self._prev: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._prev is not None:  # the token chosen at the previous step is now the last input
            self.taken_logprobs.append(self._prev.gather(1, input_ids[:, -1:]).squeeze(1))
        logp = torch.log_softmax(scores.float(), dim=-1)
        values, ids = logp.topk(self.k, dim=-1)
        self.topk_ids.append(ids.to(torch.int32))
        self.topk_logprobs.append(values.to(torch.float16))
        self.tail_logprobs.append(tail_logprob(logp, ids))
        self._prev = logp
        return scores

    def finish(self, new_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stack the capture, given the generated tokens ``[B, T]``."""
        if self._prev is not None:
            self.taken_logprobs.append(self._prev.gather(1, new_tokens[:, -1:]).squeeze(1))
            self._prev = None
        return {"topk_ids": torch.stack(self.topk_ids, 1).cpu(),
                "topk_logprobs": torch.stack(self.topk_logprobs, 1).cpu(),
                "tail_logprobs": torch.stack(self.tail_logprobs, 1).float().cpu(),
                "token_logprobs": torch.stack(self.taken_logprobs, 1).float().cpu()}


class LoopStop(StoppingCriteria):
    """Stops each row of a batch that has fallen into a repetition loop (``capture.looping``),
    looked at every ``every`` new tokens; ``stopped_at[b]`` is the number of new tokens row b had
    when it was stopped (its text up to there is kept)."""

    def __init__(self, tokenizer, prompt_length: int, eos: list[int], every: int = LOOP_CHECK_EVERY):
        self.tokenizer, self.prompt_length, self.every = tokenizer, prompt_length, every
        self.eos = set(eos)
        self.stopped_at: dict[int, int] = {}

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        n = input_ids.shape[1] - self.prompt_length
        stop = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for b in self.stopped_at:
            stop[b] = True
        if n == 0 or n % self.every:
            return stop
        for b, seq in enumerate(input_ids[:, self.prompt_length:].tolist()):
            if b in self.stopped_at or self.eos.intersection(seq):
                continue
            if looping(self.tokenizer, seq):
                self.stopped_at[b] = n
                stop[b] = True
        return stop


def encode_prompts(tokenizer, prompts: list[str] | list[list[int]], device) -> dict[str, torch.Tensor]:
    """A left-padded batch of prompts given as texts (tokenized here, the project's one rule) or
    as token ids (used as they are)."""
    if prompts and not isinstance(prompts[0], str):
        ids, mask = left_pad(prompts, tokenizer.pad_token_id, device)
        return {"input_ids": ids, "attention_mask": mask}
    return tokenizer(prompts, return_tensors="pt", padding=True,
                     add_special_tokens=add_special_tokens(tokenizer)).to(device)


def generate_with_capture(model, tokenizer, prompts: list[str] | list[list[int]], *, k: int = 64,
                          max_new_tokens: int = 256, do_sample: bool = False, temperature: float = 1.0,
                          top_p: float = 1.0, capture: bool = True, stop_loops: bool = False) -> list[dict]:
    """One batch: generate and (if ``capture``) record top-k log-probs at every new token.

    ``prompts`` are texts or token ids. Rows as ``capture.solution_row`` makes them. ``stop_loops``
    ends a row that repeats itself (``LoopStop``). ``capture=False`` is plain ``generate`` on the
    same inputs (the benchmark's reference).
    """
    eos = eos_ids(model, tokenizer)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                              **({"temperature": temperature, "top_p": top_p} if do_sample else {}))
    enc = encode_prompts(tokenizer, prompts, model.device)
    proc = TopKCapture(min(k, model.config.get_text_config().vocab_size)) if capture else None
    loops = LoopStop(tokenizer, enc["input_ids"].shape[1], eos) if stop_loops else None
    with torch.inference_mode():
        out = model.generate(**enc, generation_config=config,
                             logits_processor=LogitsProcessorList([proc] if proc else []),
                             **({"stopping_criteria": [loops]} if loops else {}))
    new = out[:, enc["input_ids"].shape[1]:]
    cap = proc.finish(new) if proc else None
    # after a loop stop the row holds padding (often = eos): solution_row cuts it at the stop
    return [solution_row(tokenizer, seq, eos, looped_at=loops.stopped_at.get(b) if loops else None,
                         capture={key: v[b] for key, v in cap.items()} if cap else None)
            for b, seq in enumerate(new.cpu().tolist())]


def score_ids(model, pad_id: int, prompt_ids: list[list[int]], text_ids: list[list[int]], *,
              k: int = 64) -> list[dict[str, torch.Tensor]]:
    """Teacher forcing of ``prompt_ids[b] + text_ids[b]`` in one forward pass: the capture
    (``capture.topk_capture``) at every token of the text, on the model's device."""
    # left padding: every sequence ends at the last column, so the last L logits cover all texts
    input_ids, mask = left_pad([list(p) + list(t) for p, t in zip(prompt_ids, text_ids)], pad_id, model.device)
    longest = max(map(len, text_ids))
    with torch.inference_mode():
        logits = model(input_ids=input_ids, attention_mask=mask, logits_to_keep=longest + 1).logits
    # logits at column j predict token j + 1: a text's n tokens are predicted by the n columns
    # just before the last one
    return [topk_capture(logits[b, -len(t) - 1:-1], k, torch.tensor(t)) for b, t in enumerate(text_ids)]


def score_with_capture(model, tokenizer, prompts: list[str], texts: list[str], *, k: int = 64) -> list[dict]:
    """One batch of teacher forcing: the teacher reads ``prompt + text + eos``; top-k log-probs at
    every token of ``text`` (and of the closing end-of-sequence token)."""
    return TransformersEngine(model, tokenizer).score(prompt_ids(tokenizer, prompts), text_ids(tokenizer, texts), k=k)


class TransformersEngine:
    """A ``transformers`` causal LM as a teacher engine (see ``helpers.backends``). ``generate`` keeps
    ``batch_size`` rows in flight and refills finished ones (``continuous.decode``), or, for models
    whose cache it cannot refill, runs ``generate_with_capture`` on batches of that size."""

    name = "transformers"

    def __init__(self, model, tokenizer, batch_size: int = 8):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    @classmethod
    def open(cls, teacher: str, *, dtype: str = "auto", device: str = "auto", **options) -> TransformersEngine:
        from ..models import load_model

        if options:
            raise ValueError(f"teacher_backend 'transformers' takes no options, got {sorted(options)}")
        return cls(*load_model(teacher, dtype=dtype, device=device))

    def generate(self, prompt_ids: list[list[int]], *, k: int, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, stop_loops: bool = False) -> list[dict]:
        settings = {"k": k, "max_new_tokens": max_new_tokens, "do_sample": do_sample, "temperature": temperature,
                    "top_p": top_p, "stop_loops": stop_loops}
        if continuous.supported(self.model):
            return continuous.decode(self.model, self.tokenizer, prompt_ids, batch_size=self.batch_size, **settings)
        return [row for b in range(0, len(prompt_ids), self.batch_size)
                for row in generate_with_capture(self.model, self.tokenizer, prompt_ids[b:b + self.batch_size],
                                                 **settings)]

    def score(self, prompt_ids: list[list[int]], text_ids: list[list[int]], *, k: int) -> list[dict]:
        caps = score_ids(self.model, self.tokenizer.pad_token_id, prompt_ids, text_ids, k=k)
        return [scored_row(self.tokenizer, t, cap) for t, cap in zip(text_ids, caps)]

    def close(self) -> None:
        pass
