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

Training is LoRA through ``helpers.kd.distill.train``; ``distill_drafter`` merges the adapter back,
so the result is a plain model that drafts without peft in the loop.
"""
from __future__ import annotations

from pathlib import Path

from ..data import Record


def distill_drafter(drafter_model, tokenizer, train_examples, val_examples, cfg: dict, *, progress: bool = True,
                    name: str = "drafter"):
    """Train ``drafter_model`` (a model of its own, e.g. a ``truncated_drafter`` copy; it is changed)
    on ``train_examples`` (``helpers.kd.distill.build_examples`` from a target store) with the training
    settings ``cfg``; returns the merged plain model and the training history."""
    from ..kd.distill import train

    peft_model, history = train(drafter_model, tokenizer, train_examples, val_examples, cfg, progress=progress,
                                name=name)
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged, history


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
