"""The teacher writes solutions (or reads reference solutions) and its top-k log-probabilities are
stored per token, by any engine of ``helpers.backends`` (``transformers`` by default).

Two modes:
- ``generate``: the teacher answers the strategy prompt (greedy by default, sampling settable);
  at every new token the engine records the top-k token ids and log-probabilities of the
  teacher's raw distribution (temperature 1, before any sampling warper), the log of the mass
  outside the top-k (fp32) and the log-probability of the token actually taken. A row that falls
  into a repetition loop can be stopped (``stop_loops``); every row says why it ended: ``stop`` is
  ``"eos"`` (finished), ``"loop"`` or ``"cap"``.
- ``score``: teacher forcing of a given text (a reference solution), the same quantities at every
  position of the text.

``build_store`` runs either mode over a list of records and writes a ``logit_store``; resuming
it removes leftover temporary files, verifies the shards already written (size and sha256 from
the manifest) and rebuilds damaged ones.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import __version__
from ..artifacts import file_problem, file_record, fingerprint, read_manifest, write_manifest
from ..backends import open_backend
from ..backends.capture import prompt_ids, text_ids
from ..backends.transformers_engine import TransformersEngine
from ..data import plain_solution
from ..models import model_fingerprint, prompt_text, tokenizer_fingerprint
from ..prompts import teacher_messages
from .logit_store import STORE_FORMAT, LogitStore, shard_name, write_shard


def build_store(out_dir: str | Path, records, *, teacher: str, strategy: str, mode: str = "generate",
                k: int = 64, max_new_tokens: int = 256, do_sample: bool = False, temperature: float = 1.0,
                top_p: float = 1.0, seed: int = 0, batch_size: int = 8, shard_size: int = 64,
                stop_loops: bool = False, templates: dict | None = None, dtype: str = "auto", device: str = "auto",
                backend: str = "transformers", backend_options: dict | None = None, loaded=None,
                progress: bool = True, stop_after_shards: int | None = None) -> LogitStore:
    """Teacher outputs for ``records`` under ``strategy``, written as a sharded store in ``out_dir``.

    ``mode="generate"``: the teacher writes a solution; ``mode="score"``: it reads the record's
    reference solution (calculator notes removed, as the student sees it) by teacher forcing. A store with the same settings is resumed at its
    first missing shard (or returned as it is when complete); different settings (or an older
    store format) start afresh. Resuming first removes leftover ``*.tmp`` files of an interrupted
    write, then checks every shard already there against the size and sha256 the manifest
    recorded when it was written: a damaged shard is named in one printed line and rebuilt.
    ``backend`` (with ``backend_options``) is the engine that runs the teacher (``helpers.backends``);
    ``loaded`` is one already open, or a ``(model, tokenizer)`` pair of ``transformers``.
    ``stop_after_shards`` stops early (to test resuming).
    """
    from tqdm.auto import tqdm

    if mode not in ("generate", "score"):
        raise ValueError(f"unknown teacher mode {mode!r}; use 'generate' or 'score'")
    out_dir = Path(out_dir)
    records = list(records)
    engine = _engine(loaded, backend, teacher, dtype, device, backend_options)
    if hasattr(engine, "batch_size"):  # an engine that batches: rows in flight
        engine.batch_size = batch_size
    tok = engine.tokenizer
    settings = {"format": STORE_FORMAT, "teacher": model_fingerprint(teacher), "tokenizer": tokenizer_fingerprint(tok),
                "backend": engine.name,
                "strategy": strategy, "mode": mode, "k": k, "template": _template(strategy, templates),
                "decoding": {"max_new_tokens": max_new_tokens, "do_sample": do_sample,
                             "temperature": temperature, "top_p": top_p, "seed": seed,
                             "stop_loops": stop_loops} if mode == "generate" else None,
                "batch_size": batch_size, "shard_size": shard_size,
                "examples": fingerprint([r.id for r in records])}
    n_shards = (len(records) + shard_size - 1) // shard_size
    if out_dir.is_dir():
        for tmp in out_dir.glob("*.tmp"):  # atomic_path temporaries of a write that was killed
            tmp.unlink()
    manifest = read_manifest(out_dir)
    if manifest is None or manifest.get("settings") != settings:
        for old in out_dir.glob("shard-*.safetensors"):
            old.unlink()
        manifest = {"stage": "teacher", "settings": settings, "n_shards": n_shards, "n_examples": len(records),
                    "helpers_version": __version__, "shards": {}}
        write_manifest(out_dir, manifest)
    recorded = manifest.setdefault("shards", {})

    def record(tmp: Path, name: str) -> None:  # before the rename: a shard on disk always has its record
        recorded[name] = file_record(tmp)
        write_manifest(out_dir, manifest)

    bar = tqdm(total=len(records), desc=f"teacher {strategy}", unit="q", disable=not progress)
    written = 0
    for s in range(n_shards):
        chunk = records[s * shard_size:(s + 1) * shard_size]
        path = out_dir / shard_name(s)
        if path.is_file():
            why = _shard_damage(path, recorded.get(path.name))
            if why is None:
                bar.update(len(chunk))
                continue
            print(f"teacher store shard {path} is damaged ({why}): rebuilding it", flush=True)
            path.unlink()
        if stop_after_shards is not None and written >= stop_after_shards:
            break
        torch.manual_seed(seed + s)  # sampling is reproducible per shard, so resuming changes nothing
        prompts = prompt_ids(tok, [prompt_text(tok, teacher_messages(strategy, r.question, plain_solution(r.solution),
                                                                     templates)) for r in chunk])
        if mode == "generate":
            # the whole shard at once: an engine that batches (transformers) keeps batch_size rows in
            # flight and refills finished ones
            out = engine.generate(prompts, k=k, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                  temperature=temperature, top_p=top_p, stop_loops=stop_loops)
            bar.update(len(chunk))
        else:
            out = []
            for b in range(0, len(chunk), batch_size):
                out += engine.score(prompts[b:b + batch_size],
                                    text_ids(tok, [plain_solution(r.solution) for r in chunk[b:b + batch_size]]), k=k)
                bar.update(min(batch_size, len(chunk) - b))
        rows = [{"id": r.id, **o} for r, o in zip(chunk, out)]
        write_shard(path, rows, before_rename=lambda tmp, name=path.name: record(tmp, name))
        written += 1
    bar.close()
    return LogitStore(out_dir)


def _shard_damage(path: Path, record: dict | None) -> str | None:
    """Why a shard file does not match its manifest record, or None when it does."""
    if record is None:
        return "no size and digest recorded"
    return file_problem(path, record)


def _template(strategy: str, templates: dict | None) -> str:
    from ..prompts import STRATEGIES

    table = {**STRATEGIES, **(templates or {})}
    if strategy not in table:
        raise ValueError(f"unknown prompting strategy {strategy!r}; known: {', '.join(table)}")
    return table[strategy]


def _engine(loaded, backend: str, teacher: str, dtype: str, device: str, options: dict | None):
    """The engine a store is built with: ``loaded`` (an engine, or a ``(model, tokenizer)`` pair of
    ``transformers``), else the ``backend`` opened on ``teacher``."""
    if loaded is None:
        return open_backend(backend, teacher, dtype=dtype, device=device, options=options)
    if isinstance(loaded, tuple):
        return TransformersEngine(*loaded)
    return loaded


REFERENCE_SUFFIX = "@reference"


def parse_strategy(entry: str) -> tuple[str, str]:
    """``"teacher"`` -> (teacher, generate); ``"gold-hint@reference"`` -> (gold-hint, score):
    the teacher reads the reference solution under that strategy's prompt (teacher forcing)."""
    if entry.endswith(REFERENCE_SUFFIX):
        return entry[: -len(REFERENCE_SUFFIX)], "score"
    return entry, "generate"


def store_dir(results_dir: str | Path, strategy_entry: str, split: str) -> Path:
    """Where notebook 01 writes (and 02, 03 read) the store of one strategy and split."""
    return Path(results_dir) / "teacher" / strategy_entry / split


def store_summary(store: LogitStore, records, extract_mode: str = "robust", unfinished: str = "keep") -> dict:
    """One table row about a store: size, response lengths, how the responses ended (finished at
    end-of-sequence, stopped in a repetition loop, cut at the token cap), the teacher's own
    accuracy, and how many examples training uses (``unfinished="drop"`` leaves out all but the
    finished ones)."""
    from ..extract import extract_answer, is_correct

    recs = [r for r in records if r.id in store]
    got = [store.get(r.id) for r in recs]
    lengths = [len(t) for t in got]
    correct = [is_correct(extract_answer(t.response, extract_mode), r.answer) for t, r in zip(got, recs)]
    n = max(1, len(recs))
    share = lambda why: sum(t.stop == why for t in got) / n  # noqa: E731
    return {"examples": len(recs), "tokens": sum(lengths), "mean tokens": sum(lengths) / n,
            "finished": share("eos"), "looped": share("loop"), "hit the cap": share("cap"),
            "teacher accuracy": sum(correct) / n,
            "used for training": sum(1 for t in got if unfinished == "keep" or t.finished),
            "bytes/token": round(store.bytes_per_token(), 1)}
