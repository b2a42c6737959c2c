import json
import math

import numpy as np
import pandas as pd
import pytest

from helpers import assess, models
from helpers.data import Record
from helpers.prompts import student_messages

RECORDS = [
    Record("q1", "Tom has 3 apples and buys 4 more. How many?", "3+4=7\n#### 7", 7.0),
    Record("q2", "What is 10 - 5?", "#### 5", 5.0),
    Record("q3", "Natalia sold 48 clips in April and half as many in May. How many altogether?", "#### 72", 72.0),
    Record("q4", "What is 2 * 6?", "#### 12", 12.0),
    Record("q5", "A longer question about Weng who earns $12 an hour for babysitting 50 minutes?", "#### 10", 10.0),
]


def _prompts(tok, recs=RECORDS):
    return [models.prompt_text(tok, student_messages(r.question)) for r in recs]


def test_batched_generation_equals_one_at_a_time(loaded):
    model, tok = loaded
    prompts = _prompts(tok)
    batched = assess.generate(model, tok, prompts, batch_size=4, max_new_tokens=12, progress=False)
    single = [assess.generate(model, tok, [p], batch_size=1, max_new_tokens=12, progress=False)[0] for p in prompts]
    assert batched == single
    assert all(r["n_tokens"] == 12 and not r["finished"] for r in batched)


def test_generation_stops_at_end_of_sequence(tiny_dir):
    model, tok = models.load_model(tiny_dir, dtype="fp32")
    prompt = _prompts(tok)[:1]
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    free = model.generate(**enc, max_new_tokens=8, do_sample=False)[0, enc.input_ids.shape[1]:].tolist()
    stop = free[3]
    first = free.index(stop)
    model.generation_config.eos_token_id = [tok.eos_token_id, stop]  # pretend that token ends a response
    row = assess.generate(model, tok, prompt, max_new_tokens=8, progress=False)[0]
    assert row["finished"] and row["n_tokens"] == first + 1
    assert row["response"] == tok.decode(free[:first + 1], skip_special_tokens=True).strip()


def test_generate_needs_left_padding(loaded):
    model, tok = loaded
    tok.padding_side = "right"
    try:
        with pytest.raises(ValueError, match="left-padding"):
            assess.generate(model, tok, ["x"], progress=False)
    finally:
        tok.padding_side = "left"


class CountingModel:
    """Wraps a model and counts the prompts it reads (rows of a masked forward pass over more than one
    new token: a prefill; decoding steps feed one token per row, and the prompts' shared prefix is
    run once, unmasked)."""

    def __init__(self, model):
        self.model, self.prompts = model, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, **kw):
        if kw["input_ids"].shape[1] > 1 and "attention_mask" in kw:
            self.prompts += kw["input_ids"].shape[0]
        return self.model(**kw)


def test_generation_cache_resumes_and_invalidates(loaded, tiny_dir, tmp_path):
    model, tok = loaded
    spec = {"model": tiny_dir}
    counting = CountingModel(model)
    first = assess.generate_responses("exp", spec, RECORDS[:3], tmp_path, loaded=(counting, tok),
                                      batch_size=2, max_new_tokens=6, progress=False)
    assert counting.prompts == 3 and list(first["id"]) == ["q1", "q2", "q3"]
    # same settings, two more questions: only those are generated
    full = assess.generate_responses("exp", spec, RECORDS, tmp_path, loaded=(counting, tok),
                                     batch_size=2, max_new_tokens=6, progress=False)
    assert counting.prompts == 5
    pd.testing.assert_frame_equal(full.iloc[:3], first)
    # an interrupted write leaves a torn last line: it is ignored and that question regenerated
    cache = tmp_path / "exp" / "generations.jsonl"
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:10])
    again = assess.generate_responses("exp", spec, RECORDS, tmp_path, loaded=(counting, tok),
                                      batch_size=2, max_new_tokens=6, progress=False)
    assert counting.prompts == 6
    pd.testing.assert_frame_equal(again, full)
    # a damaged line in the middle (a disk error, an editor) is dropped and its question regenerated
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:1] + ['{"id": "q2", "respo\x00nse'] + lines[2:]) + "\n")
    repaired = assess.generate_responses("exp", spec, RECORDS, tmp_path, loaded=(counting, tok),
                                         batch_size=2, max_new_tokens=6, progress=False)
    assert counting.prompts == 7
    pd.testing.assert_frame_equal(repaired, full)
    assert all(json.loads(line) for line in cache.read_text().splitlines())  # the file itself is whole again
    # different decoding settings: everything is generated afresh
    assess.generate_responses("exp", spec, RECORDS, tmp_path, loaded=(counting, tok),
                              batch_size=2, max_new_tokens=4, progress=False)
    assert counting.prompts == 12
    with pytest.raises(ValueError, match="unknown decoding setting"):
        assess.generate_responses("exp", spec, RECORDS, tmp_path, loaded=(counting, tok), beams=3)


def _responses(texts, stops=None):
    stops = stops or ["eos"] * len(texts)
    return pd.DataFrame([{"id": r.id, "response": t, "n_tokens": 5, "finished": stop == "eos", "stop": stop}
                         for r, t, stop in zip(RECORDS, texts, stops)])


TEXTS = ["3 + 4 = 7\n#### 7", "The answer is 6.", "April 48, May 24.", "no idea", "\\boxed{10} so #### 11"]


def test_score_joins_by_id_and_reads_answers():
    shuffled = _responses(TEXTS).iloc[::-1]
    df = assess.score("exp", RECORDS, shuffled)
    assert list(df["id"]) == [r.id for r in RECORDS]
    assert list(df["extracted"]) == [7.0, 6.0, 24.0, -1, 10.0]
    assert list(df["rule"]) == ["hashes", "answer_phrase", "last_number", "none", "boxed"]
    assert list(df["correct"]) == [True, False, False, False, True]
    assert list(df["needs_review"]) == [False, False, False, True, True]
    with pytest.raises(ValueError, match="no response for 1 question"):
        assess.score("exp", RECORDS, shuffled.iloc[1:])


def test_seed_mode_is_used_when_asked():
    df = assess.score("exp", RECORDS, _responses(["The Answer is 7 not 8"] + TEXTS[1:]), mode="seed")
    assert df["extracted"][0] == 8.0 and df["rule"][0] == "last_number"


def test_review_file_filled_in_becomes_overrides(tmp_path):
    scored = {"exp": assess.score("exp", RECORDS, _responses(TEXTS))}
    table = assess.write_outputs(tmp_path, scored, title="t")
    review = pd.read_csv(tmp_path / "manual_review.csv", dtype=str, keep_default_na=False)
    assert list(review["id"]) == ["q4", "q5"] and list(review.columns) == assess.REVIEW_COLUMNS
    review.loc[review["id"] == "q4", "answer"] = "12"
    review.loc[review["id"] == "q5", "answer"] = "none"
    review.to_csv(tmp_path / "overrides.csv", index=False)
    overrides = assess.load_overrides(tmp_path / "overrides.csv")
    df = assess.score("exp", RECORDS, _responses(TEXTS), overrides=overrides)
    assert list(df["extracted"])[3:] == [12.0, -1] and list(df["correct"])[3:] == [True, False]
    assert list(df["rule"])[3:] == ["override", "override"]
    # an override written for another response no longer applies
    changed = assess.score("exp", RECORDS, _responses(TEXTS[:3] + ["still no idea", TEXTS[4]]), overrides=overrides)
    assert changed["rule"][3] == "none"
    assert table["# Questions Correct"][0] == 2


def test_overrides_errors(tmp_path):
    assert assess.load_overrides(tmp_path / "absent.csv") == {}
    (tmp_path / "o.csv").write_text("experiment,id\nexp,q1\n")
    with pytest.raises(ValueError, match="lacks column"):
        assess.load_overrides(tmp_path / "o.csv")
    (tmp_path / "o.csv").write_text("experiment,id,answer\nexp,q1,seven\n")
    with pytest.raises(ValueError, match=r"o\.csv:2: answer 'seven'"):
        assess.load_overrides(tmp_path / "o.csv")
    for bad in ("NaN", "inf", "-Infinity"):
        (tmp_path / "o.csv").write_text(f"experiment,id,answer\nexp,q1,3\nexp,q2,{bad}\n")
        with pytest.raises(ValueError, match=rf"o\.csv:3: answer '{bad}' is not a finite number"):
            assess.load_overrides(tmp_path / "o.csv")


def test_overrides_saved_with_a_byte_order_mark_are_read(tmp_path):
    """Spreadsheets often save CSV as UTF-8 with a BOM before the first column name."""
    (tmp_path / "o.csv").write_bytes("experiment,id,answer,response_sha\nexp,q1,1\u00a0234,\nexp,q2,none,abc\n"
                                     .replace("1\u00a0234", "1234").encode("utf-8-sig"))
    assert (tmp_path / "o.csv").read_bytes()[:3] == b"\xef\xbb\xbf"
    assert assess.load_overrides(tmp_path / "o.csv") == {("exp", "q1"): (1234.0, ""), ("exp", "q2"): (None, "abc")}


@pytest.mark.parametrize("k, n, lo, hi", [
    (0, 10, 0.0, 0.27753), (10, 10, 0.72247, 1.0), (5, 10, 0.23659, 0.76341), (81, 100, 0.72221, 0.87485),
])
def test_wilson_interval(k, n, lo, hi):
    got = assess.wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-5)


def test_tables_and_files(tmp_path):
    scored = {"control": assess.score("control", RECORDS, _responses(TEXTS, ["eos", "eos", "loop", "cap", "cap"])),
              "other": assess.score("other", RECORDS, _responses(["#### 7"] * 5))}
    table = assess.write_outputs(tmp_path, scored, title="Accuracy: t", notes=["a note"])
    assert list(table["Experiment"]) == ["control", "other"]
    assert list(table["# Questions Correct"]) == [2, 1] and list(table["n"]) == [5, 5]
    assert table["Accuracy"][0] == pytest.approx(0.4)
    assert table["Final answer stated"][0] == pytest.approx(3 / 5)
    md = (tmp_path / "accuracy.md").read_text()
    assert "| Experiment | Accuracy | # Questions Correct | n | 95% CI |" in md
    assert "| Final answer stated | Read by fallback | Needs review | Looped | Hit the cap |" in md
    # 'April 48, May 24.' is read by the last-number fallback; one response looped, two hit the cap
    assert "| control | 40.0% | 2 | 5 | 11.8–76.9% | 60.0% | 1 | 2 | 20.0% | 40.0% |" in md and "- a note" in md
    assert list(table["Read by fallback"]) == [1, 0] and "Seeds" not in table
    assert pd.read_csv(tmp_path / "accuracy.csv")["# Questions Correct"].tolist() == [2, 1]
    per_q = pd.read_csv(tmp_path / "per_question" / "control.csv")
    assert {"question", "gold", "response", "extracted", "rule", "correct"} <= set(per_q.columns)
    assert per_q["extracted"].tolist()[3] == -1
    assert not list(tmp_path.glob("**/*.tmp"))


@pytest.mark.parametrize("b, c, p", [(0, 0, 1.0), (5, 0, 0.0625), (0, 5, 0.0625), (10, 2, 158 / 4096),
                                     (3, 3, 1.0), (1, 0, 1.0), (20, 5, 2 * 68406 / 2 ** 25)])
def test_exact_mcnemar(b, c, p):
    assert assess.mcnemar_exact(b, c) == pytest.approx(p, rel=1e-4)


def test_paired_comparisons_join_by_id_and_write_a_section(tmp_path):
    """Only the discordant questions count; rows are matched by id, not by position."""
    right = lambda r: f"#### {r.answer:g}"  # noqa: E731
    control = _responses([right(r) if i in (0, 1) else "no idea" for i, r in enumerate(RECORDS)])
    variant = _responses([right(r) if i in (1, 2, 3, 4) else "no idea" for i, r in enumerate(RECORDS)])
    scored = {"no-distillation": assess.score("no-distillation", RECORDS, control),
              "kd": assess.score("kd", RECORDS[::-1], variant)}  # another question order
    pairs = assess.paired_comparisons(scored, ["no-distillation", "fine-tuning"])
    assert len(pairs) == 1
    row = pairs.iloc[0]
    assert (row["Experiment"], row["Control"], row["n"], row["Seeds"], row["This better"], row["Control better"],
            row["Ties"]) == ("kd", "no-distillation", 5, 1, 3, 1, 1)
    assert row["Difference"] == pytest.approx(2 / 5) and row["McNemar p"] == pytest.approx(0.625)
    assert -1 <= row["CI low"] <= 2 / 5 <= row["CI high"] <= 1
    assess.write_outputs(tmp_path, scored, controls=["no-distillation", "fine-tuning"])
    md = (tmp_path / "accuracy.md").read_text()
    assert "## Paired comparisons" in md and "| kd | no-distillation | 5 | 1 | 3 | 1 | 1 | +40.0 pp |" in md
    assert "| 0.625 |" in md
    assert pd.read_csv(tmp_path / "accuracy_pairs.csv")["This better"].tolist() == [3]


def _scored_seeds(pattern_by_seed):
    """Pooled scored frame; ``pattern_by_seed[s]`` lists which question indexes are right."""
    right = lambda r: f"#### {r.answer:g}"  # noqa: E731
    per = {s: assess.score("no-distillation" if s is None else f"kd@seed{s}", RECORDS, _responses([right(r) if i in good else "no idea"
                                                                for i, r in enumerate(RECORDS)]))
           for s, good in pattern_by_seed.items()}
    return assess.pool_seeds(per)


def test_seeds_pool_into_one_row_with_mean_and_spread(tmp_path):
    scored = {"no-distillation": _scored_seeds({None: [0]}),
              "kd": _scored_seeds({0: [0, 1], 1: [0, 1, 2, 3], 2: [0]})}
    table = assess.accuracy_table(scored)
    kd = table.set_index("Experiment").loc["kd"]
    assert kd["n"] == 15 and kd["# Questions Correct"] == 7 and kd["Seeds"] == 3
    assert kd["Seed mean"] == pytest.approx(7 / 15)
    assert kd["Seed SD"] == pytest.approx(float(np.std([0.4, 0.8, 0.2], ddof=1)))
    control = table.set_index("Experiment").loc["no-distillation"]
    assert control["Seeds"] == 1 and control["n"] == 5 and np.isnan(control["Seed SD"])
    md = assess.table_markdown(table)
    assert "Across seeds (mean ± SD)" in md and "46.7% ± 30.6 (3 seeds)" in md and "20.0% (one run)" in md
    assess.write_outputs(tmp_path, scored, controls=["no-distillation"])
    review = pd.read_csv(tmp_path / "manual_review.csv")
    # each response to review names the model (seed) it came from, as overrides.csv must
    assert set(review["experiment"]) == {"kd@seed0", "kd@seed1", "kd@seed2", "no-distillation"}


def test_paired_comparison_with_seeds_averages_each_question_over_seeds():
    """Per question the variant's correctness is averaged over its seeds; the untrained control
    pairs with every seed. Signs: q0 tie (1 vs 1), q1 +2/3, q2 +1/3, q3 +1/3, q4 tie (0 vs 0)."""
    scored = {"no-distillation": _scored_seeds({None: [0]}),
              "kd": _scored_seeds({0: [0, 1], 1: [0, 1, 2, 3], 2: [0]})}
    row = assess.paired_comparisons(scored, ["no-distillation"]).iloc[0]
    assert (row["Seeds"], row["This better"], row["Control better"], row["Ties"]) == (3, 3, 0, 2)
    assert row["Difference"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 3) / 5)
    assert row["McNemar p"] == pytest.approx(assess.mcnemar_exact(3, 0)) == pytest.approx(0.25)
    # two seeded rows pair seed by seed: only the seeds both have count
    scored["fine-tuning"] = _scored_seeds({0: [0, 1], 1: [0, 1, 2, 3]})
    ft = assess.paired_comparisons(scored, ["fine-tuning"]).set_index("Experiment").loc["kd"]
    assert ft["Seeds"] == 2 and ft["Difference"] == pytest.approx(0.0) and ft["This better"] == 0


def test_one_seed_pairs_equal_mcnemar_on_discordant_pairs():
    a, b = _scored_seeds({0: [0, 1, 2]}), _scored_seeds({0: [2, 3]})
    row = assess.paired_comparisons({"ctl": b, "x": a}, ["ctl"]).iloc[0]
    assert (row["This better"], row["Control better"], row["Ties"]) == (2, 1, 2)
    assert row["McNemar p"] == pytest.approx(assess.mcnemar_exact(2, 1))


def test_paired_bootstrap_interval():
    assert assess.paired_bootstrap([0.0] * 20) == (0.0, 0.0)
    assert assess.paired_bootstrap([1.0] * 7) == (1.0, 1.0)
    d = [1, 0, 0, -1, 1, 1, 0, 0, 1, 0] * 5
    lo, hi = assess.paired_bootstrap(d)
    assert lo < np.mean(d) < hi and assess.paired_bootstrap(d) == (lo, hi)  # reproducible
    # close to the normal interval for a mean of 50 values
    half = 1.96 * np.std(d, ddof=1) / np.sqrt(len(d))
    assert lo == pytest.approx(np.mean(d) - half, abs=0.03) and hi == pytest.approx(np.mean(d) + half, abs=0.03)


def test_calibration_error_by_hand():
    conf = [0.02, 0.06, 0.50, 0.52, 0.99, 1.0]
    hit = [0, 1, 1, 0, 1, 1]
    # 15 bins: 0.02 and 0.06 share bin 0 (< 1/15), 0.50 and 0.52 bin 7, 0.99 and 1.0 the top bin
    want = (2 * abs(0.5 - 0.04) + 2 * abs(0.5 - 0.51) + 2 * abs(1.0 - 0.995)) / 6
    assert assess.calibration_error(conf, hit) == pytest.approx(want, abs=1e-12)
    assert assess.calibration_error([0.3] * 10, [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]) == pytest.approx(0.0, abs=1e-12)
    assert assess.calibration_error([1.0, 1.0], [0, 0]) == pytest.approx(1.0)


def test_accuracy_plot(tmp_path):
    from helpers import plots

    table = assess.accuracy_table({"a": assess.score("a", RECORDS, _responses(TEXTS))})
    plots.accuracy_bars(table, tmp_path / "acc.png")
    assert (tmp_path / "acc.png").read_bytes()[:4] == b"\x89PNG"


def test_teacher_text_metrics_match_a_per_example_reference(tiny_dir, tmp_path):
    """KD divergence and token ECE from padded batches equal a reference built one example at a
    time from the full softmax."""
    import torch

    from helpers import models
    from helpers.kd import distill, teacher

    model, tok = models.load_model(tiny_dir, dtype="fp32")
    store = teacher.build_store(tmp_path, RECORDS, teacher=tiny_dir, strategy="teacher", k=8, max_new_tokens=12,
                                batch_size=5, shard_size=5, loaded=(model, tok), progress=False)
    got = assess.teacher_text_metrics(model, tok, store, RECORDS, batch_size=3)
    conf, hit, kd, count = [], [], 0.0, 0
    cfg = {"loss": "forward_kl", "T": 1.0, "alpha": 1.0, "beta": 0.5}
    with torch.no_grad():
        for ex in distill.build_examples(RECORDS, tok, store):
            batch = distill.collate([ex], tok.pad_token_id)
            _, parts, n = distill.batch_loss(model, batch, cfg)
            kd, count = kd + parts["kd"] * n.item(), count + n.item()
            probs = torch.softmax(model(input_ids=batch["input_ids"]).logits[0, :-1].double(), -1)
            rows = batch["mask"][0].bool()
            conf += probs.max(-1).values[rows].tolist()
            hit += (probs.argmax(-1) == batch["targets"][0])[rows].tolist()
    # the teacher is the model itself, so KD is ~1e-5 nats and fp32 summation order shows at 1e-10
    assert got["kd"] == pytest.approx(kd / count, rel=1e-5, abs=1e-8)
    assert got["ece"] == pytest.approx(assess.calibration_error(conf, hit), abs=1e-5)
    assert 0 < got["ece"] < 1 and len(conf) == count


def test_min_detectable_difference_solves_connors_equation():
    from statistics import NormalDist

    z_a, z_b = NormalDist().inv_cdf(0.975), NormalDist().inv_cdf(0.8)
    for n, psi in ((200, 0.2), (64, 0.3), (500, 0.05)):
        d = assess.min_detectable_difference(n, psi)
        assert 0 < d <= psi
        assert n * d * d == pytest.approx((z_a * psi ** 0.5 + z_b * (psi - d * d) ** 0.5) ** 2, rel=1e-9)
    # more questions detect smaller differences; too few discordant questions detect nothing
    assert assess.min_detectable_difference(400, 0.2) < assess.min_detectable_difference(200, 0.2)
    assert math.isnan(assess.min_detectable_difference(20, 0.05))
    assert math.isnan(assess.min_detectable_difference(100, 0.0))


def test_primary_comparison_opens_the_report(tmp_path):
    n = 40
    recs = [Record(f"q{i}", "?", "#### 1", 1.0) for i in range(n)]
    right = lambda k: pd.DataFrame([{"id": r.id, "response": f"The answer is {1 if i < k else 2}.", "n_tokens": 5,  # noqa: E731
                                     "finished": True, "stop": "eos"} for i, r in enumerate(recs)])
    scored = {name: assess.score(name, recs, right(k)) for name, k in
              (("no-distillation", 5), ("fine-tuning", 20), ("reference-kd", 25))}
    assess.write_outputs(tmp_path, scored, controls=["no-distillation", "fine-tuning"], primary="reference-kd")
    md = (tmp_path / "accuracy.md").read_text()
    section = md.split("## Pre-registered comparison")[1].split("## Paired comparisons")[0]
    assert "| reference-kd vs no-distillation | 40 | +50.0 pp |" in section
    assert "better (interval excludes 0)" in section
    assert "| reference-kd vs fine-tuning | 40 | +12.5 pp |" in section
    mdd = 100 * assess.min_detectable_difference(40, 20 / 40)  # 20 of 40 questions discordant
    assert f"| 50.0% | ±{mdd:.1f} pp |" in section


def test_strategies_are_ranked_and_compared_pairwise(tmp_path):
    """The KD rows that learn from different teacher stores, best first, each against the ones below
    it: differences, intervals and the verdict on the leader come from the paired questions."""
    n = 60
    recs = [Record(f"q{i}", "?", "#### 1", 1.0) for i in range(n)]
    right = lambda idx: pd.DataFrame([{"id": r.id, "response": f"The answer is {1 if i in idx else 2}.",  # noqa: E731
                                       "n_tokens": 5, "finished": True, "stop": "eos"} for i, r in enumerate(recs)])
    scored = {name: assess.score(name, recs, right(idx)) for name, idx in
              (("no-distillation", range(5)), ("base-kd", range(10)), ("reference-kd", range(40)),
               ("confidence-kd", range(8, 44)))}
    strategies = {"base-kd": "base", "reference-kd": "gold-hint@reference", "confidence-kd": "confidence"}
    assert assess.strategies_markdown(scored, {"base-kd": "base"}) == ""
    md = assess.strategies_markdown(scored, strategies)
    ranks = [line.split(" | ")[1] for line in md.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")
             or line.startswith("| 3 |")]
    assert ranks == ["reference-kd", "confidence-kd", "base-kd"]  # 40, 36 and 10 of 60
    # reference-kd vs confidence-kd: right on 0-7 against 40-43, 4 of 60 apart either way
    assert "| reference-kd | confidence-kd | 60 | +6.7 pp |" in md
    assert "| reference-kd | base-kd | 60 | +50.0 pp |" in md and "| confidence-kd | base-kd | 60 | +43.3 pp |" in md
    assert "| base-kd | reference-kd |" not in md
    assert "but its lead is not shown: the paired interval against confidence-kd spans 0" in md
    assessed = assess.write_outputs(tmp_path, scored, controls=["no-distillation"], strategies=strategies)
    assert len(assessed) == 4
    assert "## Which teacher prompting strategy helps most" in (tmp_path / "accuracy.md").read_text()
