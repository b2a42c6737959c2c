"""Entries of the teacher engines and generation (``helpers.backends``): (a) capture ratio,
generation with top-k capture ÷ plain ``generate``; (j) the ``llama_cpp`` engine's capture
throughput ÷ the ``transformers`` engine's; (k) assessment-style generation with rows refilled as
they end (``backends.continuous``) ÷ plain ``generate`` on static batches."""
from __future__ import annotations

import statistics
import time

from .common import QUESTIONS, _alternate, _sync


def bench_capture(model, tok, *, batch: int, tokens: int, k: int, repeats: int) -> dict:
    from ..backends.transformers_engine import generate_with_capture
    from ..models import prompt_text
    from ..prompts import student_messages

    prompts = [prompt_text(tok, student_messages(QUESTIONS[i % len(QUESTIONS)])) for i in range(batch)]
    out = {}

    def run(capture):
        out[capture] = generate_with_capture(model, tok, prompts, k=k, max_new_tokens=tokens, capture=capture)

    t_cap, t_plain = _alternate(lambda: run(True), lambda: run(False), repeats)
    same = [r["token_ids"] for r in out[True]] == [r["token_ids"] for r in out[False]]
    n_tokens = sum(len(r["token_ids"]) for r in out[True])
    return {"capture_s": statistics.median(t_cap), "plain_s": statistics.median(t_plain),
            "capture_ratio": statistics.median(t_cap) / statistics.median(t_plain),
            "same_tokens": same, "generated_tokens": n_tokens, "rows": out[True]}


def bench_generation(model, tok, *, source: str, n: int, batch: int, tokens: int) -> dict:
    """(k) Tokens per second of assessment-style generation: rows refilled as they end ÷ plain
    ``generate`` on static batches, the same prompts, greedy with loop stops; outputs compared."""
    from ..backends import continuous
    from ..backends.capture import prompt_ids
    from ..backends.transformers_engine import generate_with_capture
    from ..data import load_split
    from ..models import prompt_text
    from ..prompts import student_messages

    ids = prompt_ids(tok, [prompt_text(tok, student_messages(r.question)) for r in load_split("test", source=source, n=n)])
    ids.sort(key=len, reverse=True)
    settings = {"max_new_tokens": tokens, "stop_loops": True}
    out, secs = {}, {}
    for which in ("plain", "refilled"):
        _sync()
        t = time.perf_counter()
        if which == "plain":
            out[which] = [row for b in range(0, n, batch) for row in
                          generate_with_capture(model, tok, ids[b:b + batch], capture=False, **settings)]
        else:
            out[which] = continuous.decode(model, tok, ids, batch_size=batch, **settings)
        _sync()
        secs[which] = time.perf_counter() - t
    count = {w: sum(len(r["token_ids"]) for r in rows) for w, rows in out.items()}
    same = sum(a["token_ids"] == b["token_ids"] for a, b in zip(out["plain"], out["refilled"]))
    speed = {w: count[w] / secs[w] for w in out}
    return {"generation_source": source, "generation_prompts": n, "generation_batch": batch, "generation_cap": tokens,
            "generation_plain_tokens_per_s": speed["plain"], "generation_refilled_tokens_per_s": speed["refilled"],
            "generation_speedup": speed["refilled"] / speed["plain"], "generation_identical_rows": same,
            "generation_tokens": count["plain"], "generation_capped": sum(r["stop"] == "cap" for r in out["plain"])}


def bench_engines(name: str, model, tok, *, batch: int, tokens: int, k: int, repeats: int) -> dict:
    """(j) The llama_cpp engine's capture throughput (tokens per second, its own GGUF, one sequence
    at a time) ÷ the transformers engine's (the loaded model, the whole batch at once), on the same
    prompts, greedy with top-k capture; with the mean share of each row written the same before the
    two first differ (the quantised GGUF parts from the de-quantised model at near-ties)."""
    from ..backends import open_backend
    from ..backends.capture import prompt_ids
    from ..backends.transformers_engine import TransformersEngine
    from ..models import prompt_text
    from ..prompts import student_messages

    prompts = prompt_ids(tok, [prompt_text(tok, student_messages(QUESTIONS[i % len(QUESTIONS)])) for i in range(batch)])
    engines = {"llama_cpp": open_backend("llama_cpp", name, options={"n_ctx": 2048}),
               "transformers": TransformersEngine(model, tok)}
    out = {}

    def run(which):
        out[which] = engines[which].generate(prompts, k=k, max_new_tokens=tokens)

    try:
        t_cpp, t_hf = _alternate(lambda: run("llama_cpp"), lambda: run("transformers"), repeats)
    finally:
        engines["llama_cpp"].close()
    n = {w: sum(len(r["token_ids"]) for r in rows) for w, rows in out.items()}
    speed = {w: n[w] / statistics.median(t) for w, t in (("llama_cpp", t_cpp), ("transformers", t_hf))}
    def agreed(a, b):  # the share of the reference row's tokens before the first difference
        n = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return n / max(1, len(b))

    shared = statistics.mean(agreed(a["token_ids"], b["token_ids"]) for a, b in zip(out["llama_cpp"], out["transformers"]))
    return {"engines_llama_cpp_tokens_per_s": speed["llama_cpp"], "engines_transformers_tokens_per_s": speed["transformers"],
            "engines_llama_cpp_over_transformers": speed["llama_cpp"] / speed["transformers"],
            "engines_shared_prefix": shared, "engines_batch": batch}
