"""Several teachers, one student: per-example teacher weights, fused examples, batches.

Every teacher scores the same text (the reference solution, by teacher forcing), so each
example has one student tokenization and one set of targets per teacher (``targets``). A
teacher's weight on an example comes from its NLL per byte of that text (bytes, so teachers with
different tokenizers compare fairly):

- ``minCE``: the teacher with the lowest NLL per byte takes the example (weight 1, the others 0);
- ``avgCE``: weights proportional to 1 / NLL per byte (every teacher counts, the better more);
- ``softmax``: weights ``softmax(-NLL per byte / tau)``.

The weights multiply each teacher's divergences in the loss (``fusion.losses``); with one
teacher every method gives weight 1, so the fused targets are that teacher's targets. Each
teacher's targets are built once (``targets``), so adding a teacher costs only its own store.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .targets import FIELDS, Targets

METHODS = ("minCE", "avgCE", "softmax")


def teacher_weights(nll_per_byte, method: str = "minCE", tau: float = 0.1) -> np.ndarray:
    """Weights [n teachers] for one example from each teacher's NLL per byte of its text."""
    x = np.asarray(nll_per_byte, np.float64)
    if not np.all(np.isfinite(x)) or np.any(x < 0):
        raise ValueError(f"teacher NLL per byte must be finite and >= 0, got {x.tolist()}")
    if method == "minCE":
        w = np.zeros_like(x)
        w[int(np.argmin(x))] = 1.0
    elif method == "avgCE":
        inv = 1.0 / np.maximum(x, 1e-9)
        w = inv / inv.sum()
    elif method == "softmax":
        if tau <= 0:
            raise ValueError(f"softmax weighting needs tau > 0, got {tau}")
        e = np.exp(-(x - x.min()) / tau)
        w = e / e.sum()
    else:
        raise ValueError(f"unknown fusion method {method!r}; choose one of {', '.join(METHODS)}")
    return w


@dataclass
class FusedExample:
    id: str
    input_ids: list[int]
    n_prompt: int
    targets: list[Targets]   # one per teacher, cut to the example's length
    weights: np.ndarray      # [n teachers]


def fused_examples(records, tokenizer, teachers: dict[str, dict[str, Targets]], *, method: str = "minCE",
                   tau: float = 0.1, max_length: int = 512) -> list[FusedExample]:
    """Student examples (the plain question, then the text's student tokens) with each teacher's
    targets and weights; ``teachers`` maps a teacher's name to its targets by example id."""
    from ..models import add_special_tokens, prompt_text
    from ..prompts import student_messages

    add = add_special_tokens(tokenizer)
    names = list(teachers)
    if not names:
        raise ValueError("fusion needs at least one teacher")
    out = []
    for r in records:
        rows = []
        for name in names:
            if r.id not in teachers[name]:
                raise ValueError(f"teacher {name!r} has no targets for example {r.id}: build its store for the same split")
            rows.append(teachers[name][r.id])
        for name, t in zip(names[1:], rows[1:]):
            if t.text != rows[0].text or not np.array_equal(t.token_ids, rows[0].token_ids):
                raise ValueError(f"example {r.id}: teacher {name!r} scored another text than {names[0]!r} "
                                 f"({t.text[:40]!r}… vs {rows[0].text[:40]!r}…): fused teachers must score the same text")
        prompt = tokenizer(prompt_text(tokenizer, student_messages(r.question)), add_special_tokens=add).input_ids
        room = max_length - len(prompt)
        if room < 1:
            raise ValueError(f"example {r.id}: the prompt alone has {len(prompt)} tokens, over max_length={max_length}")
        cut = [Targets(t.id, t.text, *(getattr(t, f)[:room] for f in FIELDS), t.teacher_nll, t.n_bytes) for t in rows]
        w = teacher_weights([t.nll_per_byte for t in rows], method, tau) if len(rows) > 1 else np.ones(1)
        out.append(FusedExample(r.id, prompt + [int(i) for i in cut[0].token_ids], len(prompt), cut, w))
    return out


def collate_fused(batch: list[FusedExample], pad_id: int) -> dict:
    """Right-padded batch; per-teacher arrays stacked [n, B, L - 1, ...] and shifted like ``targets``
    (position j holds what the logits at j predict). Positions that are no unit hold finite filler."""
    width = max(len(e.input_ids) for e in batch)
    B, n, k = len(batch), len(batch[0].targets), batch[0].targets[0].topk_ids.shape[1]
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    attention = torch.zeros((B, width), dtype=torch.long)
    mask = torch.zeros((B, width - 1))
    t = {"topk_ids": torch.zeros((n, B, width - 1, k), dtype=torch.long),
         "topk_logprobs": torch.full((n, B, width - 1, k), float("-inf")),
         "tail_logprobs": torch.zeros((n, B, width - 1)),
         "unit": torch.zeros((n, B, width - 1), dtype=torch.long),
         "piece_logprob": torch.full((n, B, width - 1), float("nan")),
         "piece_len": torch.zeros((n, B, width - 1), dtype=torch.long),
         "weight": torch.zeros((n, B))}
    for b, e in enumerate(batch):
        L = len(e.input_ids)
        input_ids[b, :L] = torch.tensor(e.input_ids)
        attention[b, :L] = 1
        mask[b, e.n_prompt - 1:L - 1] = 1
        rows = slice(e.n_prompt - 1, L - 1)
        for i, tg in enumerate(e.targets):
            for f in FIELDS[1:]:  # all but the student's tokens, which are input_ids
                t[f][i, b, rows] = torch.from_numpy(np.asarray(getattr(tg, f)).astype(
                    np.float32 if f in ("topk_logprobs", "tail_logprobs", "piece_logprob") else np.int64))
            t["weight"][i, b] = float(e.weights[i])
    return {"input_ids": input_ids, "attention_mask": attention, "targets": input_ids[:, 1:].clone(),
            "mask": mask, "teachers": t}


def fused_batch_loss(model, batch: dict, cfg: dict):
    """``distill.train``'s loss hook for fused examples: forward pass, ``cross_kd_loss`` (or CE)."""
    from ..kd.losses import cross_entropy
    from .losses import cross_kd_loss

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    if cfg["loss"] == "ce" or cfg["alpha"] == 0.0:
        ce = cross_entropy(logits, batch["targets"], batch["mask"])
        return ce, {"ce": ce.item(), "kd": float("nan")}, batch["mask"].sum()
    loss, parts = cross_kd_loss(cfg["loss"], logits, batch["targets"], batch["mask"], batch["teachers"],
                                T=cfg["T"], alpha=cfg["alpha"], beta=cfg["beta"])
    return loss, parts, batch["mask"].sum()
