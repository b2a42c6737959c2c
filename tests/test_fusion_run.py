"""Notebook 06's steps on tiny saved models: teacher stores and targets built once per teacher and
reused, rows trained (one teacher, fused, fine-tuning), held-out measures finite."""
import math

import numpy as np
import pytest

from conftest import make_model, make_tokenizer
from helpers.data import load_splits
from helpers.fusion import run as F
from helpers.models import load_model
from helpers.settings import SettingsError, check_fusion_row


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    """A tiny chat model whose tokenizer segments text differently (byte-level BPE, 270 tokens)."""
    path = tmp_path_factory.mktemp("tiny-other")
    tok = make_tokenizer(vocab_size=270)
    make_model(tok, seed=3).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def splits():
    return load_splits("gsm_symbolic", n_train=3, n_validation=2, n_test=2, seed=0)


def test_teacher_targets_are_built_once_and_reused(tmp_path, tiny_dir, other_dir, splits):
    _, student_tok = load_model(tiny_dir, dtype="fp32")
    parts = {s: splits[s] for s in ("train", "validation")}
    own = F.teacher_targets(tmp_path, tiny_dir, student_tok, parts, k=8, batch_size=2, dtype="fp32")
    other = F.teacher_targets(tmp_path, other_dir, student_tok, parts, k=8, batch_size=2, dtype="fp32")
    assert own["stats"]["train"]["share_1to1_pieces"] == 1.0 and own["stats"]["train"]["map_coverage"] == 1.0
    assert 0 < other["stats"]["train"]["share_1to1_pieces"] < 1.0
    assert other["stats"]["train"]["bytes_per_token"] <= 8 * 8 + 40  # 6k + 15, plus the small index
    for split, records in parts.items():
        for r in records:  # both teachers read the same text, tokenized the student's way
            a, b = own[split][r.id], other[split][r.id]
            assert a.text == b.text and np.array_equal(a.token_ids, b.token_ids)
            assert a.token_ids[-1] == student_tok.eos_token_id
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "fusion" / "teachers").rglob("*") if p.is_file()}
    again = F.teacher_targets(tmp_path, tiny_dir, student_tok, parts, k=8, batch_size=2, dtype="fp32")
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing rebuilt
    assert again["stats"] == own["stats"]


def test_rows_train_and_measure(tmp_path, tiny_dir, other_dir, splits):
    model, student_tok = load_model(tiny_dir, dtype="fp32")
    parts = {s: splits[s] for s in ("train", "validation")}
    teachers = {name: F.teacher_targets(tmp_path, name, student_tok, parts, k=8, batch_size=2, dtype="fp32")
                for name in (tiny_dir, other_dir)}
    training = {"epochs": 1, "batch_size": 2, "max_length": 400, "lr": 0.01}
    rows = {"fine-tuning": {"loss": "ce"}, "kd-other": {"teachers": [other_dir], "loss": "jsd"},
            "minCE": {"method": "minCE", "loss": "forward_kl"}}
    for row, spec in rows.items():
        out = F.train_row(tmp_path, row, spec, tiny_dir, splits, teachers, training=training, dtype="fp32")
        assert (out / "adapter_model.safetensors").is_file()
        again = F.train_row(tmp_path, row, spec, tiny_dir, splits, teachers, training=training, dtype="fp32")
        assert again == out
    nll = F.nll_per_byte(model, student_tok, splits["test"], batch_size=2)
    kl_self = F.kl_to_teacher(model, student_tok, splits["validation"], teachers[tiny_dir]["validation"])
    kl_other = F.kl_to_teacher(model, student_tok, splits["validation"], teachers[other_dir]["validation"])
    # the student is the first teacher itself: zero; the other (random, near-uniform tiny model): small, not zero
    assert math.isfinite(nll) and nll > 0 and abs(kl_self) < 1e-6 and kl_other > 1e-4


def test_fusion_rows_are_checked():
    assert check_fusion_row("a", {"teachers": ["x"], "loss": "jsd", "lr": 0.1}, teachers=["x", "y"]) == {
        "teachers": ["x"], "loss": "jsd", "lr": 0.1}
    with pytest.raises(SettingsError, match=r"teacher\(s\) \['z'\] are not in fusion_teachers"):
        check_fusion_row("a", {"teachers": ["z"]}, teachers=["x"])
    with pytest.raises(SettingsError, match="unknown method 'minCe'.*did you mean 'minCE'"):
        check_fusion_row("a", {"method": "minCe"})
    with pytest.raises(SettingsError, match="taken by the untouched student"):
        check_fusion_row("no-distillation", {})
    with pytest.raises(SettingsError, match="'strategy' belongs to variants"):
        check_fusion_row("a", {"strategy": "base"})
    with pytest.raises(SettingsError, match="unknown"):
        check_fusion_row("a", {"lrr": 0.1})
