"""Drafters improved by distillation from their target (DistillSpec, Zhou et al. 2023).

A drafter is accepted at a position with probability Σ_x min(p(x), q(x)) = 1 − TV(p, q), so the
way to a better drafter is to bring its distributions q towards the target's p. Both data sources
of DistillSpec are here, on the project's own sparse top-k stores and training loop
(``helpers.kd.distill``), with any of its divergences (``tv`` trains 1 − α directly):

- off-policy: the target's own solutions and distributions, as notebook 01 stores them (the
  ``base`` strategy is the plain question, the prompt speculative decoding is run with);
- on-policy: the drafter writes solutions itself, the frozen target scores them by teacher
  forcing (``on_policy_store``), and the drafter learns the target's distributions on the text it
  actually produces, where its drafts will be judged.

Training is ``helpers.kd.distill.train``, with LoRA (``distill_drafter`` merges the adapter back, so
the result is a plain model that drafts without peft in the loop) or of every weight but the input
embeddings (``full``: a drafter is small, and a shallow copy needs more than low-rank changes).

A drafter with a reduced head (``drafters.ReducedHead``) gives every token outside its ids
probability 0, so it is trained with a divergence that stays finite there (tv, reverse_kl, jsd;
not forward KL), plus cross-entropy on the target's tokens the head holds (alpha < 1), computed on
the head's n + 1 columns (``reduced_head_loss``) rather than the whole vocabulary.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..data import Record

# finite where a reduced head's q is 0 and the target's p is not (ce: on the tokens the head holds)
REDUCED_HEAD_LOSSES = ("tv", "reverse_kl", "jsd", "ce")


def distill_drafter(drafter_model, tokenizer, train_examples, val_examples, cfg: dict, *, progress: bool = True,
                    name: str = "drafter", full: bool = False):
    """Train ``drafter_model`` (a model of its own, e.g. a ``truncated_drafter`` copy; it is changed)
    on ``train_examples`` (``helpers.kd.distill.build_examples`` from a target store) with the training
    settings ``cfg``; returns the plain model (LoRA merged) and the training history. ``full``: train
    every weight but the input embeddings (in a copy with tied embeddings, the LM head stays too)
    instead of LoRA adapters."""
    from ..kd.distill import DEFAULTS, train
    from .drafters import ReducedHead

    loss_fn = None
    if isinstance(drafter_model.get_output_embeddings(), ReducedHead):
        loss = {**DEFAULTS, **cfg}["loss"]
        if loss not in REDUCED_HEAD_LOSSES:
            raise ValueError(f"{name}: a drafter with a reduced head gives the tokens outside it probability 0, where "
                             f"{loss} is infinite: train it with loss {' | '.join(REDUCED_HEAD_LOSSES)}")
        loss_fn = reduced_head_loss

    if full:
        drafter_model.requires_grad_(True)
        drafter_model.get_input_embeddings().requires_grad_(False)
    trained, history = train(drafter_model, tokenizer, train_examples, val_examples, cfg, progress=progress,
                             name=name, loss_fn=loss_fn, lora=not full)
    model = trained if full else trained.merge_and_unload()
    return model.eval(), history


def reduced_head_loss(model, batch: dict, cfg: dict):
    """``helpers.kd.distill.batch_loss`` for a drafter with a ``ReducedHead``, computed on the head's n
    logits and one -inf column that every token id outside the head maps to (the teacher's top-k ids
    and the targets through ``ReducedHead.rows``) instead of on V columns. The KD term is the
    full-vocabulary one; the cross-entropy counts only the positions whose target token the head
    holds (elsewhere it is infinite whatever the drafter does)."""
    from ..kd.losses import cross_entropy, kd_loss

    head = getattr(model, "module", model).get_output_embeddings()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    hidden = model(**inputs, output_hidden_states=True, logits_to_keep=1).hidden_states[-1][:, :-1]
    z = head.reduced_logits(hidden)
    rows = head.rows.to(z.device)
    targets = rows[batch["targets"]]
    held = targets < len(head.ids)  # elsewhere a finite stand-in (column 0) that the mask leaves out
    ce = cross_entropy(z, torch.where(held, targets, 0), batch["mask"] * held)
    if cfg["loss"] == "ce" or cfg["alpha"] == 0:
        return ce, {"ce": ce.item(), "kd": float("nan")}, batch["mask"].sum()
    k = batch["topk_ids"].shape[-1]
    if k >= z.shape[-1]:
        raise ValueError(f"a reduced head of {len(head.ids)} token ids learns from top-{k} teacher distributions: "
                         "give it more ids than k")
    kd, parts = kd_loss(cfg["loss"], z, targets, batch["mask"], rows[batch["topk_ids"]], batch["topk_logprobs"],
                        T=cfg["T"], alpha=1.0, beta=cfg["beta"], tail_logprobs=batch.get("tail_logprobs"))
    loss = kd if cfg["alpha"] == 1 else cfg["alpha"] * kd + (1 - cfg["alpha"]) * ce
    return loss, {"ce": ce.item(), "kd": parts["kd"]}, batch["mask"].sum()


def drafter_solutions(drafter_model, tokenizer, records: list[Record], *, max_new_tokens: int, batch_size: int = 16,
                      do_sample: bool = False, temperature: float = 1.0, seed: int = 0) -> list[Record]:
    """The drafter's own answers to ``records`` (plain-question prompt), as records whose solution
    is the drafter's text, ready for the target to score."""
    from ..assess import generate
    from ..models import prompt_text
    from ..prompts import student_messages

    prompts = [prompt_text(tokenizer, student_messages(r.question)) for r in records]
    rows = generate(drafter_model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                    do_sample=do_sample, temperature=temperature, seed=seed, stop_loops=True, progress=False)
    return [Record(r.id, r.question, row["response"], r.answer) for r, row in zip(records, rows)]


def on_policy_store(drafter_model, target: str, target_loaded, records: list[Record], out_dir: str | Path, *,
                    k: int = 64, max_new_tokens: int = 256, batch_size: int = 16, do_sample: bool = False,
                    temperature: float = 1.0, seed: int = 0, progress: bool = True):
    """A store of the target's top-k distributions (teacher forcing, ``mode="score"``) over the
    drafter's own solutions to ``records``; ``target`` names the target (for the store's manifest),
    ``target_loaded`` is its ``(model, tokenizer)``. The store goes to a sub-folder of ``out_dir``
    named by a digest of the drafted texts (the same drafts reuse it). Returns the ``LogitStore``."""
    from ..artifacts import fingerprint
    from ..kd.teacher import build_store

    model, tok = target_loaded
    drafted = drafter_solutions(drafter_model, tok, records, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                do_sample=do_sample, temperature=temperature, seed=seed)
    out_dir = Path(out_dir) / fingerprint([(r.id, r.solution) for r in drafted])
    return build_store(out_dir, drafted, teacher=target, strategy="base", mode="score", k=k, batch_size=batch_size,
                       shard_size=max(batch_size, 16), loaded=(model, tok), progress=progress)
