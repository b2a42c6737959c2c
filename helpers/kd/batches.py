"""Training examples and their batches, shared by the training loop (``distill``) and on-policy KD
(``on_policy``), which rebuilds a batch on the student's own samples: an ``Example`` is one
question's token ids with the teacher's top-k per target token; ``collate`` pads a list of them."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Example:
    id: str
    input_ids: list[int]
    n_prompt: int
    topk_ids: np.ndarray | None = None
    topk_logprobs: np.ndarray | None = None
    tail_logprobs: np.ndarray | None = None  # the teacher's log-mass outside its top-k, per target token
    teacher_prompt: list[int] | None = None  # the teacher's prompt tokens (on-policy KD scores samples after it)


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch. ``targets``/``mask``/``topk_*``/``tail_logprobs`` are already shifted:
    position j holds what the logits at position j must predict (token j + 1). Where the mask is
    0 the teacher arrays hold finite filler (ids 0, log-probs -30, tail 0.0)."""
    width = max(len(e.input_ids) for e in batch)
    B = len(batch)
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    attention = torch.zeros((B, width), dtype=torch.long)
    mask = torch.zeros((B, width - 1))
    k = next((e.topk_ids.shape[1] for e in batch if e.topk_ids is not None), 0)
    topk_ids = torch.zeros((B, width - 1, k), dtype=torch.long)
    topk_lps = torch.full((B, width - 1, k), -30.0)  # finite filler where nothing counts
    tails = torch.zeros((B, width - 1))
    has_tail = bool(k) and all(e.tail_logprobs is not None for e in batch if e.topk_ids is not None)
    for b, e in enumerate(batch):
        n = len(e.input_ids)
        input_ids[b, :n] = torch.tensor(e.input_ids)
        attention[b, :n] = 1
        mask[b, e.n_prompt - 1:n - 1] = 1
        if k:
            m = n - e.n_prompt
            topk_ids[b, e.n_prompt - 1:n - 1] = torch.from_numpy(np.asarray(e.topk_ids[:m], np.int64))
            topk_lps[b, e.n_prompt - 1:n - 1] = torch.from_numpy(np.asarray(e.topk_logprobs[:m], np.float32))
            if has_tail:
                tails[b, e.n_prompt - 1:n - 1] = torch.from_numpy(np.asarray(e.tail_logprobs[:m], np.float32))
    out = {"input_ids": input_ids, "attention_mask": attention, "targets": input_ids[:, 1:].clone(), "mask": mask}
    if k:
        out.update(topk_ids=topk_ids, topk_logprobs=topk_lps)
    if has_tail:
        out["tail_logprobs"] = tails
    return out
