"""Assessment: the same prompt and decoding for every model, answer extraction, tables.

Flow for one run (``notebooks/03_assess.ipynb`` calls these in order):
1. ``generate_responses`` per experiment: batched generation on the test split, cached per
   question id in ``results/<run>/generations/<experiment>.jsonl`` (an interrupted run
   resumes; changed settings start afresh).
2. ``score`` reads each response with ``helpers.extract`` and applies the run's overrides CSV.
3. ``accuracy_table`` / ``write_outputs``: per-question CSVs, the accuracy table (Markdown and
   CSV) in the study's form plus n and a 95% Wilson interval, and the manual-review CSV.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import pandas as pd

from . import __version__
from .artifacts import read_manifest, write_manifest, write_text
from .data import Record
from .extract import extract_details, is_correct
from .models import model_fingerprint, prompt_text
from .prompts import student_messages

DECODING_DEFAULTS = {"max_new_tokens": 256, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "seed": 0,
                     "stop_loops": False}
REVIEW_COLUMNS = ["experiment", "id", "gold", "extracted", "rule", "candidates", "response_sha", "response", "answer"]


# --------------------------------------------------------------------------- generation
def generate(model, tokenizer, prompts: list[str], *, batch_size: int = 16, max_new_tokens: int = 256,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             stop_loops: bool = False, progress: bool = True, on_batch=None) -> list[dict]:
    """Generate a response for each prompt, longest prompts first, with ``batch_size`` rows in flight:
    a row that ends is replaced at once by the next prompt (``backends.continuous``; models whose
    cache cannot be refilled run left-padded batches through ``generate`` instead).

    Returns one dict per prompt, in the order given: ``response`` (special tokens removed),
    ``n_tokens`` (generated, up to and including end-of-sequence), ``finished`` (ended at
    end-of-sequence) and ``stop`` (``eos``; ``loop``: stopped repeating itself, with
    ``stop_loops``; ``cap``: cut at ``max_new_tokens``). ``on_batch(indices, rows)`` is called
    as rows are done (one at a time when refilling), so callers can save as they go.
    """
    import torch
    from tqdm.auto import tqdm

    from .backends import continuous
    from .backends.capture import prompt_ids
    from .backends.transformers_engine import generate_with_capture

    if tokenizer.padding_side != "left":
        raise ValueError("batched generation needs a left-padding tokenizer (models.load_tokenizer sets it)")
    ids = prompt_ids(tokenizer, prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(ids[i]))
    results: list[dict | None] = [None] * len(prompts)
    torch.manual_seed(seed)
    bar = tqdm(total=len(prompts), desc="generating", unit="q", disable=not progress)

    def response(o: dict) -> dict:
        return {"response": o["response"], "n_tokens": len(o["token_ids"]), "finished": o["finished"],
                "stop": o["stop"]}

    if continuous.supported(model):
        def done(j: int, o: dict) -> None:
            results[order[j]] = response(o)
            if on_batch is not None:
                on_batch([order[j]], [results[order[j]]])
            bar.update(1)

        continuous.decode(model, tokenizer, [ids[i] for i in order], batch_size=batch_size,
                          max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                          stop_loops=stop_loops, on_row=done)
        bar.close()
        return results  # type: ignore[return-value]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        out = generate_with_capture(model, tokenizer, [prompts[i] for i in idx], max_new_tokens=max_new_tokens,
                                    do_sample=do_sample, temperature=temperature, top_p=top_p, capture=False,
                                    stop_loops=stop_loops)
        rows = [response(o) for o in out]
        for i, row in zip(idx, rows):
            results[i] = row
        if on_batch is not None:
            on_batch(idx, rows)
        bar.update(len(idx))
    bar.close()
    return results  # type: ignore[return-value]


def _read_cache(path: Path) -> dict[str, dict]:
    """Rows of a generation cache by id. The toolkit wrote the file, so a damaged line (a torn
    last line of an interrupted run, or any unreadable one) is repaired: reported in one line,
    dropped from the file, and its question generated again."""
    from .artifacts import write_jsonl

    rows: dict[str, dict] = {}
    if not path.is_file():
        return rows
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    damaged = []
    for k, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not {"id", "response", "n_tokens", "finished", "stop"} <= set(row):
                raise ValueError
        except ValueError:
            if line.strip():
                damaged.append(k)
            continue
        rows[row["id"]] = row
    if damaged:
        if damaged != [len(lines)]:  # more than a torn last line: say so
            print(f"{path}: line(s) {', '.join(map(str, damaged))} damaged; those responses are generated again",
                  flush=True)
        write_jsonl(path, rows.values())
    return rows


def generate_responses(experiment: str, spec: dict, records: list[Record], out_dir: str | Path, *,
                       batch_size: int = 16, dtype: str = "auto", device: str = "auto",
                       loaded=None, progress: bool = True, **decoding) -> pd.DataFrame:
    """Responses of one model (``spec``: ``{"model": id_or_path, "adapter": path_or_None}``) to
    ``records``, cached by question id under ``out_dir/<experiment>.jsonl``.

    Rows already generated with the same model and decoding settings are reused; only the
    missing ids are generated, and each batch is appended as soon as it is done.
    ``loaded=(model, tokenizer)`` skips loading (for callers that hold the model already).
    """
    unknown = set(decoding) - set(DECODING_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown decoding setting(s) {sorted(unknown)}; known: {sorted(DECODING_DEFAULTS)}")
    decoding = {**DECODING_DEFAULTS, **decoding}
    if "model" not in spec:
        raise ValueError(f"experiment {experiment!r}: its spec needs a 'model' (hub id, path or embedded name)")
    out_dir = Path(out_dir) / experiment
    cache = out_dir / "generations.jsonl"
    settings = {"model": model_fingerprint(spec["model"], spec.get("adapter")), "decoding": decoding,
                "prompt": "student_messages/plain-question", "dtype": dtype}
    manifest = read_manifest(out_dir)
    if manifest is None or manifest.get("settings") != json.loads(json.dumps(settings)):
        out_dir.mkdir(parents=True, exist_ok=True)
        if cache.exists():
            cache.unlink()
        write_manifest(out_dir, {"stage": "assess.generate", "experiment": experiment,
                                 "settings": settings, "helpers_version": __version__})
    done = _read_cache(cache)
    todo = [r for r in records if r.id not in done]
    if todo:
        model, tok = loaded if loaded is not None else _load(spec, dtype, device)
        prompts = [prompt_text(tok, student_messages(r.question)) for r in todo]
        with open(cache, "a", encoding="utf-8") as f:
            def save(idx, rows):
                for i, row in zip(idx, rows):
                    rec = {"id": todo[i].id, **row}
                    done[todo[i].id] = rec
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()

            generate(model, tok, prompts, batch_size=batch_size, progress=progress, on_batch=save,
                     **{k: decoding[k] for k in DECODING_DEFAULTS})
    return pd.DataFrame([{"id": r.id, **{k: done[r.id][k] for k in ("response", "n_tokens", "finished", "stop")}}
                         for r in records])


def _load(spec: dict, dtype: str, device: str):
    from .models import load_model

    return load_model(spec["model"], adapter=spec.get("adapter"), dtype=dtype, device=device)


# --------------------------------------------------------------------------- scoring
def response_sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def load_overrides(path: str | Path | None) -> dict[tuple[str, str], tuple[float | None, str]]:
    """Manual answers from a filled-in review CSV: ``(experiment, id) -> (answer, response_sha)``.

    Rows with an empty ``answer`` are ignored; ``none`` (or -1) means "no answer in the response".
    """
    if path is None or not Path(path).is_file():
        return {}
    out = {}
    # utf-8-sig: a spreadsheet may save the file with a byte-order mark before the header
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = {"experiment", "id", "answer"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: overrides CSV lacks column(s) {sorted(missing)}")
        for lineno, row in enumerate(reader, 2):
            raw = (row.get("answer") or "").strip()
            if not raw:
                continue
            if raw.lower() in ("none", "-1"):
                value = None
            else:
                try:
                    value = float(raw.replace(",", "").replace("$", ""))
                except ValueError:
                    raise ValueError(f"{path}:{lineno}: answer {raw!r} is not a number (or 'none')") from None
                if not math.isfinite(value):
                    raise ValueError(f"{path}:{lineno}: answer {raw!r} is not a finite number; "
                                     "write the number the response states, or 'none'")
            out[(row["experiment"], row["id"])] = (value, (row.get("response_sha") or "").strip())
    return out


def score(experiment: str, records: list[Record], responses: pd.DataFrame, *, mode: str = "robust",
          overrides: dict | None = None) -> pd.DataFrame:
    """Per-question table: id, question, gold, response, extracted (-1 = none), rule, correct, needs_review.

    Records and responses are joined by id. An override applies only while the response it
    was written for is unchanged (its ``response_sha`` matches, when given).
    """
    by_id = {row.id: row for row in responses.itertuples(index=False)}
    missing = [r.id for r in records if r.id not in by_id]
    if missing:
        raise ValueError(f"experiment {experiment!r}: no response for {len(missing)} question(s), e.g. {missing[:3]}")
    overrides = overrides or {}
    rows = []
    for r in records:
        resp = by_id[r.id]
        ex = extract_details(resp.response, mode)
        value, rule, review = ex.value, ex.rule, ex.needs_review
        sha = response_sha(resp.response)
        if (experiment, r.id) in overrides:
            o_value, o_sha = overrides[(experiment, r.id)]
            if not o_sha or o_sha == sha:
                value, rule, review = o_value, "override", False
        rows.append({
            "experiment": experiment, "id": r.id, "question": r.question, "gold": r.answer, "response": resp.response,
            "extracted": -1 if value is None else value, "rule": rule or "none",
            "correct": is_correct(value, r.answer), "needs_review": review,
            "candidates": json.dumps(ex.candidates), "n_tokens": resp.n_tokens, "finished": resp.finished,
            "stop": getattr(resp, "stop", "eos" if resp.finished else "cap"), "response_sha": sha,
        })
    return pd.DataFrame(rows)


ECE_BINS = 15


def calibration_error(confidence, correct, bins: int = ECE_BINS) -> float:
    """Expected calibration error: tokens binned by confidence into ``bins`` equal-width bins over
    [0, 1] (the top bin includes 1), then Σ_b (n_b / N) · |accuracy_b − mean confidence_b|."""
    import numpy as np

    conf, hit = np.asarray(confidence, np.float64).ravel(), np.asarray(correct, np.float64).ravel()
    if conf.size == 0:
        return float("nan")
    counts, conf_sum, hit_sum = _bin_sums(conf, hit, bins)
    return _ece(counts, conf_sum, hit_sum)


def _bin_sums(conf, hit, bins: int):
    import numpy as np

    which = np.minimum((conf * bins).astype(np.int64), bins - 1)
    return (np.bincount(which, minlength=bins), np.bincount(which, conf, minlength=bins),
            np.bincount(which, hit, minlength=bins))


def _ece(counts, conf_sum, hit_sum) -> float:
    n = counts.sum()
    return float(abs(hit_sum - conf_sum).sum() / n) if n else float("nan")


def teacher_text_metrics(model, tokenizer, store, records: list[Record], *, batch_size: int = 8,
                         bins: int = ECE_BINS) -> dict[str, float]:
    """Two signals that move even when accuracy is near zero, over every solution token of the
    teacher's held-out ``records`` in ``store`` (one forward pass of ``model`` per batch):

    - ``kd``: mean forward KL (T = 1, top-k with tail, see ``helpers.kd.losses``) from the teacher's
      stored distributions to the model: how close a student has come to its teacher;
    - ``ece``: the token-level expected calibration error (``bins`` equal-width bins) of the model's
      next-token prediction: its top probability as confidence, correct when that token is the one
      the teacher wrote.
    """
    import numpy as np
    import torch

    from .kd.distill import build_examples, collate
    from .kd.losses import kd_loss

    examples = build_examples(records, tokenizer, store)
    total, count = 0.0, 0.0
    sums = [np.zeros(bins), np.zeros(bins), np.zeros(bins)]
    with torch.inference_mode():
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(model.device) for k, v in collate(examples[i:i + batch_size], tokenizer.pad_token_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
            _, parts = kd_loss("forward_kl", logits, batch["targets"], batch["mask"], batch["topk_ids"],
                               batch["topk_logprobs"], T=1.0, alpha=1.0, tail_logprobs=batch.get("tail_logprobs"))
            n = batch["mask"].sum().item()
            total += parts["kd"] * n
            count += n
            keep = batch["mask"].bool()
            top, pred = logits.max(-1)
            conf = torch.exp(top - torch.logsumexp(logits, -1))[keep].double().cpu().numpy()
            hit = (pred == batch["targets"])[keep].double().cpu().numpy()
            for acc, part in zip(sums, _bin_sums(conf, hit, bins)):
                acc += part
    return {"kd": total / max(count, 1.0), "ece": _ece(*sums)}


def loss_weights(adapter_dir: str | Path) -> dict[str, float]:
    """The weights of a trained variant's loss terms, read from its manifest: ``CE weight``
    (1 for fine-tuning, 1 − α for KD) and ``KD weight α·T²`` (0 without KD). The two together say
    how large each row's effective steps were; empty when the adapter has no manifest."""
    cfg = ((read_manifest(adapter_dir) or {}).get("settings") or {}).get("config") or {}
    if not cfg:
        return {}
    if cfg["loss"] == "ce" or cfg["alpha"] == 0:
        return {"CE weight": 1.0, "KD weight α·T²": 0.0}
    return {"CE weight": 1.0 - cfg["alpha"], "KD weight α·T²": cfg["alpha"] * cfg["T"] ** 2}


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for k successes out of n (sensible at 0 and n, unlike the normal one)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


EXPLICIT_RULES = ("asked_question", "boxed", "hashes", "answer_label", "answer_phrase", "override")


def pool_seeds(per_seed: dict[int | None, pd.DataFrame]) -> pd.DataFrame:
    """One row's scored frames, one per training seed (None: not trained, or a single training),
    stacked into one frame with a ``seed`` column (blank for None) for the tables below."""
    frames = [df.assign(seed=pd.array([s] * len(df), dtype="Int64")) for s, df in per_seed.items()]
    return pd.concat(frames, ignore_index=True)


def _seeds(df: pd.DataFrame) -> list:
    return sorted(df["seed"].dropna().unique().tolist()) if "seed" in df else []


def accuracy_table(scored: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per experiment, in the given order: the study's columns plus n, the interval, the
    share of responses with an explicitly stated final answer, the number read only by the
    last-number fallback, and how responses ended (looped, hit the cap). With several training
    seeds (a ``seed`` column, see ``pool_seeds``) accuracy and its interval pool every seed's
    responses, and ``Seeds``, ``Seed mean`` and ``Seed SD`` (sample standard deviation) follow."""
    rows = []
    multi = any(len(_seeds(df)) > 1 for df in scored.values())
    for name, df in scored.items():
        n, k = len(df), int(df["correct"].sum())
        lo, hi = wilson_interval(k, n)
        stop = df["stop"] if "stop" in df else pd.Series(["eos"] * n)
        row = {"Experiment": name, "Accuracy": k / n if n else float("nan"), "# Questions Correct": k,
               "n": n, "CI low": lo, "CI high": hi,
               "Final answer stated": float(df["rule"].isin(EXPLICIT_RULES).mean()) if n else float("nan"),
               "Needs review": int(df["needs_review"].sum()), "Read by fallback": int((df["rule"] == "last_number").sum()),
               "Looped": float((stop == "loop").mean()) if n else float("nan"),
               "Hit the cap": float((stop == "cap").mean()) if n else float("nan")}
        if multi:
            per = [float(g["correct"].mean()) for _, g in df.groupby("seed")] if _seeds(df) else [row["Accuracy"]]
            row.update({"Seeds": len(per), "Seed mean": sum(per) / len(per),
                        "Seed SD": float(pd.Series(per).std()) if len(per) > 1 else float("nan")})
        rows.append(row)
    return pd.DataFrame(rows)


def mcnemar_exact(only_this: int, only_control: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs: under "no difference" each of
    the b + c questions that exactly one of the two models gets right is equally likely to
    favour either, so min(b, c) is Binomial(b + c, 1/2) in its lower tail."""
    n = only_this + only_control
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_this, only_control) + 1)) / 2 ** n
    return min(1.0, 2.0 * tail)


def paired_bootstrap(diffs, *, resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean of per-question differences, resampling questions
    (with replacement, ``resamples`` times, a fixed generator so the table is reproducible)."""
    import numpy as np

    d = np.asarray(diffs, np.float64)
    if d.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = np.concatenate([d[rng.integers(0, d.size, (min(1000, resamples - i), d.size))].mean(1)
                            for i in range(0, resamples, 1000)])
    lo, hi = np.percentile(means, [2.5, 97.5])
    return (float(lo), float(hi))


def min_detectable_difference(n: int, discordant: float, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest accuracy difference a two-sided paired test at level ``alpha`` detects with
    probability ``power`` on ``n`` questions, when a share ``discordant`` of them is answered right by
    exactly one of the two models (Connor's normal approximation to McNemar's test:
    n·δ² = (z_{1−α/2}·√ψ + z_{power}·√(ψ − δ²))², solved for δ ≤ ψ). NaN when even δ = ψ (every
    discordant pair one way) is not enough."""
    from statistics import NormalDist

    z_a, z_b = NormalDist().inv_cdf(1 - alpha / 2), NormalDist().inv_cdf(power)
    psi = float(discordant)
    if n <= 0 or not 0 < psi <= 1:
        return float("nan")
    short = lambda d: n * d * d - (z_a * math.sqrt(psi) + z_b * math.sqrt(max(psi - d * d, 0.0))) ** 2  # noqa: E731
    if short(psi) < 0:
        return float("nan")
    lo, hi = 0.0, psi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if short(mid) < 0 else (lo, mid)
    return hi


def _excludes_zero(pair) -> bool:
    """Whether a paired comparison's 95 % interval (``CI low``, ``CI high``) leaves out 0."""
    return pair["CI low"] > 0 or pair["CI high"] < 0


def primary_markdown(pairs: pd.DataFrame, primary: str, controls=("no-distillation", "fine-tuning")) -> str:
    """The pre-registered comparisons of ``primary`` against each control, first in the report: the
    paired difference with its 95 % interval and McNemar p, and the smallest difference the test
    split detects at 80 % power given the discordance observed."""
    rows = pairs[(pairs["Experiment"] == primary) & pairs["Control"].isin(list(controls))]
    if rows.empty:
        return ""
    lines = ["## Pre-registered comparison", "",
             f"Stated in the profile before the run: **{primary}** against each control, paired over the same test "
             "questions (exact McNemar test, 95 % paired bootstrap interval). 'Detectable' is the smallest difference "
             "this many questions detect with 80 % power at the 5 % level, given the share of questions on which "
             "the two disagree.", "",
             "| comparison | n | difference | 95% CI | McNemar p | discordant | detectable (80% power) | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for _, r in rows.iterrows():
        psi = (r["This better"] + r["Control better"]) / max(1, r["n"])
        mdd = min_detectable_difference(int(r["n"]), psi)
        apart = _excludes_zero(r)
        verdict = (("better" if r["Difference"] > 0 else "worse") + " (interval excludes 0)") if apart else \
            "no difference shown (interval spans 0)"
        lines.append(f"| {primary} vs {r['Control']} | {r['n']} | {100 * r['Difference']:+.1f} pp | "
                     f"{100 * r['CI low']:+.1f} to {100 * r['CI high']:+.1f} | {r['McNemar p']:.3g} | {100 * psi:.1f}% | "
                     + ("n/a" if math.isnan(mdd) else f"±{100 * mdd:.1f} pp") + f" | {verdict} |")
    return "\n".join(lines) + "\n"


def strategies_markdown(scored: dict[str, pd.DataFrame], strategies: dict[str, str]) -> str:
    """The seed study's question, which teacher prompting strategy helps most: the KD rows named in
    ``strategies`` (row -> its teacher store), ranked by accuracy, and each pair of them compared on
    the same questions (``paired_comparisons``: difference, 95 % paired bootstrap interval, exact
    McNemar p). Empty with fewer than two such rows."""
    rows = [r for r in strategies if r in scored]
    if len(rows) < 2:
        return ""
    acc = {r: float(scored[r]["correct"].mean()) for r in rows}
    ranked = sorted(rows, key=lambda r: (-acc[r], r))
    pairs = paired_comparisons({r: scored[r] for r in ranked}, ranked)
    lines = ["## Which teacher prompting strategy helps most", "",
             "The KD rows that differ in the teacher store they learn from, by accuracy; below, each against each "
             "one ranked below it, paired over the same test questions.", "",
             "| rank | row | teacher strategy | accuracy |", "|---|---|---|---|"]
    lines += [f"| {i + 1} | {r} | {strategies[r]} | {100 * acc[r]:.1f}% |" for i, r in enumerate(ranked)]
    lines += ["", "| row | vs | n | difference | 95% CI | McNemar p | |", "|---|---|---|---|---|---|---|"]
    rank = {r: i for i, r in enumerate(ranked)}
    best, unshown = ranked[0], []  # the rows the leader is not shown to beat
    for _, p in pairs.iterrows():
        if rank[p["Experiment"]] > rank[p["Control"]]:  # each pair once: the higher-ranked row first
            continue
        apart = _excludes_zero(p)
        lines.append(f"| {p['Experiment']} | {p['Control']} | {p['n']} | {100 * p['Difference']:+.1f} pp | "
                     f"{100 * p['CI low']:+.1f} to {100 * p['CI high']:+.1f} | {p['McNemar p']:.3g} | "
                     + ("interval excludes 0" if apart else "interval spans 0") + " |")
        if p["Experiment"] == best and not apart:
            unshown.append(p["Control"])
    verdict = (f"**{best}** ({strategies[best]}) is ahead of every other strategy with the paired interval excluding 0."
               if not unshown else f"**{best}** ({strategies[best]}) ranks first, but its lead is not shown: the paired "
               "interval against " + ", ".join(unshown) + " spans 0.")
    return "\n".join(lines + ["", verdict]) + "\n"


PAIR_COLUMNS = ["Experiment", "Control", "n", "Seeds", "This better", "Control better", "Ties",
                "Difference", "CI low", "CI high", "McNemar p"]


def _per_question(df: pd.DataFrame, seeds: list) -> pd.Series:
    """Correctness per question, averaged over ``seeds`` (all rows when the frame has no seeds)."""
    if seeds and _seeds(df):
        df = df[df["seed"].isin(seeds)]
    return df.groupby("id", sort=False)["correct"].mean()


def paired_comparisons(scored: dict[str, pd.DataFrame], controls) -> pd.DataFrame:
    """Each row against each control on the same questions (joined by id).

    Per question, d = this row's correctness minus the control's, each averaged over the training
    seeds they share (a row without seeds, like the untouched student, pairs with every seed).
    Reported: the questions where this row or the control does better, the mean difference with a
    paired bootstrap 95 % interval over questions, and the exact two-sided sign test of the signs
    of d, which with one seed is exactly McNemar's test of the discordant pairs (``mcnemar_exact``).
    Controls missing from ``scored`` are left out."""
    rows = []
    for control in [c for c in controls if c in scored]:
        ref_df = scored[control]
        for name, df in scored.items():
            if name == control:
                continue
            mine_seeds, ref_seeds = _seeds(df), _seeds(ref_df)
            shared = sorted(set(mine_seeds) & set(ref_seeds)) if mine_seeds and ref_seeds else mine_seeds or ref_seeds
            mine, ref = _per_question(df, shared), _per_question(ref_df, shared)
            ids = mine.index.intersection(ref.index)
            d = (mine[ids] - ref[ids]).to_numpy(dtype=float)
            better, worse = int((d > 0).sum()), int((d < 0).sum())
            lo, hi = paired_bootstrap(d)
            rows.append({"Experiment": name, "Control": control, "n": len(ids), "Seeds": max(1, len(shared)),
                         "This better": better, "Control better": worse, "Ties": len(ids) - better - worse,
                         "Difference": float(d.mean()) if len(ids) else float("nan"), "CI low": lo, "CI high": hi,
                         "McNemar p": mcnemar_exact(better, worse)})
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def pairs_markdown(pairs: pd.DataFrame) -> str:
    """The paired comparisons as a Markdown section (empty when there are none)."""
    if pairs.empty:
        return ""
    several = bool((pairs["Seeds"] > 1).any())
    lines = ["## Paired comparisons", "",
             "Each row against a control on the same questions. 'This better' / 'control better' count the questions "
             "where one of the two is right more often" + (" (correctness averaged over the training seeds both "
                                                           "have)" if several else " (the discordant pairs)")
             + "; the difference in accuracy (percentage points) comes only from those. The 95 % interval is a "
             "paired bootstrap over questions; p is the exact two-sided McNemar test of the discordant pairs"
             + (" (with several seeds: the sign test of each question's averaged difference)" if several else "")
             + ".", "",
             "| Experiment | vs | n | seeds | this better | control better | ties | difference | 95% CI | McNemar p |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in pairs.iterrows():
        lines.append(f"| {r['Experiment']} | {r['Control']} | {r['n']} | {r['Seeds']} | {r['This better']} | "
                     f"{r['Control better']} | {r['Ties']} | {100 * r['Difference']:+.1f} pp | "
                     f"{100 * r['CI low']:+.1f} to {100 * r['CI high']:+.1f} | {r['McNemar p']:.3g} |")
    return "\n".join(lines) + "\n"


def markdown_table(df: pd.DataFrame, floatfmt: str = ".3f") -> str:
    """Any small frame as a Markdown table (floats formatted, no extra dependency)."""
    fmt = lambda v: format(v, floatfmt) if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


STANDARD_COLUMNS = ["Experiment", "Accuracy", "# Questions Correct", "n", "CI low", "CI high",
                    "Final answer stated", "Needs review", "Read by fallback", "Looped", "Hit the cap"]
SEED_COLUMNS = ["Seeds", "Seed mean", "Seed SD"]


def table_markdown(table: pd.DataFrame, title: str | None = None, notes: list[str] | None = None) -> str:
    """The accuracy table as Markdown, percentages with one decimal; with several seeds one
    'Across seeds' cell (mean ± SD over seeds, in percent); extra columns (e.g. the KD divergence)
    follow with three decimals (blank where not measured)."""
    seeds = all(c in table.columns for c in SEED_COLUMNS)
    extra = [c for c in table.columns if c not in STANDARD_COLUMNS + SEED_COLUMNS]
    head = (["Experiment", "Accuracy", "# Questions Correct", "n", "95% CI"] + (["Across seeds (mean ± SD)"] if seeds else [])
            + ["Final answer stated", "Read by fallback", "Needs review", "Looped", "Hit the cap"] + extra)
    lines = ([f"# {title}", ""] if title else []) + ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    for _, r in table.iterrows():
        cells = [str(r["Experiment"]), pct(r["Accuracy"]), str(r["# Questions Correct"]), str(r["n"]),
                 f"{100 * r['CI low']:.1f}–{100 * r['CI high']:.1f}%"]
        if seeds:
            cells.append(f"{100 * r['Seed mean']:.1f}% ± {100 * r['Seed SD']:.1f} ({r['Seeds']} seeds)"
                         if r["Seeds"] > 1 else f"{100 * r['Seed mean']:.1f}% (one run)")
        cells += [pct(r["Final answer stated"]), str(r["Read by fallback"]), str(r["Needs review"]),
                  pct(r["Looped"]), pct(r["Hit the cap"])]
        cells += ["" if pd.isna(r[c]) else f"{r[c]:.3f}" for c in extra]
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_outputs(logs_dir: str | Path, scored: dict[str, pd.DataFrame], *, title: str | None = None,
                  notes: list[str] | None = None, extra: dict[str, dict[str, float]] | None = None,
                  controls=(), primary: str | None = None, strategies: dict[str, str] | None = None) -> pd.DataFrame:
    """Write per-question CSVs, ``accuracy.md``/``accuracy.csv`` and ``manual_review.csv`` (atomically).
    ``primary``: the pre-registered row, whose comparisons with the controls open the report
    (``primary_markdown``).

    ``extra`` adds columns: ``{column: {experiment: value}}`` (missing experiments stay blank).
    ``controls``: rows every other row is compared with, pairwise on the same questions
    (``paired_comparisons``; a section of ``accuracy.md`` and ``accuracy_pairs.csv``).
    ``strategies``: KD row -> the teacher strategy it learned from; with two or more, a section
    ranks them and compares them pairwise (``strategies_markdown``).
    """
    logs_dir = Path(logs_dir)
    (logs_dir / "per_question").mkdir(parents=True, exist_ok=True)
    for name, df in scored.items():
        write_text(logs_dir / "per_question" / f"{name}.csv",
                   df.drop(columns=["candidates", "response_sha"]).to_csv(index=False))
    table = accuracy_table(scored)
    for column, values in (extra or {}).items():
        table[column] = [values.get(name, float("nan")) for name in table["Experiment"]]
    write_text(logs_dir / "accuracy.csv", table.to_csv(index=False))
    pairs = paired_comparisons(scored, controls)
    if controls:
        write_text(logs_dir / "accuracy_pairs.csv", pairs.to_csv(index=False))
    md = table_markdown(table, title, notes)
    first = primary_markdown(pairs, primary, controls) if primary else ""
    by_strategy = strategies_markdown(scored, strategies or {})
    write_text(logs_dir / "accuracy.md", md + ("\n" + first if first else "")
               + ("\n" + by_strategy if by_strategy else "")
               + ("\n" + pairs_markdown(pairs) if not pairs.empty else ""))
    review = [
        {"experiment": row.get("experiment", name), **{k: row[k] for k in REVIEW_COLUMNS[1:-1]}, "answer": ""}
        for name, df in scored.items() for _, row in df[df["needs_review"]].iterrows()
    ]
    write_text(logs_dir / "manual_review.csv", pd.DataFrame(review, columns=REVIEW_COLUMNS).to_csv(index=False))
    return table
