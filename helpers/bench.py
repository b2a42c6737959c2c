"""Ratios that keep the toolkit fast, each measured in one run on one machine.

    python -m helpers.bench                 # embedded SmolLM2-135M-Instruct, CPU or GPU
    python -m helpers.bench --model PATH --batch 32 --tokens 128

(a) capture ratio: generation with top-k capture ÷ plain ``generate`` (same model, prompts and
    tokens: greedy, so both write the same tokens; checked)            target ≤ 1.10
(b) KD step ratio: one LoRA training step with sparse top-k forward KL + cross-entropy ÷ one
    cross-entropy-only step on the same batch                           target ≤ 1.15
(c) logit-store bytes per token (file size, headers included)           target ≤ 8·k
(d) Co-LLM cost: time per token of Co-LLM decoding (both models cached) at deferral rate r ÷
    (base-alone time per token + r · assistant-alone time per token)   target ≤ 1.15
    and its speed-up over re-reading the whole prefix at every deferral (reported)

Timings alternate the two sides and take medians, so drift on a busy machine hits both.
Results are printed and written to ``logs/bench/`` (Markdown and JSON); the exit status is 1
when a target is missed.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from .artifacts import write_json, write_text

TARGETS = {"capture_ratio": 1.10, "kd_step_ratio": 1.15, "collm_cost_ratio": 1.15}
QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "Betty is saving money for a new wallet which costs $100. Betty has only half of the money she needs. "
    "Her parents decided to give her $15 for that purpose, and her grandparents twice as much as her parents. "
    "How much more money does Betty need to buy the wallet?",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?",
]


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _alternate(a, b, repeats: int) -> tuple[list[float], list[float]]:
    """Time a() and b() alternately after one warm-up of each."""
    a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, acc in ((a, ta), (b, tb)):
            _sync()
            t = time.perf_counter()
            fn()
            _sync()
            acc.append(time.perf_counter() - t)
    return ta, tb


def bench_capture(model, tok, *, batch: int, tokens: int, k: int, repeats: int) -> dict:
    from .models import prompt_text
    from .prompts import student_messages
    from .teacher import generate_with_capture

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


def bench_kd_step(model, *, batch: int, length: int, k: int, repeats: int) -> dict:
    from peft import LoraConfig, get_peft_model

    from .losses import kd_loss

    g = torch.Generator().manual_seed(0)
    vocab = model.config.get_text_config().vocab_size
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, task_type="CAUSAL_LM",
                                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    peft_model.train()
    dev = peft_model.device
    ids = torch.randint(0, vocab, (batch, length), generator=g).to(dev)
    mask = torch.ones(batch, length - 1, device=dev)
    topk_ids = torch.randint(0, vocab, (batch, length - 1, k), generator=g).to(dev)
    topk_lps = torch.log_softmax(torch.randn(batch, length - 1, k, generator=g), -1).to(dev)
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

    def step(kind):
        logits = peft_model(input_ids=ids).logits[:, :-1]
        loss, _ = kd_loss(kind, logits, ids[:, 1:], mask, topk_ids, topk_lps, T=1.0, alpha=0.5)
        loss.backward()
        opt.step()
        opt.zero_grad()

    t_kd, t_ce = _alternate(lambda: step("forward_kl"), lambda: step("ce"), repeats)
    peft_model.unload()  # leave the base model as it was
    return {"kd_step_s": statistics.median(t_kd), "ce_step_s": statistics.median(t_ce),
            "kd_step_ratio": statistics.median(t_kd) / statistics.median(t_ce)}


def bench_store(rows: list[dict], k: int) -> dict:
    import struct

    from .artifacts import write_manifest
    from .logit_store import FIELDS, STORE_FORMAT, LogitStore, shard_name, shard_record, write_shard

    with tempfile.TemporaryDirectory() as d:
        path = write_shard(Path(d) / shard_name(0), [{"id": f"q{i}", **{key: r[key] for key in (*FIELDS, "response", "finished")}}
                                                     for i, r in enumerate(rows)])
        write_manifest(d, {"settings": {"k": k, "format": STORE_FORMAT}, "n_shards": 1,
                           "shards": {path.name: shard_record(path)}})
        store = LogitStore(d)
        raw = path.read_bytes()
        # measured: the file minus its 8-byte length prefix, its header and the offsets (n + 1 int64)
        arrays = len(raw) - 8 - struct.unpack("<Q", raw[:8])[0] - 8 * (len(rows) + 1)
        return {"bytes_per_token": store.bytes_per_token(), "array_bytes_per_token": 6 * k + 12,
                "measured_array_bytes_per_token": arrays / max(1, store.tokens()),
                "bytes_per_token_target": 8 * k, "store_tokens": store.tokens()}


def bench_collm(model, tok, *, tokens: int, rate: float, repeats: int, prompts: int = 4) -> dict:
    """Batch-1 decoding of a few prompts: base alone, assistant alone (plain ``generate``),
    Co-LLM at random deferral rate ``rate`` with both caches, and the same with an assistant
    that re-reads the whole prefix at each deferral. The assistant is the same weights under
    another prompt (what is offline here); costs are per generated token."""
    from . import collm
    from .models import prompt_text
    from .prompts import student_messages, teacher_messages

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
        from .teacher import generate_with_capture
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m helpers.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="hub id, path or embedded name")
    ap.add_argument("--batch", type=int, default=16, help="prompts per generation batch (default 16)")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    ap.add_argument("--k", type=int, default=64, help="top-k kept per position (default 64)")
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--train-length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--collm-rate", type=float, default=0.2, help="deferral rate of the Co-LLM entry (default 0.2)")
    ap.add_argument("--collm-tokens", type=int, default=48, help="new tokens per prompt in the Co-LLM entry")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", default="logs/bench", help="folder for bench.md and bench.json")
    args = ap.parse_args(argv)

    from .models import load_model

    torch.manual_seed(0)
    model, tok = load_model(args.model, dtype=args.dtype)
    print(f"model {args.model} on {model.device} ({model.dtype}); torch threads {torch.get_num_threads()}", flush=True)
    cap = bench_capture(model, tok, batch=args.batch, tokens=args.tokens, k=args.k, repeats=args.repeats)
    print(f"(a) capture {cap['capture_s']:.2f} s / plain {cap['plain_s']:.2f} s = {cap['capture_ratio']:.3f}", flush=True)
    kd = bench_kd_step(model, batch=args.train_batch, length=args.train_length, k=args.k, repeats=args.repeats)
    print(f"(b) KD step {kd['kd_step_s']:.2f} s / CE step {kd['ce_step_s']:.2f} s = {kd['kd_step_ratio']:.3f}", flush=True)
    co = bench_collm(model, tok, tokens=args.collm_tokens, rate=args.collm_rate, repeats=args.repeats)
    print(f"(d) Co-LLM {1e3 * co['collm_s_per_token']:.1f} ms/token at rate {co['collm_rate']:.2f}; bound base "
          f"{1e3 * co['collm_base_s_per_token']:.1f} + r·assistant {1e3 * co['collm_assistant_s_per_token']:.1f} ms/token: "
          f"ratio {co['collm_cost_ratio']:.3f}; re-reading the prefix is {co['collm_reread_speedup']:.2f}× slower", flush=True)
    st = bench_store(cap.pop("rows"), args.k)
    print(f"(c) store {st['bytes_per_token']:.1f} bytes/token (arrays {st['array_bytes_per_token']}, "
          f"target ≤ {st['bytes_per_token_target']})", flush=True)

    checks = {
        "capture_ratio": (cap["capture_ratio"], f"≤ {TARGETS['capture_ratio']}", cap["capture_ratio"] <= TARGETS["capture_ratio"] and cap["same_tokens"]),
        "kd_step_ratio": (kd["kd_step_ratio"], f"≤ {TARGETS['kd_step_ratio']}", kd["kd_step_ratio"] <= TARGETS["kd_step_ratio"]),
        "bytes_per_token": (st["bytes_per_token"], f"≤ {st['bytes_per_token_target']}", st["bytes_per_token"] <= st["bytes_per_token_target"]),
        "collm_cost_ratio": (co["collm_cost_ratio"], f"≤ {TARGETS['collm_cost_ratio']}", co["collm_cost_ratio"] <= TARGETS["collm_cost_ratio"]),
        "collm_reread_speedup": (co["collm_reread_speedup"], "reported", True),
    }
    setup = {"model": args.model, "device": str(model.device), "dtype": str(model.dtype), "batch": args.batch,
             "tokens": args.tokens, "k": args.k, "collm_rate": args.collm_rate, "collm_tokens": args.collm_tokens, "train_batch": args.train_batch, "train_length": args.train_length,
             "repeats": args.repeats, "torch": torch.__version__, "threads": torch.get_num_threads(),
             "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    lines = ["# Benchmark", "", ", ".join(f"{k}={v}" for k, v in setup.items()), "",
             "| figure | value | target | met |", "|---|---|---|---|"]
    lines += [f"| {name} | {value:.3f} | {target} | {'yes' if ok else 'NO'} |" for name, (value, target, ok) in checks.items()]
    lines += ["", f"capture {cap['capture_s']:.3f} s vs plain generate {cap['plain_s']:.3f} s for "
              f"{cap['generated_tokens']} tokens (same tokens: {cap['same_tokens']}); "
              f"KD step {kd['kd_step_s']:.3f} s vs CE step {kd['ce_step_s']:.3f} s; "
              f"store arrays {st['array_bytes_per_token']} bytes/token; Co-LLM at deferral rate {co['collm_rate']:.3f}: "
              f"{1e3 * co['collm_s_per_token']:.2f} ms/token against base {1e3 * co['collm_base_s_per_token']:.2f} + "
              f"r × assistant {1e3 * co['collm_assistant_s_per_token']:.2f} ms/token; with re-reading "
              f"{1e3 * co['collm_reread_s_per_token']:.2f} ms/token."]
    out = Path(args.out)
    write_text(out / "bench.md", "\n".join(lines) + "\n")
    write_json(out / "bench.json", {"setup": setup, **cap, **kd, **st, **co,
                                    "met": {name: ok for name, (_, _, ok) in checks.items()}})
    print("\n".join(lines[4:]))
    print(f"written to {out / 'bench.md'}")
    missed = [name for name, (_, _, ok) in checks.items() if not ok]
    if missed:
        print(f"targets missed: {', '.join(missed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
