"""The steps of notebook 06, each skipped when its manifest says it is already done.

1. ``teacher_targets``: each teacher reads the reference solutions of a split (teacher forcing,
   ``teacher.build_store(mode="score")``), and its store is moved onto the student's tokens
   (``targets``). Both are kept per teacher, so adding a teacher builds only its own.
2. ``train_row``: one row of the table: fine-tuning (CE on the references), KD from one teacher,
   or fused KD from several (``fuse``), LoRA through ``distill.train``.
3. ``nll_per_byte`` and ``kl_to_teacher``: held-out measures that move when accuracy does not.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..artifacts import fingerprint, is_done, read_manifest, write_manifest
from .targets import TOKEN, alignment_stats, map_record, read_targets, write_targets


def safe_name(model: str) -> str:
    """A folder name for a model id or path."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model).name if Path(model).exists() else model).strip("_")


def teacher_targets(results_dir, teacher: str, student_tok, splits: dict, *, strategy: str = "base", k: int = 64,
                    batch_size: int = 8, dtype: str = "auto", device: str = "auto", progress: bool = True) -> dict:
    """The teacher's targets on the student's tokens for each split: ``{split: {id: Targets}}``,
    plus ``"stats"``: per split, the alignment statistics and the vocabulary map's coverage."""
    from ..kd.logit_store import LogitStore
    from ..kd.teacher import build_store
    from ..models import load_model, load_tokenizer, tokenizer_fingerprint
    from .vocab import build_vocab_map

    root = Path(results_dir) / "fusion" / "teachers" / safe_name(teacher)
    student_fp = tokenizer_fingerprint(student_tok)
    stores, out, stats, loaded = {}, {}, {}, None
    for split, records in splits.items():
        path = root / split / "store"
        try:
            probe = LogitStore(path) if (path / "manifest.json").is_file() else None
        except ValueError:  # another store format or a damaged shard: build_store rebuilds it
            probe = None
        want = {"examples": fingerprint([r.id for r in records]), "k": k, "strategy": strategy, "mode": "score"}
        if probe is None or not probe.complete or any(probe.manifest["settings"].get(f) != v for f, v in want.items()):
            loaded = loaded or load_model(teacher, dtype=dtype, device=device)
            probe = build_store(path, records, teacher=teacher, strategy=strategy, mode="score", k=k,
                                batch_size=batch_size, shard_size=64, dtype=dtype, device=device, loaded=loaded,
                                progress=progress)
        stores[split] = probe
    teacher_tok = loaded[1] if loaded else load_tokenizer(teacher)
    del loaded
    vmap = None
    for split, store in stores.items():
        folder = root / split
        file = folder / "targets.safetensors"
        settings = {"store": store.manifest["settings"], "student_tokenizer": student_fp, "helpers_version": __version__}
        if not (is_done(folder, settings) and file.is_file()):
            vmap = vmap or build_vocab_map(teacher_tok, student_tok)
            rows, counts = [], []
            for r in splits[split]:
                t, c = map_record(store.get(r.id), teacher_tok, student_tok, vmap)
                rows.append(t)
                counts.append(c)
            write_targets(file, rows)
            stat = {**alignment_stats(counts, file.stat().st_size / max(1, sum(len(t) for t in rows))),
                    **{f"map_{key}": v for key, v in vmap.stats().items()}}
            write_manifest(folder, {"stage": "fusion-targets", "settings": settings, "stats": stat})
        out[split] = read_targets(file)
        stats[split] = read_manifest(folder)["stats"]
    out["stats"] = stats
    return out


def train_row(results_dir, row: str, spec: dict, student: str, splits: dict, teachers: dict, *, training: dict,
              seed: int = 0, tau: float = 0.1, dtype: str = "auto", device: str = "auto", progress: bool = True) -> Path:
    """Train (or find already trained) one row's LoRA adapter; returns its folder.

    ``spec``: ``{loss: ce}`` for fine-tuning on the references, else ``teachers`` (names, default
    all), ``method`` (minCE | avgCE | softmax; one teacher needs none) and any training setting.
    ``teachers`` holds each teacher's ``teacher_targets``.
    """
    from ..kd.distill import DEFAULTS, build_examples, is_trained, save_adapter, train
    from ..models import load_model, model_fingerprint
    from ..settings import check_fusion_row
    from .fuse import collate_fused, fused_batch_loss, fused_examples

    spec = check_fusion_row(row, spec, teachers=list(teachers))
    names = spec.pop("teachers", None) or list(teachers)
    method = spec.pop("method", "minCE")
    cfg = {**DEFAULTS, "seed": seed, **(training or {}), **spec}
    out_dir = Path(results_dir) / "fusion" / "adapters" / row
    ce = cfg["loss"] == "ce"
    settings = {"student": model_fingerprint(student), "config": cfg, "dtype": dtype,
                "teachers": None if ce else {n: teachers[n]["stats"] for n in names},
                "method": None if ce or len(names) == 1 else method, "tau": tau if method == "softmax" else None,
                "examples": {s: fingerprint([r.id for r in splits[s]]) for s in ("train", "validation")}}
    if is_trained(out_dir, settings):
        print(f"{row}: already trained with these settings: {out_dir}")
        return out_dir
    model, tok = load_model(student, dtype=dtype, device=device)
    if ce:
        ex = {s: build_examples(splits[s], tok, max_length=cfg["max_length"]) for s in ("train", "validation")}
        hooks = {}
    else:
        ex = {s: fused_examples(splits[s], tok, {n: teachers[n][s] for n in names}, method=method, tau=tau,
                                max_length=cfg["max_length"]) for s in ("train", "validation")}
        hooks = {"collate_fn": collate_fused, "loss_fn": fused_batch_loss}
        w = np.stack([e.weights for e in ex["train"]])
        print(f"{row}: teachers {names}, {method if len(names) > 1 else 'one teacher'}; mean weight per teacher "
              f"{dict(zip(names, np.round(w.mean(0), 3).tolist()))}", flush=True)
    peft_model, history = train(model, tok, ex["train"], ex["validation"], cfg, progress=progress, name=row, **hooks)
    if len(names) > 1 and not ce:
        history["teacher_weights"] = dict(zip(names, np.stack([e.weights for e in ex["train"]]).mean(0).tolist()))
    save_adapter(peft_model, out_dir, history, settings)
    print(f"{row}: trained in {history['seconds']} s; saved to {out_dir}", flush=True)
    return out_dir


def nll_per_byte(model, tokenizer, records, *, batch_size: int = 8) -> float:
    """The model's NLL of the reference solutions (and their end-of-sequence token) per UTF-8 byte
    of the solution text, teacher-forced after the plain question: comparable across tokenizers."""
    from ..data import plain_solution
    from ..kd.distill import build_examples, collate

    examples = build_examples(records, tokenizer, max_length=10**6)
    nll = 0.0
    with torch.inference_mode():
        for i in range(0, len(examples), batch_size):
            b = {k: v.to(model.device) for k, v in collate(examples[i:i + batch_size], tokenizer.pad_token_id).items()}
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
            lp = logits.gather(-1, b["targets"][..., None])[..., 0] - torch.logsumexp(logits, -1)
            nll -= (lp * b["mask"]).sum().item()
    return nll / max(1, sum(len(plain_solution(r.solution).encode()) for r in records))


def kl_to_teacher(model, tokenizer, records, targets: dict, *, batch_size: int = 8) -> float:
    """Forward KL (T = 1, nats per token) from a teacher to the model on the teacher's 1:1 pieces
    (its mapped top-k and tail) of the held-out ``records``."""
    from .fuse import collate_fused, fused_examples
    from .losses import cross_kd_loss

    examples = fused_examples(records, tokenizer, {"t": targets}, max_length=10**6)
    total = count = 0.0
    with torch.inference_mode():
        for i in range(0, len(examples), batch_size):
            b = collate_fused(examples[i:i + batch_size], tokenizer.pad_token_id)
            b["teachers"]["unit"] = torch.where(b["teachers"]["unit"] == TOKEN, TOKEN, 0)  # mapped tokens only
            n = float(((b["teachers"]["unit"][0] == TOKEN) * b["mask"]).sum())
            logits = model(input_ids=b["input_ids"].to(model.device),
                           attention_mask=b["attention_mask"].to(model.device)).logits[:, :-1].float().cpu()
            _, parts = cross_kd_loss("forward_kl", logits, b["targets"], b["mask"], b["teachers"], alpha=1.0)
            total += parts["kd_0"] * n
            count += n
    return total / count if count else math.nan
