"""Entry (e): fp32 ÷ bf16 time of plain generation and of one LoRA training step, and whether
``dtype: auto`` (``helpers.models.pick_dtype``) picks the faster of the two."""
from __future__ import annotations

import math
import statistics

import torch

from .common import QUESTIONS, _alternate, _lora_student, _sgd_step


def _lora_ce_step(model, *, batch: int, length: int, seed: int = 0):
    """A LoRA (q/k/v/o) cross-entropy training step on random tokens, as a callable; and undo."""
    peft_model, ids, opt, _ = _lora_student(model, batch=batch, length=length, seed=seed)

    def step():
        logits = peft_model(input_ids=ids).logits[:, :-1].float()
        _sgd_step(opt, torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))

    return step, peft_model.unload


def bench_dtypes(name: str, *, batch: int, tokens: int, train_batch: int, train_length: int, repeats: int) -> dict:
    """fp32 ÷ bf16 time for plain generation (same prompts and token budget) and for one LoRA
    cross-entropy step, with the dtype ``auto`` picks on this device."""
    from ..backends.transformers_engine import generate_with_capture
    from ..models import load_model, pick_dtype, prompt_text
    from ..prompts import student_messages

    m32, tok = load_model(name, dtype="fp32")
    m16, _ = load_model(name, dtype="bf16")
    prompts = [prompt_text(tok, student_messages(QUESTIONS[i % len(QUESTIONS)])) for i in range(batch)]
    gen = {}

    def generate(model, key):
        gen[key] = sum(len(r["token_ids"]) for r in generate_with_capture(model, tok, prompts, max_new_tokens=tokens,
                                                                          capture=False))

    g32, g16 = _alternate(lambda: generate(m32, "fp32"), lambda: generate(m16, "bf16"), repeats)
    (s32, undo32), (s16, undo16) = (_lora_ce_step(m, batch=train_batch, length=train_length) for m in (m32, m16))
    t32, t16 = _alternate(s32, s16, repeats)
    undo32(), undo16()
    auto = pick_dtype("auto", str(m32.device))
    out = {"fp32_generate_s": statistics.median(g32), "bf16_generate_s": statistics.median(g16),
           "fp32_generate_tokens": gen["fp32"], "bf16_generate_tokens": gen["bf16"],
           "fp32_train_step_s": statistics.median(t32), "bf16_train_step_s": statistics.median(t16),
           "auto_dtype": {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(auto, str(auto))}
    # per token: greedy fp32 and bf16 may stop at different lengths
    out["fp32_bf16_generate_ratio"] = (out["fp32_generate_s"] / max(gen["fp32"], 1)) / (out["bf16_generate_s"] / max(gen["bf16"], 1))
    out["fp32_bf16_train_ratio"] = out["fp32_train_step_s"] / out["bf16_train_step_s"]
    both = math.sqrt(out["fp32_bf16_generate_ratio"] * out["fp32_bf16_train_ratio"])  # > 1: bf16 is faster
    out["faster_dtype"] = "bf16" if both > 1 else "fp32"
    out["auto_picks_faster"] = out["auto_dtype"] == out["faster_dtype"] or abs(math.log(both)) < math.log(1.05)
    return out
