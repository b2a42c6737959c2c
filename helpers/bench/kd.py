"""Entries of distillation (``helpers.kd``): (b) one LoRA step with sparse top-k KD ÷ one
cross-entropy step; (c) logit-store bytes per token; (i) chunked ÷ plain KD loss through the LM
head at large vocabularies, peak memory and time, each side in its own process."""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from .common import _alternate, _lora_student, _sgd_step, _sparse_teacher, _sync


def bench_kd_step(model, *, batch: int, length: int, k: int, repeats: int) -> dict:
    from ..kd.losses import kd_loss

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


def bench_store(rows: list[dict], k: int) -> dict:
    import struct

    from ..artifacts import file_record, write_manifest
    from ..kd.logit_store import FIELDS, STORE_FORMAT, LogitStore, shard_name, write_shard

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
    from ..kd.losses import chunked_kd_loss, kd_loss

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
