"""Continuous batching for ``transformers`` models: a batch whose finished rows are replaced at once.

``generate`` keeps a batch running until its longest row ends, so rows that finished early (at
end-of-sequence, in a repetition loop) keep costing a forward pass per step. ``decode`` keeps
``batch_size`` rows in flight instead: a row that ends leaves the batch at that step (its slice of
the KV cache is dropped) and the next waiting prompt takes its place (prefilled alone, its cache
left-padded to the batch's width, or the batch's to its). Columns that every row holds as padding
are cut from the left, so the width stays near the longest live row.

The decoding rule is ``generate``'s own: greedy takes the first highest logit; sampling applies the
temperature and top-p warpers of ``transformers`` and draws with the global torch generator;
positions are counted from the attention mask as ``generate`` counts them. Per row the forward
passes see the same tokens, so greedy outputs equal ``generate``'s wherever the floating-point
sums agree (fp32 on a CPU: the tests check token for token). A row stops at an end-of-sequence id
of the model's generation config or tokenizer (``capture.eos_ids``), at ``max_new_tokens``, or,
with ``stop_loops``, when ``capture.looping`` says it repeats itself (looked at every
``LOOP_CHECK_EVERY`` of its own tokens, as ``LoopStop`` does). Why not ``generate_batch`` of
``transformers``: it takes no stopping criteria (the loop stop) and exposes no per-step logits
(the capture).

Models whose KV cache is not one plain growing tensor per layer (sliding-window or recurrent
layers) are not handled here: ``supported`` says so, and callers fall back to ``generate``.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import DynamicCache, TemperatureLogitsWarper, TopPLogitsWarper
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from .capture import LOOP_CHECK_EVERY, eos_ids, looping, solution_row, tail_logprob

# the KV-cache argument of forward: ``cache`` in recent transformers, ``past_key_values`` before
_CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def supported(model) -> bool:
    """Whether ``decode`` can run ``model``: every cache layer is a plain ``DynamicLayer``."""
    cache = DynamicCache(config=model.config)
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


class _Batch:
    """The rows in flight: KV cache, attention mask [B, S], per-row state."""

    def __init__(self, model):
        self.model = model
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None
        self.rows: list[dict] = []  # per row: index, new tokens, capture, next position

    def __len__(self) -> int:
        return len(self.rows)

    def prefill(self, prompts: list[list[int]], pad_id: int) -> torch.Tensor:
        """Left-padded prompts through the model with a fresh cache; returns their last logits [n, V]."""
        from .capture import left_pad

        ids, mask = left_pad(prompts, pad_id, self.model.device)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        cache = DynamicCache(config=self.model.config)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                            logits_to_keep=1, **{_CACHE: cache}).logits[:, -1]
        self._join(cache, mask)
        return logits

    def _join(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        old, new = self.mask.shape[1], mask.shape[1]
        width = max(old, new)
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])
        self.mask = torch.cat([_pad_left(self.mask, width, dim=1), _pad_left(mask, width, dim=1)])

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row [B]; returns the next logits [B, V]."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], 1)
        positions = torch.tensor([[r["position"]] for r in self.rows], device=self.mask.device)
        for r in self.rows:
            r["position"] += 1
        return self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=positions,
                          use_cache=True, logits_to_keep=1, **{_CACHE: self.cache}).logits[:, -1]

    def keep(self, keep: list[int]) -> None:
        """Keep only the rows at ``keep``, then cut the columns every kept row holds as padding."""
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache, self.mask = None, None
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.mask = self.mask[index]
        start = int((self.mask.sum(0) > 0).int().argmax())  # the first column some row uses
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]
        self.mask = self.mask[:, start:]


def _pad_left(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim)


def decode(model, tokenizer, prompts: list[list[int]], *, batch_size: int, max_new_tokens: int, k: int | None = None,
           do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, stop_loops: bool = False,
           on_row: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Every prompt (token ids) decoded with at most ``batch_size`` rows in flight; rows as
    ``capture.solution_row`` makes them, in the order of ``prompts``. ``k``: capture the top-k
    log-probs of the raw distribution at every new token (``capture.topk_capture``'s fields); None
    captures nothing. ``on_row(i, row)`` is called as soon as prompt i's row is done."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    eos = eos_ids(model, tokenizer)
    stops = torch.tensor(eos, device=model.device)
    warpers = [TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)] if do_sample else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    out: list[dict | None] = [None] * len(prompts)
    waiting = list(range(len(prompts)))
    batch = _Batch(model)
    logits = None
    with torch.inference_mode():
        while waiting or len(batch):
            if waiting and len(batch) < batch_size:
                take, waiting = waiting[:batch_size - len(batch)], waiting[batch_size - len(batch):]
                new = batch.prefill([list(prompts[i]) for i in take], pad)
                logits = new if logits is None else torch.cat([logits, new])
                batch.rows += [{"index": i, "new": [], "caps": [], "position": len(prompts[i])} for i in take]
            tokens = _choose(logits, warpers)
            if k is not None:
                _capture(batch.rows, logits, tokens, k)
            done = _stopped(batch.rows, tokens, stops, tokenizer, max_new_tokens, stop_loops)
            for b in done:
                row = batch.rows[b]
                caps = {key: torch.cat([c[key] for c in row["caps"]]) for key in row["caps"][0]} if k is not None else None
                out[row["index"]] = solution_row(tokenizer, row["new"], eos, looped_at=row.get("looped"), capture=caps)
                if on_row is not None:
                    on_row(row["index"], out[row["index"]])
            keep = [b for b in range(len(batch)) if b not in done]
            batch.keep(keep)
            if keep:
                index = torch.tensor(keep, device=tokens.device)
                logits = batch.step(tokens[index])
            else:
                logits = None
    return out  # type: ignore[return-value]


def _choose(logits: torch.Tensor, warpers) -> torch.Tensor:
    if not warpers:
        return logits.argmax(-1)
    scores = logits.float()
    for warp in warpers:
        scores = warp(None, scores)
    return torch.multinomial(torch.softmax(scores, -1), 1)[:, 0]


def _capture(rows: list[dict], logits: torch.Tensor, tokens: torch.Tensor, k: int) -> None:
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    fields = {"topk_ids": ids.to(torch.int32).cpu(), "topk_logprobs": values.to(torch.float16).cpu(),
              "tail_logprobs": tail_logprob(logp, ids).cpu(),
              "token_logprobs": logp.gather(-1, tokens[:, None]).squeeze(-1).cpu()}
    for b, row in enumerate(rows):
        row["caps"].append({key: v[b:b + 1] for key, v in fields.items()})


def _stopped(rows: list[dict], tokens: torch.Tensor, stops: torch.Tensor, tokenizer, max_new_tokens: int,
             stop_loops: bool) -> set[int]:
    """Append each row's token; the rows that end with it (end-of-sequence, cap, loop)."""
    is_eos = torch.isin(tokens, stops).tolist()
    done = set()
    for b, (row, token) in enumerate(zip(rows, tokens.tolist())):
        row["new"].append(token)
        n = len(row["new"])
        if is_eos[b] or n >= max_new_tokens:
            done.add(b)
        elif stop_loops and n % LOOP_CHECK_EVERY == 0 and looping(tokenizer, row["new"]):
            row["looped"] = n
            done.add(b)
    return done
