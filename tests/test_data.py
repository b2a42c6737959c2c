import json

import pytest

from helpers import data
from helpers.data import load_split, load_splits, parse_gold, read_gsm8k_jsonl


@pytest.mark.parametrize("text, gold", [
    ("2 + 2 = 4\n#### 4", 4.0),
    ("#### 1,234", 1234.0),
    ("... so she owes\n#### -5", -5.0),
    ("#### 2.5", 2.5),
    ("#### $18", 18.0),
    ("#### 1,234,567.25", 1234567.25),
    ("#### 8.0", 8.0),
    ("first #### 3 then\n#### 7", 7.0),
])
def test_parse_gold(text, gold):
    assert parse_gold(text) == gold


@pytest.mark.parametrize("text, message", [
    ("no marker at all", "no '#### <number>'"),
    ("#### twelve", "'twelve'"),
    ("#### 12 apples", "'12 apples'"),
    ("####", "''"),
])
def test_parse_gold_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_gold(text, "f.jsonl:3")


def test_gsm_symbolic_splits_sizes_disjoint_deterministic():
    a = load_splits("gsm_symbolic", n_train=30, n_validation=10, n_test=12, seed=3)
    assert {k: len(v) for k, v in a.items()} == {"train": 30, "validation": 10, "test": 12}
    ids = [r.id for split in a.values() for r in split]
    questions = [r.question for split in a.values() for r in split]
    assert len(set(ids)) == len(ids) and len(set(questions)) == len(questions)
    for r in a["test"]:
        assert isinstance(r.answer, float) and r.solution.rstrip().split("####")[-1].strip()
        assert "Give the result" not in r.question
        assert parse_gold(r.solution) == r.answer
    b = load_splits("gsm_symbolic", n_train=30, n_validation=10, n_test=12, seed=3)
    assert a == b
    c = load_splits("gsm_symbolic", n_train=30, n_validation=10, n_test=12, seed=4)
    assert {r.id for r in c["test"]} != {r.id for r in a["test"]}


def test_gsm_symbolic_test_split_independent_of_other_sizes():
    alone = load_split("test", n=8, seed=0)
    with_train = load_splits("gsm_symbolic", n_train=50, n_validation=5, n_test=8, seed=0)["test"]
    assert [r.id for r in alone] == [r.id for r in with_train]


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = [{"question": f"Q{i}: what is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1:,}"} for i in range(998, 1010)]


def test_gsm8k_local_files(tmp_path):
    _write(tmp_path / "train.jsonl", GOOD)
    _write(tmp_path / "test.jsonl", GOOD[:5])
    s = load_splits("gsm8k", n_train=6, n_validation=3, n_test=4, data_dir=str(tmp_path), seed=1)
    assert [len(s[k]) for k in ("train", "validation", "test")] == [6, 3, 4]
    assert not {r.id for r in s["train"]} & {r.id for r in s["validation"]}
    assert s["test"][2].answer == 1001.0 and s["test"][2].question == "Q1000: what is 1000 + 1?"
    assert s == load_splits("gsm8k", n_train=6, n_validation=3, n_test=4, data_dir=str(tmp_path), seed=1)
    assert s["validation"] != load_splits("gsm8k", n_validation=3, data_dir=str(tmp_path), seed=2)["validation"]


def test_gsm8k_socratic_file_name(tmp_path):
    _write(tmp_path / "test_socratic.jsonl", GOOD[:2])
    recs = load_split("test", source="gsm8k-socratic", n=2, data_dir=str(tmp_path))
    assert recs[0].id.startswith("gsm8k_socratic-test-")


def test_gsm8k_too_many_requested(tmp_path):
    _write(tmp_path / "train.jsonl", GOOD)
    with pytest.raises(ValueError, match="has 12"):
        load_splits("gsm8k", n_train=10, n_validation=5, data_dir=str(tmp_path))


@pytest.mark.parametrize("rows, message", [
    ([GOOD[0], "{not json"], r"bad\.jsonl:2: malformed JSON"),
    ([GOOD[0], {"question": "q"}], r"bad\.jsonl:2: missing or empty field 'answer'"),
    ([{"answer": "#### 3"}], r"bad\.jsonl:1: missing or empty field 'question'"),
    ([GOOD[0], GOOD[1], {"question": "q", "answer": "so\n#### seven"}], r"bad\.jsonl:3: gold answer 'seven'"),
    ([[1, 2]], r"bad\.jsonl:1: expected a JSON object"),
    ([], r"bad\.jsonl: no problems"),
])
def test_gsm8k_bad_input_names_file_and_line(tmp_path, rows, message):
    _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=message):
        read_gsm8k_jsonl(tmp_path / "bad.jsonl")


def test_missing_file_and_unknown_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="test.jsonl"):
        load_split("test", source="gsm8k", n=2, data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown data source 'gsm9k'"):
        load_splits("gsm9k", n_test=1)
    with pytest.raises(ValueError, match="unknown split"):
        load_split("dev")


def test_hub_unreachable_points_to_data_dir(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="data_dir"):
        load_split("test", source="gsm8k", n=1)


def test_duplicate_questions_keep_distinct_ids(tmp_path):
    _write(tmp_path / "test.jsonl", [GOOD[0], GOOD[0]])
    recs = read_gsm8k_jsonl(tmp_path / "test.jsonl")
    assert len({r.id for r in recs}) == 2


def test_records_roundtrip(tmp_path):
    recs = load_split("test", n=3)
    data.save_records(tmp_path / "r.jsonl", recs)
    assert data.load_records(tmp_path / "r.jsonl") == recs
    (tmp_path / "bad.jsonl").write_text('{"id": "x"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: record 1 lacks field\(s\) \['question', 'solution', 'answer'\]"):
        data.load_records(tmp_path / "bad.jsonl")


def _check_arithmetic(solution: str) -> None:
    """Every 'a op b = c' in a solution is right."""
    import re

    for a, op, b, c in re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", solution):
        assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(c), solution


def test_word_arith_splits_are_seeded_disjoint_and_correct():
    a = load_splits("word_arith", n_train=300, n_validation=20, n_test=50, seed=1)
    b = load_splits("word_arith", n_train=300, n_validation=20, n_test=50, seed=1)
    assert {k: len(v) for k, v in a.items()} == {"train": 300, "validation": 20, "test": 50}
    assert a == b and load_splits("word_arith", n_test=50, seed=2)["test"] != a["test"]
    questions = [r.question for split in a.values() for r in split]
    assert len(set(questions)) == len(questions)
    steps = {data.solution_steps(r.solution) for r in a["train"]}
    assert steps == {1, 2}
    for r in a["train"]:
        assert parse_gold(r.solution) == r.answer and r.answer > 0
        _check_arithmetic(r.solution)
    # the test split depends only on its own size
    assert load_splits("word_arith", n_test=50, seed=1)["test"] == a["test"]


def test_gsm_symbolic_2step_keeps_short_solutions():
    short = load_splits("gsm_symbolic-2step", n_train=6, n_test=6, seed=0)
    assert all(data.solution_steps(r.solution) <= 2 for split in short.values() for r in split)
    every = load_splits("gsm_symbolic", n_test=40, seed=0)["test"]
    assert max(data.solution_steps(r.solution) for r in every) > 2
    with pytest.raises(ValueError, match="data_dir"):
        load_splits("word_arith", n_test=2, data_dir="/tmp")
