"""Ratios that keep the toolkit fast, each measured in one run on one machine.

The runner behind ``python -m helpers.bench`` (the entries and their targets are listed in the
package's docstring): ``main`` (the options, the order the entries run in, each figure printed as
it is measured, the table and the files written to ``logs/bench/``, the exit status), the targets
(``TARGETS``), the settings of ``--quick`` and of the full run (``QUICK``, ``FULL``), and the
reference-CPU emulation (``REFERENCE_CPU``; ``cpu_name``, both from ``helpers.models``)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ..artifacts import write_json, write_text
from ..models import REFERENCE_CPU, cpu_name  # noqa: F401  (re-exported: the benchmark's reference CPU)
from .backends import bench_capture, bench_engines, bench_generation
from .collm import bench_collm
from .dtypes import bench_dtypes
from .fusion import ALIGN_TEXTS, ALIGN_TOKENIZER, align_tokenizer_b, bench_align, bench_cross_kd_step
from .kd import bench_chunked_loss, bench_kd_step, bench_store
from .speculative import bench_speculative


TARGETS = {"generation_speedup": 3.0, "capture_ratio": 1.10, "kd_step_ratio": 1.15, "cross_kd_step_ratio": 1.3, "collm_cost_ratio": 1.15,
           "chunked_memory_ratio": 0.5, "chunked_time_ratio": 1.10,
           "spec_measured_over_predicted": 0.9, "spec_ours_over_assisted": 1.0, "align_ratio": 50.0}


QUICK = {"gen_prompts": 32, "gen_batch": 16, "gen_tokens": 128, "batch": 4, "tokens": 24, "train_batch": 2, "train_length": 96, "repeats": 1, "collm_tokens": 16,
         "spec_tokens": 32, "align_repeats": 10, "chunked_tokens": 1024, "chunked_hidden": 256}
FULL = {"gen_prompts": 64, "gen_batch": 64, "gen_tokens": 512, "batch": 16, "tokens": 64, "train_batch": 4, "train_length": 256, "repeats": 3, "collm_tokens": 48,
        "spec_tokens": 64, "align_repeats": 50, "chunked_tokens": 1024, "chunked_hidden": 0}


def main(argv: list[str] | None = None) -> int:
    from tqdm.auto import tqdm

    ap = argparse.ArgumentParser(prog="python -m helpers.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="hub id, path or embedded name")
    ap.add_argument("--quick", action="store_true", help="smaller batches, one repeat: minutes on a busy CPU "
                                                         "(default output logs/bench/quick)")
    ap.add_argument("--reference-cpu", action="store_true", help="measure as on the reference laptop CPU: AVX2 "
                    "only (MKL, oneDNN and ATen limited to it), fp32")
    ap.add_argument("--gen-source", default="gsm_symbolic", help="problem source of entry (k) (default gsm_symbolic: "
                    "with the defaults below, the assessment of the study's problems as the default run made it)")
    ap.add_argument("--gen-prompts", type=int, help="test prompts in entry (k) (default 64; quick 32)")
    ap.add_argument("--gen-batch", type=int, help="rows in flight in entry (k) (default 64; quick 16)")
    ap.add_argument("--gen-tokens", type=int, help="token cap in entry (k) (default 512; quick 128)")
    ap.add_argument("--skip-generation", action="store_true", help="leave out the generation throughput entry (k)")
    ap.add_argument("--batch", type=int, help="prompts per generation batch (default 16; quick 4)")
    ap.add_argument("--tokens", type=int, help="new tokens per prompt (default 64; quick 24)")
    ap.add_argument("--k", type=int, default=64, help="top-k kept per position (default 64)")
    ap.add_argument("--train-batch", type=int, help="training batch (default 4; quick 2)")
    ap.add_argument("--train-length", type=int, help="training sequence length (default 256; quick 96)")
    ap.add_argument("--repeats", type=int, help="timed repeats per side (default 3; quick 1)")
    ap.add_argument("--collm-rate", type=float, default=0.2, help="deferral rate of the Co-LLM entry (default 0.2)")
    ap.add_argument("--collm-tokens", type=int, help="new tokens per prompt in the Co-LLM entry (default 48; quick 16)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--skip-dtypes", action="store_true", help="leave out the fp32 ÷ bf16 entry (e)")
    ap.add_argument("--spec-layers", type=int, default=8, help="layers of the truncated drafter in entry (f) (default 8)")
    ap.add_argument("--spec-tokens", type=int, help="new tokens per prompt in entry (f) (default 64; quick 32)")
    ap.add_argument("--skip-speculative", action="store_true", help="leave out the speculative decoding entry (f)")
    ap.add_argument("--align-tokenizer", default=ALIGN_TOKENIZER,
                    help=f"tokenizer B of the alignment entry (g), aligned against --model's (default {ALIGN_TOKENIZER}, "
                         "or a Unigram tokenizer trained on the solutions when that is not installed; 'trained' "
                         "picks the trained one)")
    ap.add_argument("--align-tokens", default="512,2048",
                    help="text lengths of entry (g) in tokens of --model's tokenizer, comma-separated (default 512,2048)")
    ap.add_argument("--align-repeats", type=int, help="timed runs of our alignment per size in entry (g) "
                                                      "(default 50; quick 10); the DTW reference runs once")
    ap.add_argument("--skip-align", action="store_true", help="leave out the alignment throughput entry (g)")
    ap.add_argument("--chunked-tokens", type=int, help="tokens per sequence (batch 2) in the chunked-loss entry (i) "
                    "(default 1024)")
    ap.add_argument("--chunked-hidden", type=int, help="hidden size in entry (i) (0: each vocabulary's model's, 896 "
                    "and 640; quick 256)")
    ap.add_argument("--skip-chunked", action="store_true", help="leave out the chunked-loss entry (i)")
    ap.add_argument("--skip-engines", action="store_true", help="leave out the llama_cpp ÷ transformers entry (j)")
    ap.add_argument("--out", default=None, help="folder for bench.md and bench.json (default logs/bench)")
    args = ap.parse_args(argv)
    import os

    if args.reference_cpu:
        args.dtype = "fp32"
        if any(os.environ.get(k) != v for k, v in REFERENCE_CPU.items()):  # set before torch loads its kernels
            env = {**os.environ, **REFERENCE_CPU}
            os.execve(sys.executable, [sys.executable, "-m", "helpers.bench", *(sys.argv[1:] if argv is None else argv)],
                      env)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or ("logs/bench/quick" if args.quick else "logs/bench")

    from ..models import load_model

    torch.manual_seed(0)
    align_sizes = [int(v) for v in str(args.align_tokens).split(",") if v.strip()]
    if not args.skip_align and (not align_sizes or min(align_sizes) < 1):
        ap.error(f"--align-tokens needs positive token counts, got {args.align_tokens!r}")
    import importlib.util

    from ..models import EMBEDDED

    engines_why = ("--skip-engines" if args.skip_engines else
                   "llama-cpp-python is not installed (pip install -e .[cpu-fast])" if importlib.util.find_spec("llama_cpp")
                   is None else None if args.model in EMBEDDED or args.model.endswith(".gguf") else
                   f"{args.model} is not a GGUF model (an embedded name or a .gguf file)")
    phases = (["load"] + ([] if args.skip_generation else ["(k) generation"]) + ["(a) capture"] + ([] if engines_why else ["(j) llama_cpp ÷ transformers"]) + ["(b) KD step", "(h) cross-tokenizer KD step", "(d) Co-LLM", "(c) store"]
              + ([] if args.skip_speculative else ["(f) speculative"]) + ([] if args.skip_dtypes else ["(e) fp32 ÷ bf16"])
              + ([] if args.skip_align else ["(g) alignment"]) + ([] if args.skip_chunked else ["(i) chunked loss"]))
    bar = tqdm(total=len(phases), desc="benchmark", unit="figure")

    def done(line: str) -> None:
        bar.write(line)
        bar.update(1)

    bar.set_postfix_str(phases[0])
    model, tok = load_model(args.model, dtype=args.dtype)
    loaded = {"device": str(model.device), "dtype": str(model.dtype)}
    done(f"model {args.model} on {model.device} ({model.dtype}); torch threads {torch.get_num_threads()}; "
         f"CPU {cpu_name()}")
    ge = {}
    if not args.skip_generation:
        bar.set_postfix_str("(k) generation")
        ge = bench_generation(model, tok, source=args.gen_source, n=args.gen_prompts, batch=args.gen_batch,
                              tokens=args.gen_tokens)
        done(f"(k) generation ({args.gen_prompts} {args.gen_source} test prompts, batch {args.gen_batch}, cap "
             f"{args.gen_tokens}): refilled {ge['generation_refilled_tokens_per_s']:.1f} tokens/s ÷ plain generate "
             f"{ge['generation_plain_tokens_per_s']:.1f} tokens/s = {ge['generation_speedup']:.2f}× "
             f"(target ≥ {TARGETS['generation_speedup']}); identical rows {ge['generation_identical_rows']}/"
             f"{args.gen_prompts}")
    bar.set_postfix_str("(a) capture")
    cap = bench_capture(model, tok, batch=args.batch, tokens=args.tokens, k=args.k, repeats=args.repeats)
    done(f"(a) capture {cap['capture_s']:.2f} s / plain {cap['plain_s']:.2f} s = {cap['capture_ratio']:.3f}")
    en = {}
    if engines_why is None:
        bar.set_postfix_str("(j) llama_cpp ÷ transformers")
        en = bench_engines(args.model, model, tok, batch=args.batch, tokens=args.tokens, k=args.k, repeats=args.repeats)
        done(f"(j) capture throughput llama_cpp {en['engines_llama_cpp_tokens_per_s']:.1f} tokens/s (one sequence at a "
             f"time) ÷ transformers {en['engines_transformers_tokens_per_s']:.1f} tokens/s (batch {args.batch}) = "
             f"{en['engines_llama_cpp_over_transformers']:.3f}; rows written the same for "
             f"{100 * en['engines_shared_prefix']:.0f} % of their tokens before they first differ")
    else:
        bar.write(f"(j) llama_cpp ÷ transformers left out: {engines_why}")
    bar.set_postfix_str("(b) KD step")
    kd = bench_kd_step(model, batch=args.train_batch, length=args.train_length, k=args.k, repeats=args.repeats)
    done(f"(b) KD step {kd['kd_step_s']:.2f} s / CE step {kd['ce_step_s']:.2f} s = {kd['kd_step_ratio']:.3f}")
    bar.set_postfix_str("(h) cross-tokenizer KD step")
    xk = bench_cross_kd_step(model, batch=args.train_batch, length=args.train_length, k=args.k, repeats=args.repeats)
    done(f"(h) cross-tokenizer KD step {xk['cross_kd_step_s']:.2f} s / same-tokenizer KD step "
         f"{xk['same_kd_step_s']:.2f} s = {xk['cross_kd_step_ratio']:.3f}")
    bar.set_postfix_str("(d) Co-LLM")
    co = bench_collm(model, tok, tokens=args.collm_tokens, rate=args.collm_rate, repeats=args.repeats)
    done(f"(d) Co-LLM {1e3 * co['collm_s_per_token']:.1f} ms/token at rate {co['collm_rate']:.2f}; bound base "
         f"{1e3 * co['collm_base_s_per_token']:.1f} + r·assistant {1e3 * co['collm_assistant_s_per_token']:.1f} ms/token: "
         f"ratio {co['collm_cost_ratio']:.3f}; re-reading the prefix is {co['collm_reread_speedup']:.2f}× slower")
    bar.set_postfix_str("(c) store")
    st = bench_store(cap.pop("rows"), args.k)
    done(f"(c) store {st['bytes_per_token']:.1f} bytes/token (arrays {st['array_bytes_per_token']}, "
         f"target ≤ {st['bytes_per_token_target']})")
    sp = {}
    if not args.skip_speculative:
        bar.set_postfix_str("(f) speculative")
        sp = bench_speculative(args.model, layers=args.spec_layers, gammas=[1, 2, 3, 5], tokens=args.spec_tokens,
                               repeats=args.repeats)
        b = sp["spec_per_gamma"][sp["spec_best_gamma"]]
        done(f"(f) speculative (first {sp['spec_layers']} layers drafting, batch 1): best γ {sp['spec_best_gamma']}, "
             f"α {b['alpha']:.3f}, c {b['c']:.3f}, speed-up measured {b['measured']:.2f} vs predicted "
             f"{b['predicted']:.2f} (ratio {sp['spec_measured_over_predicted']:.3f}); ours ÷ transformers assisted "
             f"throughput {sp['spec_ours_over_assisted']:.3f}")
    dt = {}
    if not args.skip_dtypes:
        del model
        bar.set_postfix_str("(e) fp32 ÷ bf16")
        dt = bench_dtypes(args.model, batch=args.batch, tokens=args.tokens, train_batch=args.train_batch,
                          train_length=args.train_length, repeats=args.repeats)
        done(f"(e) fp32 ÷ bf16: generation {dt['fp32_bf16_generate_ratio']:.3f} per token, training step "
             f"{dt['fp32_bf16_train_ratio']:.3f}; faster here: {dt['faster_dtype']}; auto picks {dt['auto_dtype']}")
    al = {}
    if not args.skip_align:
        from ..data import load_split

        bar.set_postfix_str("(g) alignment")
        texts = [r.solution for r in load_split("train", n=ALIGN_TEXTS)]
        tok_b, name_b, note = align_tokenizer_b(args.align_tokenizer, texts)
        if note:
            bar.write(note)
        per_size = bench_align(tok, tok_b, texts, sizes=align_sizes, repeats=args.align_repeats)
        for size, r in per_size.items():
            r.pop("dtw_path")
            bar.write(f"(g) alignment at {size} tokens (A {r['tokens_a']}, B {r['tokens_b']}): DTW ÷ ours "
                      f"{r['ratio']:.0f}× (target ≥ {TARGETS['align_ratio']:.0f}×), end to end with tokenization "
                      f"{r['e2e_ratio']:.0f}×; 1:1 pieces {100 * r['one_to_one_share']:.1f} %")
        bar.update(1)
        al = {"align_tokenizer_a": args.model, "align_tokenizer_b": name_b,
              "align_per_size": per_size, **{f"align_ratio_{n}": r["ratio"] for n, r in per_size.items()},
              **{f"align_e2e_ratio_{n}": r["e2e_ratio"] for n, r in per_size.items()}}
    ch = {}
    if not args.skip_chunked:
        bar.set_postfix_str("(i) chunked loss")
        ch = bench_chunked_loss(batch=2, length=args.chunked_tokens, k=args.k, repeats=args.repeats,
                                hidden=args.chunked_hidden or None)
        for name, r in ch.items():
            bar.write(f"(i) chunked ÷ plain KD loss step at vocabulary {r['vocab']} ({name}, hidden {r['hidden']}, "
                      f"2×{args.chunked_tokens} tokens): peak memory {r['chunked_peak_bytes'] / 2**20:.0f} / "
                      f"{r['plain_peak_bytes'] / 2**20:.0f} MiB = {r['memory_ratio']:.3f} (target ≤ "
                      f"{TARGETS['chunked_memory_ratio']}), time {r['time_ratio']:.3f} (target ≤ {TARGETS['chunked_time_ratio']})")
        bar.update(1)
    bar.close()

    checks = {}
    if ge:
        checks["generation_speedup"] = (ge["generation_speedup"], f"≥ {TARGETS['generation_speedup']} (identical)",
                                        ge["generation_speedup"] >= TARGETS["generation_speedup"]
                                        and ge["generation_identical_rows"] == args.gen_prompts)
    checks |= {
        "capture_ratio": (cap["capture_ratio"], f"≤ {TARGETS['capture_ratio']}", cap["capture_ratio"] <= TARGETS["capture_ratio"] and cap["same_tokens"]),
        "kd_step_ratio": (kd["kd_step_ratio"], f"≤ {TARGETS['kd_step_ratio']}", kd["kd_step_ratio"] <= TARGETS["kd_step_ratio"]),
        "cross_kd_step_ratio": (xk["cross_kd_step_ratio"], f"≤ {TARGETS['cross_kd_step_ratio']}",
                                xk["cross_kd_step_ratio"] <= TARGETS["cross_kd_step_ratio"]),
        "bytes_per_token": (st["bytes_per_token"], f"≤ {st['bytes_per_token_target']}", st["bytes_per_token"] <= st["bytes_per_token_target"]),
        "collm_cost_ratio": (co["collm_cost_ratio"], f"≤ {TARGETS['collm_cost_ratio']}", co["collm_cost_ratio"] <= TARGETS["collm_cost_ratio"]),
        "collm_reread_speedup": (co["collm_reread_speedup"], "reported", True),
    }
    if dt:
        checks["fp32_bf16_generate_ratio"] = (dt["fp32_bf16_generate_ratio"], "reported", True)
        checks["fp32_bf16_train_ratio"] = (dt["fp32_bf16_train_ratio"], "reported", True)
        checks["auto_picks_faster_dtype"] = (float(dt["auto_picks_faster"]), f"1 (auto = {dt['auto_dtype']}, "
                                             f"faster = {dt['faster_dtype']})", dt["auto_picks_faster"])
    if sp:
        checks["spec_measured_over_predicted"] = (sp["spec_measured_over_predicted"], f"≥ {TARGETS['spec_measured_over_predicted']}",
                                                  sp["spec_measured_over_predicted"] >= TARGETS["spec_measured_over_predicted"])
        checks["spec_ours_over_assisted"] = (sp["spec_ours_over_assisted"], f"≥ {TARGETS['spec_ours_over_assisted']}",
                                             sp["spec_ours_over_assisted"] >= TARGETS["spec_ours_over_assisted"]
                                             and sp["spec_identical"])
    for n, r in al.get("align_per_size", {}).items():
        checks[f"align_ratio_{n}"] = (r["ratio"], f"≥ {TARGETS['align_ratio']:.0f}", r["ratio"] >= TARGETS["align_ratio"])
        checks[f"align_e2e_ratio_{n}"] = (r["e2e_ratio"], "reported", True)
        checks[f"align_one_to_one_share_{n}"] = (r["one_to_one_share"], "reported", True)
    if en:
        checks["engines_llama_cpp_over_transformers"] = (en["engines_llama_cpp_over_transformers"], "reported", True)
    for name, r in ch.items():
        checks[f"chunked_memory_ratio_{name}"] = (r["memory_ratio"], f"≤ {TARGETS['chunked_memory_ratio']}",
                                                  r["memory_ratio"] <= TARGETS["chunked_memory_ratio"])
        checks[f"chunked_time_ratio_{name}"] = (r["time_ratio"], f"≤ {TARGETS['chunked_time_ratio']}",
                                                r["time_ratio"] <= TARGETS["chunked_time_ratio"])
    setup = {"model": args.model, **loaded, "quick": args.quick, "gen_source": args.gen_source,
             "gen_prompts": args.gen_prompts, "gen_batch": args.gen_batch, "gen_tokens": args.gen_tokens, "batch": args.batch,
             "tokens": args.tokens, "k": args.k, "collm_rate": args.collm_rate, "collm_tokens": args.collm_tokens, "train_batch": args.train_batch, "train_length": args.train_length,
             "repeats": args.repeats, "spec_tokens": args.spec_tokens,
             **({} if args.skip_align else {"align_tokenizer": args.align_tokenizer, "align_tokens": align_sizes}),
             "align_repeats": args.align_repeats,
             "chunked_tokens": args.chunked_tokens, "chunked_hidden": args.chunked_hidden,
             "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_name(),
             "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    lines = ["# Benchmark", "", ", ".join(f"{k}={v}" for k, v in setup.items()), "",
             "| figure | value | target | met |", "|---|---|---|---|"]
    lines += [f"| {name} | {value:.3f} | {target} | {'yes' if ok else 'NO'} |" for name, (value, target, ok) in checks.items()]
    lines += ["", f"capture {cap['capture_s']:.3f} s vs plain generate {cap['plain_s']:.3f} s for "
              f"{cap['generated_tokens']} tokens (same tokens: {cap['same_tokens']}); "
              f"KD step {kd['kd_step_s']:.3f} s vs CE step {kd['ce_step_s']:.3f} s; cross-tokenizer KD step "
              f"{xk['cross_kd_step_s']:.3f} s vs same-tokenizer {xk['same_kd_step_s']:.3f} s; "
              f"store arrays {st['array_bytes_per_token']} bytes/token; Co-LLM at deferral rate {co['collm_rate']:.3f}: "
              f"{1e3 * co['collm_s_per_token']:.2f} ms/token against base {1e3 * co['collm_base_s_per_token']:.2f} + "
              f"r × assistant {1e3 * co['collm_assistant_s_per_token']:.2f} ms/token; with re-reading "
              f"{1e3 * co['collm_reread_s_per_token']:.2f} ms/token."
              + (f" fp32 vs bf16: generation {dt['fp32_generate_s']:.3f} s ({dt['fp32_generate_tokens']} tokens) vs "
                 f"{dt['bf16_generate_s']:.3f} s ({dt['bf16_generate_tokens']} tokens); training step "
                 f"{dt['fp32_train_step_s']:.3f} s vs {dt['bf16_train_step_s']:.3f} s." if dt else "")]
    if al:
        lines.append("Alignment (g), tokenizer A {} vs B {}: ".format(al["align_tokenizer_a"], al["align_tokenizer_b"]) + "; ".join(
            f"{n} tokens of A ({r['tokens_b']} of B, {r['chars']} characters): ours {1e3 * r['ours_s']:.3f} ms vs "
            f"DTW {1e3 * r['dtw_s']:.1f} ms on the same tokenizations ({r['ratio']:.0f}×), end to end "
            f"{1e3 * r['ours_e2e_s']:.3f} ms vs {1e3 * r['dtw_e2e_s']:.1f} ms ({r['e2e_ratio']:.0f}×); "
            f"{r['pieces']} pieces, {100 * r['one_to_one_share']:.1f} % 1:1, DTW's path passes through "
            f"{100 * r['dtw_agrees_on_one_to_one']:.1f} % of them" for n, r in al["align_per_size"].items()) + ".")
    out = Path(args.out)
    if sp:
        lines.append("Speculative decoding (batch 1, greedy, first {} layers drafting): ".format(sp["spec_layers"]) + "; ".join(
            f"γ={g}: α {v['alpha']:.3f}, c {v['c']:.3f}, speed-up {v['measured']:.2f} measured / {v['predicted']:.2f} "
            f"predicted" for g, v in sp["spec_per_gamma"].items())
            + f"; output equals plain generate: {sp['spec_identical']} (ours), {sp['spec_assisted_identical']} (assisted).")
    write_text(out / "bench.md", "\n".join(lines) + "\n")
    if ge:
        lines.append(f"Generation (k): {ge['generation_tokens']} tokens ({ge['generation_capped']} rows at the cap); "
                     f"plain generate {ge['generation_plain_tokens_per_s']:.1f} tokens/s, refilled "
                     f"{ge['generation_refilled_tokens_per_s']:.1f} tokens/s; rows identical "
                     f"{ge['generation_identical_rows']}/{ge['generation_prompts']}.")
    write_json(out / "bench.json", {"setup": setup, **ge, **cap, **en, **kd, **xk, **st, **co, **dt, **sp, **al,
                                    **({"chunked": ch} if ch else {}),
                                    "met": {name: ok for name, (_, _, ok) in checks.items()}})
    print("\n".join(lines[4:]))
    print(f"written to {out / 'bench.md'}")
    missed = [name for name, (_, _, ok) in checks.items() if not ok]
    if missed:
        print(f"targets missed: {', '.join(missed)}", file=sys.stderr)
        return 1
    return 0
