"""Entry (d) of Co-LLM (``helpers.collm``): time per token of Co-LLM decoding at a deferral rate ÷
(base alone + rate × assistant alone), and its speed-up over re-reading the prefix."""
from __future__ import annotations

import math
import statistics
import time

from .common import QUESTIONS, _sync


def bench_collm(model, tok, *, tokens: int, rate: float, repeats: int, prompts: int = 4) -> dict:
    """Batch-1 decoding of a few prompts: base alone, assistant alone (plain ``generate``),
    Co-LLM at random deferral rate ``rate`` with both caches, and the same with an assistant
    that re-reads the whole prefix at each deferral. The assistant is the same weights under
    another prompt (what is offline here); costs are per generated token."""
    from .. import collm
    from ..models import prompt_text
    from ..prompts import student_messages, teacher_messages

    head = collm.DeferralHead(model.config.get_text_config().hidden_size).to(model.device)
    qs = [QUESTIONS[i % len(QUESTIONS)] for i in range(prompts)]
    bp = [prompt_text(tok, student_messages(q)) for q in qs]
    ap = [prompt_text(tok, teacher_messages("teacher", q)) for q in qs]

    def per_token(fn):
        def run():
            n = 0
            for i in range(prompts):
                n += fn(i)
            run.n = n
        return run

    def co(i, **kw):
        row = collm.co_generate(model, head, tok, model, [bp[i]], [ap[i]], max_new_tokens=tokens, seed=i, **kw)[0]
        co.who += row["who"]
        return len(row["token_ids"])

    def asst_alone(i):
        from ..backends.transformers_engine import generate_with_capture
        return len(generate_with_capture(model, tok, [ap[i]], max_new_tokens=tokens, capture=False)[0]["token_ids"])

    runs = {"base": per_token(lambda i: co(i, eta_logit=math.inf)), "assistant": per_token(asst_alone),
            "co": per_token(lambda i: co(i, random_prob=rate)),
            "reread": per_token(lambda i: co(i, random_prob=rate, asst_cache=False))}
    times = {k: [] for k in runs}
    co.who = []
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in runs.items():
            if name == "co":
                co.who = []
            _sync()
            t = time.perf_counter()
            fn()
            _sync()
            times[name].append((time.perf_counter() - t) / fn.n)
    med = {k: statistics.median(v) for k, v in times.items()}
    r = sum(co.who) / max(len(co.who), 1)
    bound = med["base"] + r * med["assistant"]
    return {"collm_rate": r, "collm_base_s_per_token": med["base"], "collm_assistant_s_per_token": med["assistant"],
            "collm_s_per_token": med["co"], "collm_reread_s_per_token": med["reread"],
            "collm_cost_ratio": med["co"] / bound, "collm_reread_speedup": med["reread"] / med["co"]}
