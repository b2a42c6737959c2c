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

One module per capability's entries, one runner; imports flow one way, from ``runner`` to the
entries to ``common``:

- ``backends``: (a) capture, (j) teacher engines, (k) generation throughput;
- ``kd``: (b) KD step, (c) logit-store bytes per token, (i) chunked loss;
- ``collm``: (d) Co-LLM cost;
- ``dtypes``: (e) fp32 ÷ bf16;
- ``speculative``: (f) speculative decoding;
- ``fusion``: (g) alignment throughput, (h) cross-tokenizer KD step;
- ``common``: the shared prompts, alternating timer and LoRA student;
- ``runner``: ``main`` (the options, the table, ``logs/bench/``), the targets, the reference-CPU
  emulation; ``__main__`` runs it.
"""
from .backends import bench_capture, bench_engines, bench_generation
from .collm import bench_collm
from .common import QUESTIONS
from .dtypes import bench_dtypes
from .fusion import (
    ALIGN_TEXTS, ALIGN_TOKENIZER, align_text, align_tokenizer_b, bench_align, bench_cross_kd_step, dtw_reference,
    trained_tokenizer
)
from .kd import LARGE_VOCABS, bench_chunked_loss, bench_kd_step, bench_store
from .runner import FULL, QUICK, REFERENCE_CPU, TARGETS, cpu_name, main
from .speculative import SPEC_PROMPTS, bench_speculative

__all__ = ["ALIGN_TEXTS", "ALIGN_TOKENIZER", "FULL", "LARGE_VOCABS", "QUESTIONS", "QUICK", "REFERENCE_CPU",
           "SPEC_PROMPTS", "TARGETS", "align_text", "align_tokenizer_b", "bench_align", "bench_capture",
           "bench_chunked_loss", "bench_collm", "bench_cross_kd_step", "bench_dtypes", "bench_engines",
           "bench_generation", "bench_kd_step", "bench_speculative", "bench_store", "cpu_name", "dtw_reference",
           "main", "trained_tokenizer"]
