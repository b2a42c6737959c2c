"""Measuring drafters against their target, for notebook 05 and the benchmark.

For each drafter and draft length γ, on the same prompts at batch 1 (where speculative decoding
is used to cut latency): α (accepted ÷ evaluated draft positions, Wilson interval), tokens per
target call, the measured drafter cost ratio c (one drafter forward of one token ÷ one target
forward of one token, both with a warm KV cache), the speed-up predicted by Leviathan et al.,
(1 − α^{γ+1}) / ((1 − α)(γc + 1)), and the measured one (plain greedy ``generate`` time ÷ the
speculative loop's time for the same tokens), and whether the greedy output equals the target's
token for token. ``assisted_generate`` runs transformers' own assisted generation on the same
prompts and drafter as an anchor.
"""
from __future__ import annotations

import copy
import math
import re
import time

import pandas as pd
import torch

from .decode import acceptance_rate, speculative_generate
from .drafters import Drafter

KINDS = ("digit", "operator", "word", "other")
_OPERATOR = re.compile(r"^\s*[-+*/×÷=<>^%$().,:]+\s*$")


def token_kind(text: str) -> str:
    """The kind of one token's text: digit (any digit), operator (arithmetic signs and punctuation
    around numbers), word (letters), other (spaces, newlines, markup)."""
    if any(c.isdigit() for c in text):
        return "digit"
    if _OPERATOR.match(text):
        return "operator"
    if any(c.isalpha() for c in text):
        return "word"
    return "other"


def predicted_speedup(alpha: float, gamma: int, c: float) -> float:
    """Leviathan et al.'s expected wall-time improvement for i.i.d. acceptance α, γ drafts and
    drafter cost ratio c: (1 − α^{γ+1}) / ((1 − α)(γc + 1))."""
    tokens = gamma + 1.0 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    return tokens / (gamma * c + 1)


@torch.inference_mode()
def step_seconds(model, input_ids: torch.Tensor, steps: int = 16, repeats: int = 3) -> float:
    """Seconds of one single-token forward with a KV cache after ``input_ids`` [1, T] (the best of
    ``repeats`` runs of ``steps`` greedy steps), the unit of the cost ratio c."""
    from transformers import DynamicCache

    from .drafters import _CACHE_ARG

    best = math.inf
    for _ in range(repeats):
        cache = DynamicCache(config=model.config)
        out = model(input_ids=input_ids, use_cache=True, **{_CACHE_ARG: cache})
        token = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=token, use_cache=True, **{_CACHE_ARG: cache})
            token = out.logits[:, -1:].argmax(-1)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def plain_generate(target, tokenizer, prompts: list[str], max_new_tokens: int) -> tuple[list[list[int]], float]:
    """Greedy ``generate`` one prompt at a time: (new token ids per prompt, total seconds)."""
    return _generate_each(target, tokenizer, prompts, max_new_tokens)


def assisted_generate(target, assistant_model, tokenizer, prompts: list[str], gamma: int,
                      max_new_tokens: int) -> tuple[list[list[int]], float]:
    """transformers' assisted generation (greedy, batch 1) with a fixed draft length ``gamma``:
    (new token ids per prompt, total seconds). The assistant is deep-copied first, since
    transformers may change it (its generation config, and the model in cross-tokenizer runs)."""
    assistant = copy.deepcopy(assistant_model)
    assistant.generation_config.num_assistant_tokens = gamma
    assistant.generation_config.num_assistant_tokens_schedule = "constant"
    assistant.generation_config.assistant_confidence_threshold = 0.0  # draft exactly γ, as our loop does
    return _generate_each(target, tokenizer, prompts, max_new_tokens, assistant_model=assistant)


@torch.inference_mode()
def _generate_each(target, tokenizer, prompts: list[str], max_new_tokens: int, **extra) -> tuple[list[list[int]], float]:
    """Greedy ``target.generate`` (with ``extra`` arguments) one prompt at a time, timing only the calls."""
    from ..models import add_special_tokens

    out, seconds = [], 0.0
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special_tokens(tokenizer)).to(target.device)
        start = time.perf_counter()
        ids = target.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id, **extra)
        seconds += time.perf_counter() - start
        out.append(_cut_at_eos(ids[0, enc["input_ids"].shape[1]:].tolist(), target, tokenizer))
    return out, seconds


def _cut_at_eos(ids: list[int], model, tokenizer) -> list[int]:
    from ..backends.capture import eos_ids

    eos = set(eos_ids(model, tokenizer))
    return next((ids[:j + 1] for j, t in enumerate(ids) if t in eos), ids)


def run_drafter(target, tokenizer, drafter: Drafter, prompts: list[str], gamma: int, max_new_tokens: int,
                reference: list[list[int]]):
    """Our loop over ``prompts`` one at a time (batch 1, greedy): (rows, per-prompt stats, seconds,
    identical), ``identical`` being whether every output equals ``reference`` token for token."""
    rows, stats, seconds = [], [], 0.0
    for prompt in prompts:
        (row,), st = speculative_generate(target, drafter, tokenizer, [prompt], gamma=gamma,
                                          max_new_tokens=max_new_tokens)
        rows.append(row)
        stats.append(st)
        seconds += st.seconds
    identical = all(r["token_ids"] == ref for r, ref in zip(rows, reference))
    return rows, stats, seconds, identical


def pooled(stats) -> dict:
    """Counts of several runs' ``SpecStats`` added up: accepted, evaluated, drafted, generated,
    row-calls, per-position counts, drafter/target seconds."""
    out = {k: sum(getattr(s, k) for s in stats) for k in ("accepted", "evaluated", "drafted", "generated",
                                                            "row_calls", "target_calls", "drafter_forwards")}
    width = max(len(s.evaluated_at) for s in stats)
    out["evaluated_at"] = [sum(s.evaluated_at[j] for s in stats if j < len(s.evaluated_at)) for j in range(width)]
    out["accepted_at"] = [sum(s.accepted_at[j] for s in stats if j < len(s.accepted_at)) for j in range(width)]
    out["drafter_seconds"] = sum(s.drafter_seconds for s in stats)
    out["target_seconds"] = sum(s.target_seconds for s in stats)
    return out


def measure(pool: dict, gamma: int, target_step: float, plain_seconds: float, seconds: float) -> dict:
    """One drafter × γ row from ``pooled`` counts: α with its Wilson interval, accepted ÷ drafted
    (not α), tokens per target call, the cost ratio c (the drafter's seconds per drafted token ÷
    one target step of ``target_step`` seconds), the predicted speed-up and the measured one
    (``plain_seconds`` of plain generate ÷ ``seconds`` of our loop on the same prompts)."""
    alpha, low, high = acceptance_rate(pool["accepted"], pool["evaluated"])
    c = (pool["drafter_seconds"] / max(pool["drafted"], 1)) / target_step
    return {"alpha": alpha, "alpha_low": low, "alpha_high": high, "accepted": pool["accepted"],
            "evaluated": pool["evaluated"], "accepted_per_drafted": pool["accepted"] / max(pool["drafted"], 1),
            "tokens_per_call": pool["generated"] / max(pool["row_calls"], 1), "c": c,
            "predicted_speedup": predicted_speedup(alpha, gamma, c), "measured_speedup": plain_seconds / seconds}


def table_markdown(table: pd.DataFrame) -> str:
    """The drafter × γ table as Markdown."""
    head = ["drafter", "γ", "α (95% CI)", "accepted ÷ drafted (not α)", "tokens per target call", "c",
            "predicted speed-up", "measured speed-up", "greedy identical"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        lines.append(f"| {r['drafter']} | {r['gamma']} | {r['alpha']:.3f} ({r['alpha_low']:.3f}–{r['alpha_high']:.3f}) | "
                     f"{r['accepted_per_drafted']:.3f} | {r['tokens_per_call']:.2f} | {r['c']:.3f} | "
                     f"{r['predicted_speedup']:.2f} | {r['measured_speedup']:.2f} | "
                     f"{'✓' if r['greedy_identical'] else '✗'} |")
    return "\n".join(lines) + "\n"


@torch.inference_mode()
def greedy_agreement(drafter: Drafter, tokenizer, prompt_ids: list[int], tokens: list[int]) -> list[bool]:
    """Teacher forcing on the target's own greedy output ``tokens`` after ``prompt_ids``: at each
    position, does the drafter's first greedy proposal equal the target's token? In greedy decoding
    a draft is only ever examined after a prefix of the target's own output, so this is the
    acceptance of every position, whether or not the loop happened to examine it there."""
    from .drafters import ModelDrafter, Sampling

    if isinstance(drafter, ModelDrafter):  # one forward pass over the whole sequence
        model = drafter.model
        ids = torch.tensor([prompt_ids + tokens], device=model.device)
        best = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].argmax(-1).tolist()
        return [b == t for b, t in zip(best, tokens)]
    out = []
    for t in range(len(tokens)):
        seq = torch.tensor([prompt_ids + tokens[:t]])
        drafter.reset(seq, torch.ones_like(seq))
        proposed, _ = drafter.propose(1, Sampling())
        out.append(int(proposed[0, 0]) == tokens[t] if proposed.shape[1] else False)
    return out


def acceptance_by_kind(drafter: Drafter, tokenizer, prompt_ids: list[list[int]],
                       outputs: list[list[int]]) -> dict[str, tuple[int, int]]:
    """Greedy acceptance per kind of the target's token (``token_kind``): {kind: (accepted, positions)}."""
    counts = {k: [0, 0] for k in KINDS}
    for ids, out in zip(prompt_ids, outputs):
        for token, ok in zip(out, greedy_agreement(drafter, tokenizer, ids, out)):
            kind = token_kind(tokenizer.decode([token]))
            counts[kind][0] += int(ok)
            counts[kind][1] += 1
    return {k: (a, n) for k, (a, n) in counts.items()}
