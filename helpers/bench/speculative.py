"""Entry (f) of speculative decoding (``helpers.speculative``) at batch 1 with the target's first
layers drafting: measured ÷ predicted speed-up at the best γ, and our loop ÷ transformers'
assisted generation."""
from __future__ import annotations


SPEC_PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
]


def bench_speculative(name: str, *, layers: int, gammas: list[int], tokens: int, repeats: int) -> dict:
    """(f) Speculative decoding at batch 1, greedy, with the target's first ``layers`` layers as
    drafter: per γ, α, the cost ratio c, predicted and measured speed-up over plain ``generate``;
    at the best γ, measured ÷ predicted and our loop's throughput ÷ transformers' assisted
    generation with the same drafter (each the best of ``repeats`` runs, after a warm-up of each).
    In fp32, where a one-token and a several-token forward round alike, so greedy outputs can be
    compared token for token."""
    from ..models import load_model, prompt_text
    from ..prompts import student_messages
    from ..speculative import report, truncated_drafter

    model, tok = load_model(name, dtype="fp32")
    layers = min(layers, model.config.get_text_config().num_hidden_layers)
    prompts = [prompt_text(tok, student_messages(q)) for q in SPEC_PROMPTS]
    drafter = truncated_drafter(model, layers, tok)
    ids = tok(prompts[0], return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)
    report.plain_generate(model, tok, prompts[:1], 4)  # warm-up
    reference, plain_s = min((report.plain_generate(model, tok, prompts, tokens) for _ in range(repeats)),
                             key=lambda r: r[1])
    step = report.step_seconds(model, ids)
    report.run_drafter(model, tok, drafter, prompts[:1], gammas[0], 4, [r[:4] for r in reference[:1]])  # warm-up
    per_gamma = {}
    for gamma in gammas:
        runs = [report.run_drafter(model, tok, drafter, prompts, gamma, tokens, reference) for _ in range(repeats)]
        _, stats, seconds, identical = min(runs, key=lambda r: r[2])
        row = report.measure(report.pooled(stats), gamma, step, plain_s, seconds)
        per_gamma[gamma] = {"alpha": row["alpha"], "c": row["c"], "predicted": row["predicted_speedup"],
                            "measured": row["measured_speedup"], "seconds": seconds, "identical": identical}
    best = max(per_gamma, key=lambda g: per_gamma[g]["measured"])
    report.assisted_generate(model, drafter.model, tok, prompts[:1], best, 4)  # warm-up
    assisted_out, assisted_s = min((report.assisted_generate(model, drafter.model, tok, prompts, best, tokens)
                                    for _ in range(repeats)), key=lambda r: r[1])
    b = per_gamma[best]
    return {"spec_layers": layers, "spec_best_gamma": best, "spec_per_gamma": per_gamma,
            "spec_measured_over_predicted": b["measured"] / b["predicted"],
            "spec_ours_over_assisted": assisted_s / b["seconds"],
            "spec_identical": all(v["identical"] for v in per_gamma.values()),
            "spec_assisted_identical": assisted_out == reference}
