"""Continuous batching for ``transformers`` models: a batch whose finished rows are replaced at once.

``generate`` keeps a batch running until its longest row ends, so rows that finished early (at
end-of-sequence, in a repetition loop) keep costing a forward pass per step. ``decode`` keeps
``batch_size`` rows in flight instead: a row that ends frees its slot at that step and the next
waiting prompt is prefilled into it.

The KV cache is preallocated: per layer one buffer [slots, kv heads, columns, head dim] and one
attention mask [slots, columns], shared by all rows. The batch reads a window of columns; each step
writes its new column in place, where ``DynamicCache`` would copy the whole cache to grow it by one.
A refilled prompt is written right-aligned to the window's last column (left padding); columns that
no live row uses are dropped from the left of the window; once the buffer's end is reached the
window is moved back to its start (one copy every quarter of a row's span or more). After the last
prompt is taken, a batch whose free slots outnumber its live rows is compacted to the live ones.

The prompts' common leading tokens (a chat template's system turn, a shared instruction) are run
once, at batch 1, and their keys and values are copied into every row; each prompt's prefill reads
only what follows them.

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

import os
from collections.abc import Callable

import torch
from transformers import DynamicCache, TemperatureLogitsWarper, TopPLogitsWarper
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from .capture import LOOP_CHECK_EVERY, eos_ids, left_pad, looping, solution_row, tail_logprob

# the KV-cache argument of forward: ``cache`` in recent transformers, ``past_key_values`` before
_CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def supported(model) -> bool:
    """Whether ``decode`` can run ``model``: every cache layer is a plain ``DynamicLayer``."""
    cache = DynamicCache(config=model.config)
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


class _SlotLayer(DynamicLayer):
    """One layer's keys and values in the batch's buffers: ``keys``/``values`` are the current
    window; ``update`` writes the step's columns right after it, in place."""

    def __init__(self, batch: "_Batch", index: int):
        super().__init__()
        self.batch, self.index = batch, index
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # the buffers exist already
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        b = self.batch
        end = b.hi + key_states.shape[-2]
        keys, values = b.keys[self.index], b.values[self.index]
        keys[:b.slots, :, b.hi:end] = key_states
        values[:b.slots, :, b.hi:end] = value_states
        return keys[:b.slots, :, b.lo:end], values[:b.slots, :, b.lo:end]

    def get_seq_length(self) -> int:
        return self.batch.hi - self.batch.lo


class _Batch:
    """The rows in flight, one per slot (None: free), over preallocated keys, values and mask."""

    def __init__(self, model, slots: int, span: int, max_prompt: int, prefix: list[int]):
        self.model, self.slots, self.max_prompt = model, slots, max_prompt
        self.columns = span + max(32, span // 4)  # a row never spans more than ``span`` columns
        self.lo = self.hi = max_prompt  # room on the left for any prompt
        self.rows: list[dict | None] = [None] * slots
        self.mask = torch.zeros(slots, self.columns, dtype=torch.long, device=model.device)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.cache = DynamicCache(config=model.config)
        self.cache.layers = [_SlotLayer(self, i) for i in range(len(self.cache.layers))]
        self.prefix = self._prefix_states(prefix) if prefix else None
        self.prefix_len = len(prefix)

    def live(self) -> list[int]:
        return [s for s, r in enumerate(self.rows) if r is not None]

    def free(self) -> list[int]:
        return [s for s, r in enumerate(self.rows) if r is None]

    def _prefix_states(self, prefix: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        cache = DynamicCache(config=self.model.config)
        ids = torch.tensor([prefix], device=self.model.device)
        self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{_CACHE: cache})
        return [(layer.keys, layer.values) for layer in cache.layers]

    def prefill(self, slots: list[int], prompts: list[list[int]], pad_id: int) -> torch.Tensor:
        """Prompts into the given free slots, right-aligned to the window's end (their shared
        prefix from ``prefix``, the rest through the model); returns their last logits [n, V]."""
        n, p = len(prompts), self.prefix_len
        ids, mask = left_pad([list(q[p:]) for q in prompts], pad_id, self.model.device)
        cache = DynamicCache(config=self.model.config)
        if p:
            for i, (k, v) in enumerate(self.prefix):
                cache.update(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1), i)
            mask = torch.cat([mask.new_ones(n, p), mask], 1)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, p:]
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                            logits_to_keep=1, **{_CACHE: cache}).logits[:, -1]
        if not self.keys:  # the buffers take the model's own shapes and dtype
            for layer in cache.layers:
                shape = (self.slots, layer.keys.shape[1], self.columns, layer.keys.shape[3])
                self.keys.append(layer.keys.new_zeros(shape))
                self.values.append(layer.values.new_zeros((*shape[:3], layer.values.shape[3])))
        width = mask.shape[1]
        index = torch.tensor(slots, device=self.mask.device)
        start = self.hi - width
        for i, layer in enumerate(cache.layers):
            self.keys[i][index, :, start:self.hi] = layer.keys
            self.values[i][index, :, start:self.hi] = layer.values
        self.mask[index] = 0
        self.mask[index, start:self.hi] = mask
        self.lo = min(self.lo, start)
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per slot [slots] (free slots read whatever they are given); returns the
        next logits [slots, V]."""
        if self.hi == self.columns:
            self._rewind()
        self.mask[:self.slots, self.hi] = 1
        positions = torch.tensor([[r["position"] if r else 0] for r in self.rows], device=self.mask.device)
        for r in self.rows:
            if r:
                r["position"] += 1
        logits = self.model(input_ids=tokens[:, None], attention_mask=self.mask[:self.slots, self.lo:self.hi + 1],
                            position_ids=positions, use_cache=True, logits_to_keep=1,
                            **{_CACHE: self.cache}).logits[:, -1]
        self.hi += 1
        return logits

    def trim(self) -> None:
        """Drop from the window's left the columns no live row uses."""
        live = self.live()
        if live:
            used = self.mask[torch.tensor(live, device=self.mask.device), self.lo:self.hi].sum(0) > 0
            self.lo += int(used.int().argmax())

    def _rewind(self) -> None:
        """Move the window back to the buffer's start (keeping room for a prompt on its left)."""
        width = self.hi - self.lo
        lo = max(self.max_prompt, width) - width
        for buf in (*self.keys, *self.values):
            buf[:, :, lo:lo + width] = buf[:, :, self.lo:self.hi].clone()
        window = self.mask[:, self.lo:self.hi].clone()
        self.mask.zero_()  # nothing outside the window may reappear when a prompt widens it
        self.mask[:, lo:lo + width] = window
        self.lo, self.hi = lo, lo + width

    def compact(self, logits: torch.Tensor) -> torch.Tensor:
        """Keep only the live slots (moved to the front); returns their rows of ``logits``."""
        live = self.live()
        index = torch.tensor(live, device=self.mask.device)
        for buf in (*self.keys, *self.values):
            buf[:len(live), :, self.lo:self.hi] = buf[index, :, self.lo:self.hi]
        self.mask[:len(live)] = self.mask[index]
        self.rows = [self.rows[s] for s in live]
        self.slots = len(live)
        return logits[index]


def _shared_prefix(prompts: list[list[int]]) -> list[int]:
    """The leading tokens every prompt shares, leaving each at least one token of its own."""
    if len(prompts) < 2:
        return []
    prefix = os.path.commonprefix([list(p) for p in prompts])
    return list(prefix[:min(map(len, prompts)) - 1])


def decode(model, tokenizer, prompts: list[list[int]], *, batch_size: int, max_new_tokens: int, k: int | None = None,
           do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, stop_loops: bool = False,
           on_row: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Every prompt (token ids) decoded with at most ``batch_size`` rows in flight; rows as
    ``capture.solution_row`` makes them, in the order of ``prompts``. ``k``: capture the top-k
    log-probs of the raw distribution at every new token (``capture.topk_capture``'s fields); None
    captures nothing. ``on_row(i, row)`` is called as soon as prompt i's row is done."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    out: list[dict | None] = [None] * len(prompts)
    if not prompts:
        return []
    eos = eos_ids(model, tokenizer)
    stops = torch.tensor(eos, device=model.device)
    warpers = [TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)] if do_sample else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    max_prompt = max(map(len, prompts))
    waiting = list(range(len(prompts)))
    with torch.inference_mode():
        batch = _Batch(model, min(batch_size, len(prompts)), max_prompt + max_new_tokens, max_prompt,
                       _shared_prefix(prompts))
        logits = None
        while True:
            free = batch.free()
            if waiting and free:
                take, waiting = waiting[:len(free)], waiting[len(free):]
                slots = free[:len(take)]
                new = batch.prefill(slots, [prompts[i] for i in take], pad)
                if logits is None:
                    logits = new.new_zeros(batch.slots, new.shape[-1])
                logits[torch.tensor(slots, device=logits.device)] = new
                for s, i in zip(slots, take):
                    batch.rows[s] = {"index": i, "new": [], "caps": [], "position": len(prompts[i])}
            live = batch.live()
            if not live:
                break
            if not waiting and 2 * len(live) <= batch.slots:
                logits = batch.compact(logits)
                live = list(range(batch.slots))
            index = torch.tensor(live, device=logits.device)
            chosen = _choose(logits[index], warpers)
            rows = [batch.rows[s] for s in live]
            if k is not None:
                _capture(rows, logits[index], chosen, k)
            for b in _stopped(rows, chosen, stops, tokenizer, max_new_tokens, stop_loops):
                row = rows[b]
                caps = {key: torch.cat([c[key] for c in row["caps"]]) for key in row["caps"][0]} if k is not None else None
                out[row["index"]] = solution_row(tokenizer, row["new"], eos, looped_at=row.get("looped"), capture=caps)
                if on_row is not None:
                    on_row(row["index"], out[row["index"]])
                batch.rows[live[b]] = None
            if not batch.live():
                if not waiting:
                    break
                continue
            batch.trim()
            tokens = torch.full((batch.slots,), pad, dtype=chosen.dtype, device=chosen.device)
            tokens[index] = chosen
            logits = batch.step(tokens)
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
