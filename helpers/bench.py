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
(e) fp32 ÷ bf16 time of plain generation and of one LoRA training step (on a CPU without
    native bf16 fp32 is faster); target: ``dtype: auto`` picks the faster of the two (or they
    are within 5 % of each other)
(f) speculative decoding at batch 1 with the target's first layers drafting: measured ÷ predicted
    speed-up at the best γ (target ≥ 0.9) and our loop's throughput ÷ transformers' assisted
    generation with the same drafter (target ≥ 1.0)
(g) alignment throughput: a DTW alignment of the same token strings (a reference written here, for
    timing only) ÷ ``helpers.fusion.align`` on GSM-style solution text of 512 and 2048 tokens of the
    model's tokenizer (A) against a second tokenizer (B: ``--align-tokenizer``, default the embedded
    Gemma 3 270M, else a Unigram tokenizer trained here); tokenization excluded from both sides, and
    end to end with it (reported); with the share of 1:1 pieces          target ≥ 50

(h) cross-tokenizer KD step (token and piece units of ``helpers.fusion``) ÷ the same-tokenizer KD
    step on the same batch                                              target ≤ 1.3
(i) chunked KD loss ÷ plain KD loss, one step through the LM head at 2 × 1024 tokens at the vocabularies
    of Qwen2.5 (151,936) and Gemma 3 (262,144), each side in its own process: peak memory (target
    ≤ 0.5) and time (target ≤ 1.10)
(j) teacher engines: the ``llama_cpp`` engine's capture throughput on the model's GGUF ÷ the
    ``transformers`` engine's, same prompts, greedy (reported; needs the ``[cpu-fast]`` extra)
(k) generation throughput as assessment runs it (by default 64 GSM-Symbolic test prompts at batch
    64 with room for 512 new tokens, loops stopped, greedy): generated tokens per second with rows refilled
    as they end (``backends.continuous``) ÷ plain ``generate`` on left-padded batches of the same
    size, longest prompts first (the toolkit's path before refilling); the outputs must be equal
    token for token                                                    target ≥ 3.0

``--reference-cpu`` runs it all as on the reference laptop CPU (AVX2 only, fp32): the process
restarts with MKL, oneDNN and ATen limited to AVX2 (``REFERENCE_CPU``) on a CPU that has more.

``--quick`` measures everything on smaller batches with one repeat (a few minutes on a busy
2-core machine); each figure is printed as soon as it is measured.

Timings alternate the two sides and take medians, so drift on a busy machine hits both.
Results are printed and written to ``logs/bench/`` (Markdown and JSON); the exit status is 1
when a target is missed.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from .artifacts import write_json, write_text

REFERENCE_CPU = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
TARGETS = {"generation_speedup": 3.0, "capture_ratio": 1.10, "kd_step_ratio": 1.15, "cross_kd_step_ratio": 1.3, "collm_cost_ratio": 1.15,
           "chunked_memory_ratio": 0.5, "chunked_time_ratio": 1.10,
           "spec_measured_over_predicted": 0.9, "spec_ours_over_assisted": 1.0, "align_ratio": 50.0}
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
    from .backends.transformers_engine import generate_with_capture
    from .models import prompt_text
    from .prompts import student_messages

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


def cpu_name() -> str:
    """The CPU's model name and its widest vector extensions, with any AVX2 emulation in force."""
    import os
    import platform

    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", platform.machine(), platform.processor()):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wide = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    emulated = all(os.environ.get(k) == v for k, v in REFERENCE_CPU.items())
    return f"{name} ({', '.join(wide) or 'flags unknown'})" + ("; emulating AVX2 only" if emulated else "")


def bench_generation(model, tok, *, source: str, n: int, batch: int, tokens: int) -> dict:
    """(k) Tokens per second of assessment-style generation: rows refilled as they end ÷ plain
    ``generate`` on static batches, the same prompts, greedy with loop stops; outputs compared."""
    from .backends import continuous
    from .backends.capture import prompt_ids
    from .backends.transformers_engine import generate_with_capture
    from .data import load_split
    from .models import prompt_text
    from .prompts import student_messages

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
    from .backends import open_backend
    from .backends.capture import prompt_ids
    from .backends.transformers_engine import TransformersEngine
    from .models import prompt_text
    from .prompts import student_messages

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


def _lora_student(model, *, batch: int, length: int, seed: int = 0):
    """``model`` with LoRA (q/k/v/o) in training mode, a batch of random tokens and SGD, for timed
    training steps; also the generator, for any further random inputs. ``peft_model.unload()`` undoes it."""
    from peft import LoraConfig, get_peft_model

    g = torch.Generator().manual_seed(seed)
    vocab = model.config.get_text_config().vocab_size
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, task_type="CAUSAL_LM",
                                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    peft_model.train()
    ids = torch.randint(0, vocab, (batch, length), generator=g).to(peft_model.device)
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    return peft_model, ids, opt, g


def _sparse_teacher(g, vocab: int, shape: tuple, k: int, device):
    """Random top-k ids and log-probs of a teacher at every position of ``shape``."""
    topk_ids = torch.randint(0, vocab, (*shape, k), generator=g).to(device)
    return topk_ids, torch.log_softmax(torch.randn(*shape, k, generator=g), -1).to(device)


def _sgd_step(opt, loss) -> None:
    loss.backward()
    opt.step()
    opt.zero_grad()


def bench_kd_step(model, *, batch: int, length: int, k: int, repeats: int) -> dict:
    from .kd.losses import kd_loss

    peft_model, ids, opt, g = _lora_student(model, batch=batch, length=length)
    dev = peft_model.device
    mask = torch.ones(batch, length - 1, device=dev)
    topk_ids, topk_lps = _sparse_teacher(g, model.config.get_text_config().vocab_size, (batch, length - 1), k, dev)

    def step(kind):
        logits = peft_model(input_ids=ids).logits[:, :-1]
        _sgd_step(opt, kd_loss(kind, logits, ids[:, 1:], mask, topk_ids, topk_lps, T=1.0, alpha=0.5)[0])

    t_kd, t_ce = _alternate(lambda: step("forward_kl"), lambda: step("ce"), repeats)
    peft_model.unload()  # leave the base model as it was
    return {"kd_step_s": statistics.median(t_kd), "ce_step_s": statistics.median(t_ce),
            "kd_step_ratio": statistics.median(t_kd) / statistics.median(t_ce)}


def bench_cross_kd_step(model, *, batch: int, length: int, k: int, repeats: int, piece_share: float = 0.2) -> dict:
    """One KD training step on targets moved across tokenizers (``fusion.losses``: token units with
    filler columns, multi-token piece units) ÷ one same-tokenizer KD step (``kd_loss``) on the same
    batch, ids and log-probs: the cost of distilling from a teacher with another tokenizer."""
    from .fusion.losses import cross_kd_loss
    from .fusion.targets import PIECE, TOKEN
    from .kd.losses import kd_loss

    peft_model, ids, opt, g = _lora_student(model, batch=batch, length=length)
    dev = peft_model.device
    L = length - 1
    mask = torch.ones(batch, L, device=dev)
    topk_ids, topk_lps = _sparse_teacher(g, model.config.get_text_config().vocab_size, (batch, L), k, dev)
    tail = torch.full((batch, L), -3.0, device=dev)
    # a realistic mix: most positions 1:1 (a few unmapped columns as filler), some ending a 2-token piece
    unit = torch.full((batch, L), TOKEN, dtype=torch.long)
    ends = torch.rand(batch, L, generator=g) < piece_share
    ends[:, 0] = False
    unit[ends] = PIECE
    unit[:, :-1][ends[:, 1:]] = 0  # the first token of each piece is no unit of its own
    cross_lps = topk_lps.clone()
    cross_lps[..., -k // 8:] = float("-inf")
    teachers = {"topk_ids": topk_ids[None], "topk_logprobs": cross_lps[None], "tail_logprobs": tail[None],
                "unit": unit[None].to(dev), "piece_len": (ends.long() * 2)[None].to(dev),
                "piece_logprob": torch.where(ends, -1.5, float("nan"))[None].to(dev), "weight": torch.ones(1, batch, device=dev)}

    def step(cross):
        logits = peft_model(input_ids=ids).logits[:, :-1]
        if cross:
            loss, _ = cross_kd_loss("forward_kl", logits, ids[:, 1:], mask, teachers, T=1.0, alpha=0.5)
        else:
            loss, _ = kd_loss("forward_kl", logits, ids[:, 1:], mask, topk_ids, topk_lps, T=1.0, alpha=0.5,
                              tail_logprobs=tail)
        _sgd_step(opt, loss)

    t_cross, t_same = _alternate(lambda: step(True), lambda: step(False), repeats)
    peft_model.unload()
    return {"cross_kd_step_s": statistics.median(t_cross), "same_kd_step_s": statistics.median(t_same),
            "cross_kd_step_ratio": statistics.median(t_cross) / statistics.median(t_same)}


# large vocabularies: (name, vocabulary, hidden size of a model that has it)
LARGE_VOCABS = (("qwen2.5", 151_936, 896), ("gemma3", 262_144, 640))


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak_rss() -> int:
    """Reset this process's resident-set high-water mark (Linux: 5 > /proc/self/clear_refs) and
    return the resident set now; where that is not possible, the maximum so far (an overestimate
    of the base, so peaks measured from it are underestimates)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_bytes("VmRSS")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss() -> int:
    try:
        return _status_bytes("VmHWM")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _loss_step_peak(vocab: int, hidden: int, batch: int, length: int, k: int, chunked: bool, repeats: int, queue) -> None:
    """In a fresh process: one KD step of the loss through the LM head (from hidden states, forward
    and backward), plain (full fp32 logits) or chunked; puts (peak extra bytes, median seconds)."""
    from .kd.losses import chunked_kd_loss, kd_loss

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    h = torch.randn(batch, length, hidden, device=dev, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=dev) * hidden ** -0.5).requires_grad_()
    targets = torch.randint(0, vocab, (batch, length), device=dev)
    mask = torch.ones(batch, length, device=dev)
    ids = torch.randint(0, vocab, (batch, length, k), device=dev)
    lps = torch.log_softmax(torch.randn(batch, length, k, device=dev), -1) - 1.0
    tail = torch.full((batch, length), -1.0, device=dev)

    def step():
        if chunked:
            loss, _ = chunked_kd_loss("forward_kl", h, w, targets, mask, ids, lps, tail_logprobs=tail)
        else:
            loss, _ = kd_loss("forward_kl", h @ w.T, targets, mask, ids, lps, tail_logprobs=tail)
        loss.backward()
        h.grad = w.grad = None

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:  # the resident set's high-water mark, reset here (Linux), over the resident set now
        base = _reset_peak_rss()
    step()  # warm-up: its peak is the step's peak (the timed steps reuse what it allocated)
    times = []
    for _ in range(repeats):
        _sync()
        t = time.perf_counter()
        step()
        _sync()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss()
    queue.put((peak - base, statistics.median(times)))


def bench_chunked_loss(*, batch: int, length: int, k: int, repeats: int, hidden: int | None = None) -> dict:
    """Peak memory and time of one KD loss step through the LM head (forward and backward from the
    hidden states), chunked ÷ plain, at Qwen's and Gemma's vocabulary sizes. Each side runs in its
    own fresh process, so its peak is its own: on a CPU the growth of the process's maximum resident
    set over one step once the inputs exist (gradients included, as both sides hold them), on a GPU
    the peak allocated memory above the inputs."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = {}
    for name, vocab, model_hidden in LARGE_VOCABS:
        row = {"vocab": vocab, "hidden": hidden or model_hidden}
        for chunked in (False, True):
            q = ctx.Queue()
            p = ctx.Process(target=_loss_step_peak, args=(vocab, row["hidden"], batch, length, k, chunked, repeats, q))
            p.start()
            peak, seconds = q.get()
            p.join()
            side = "chunked" if chunked else "plain"
            row[f"{side}_peak_bytes"], row[f"{side}_s"] = peak, seconds
        row["memory_ratio"] = row["chunked_peak_bytes"] / max(1, row["plain_peak_bytes"])
        row["time_ratio"] = row["chunked_s"] / row["plain_s"]
        out[name] = row
    return out


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
    from .backends.transformers_engine import generate_with_capture
    from .models import load_model, pick_dtype, prompt_text
    from .prompts import student_messages

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


def bench_store(rows: list[dict], k: int) -> dict:
    import struct

    from .artifacts import file_record, write_manifest
    from .kd.logit_store import FIELDS, STORE_FORMAT, LogitStore, shard_name, write_shard

    with tempfile.TemporaryDirectory() as d:
        path = write_shard(Path(d) / shard_name(0), [{"id": f"q{i}", **{key: r[key] for key in (*FIELDS, "response", "finished")}}
                                                     for i, r in enumerate(rows)])
        write_manifest(d, {"settings": {"k": k, "format": STORE_FORMAT}, "n_shards": 1,
                           "shards": {path.name: file_record(path)}})
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
        from .backends.transformers_engine import generate_with_capture
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
    from .models import load_model, prompt_text
    from .prompts import student_messages
    from .speculative import report, truncated_drafter

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


# --------------------------------------------------------------------------- (g) alignment throughput
ALIGN_TOKENIZER = "gemma3-270m"  # B by default; a Unigram tokenizer trained here when it is not installed
ALIGN_TEXTS = 300  # gsm_symbolic training solutions: the texts cut to length, and the trained B's corpus
_MARKERS = str.maketrans("", "", "Ġ▁Ċĉ")  # whitespace markers of byte-level BPE and SentencePiece


def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertion, deletion, substitution each cost 1), one row at a time."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        diag, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diag + (ca != cb))
    return row[-1]


def dtw_reference(tokens_a: list[str], tokens_b: list[str]) -> list[tuple[int, int]]:
    """A reference for timing only (benchmark (g)); the toolkit aligns with ``helpers.fusion.align``.

    Dynamic time warping over two token-string sequences, as FuseLLM-style fusion aligns
    tokenizations: whitespace markers (Ġ Ċ ĉ ▁) are stripped, the cost of pairing two tokens is the
    edit distance between their strings (computed once per distinct pair), every one of the n·m
    cells of the cumulative-cost table is filled in a plain Python loop, and the cheapest path is
    traced back (ties prefer the diagonal). Returns that path as (i, j) pairs from (0, 0) to
    (n-1, m-1), each step advancing i, j or both by one."""
    a, b = [t.translate(_MARKERS) for t in tokens_a], [t.translate(_MARKERS) for t in tokens_b]
    n, m = len(a), len(b)
    if not n or not m:
        return []
    inf, pair_cost = math.inf, {}
    table = [[0.0] + [inf] * m]  # table[i][j]: cheapest path over a[:i], b[:j] that pairs a[i-1] with b[j-1]
    for x in a:
        above, row = table[-1], [inf] * (m + 1)
        costs = pair_cost.setdefault(x, {})
        for j, y in enumerate(b, 1):
            c = costs.get(y)
            if c is None:
                c = costs[y] = _edit_distance(x, y)
            row[j] = c + min(above[j - 1], above[j], row[j - 1])
        table.append(row)
    i, j, path = n, m, [(n - 1, m - 1)]
    while i > 1 or j > 1:
        _, i, j = min((table[i - 1][j - 1], i - 1, j - 1), (table[i - 1][j], i - 1, j), (table[i][j - 1], i, j - 1),
                      key=lambda t: t[0])  # min keeps the first of equals: the diagonal
        path.append((i - 1, j - 1))
    return path[::-1]


def trained_tokenizer(texts: list[str], vocab_size: int = 2000):
    """Another segmentation of the same texts for (g) when no second tokenizer is installed: a
    SentencePiece-style Unigram tokenizer ('▁' for spaces) trained on ``texts`` (a fraction of a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.Unigram())
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<unk>"],
                                                          unk_token="<unk>", show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")


def align_tokenizer_b(name: str, texts: list[str]):
    """(tokenizer B, its description, a note or None). ``trained``: a Unigram tokenizer trained on
    ``texts``; the default ``gemma3-270m`` falls back to it (with a note) when that embedded model
    is not installed; any other name loads like ``--model`` and fails loudly."""
    from .models import EMBEDDED, load_tokenizer

    trained = f"Unigram/Metaspace trained on {len(texts)} gsm_symbolic solutions"
    if name == "trained":
        return trained_tokenizer(texts), trained, None
    if name == ALIGN_TOKENIZER:
        why = "it is not an embedded model in this version" if name not in EMBEDDED else None
        if why is None:
            try:
                return load_tokenizer(name), name, None
            except (ValueError, OSError, ImportError) as e:
                why = f"it could not be loaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        return trained_tokenizer(texts), trained, f"(g) tokenizer B {name!r} is not installed ({why}); using a {trained}"
    return load_tokenizer(name), name, None


def align_text(tokenizer, texts: list[str], n_tokens: int) -> str:
    """``texts`` joined by blank lines (cycled when too few) and cut after the ``n_tokens``-th token of ``tokenizer``."""
    from .fusion.align import token_offsets

    if not texts:
        raise ValueError("no texts to build the alignment benchmark's text from")
    parts, count, target = [], 0, n_tokens + 8
    while True:
        while count < target:
            parts.append(texts[len(parts) % len(texts)])
            count += len(tokenizer(parts[-1], add_special_tokens=False)["input_ids"]) + 1
        text = "\n\n".join(parts)
        _, spans = token_offsets(tokenizer, text)
        if len(spans) >= n_tokens:
            return text[:spans[n_tokens - 1][1]]
        target += n_tokens - len(spans) + 8  # the joined text tokenized shorter than its parts: add more


def bench_align(tok_a, tok_b, texts: list[str], *, sizes: list[int], repeats: int) -> dict:
    """(g) Alignment throughput: ``helpers.fusion.align`` ÷ a DTW reference on the same text, per size
    (tokens of A). Alignment alone: both sides get the same finished tokenizations (ours their
    character spans, DTW their token strings); tokenization is excluded from both. End to end:
    ``align_texts`` (both tokenizations with offsets, then the walk) against tokenizing to token
    strings plus DTW. Ours is the median of ``repeats`` runs (half before and half after the DTW
    run); DTW runs once per size (seconds at 2048 tokens), its tokenization the median of ``repeats``."""
    from .fusion.align import align_offsets, align_texts, token_offsets

    def times(fn, n):
        out = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return out

    per_size = {}
    for size in sizes:
        text = align_text(tok_a, texts, size)
        (ids_a, spans_a), (ids_b, spans_b) = token_offsets(tok_a, text), token_offsets(tok_b, text)
        strings_a, strings_b = tok_a.convert_ids_to_tokens(ids_a), tok_b.convert_ids_to_tokens(ids_b)
        ours = lambda: align_offsets(spans_a, spans_b, len(text))  # noqa: E731
        pieces = ours()  # warm-up
        half = max(1, repeats // 2)
        t_ours = times(ours, half)
        t = time.perf_counter()
        path = dtw_reference(strings_a, strings_b)
        dtw_s = time.perf_counter() - t
        t_ours += times(ours, max(1, repeats - half))

        def tokenize_strings():
            return [tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"]) for tok in (tok_a, tok_b)]

        t_e2e, t_tok = _alternate(lambda: align_texts(tok_a, tok_b, text), tokenize_strings, max(1, repeats))
        ours_s, ours_e2e_s, tok_s = (statistics.median(v) for v in (t_ours, t_e2e, t_tok))
        one_to_one = [p for p in pieces if p.kind == "1:1"]
        on_path = set(path)
        per_size[size] = {
            "tokens_a": len(ids_a), "tokens_b": len(ids_b), "chars": len(text), "pieces": len(pieces),
            "one_to_one_share": len(one_to_one) / max(len(pieces), 1),
            "dtw_agrees_on_one_to_one": sum((p.a_start, p.b_start) in on_path for p in one_to_one) / max(len(one_to_one), 1),
            "ours_s": ours_s, "dtw_s": dtw_s, "ratio": dtw_s / ours_s,
            "ours_e2e_s": ours_e2e_s, "dtw_tokenize_s": tok_s, "dtw_e2e_s": tok_s + dtw_s,
            "e2e_ratio": (tok_s + dtw_s) / ours_e2e_s, "dtw_path": path}
    return per_size


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

    from .models import load_model

    torch.manual_seed(0)
    align_sizes = [int(v) for v in str(args.align_tokens).split(",") if v.strip()]
    if not args.skip_align and (not align_sizes or min(align_sizes) < 1):
        ap.error(f"--align-tokens needs positive token counts, got {args.align_tokens!r}")
    import importlib.util

    from .models import EMBEDDED

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
        from .data import load_split

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


if __name__ == "__main__":
    sys.exit(main())
