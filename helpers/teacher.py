"""The teacher writes solutions and its top-k log-probabilities are recorded per token.

Two modes:
- ``generate``: the teacher answers the strategy prompt (greedy by default, sampling settable);
  a logits processor inside ``transformers``' own ``generate`` records, at every step, the top-k
  token ids and log-probabilities of the teacher's raw distribution (temperature 1, before any
  sampling warper), the log of the mass outside the top-k (fp32, exact: the log-sum-exp of the
  log-probs outside the top-k ids, -inf when k covers the vocabulary) and the log-probability of
  the token actually taken. The capture keeps everything on the device until the batch ends,
  so it costs little beyond ``generate``.
- ``score``: teacher forcing of a given text (a reference solution), one forward pass per batch,
  the same quantities at every position of the text.

Generation can stop a row that has fallen into a repetition loop (``stop_loops``, see
``LoopStop``): small models decoding greedily often repeat one or a few lines for ever, and a
batch otherwise runs until its longest row hits ``max_new_tokens``. Every generated row says why
it ended: ``stop`` is ``"eos"`` (finished), ``"loop"`` or ``"cap"``.

``build_store`` runs either mode over a list of records and writes a ``logit_store``; resuming
it removes leftover temporary files, verifies the shards already written (size and sha256 from
the manifest) and rebuilds damaged ones.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria

from . import __version__
from .artifacts import file_problem, file_record, fingerprint, read_manifest, write_manifest
from .data import plain_solution
from .logit_store import STORE_FORMAT, LogitStore, shard_name, write_shard
from .models import add_special_tokens, model_fingerprint, prompt_text, tokenizer_fingerprint
from .prompts import teacher_messages


def tail_logprob(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Log of the probability mass outside ``ids`` given full log-probs ``logp`` (fp32, [...]):
    the log-sum-exp of the log-probs outside the ids, exactly -inf when they cover the vocabulary."""
    logp = logp.float()
    if ids.shape[-1] >= logp.shape[-1]:
        return logp.new_full(logp.shape[:-1], float("-inf"))
    return torch.logsumexp(logp.scatter(-1, ids.long(), float("-inf")), dim=-1)


class TopKCapture(LogitsProcessor):
    """Records top-k log-probs of the scores it sees and returns them unchanged.

    ``transformers`` runs custom processors before the sampling warpers (temperature, top-p),
    so with no penalties configured the scores seen here are the model's raw logits.
    """

    def __init__(self, k: int):
        self.k = k
        self.topk_ids: list[torch.Tensor] = []
        self.topk_logprobs: list[torch.Tensor] = []
        self.tail_logprobs: list[torch.Tensor] = []
        self.taken_logprobs: list[torch.Tensor] = []
        self._prev: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._prev is not None:  # the token chosen at the previous step is now the last input
            self.taken_logprobs.append(self._prev.gather(1, input_ids[:, -1:]).squeeze(1))
        logp = torch.log_softmax(scores.float(), dim=-1)
        values, ids = logp.topk(self.k, dim=-1)
        self.topk_ids.append(ids.to(torch.int32))
        self.topk_logprobs.append(values.to(torch.float16))
        self.tail_logprobs.append(tail_logprob(logp, ids))
        self._prev = logp
        return scores

    def finish(self, new_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stack the capture, given the generated tokens ``[B, T]``."""
        if self._prev is not None:
            self.taken_logprobs.append(self._prev.gather(1, new_tokens[:, -1:]).squeeze(1))
            self._prev = None
        return {"topk_ids": torch.stack(self.topk_ids, 1).cpu(),
                "topk_logprobs": torch.stack(self.topk_logprobs, 1).cpu(),
                "tail_logprobs": torch.stack(self.tail_logprobs, 1).float().cpu(),
                "token_logprobs": torch.stack(self.taken_logprobs, 1).float().cpu()}


_DIGITS = re.compile(r"\d+(?:[.,]\d+)*")


def repetition_loop(text: str, *, repeats: int = 3, max_period: int = 4, min_words: int = 6) -> bool:
    """True when the last complete lines of ``text`` repeat a block of 1..``max_period`` lines
    ``repeats`` times in a row, numbers ignored ("the total is 4 + 2 = 6." then "... 6 + 2 = 8.")
    and blank lines skipped; the block must hold at least ``min_words`` words, so short list items
    or a repeated heading do not count. A line still being written is not looked at."""
    lines = [_DIGITS.sub("#", line.strip()) for line in text.split("\n")[:-1] if line.strip()]
    for period in range(1, max_period + 1):
        tail = lines[-repeats * period:]
        if len(tail) < repeats * period or sum(len(line.split()) for line in tail[:period]) < min_words:
            continue
        if all(tail[i] == tail[i + period] for i in range(len(tail) - period)):
            return True
    return False


def token_loop(ids: list[int], *, repeats: int = 3, max_period: int = 64, min_length: int = 48) -> bool:
    """True when the last max(``repeats``·p, ``min_length``) tokens are one block of p ≤ ``max_period``
    tokens repeated exactly (a loop inside one line, e.g. "2 2 2 2 ...")."""
    n = len(ids)
    for period in range(1, max_period + 1):
        length = max(repeats * period, min_length)
        if n < length:
            break
        tail = ids[n - length:]
        if tail[period:] == tail[:-period]:
            return True
    return False


class LoopStop(StoppingCriteria):
    """Stops each row of a batch that has fallen into a repetition loop (``repetition_loop`` on its
    text or ``token_loop`` on its tokens), looked at every ``every`` new tokens; ``stopped_at[b]`` is
    the number of new tokens row b had when it was stopped (its text up to there is kept)."""

    def __init__(self, tokenizer, prompt_length: int, eos: list[int], every: int = 8):
        self.tokenizer, self.prompt_length, self.every = tokenizer, prompt_length, every
        self.eos = set(eos)
        self.stopped_at: dict[int, int] = {}

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        n = input_ids.shape[1] - self.prompt_length
        stop = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for b in self.stopped_at:
            stop[b] = True
        if n == 0 or n % self.every:
            return stop
        for b, seq in enumerate(input_ids[:, self.prompt_length:].tolist()):
            if b in self.stopped_at or self.eos.intersection(seq):
                continue
            if token_loop(seq) or repetition_loop(self.tokenizer.decode(seq, skip_special_tokens=True)):
                self.stopped_at[b] = n
                stop[b] = True
        return stop


def eos_ids(model=None, tokenizer=None) -> list[int]:
    """End-of-sequence ids: the model's generation config's (when given), plus the tokenizer's (when given)."""
    eos = None if model is None else model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    return eos


def generate_with_capture(model, tokenizer, prompts: list[str], *, k: int = 64, max_new_tokens: int = 256,
                          do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                          capture: bool = True, stop_loops: bool = False) -> list[dict]:
    """One batch: generate and (if ``capture``) record top-k log-probs at every new token.

    Each row: ``token_ids`` (up to and including end-of-sequence), ``response``, ``finished``,
    ``stop`` (``eos``, ``loop`` or ``cap``) and with capture ``topk_ids`` [n, k], ``topk_logprobs``
    [n, k], ``tail_logprobs`` [n], ``token_logprobs`` [n]. ``stop_loops`` ends a row that repeats
    itself (``LoopStop``). ``capture=False`` is plain ``generate`` on the same inputs (the
    benchmark's reference).
    """
    eos = eos_ids(model, tokenizer)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                              **({"temperature": temperature, "top_p": top_p} if do_sample else {}))
    enc = tokenizer(prompts, return_tensors="pt", padding=True,
                    add_special_tokens=add_special_tokens(tokenizer)).to(model.device)
    proc = TopKCapture(min(k, model.config.get_text_config().vocab_size)) if capture else None
    loops = LoopStop(tokenizer, enc["input_ids"].shape[1], eos) if stop_loops else None
    with torch.inference_mode():
        out = model.generate(**enc, generation_config=config,
                             logits_processor=LogitsProcessorList([proc] if proc else []),
                             **({"stopping_criteria": [loops]} if loops else {}))
    new = out[:, enc["input_ids"].shape[1]:]
    cap = proc.finish(new) if proc else None
    new = new.cpu()
    rows = []
    for b, seq in enumerate(new.tolist()):
        looped = loops.stopped_at.get(b) if loops else None
        seq = seq[:looped] if looped else seq  # after a loop stop the row holds padding (often = eos)
        n = next((j + 1 for j, t in enumerate(seq) if t in eos), len(seq))
        stop = "eos" if seq and seq[n - 1] in eos else "loop" if looped else "cap"
        row = {"token_ids": seq[:n], "finished": stop == "eos", "stop": stop,
               "response": tokenizer.decode(seq[:n], skip_special_tokens=True).strip()}
        if cap is not None:
            row.update({key: v[b, :n].numpy() for key, v in cap.items()})
        rows.append(row)
    return rows


def score_with_capture(model, tokenizer, prompts: list[str], texts: list[str], *, k: int = 64) -> list[dict]:
    """One batch of teacher forcing: the teacher reads ``prompt + text + eos``; top-k log-probs at
    every token of ``text`` (and of the closing end-of-sequence token)."""
    eos = tokenizer.eos_token_id
    add = add_special_tokens(tokenizer)
    prompt_ids = [tokenizer(p, add_special_tokens=add).input_ids for p in prompts]
    text_ids = [tokenizer(t, add_special_tokens=False).input_ids + [eos] for t in texts]
    seqs = [p + t for p, t in zip(prompt_ids, text_ids)]
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id
    # left padding: every sequence ends at the last column, so the last L logits cover all texts
    input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=model.device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=model.device)
    longest = max(map(len, text_ids))
    with torch.inference_mode():
        logits = model(input_ids=input_ids, attention_mask=mask, logits_to_keep=longest + 1).logits
    rows = []
    for b, t in enumerate(text_ids):
        n = len(t)
        # logits at column j predict token j+1: the text's n tokens are predicted by the n
        # columns just before the last one
        lp = torch.log_softmax(logits[b, -n - 1:-1].float(), dim=-1)
        values, ids = lp.topk(min(k, lp.shape[-1]), dim=-1)
        target = torch.tensor(t, device=lp.device)
        rows.append({"token_ids": t, "finished": True,
                     "response": tokenizer.decode(t, skip_special_tokens=True).strip(),
                     "topk_ids": ids.to(torch.int32).cpu().numpy(),
                     "topk_logprobs": values.to(torch.float16).cpu().numpy(),
                     "tail_logprobs": tail_logprob(lp, ids).cpu().numpy(),
                     "token_logprobs": lp.gather(1, target[:, None]).squeeze(1).cpu().numpy()})
    return rows


def build_store(out_dir: str | Path, records, *, teacher: str, strategy: str, mode: str = "generate",
                k: int = 64, max_new_tokens: int = 256, do_sample: bool = False, temperature: float = 1.0,
                top_p: float = 1.0, seed: int = 0, batch_size: int = 8, shard_size: int = 64,
                stop_loops: bool = False, templates: dict | None = None, dtype: str = "auto", device: str = "auto",
                loaded=None, progress: bool = True, stop_after_shards: int | None = None) -> LogitStore:
    """Teacher outputs for ``records`` under ``strategy``, written as a sharded store in ``out_dir``.

    ``mode="generate"``: the teacher writes a solution; ``mode="score"``: it reads the record's
    reference solution (calculator notes removed, as the student sees it) by teacher forcing. A store with the same settings is resumed at its
    first missing shard (or returned as it is when complete); different settings (or an older
    store format) start afresh. Resuming first removes leftover ``*.tmp`` files of an interrupted
    write, then checks every shard already there against the size and sha256 the manifest
    recorded when it was written: a damaged shard is named in one printed line and rebuilt.
    ``stop_after_shards`` stops early (to test resuming).
    """
    from tqdm.auto import tqdm

    if mode not in ("generate", "score"):
        raise ValueError(f"unknown teacher mode {mode!r}; use 'generate' or 'score'")
    out_dir = Path(out_dir)
    records = list(records)
    model, tok = loaded if loaded is not None else _load(teacher, dtype, device)
    settings = {"format": STORE_FORMAT, "teacher": model_fingerprint(teacher), "tokenizer": tokenizer_fingerprint(tok),
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
        rows = []
        for b in range(0, len(chunk), batch_size):
            batch = chunk[b:b + batch_size]
            prompts = [prompt_text(tok, teacher_messages(strategy, r.question, plain_solution(r.solution), templates))
                       for r in batch]
            if mode == "generate":
                out = generate_with_capture(model, tok, prompts, k=k, max_new_tokens=max_new_tokens,
                                            do_sample=do_sample, temperature=temperature, top_p=top_p,
                                            stop_loops=stop_loops)
            else:
                out = score_with_capture(model, tok, prompts, [plain_solution(r.solution) for r in batch], k=k)
            rows += [{"id": r.id, **o} for r, o in zip(batch, out)]
            bar.update(len(batch))
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
    from .prompts import STRATEGIES

    table = {**STRATEGIES, **(templates or {})}
    if strategy not in table:
        raise ValueError(f"unknown prompting strategy {strategy!r}; known: {', '.join(table)}")
    return table[strategy]


def _load(name: str, dtype: str, device: str):
    from .models import load_model

    return load_model(name, dtype=dtype, device=device)


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
    from .assess import is_correct
    from .extract import extract_answer

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
