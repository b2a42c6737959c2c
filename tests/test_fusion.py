"""Distillation across tokenizers: vocabulary map, targets moved onto the student's tokens, piece
losses, fusion weights; identical tokenizers reduce exactly to same-tokenizer KD."""
import math

import numpy as np
import pytest
import torch

from conftest import make_metaspace_tokenizer, make_model, make_tokenizer
from helpers.backends.transformers_engine import score_with_capture
from helpers.data import Record
from helpers.fusion.align import id_spans
from helpers.fusion.fuse import collate_fused, fused_examples, teacher_weights
from helpers.fusion.losses import cross_kd_loss, piece_logprobs
from helpers.fusion.targets import PIECE, TOKEN, map_record, read_targets, write_targets
from helpers.fusion.vocab import build_vocab_map, token_texts
from helpers.kd.distill import Example, collate
from helpers.kd.logit_store import TeacherRecord
from helpers.kd.losses import KINDS, kd_loss

TEXTS = ["Natalia sold 48 clips in April, and then she sold half as many clips in May.",
         "Weng earns $12 an hour for babysitting. The answer is 72. #### 72",
         "Question: what is 3 + 4? Answer: 7."]
DIVERGENCES = [k for k in KINDS if k != "ce"]


@pytest.fixture(scope="module")
def byte_tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def meta_tok():
    return make_metaspace_tokenizer(chat_template=True)


def records(tok, model, texts=TEXTS, k=16):
    prompts = [tok.apply_chat_template([{"role": "user", "content": "q"}], tokenize=False, add_generation_prompt=True)
               for _ in texts]
    rows = score_with_capture(model, tok, prompts, list(texts), k=k)
    return [TeacherRecord(f"r{i}", r["response"], True, np.asarray(r["token_ids"]), r["topk_ids"], r["topk_logprobs"],
                          r["token_logprobs"], r["tail_logprobs"]) for i, r in enumerate(rows)]


# --- vocabulary map ---------------------------------------------------------------------------------

def test_every_pair_decodes_to_the_same_text(byte_tok, meta_tok):
    for a, b in ((byte_tok, meta_tok), (meta_tok, byte_tok)):
        vmap = build_vocab_map(a, b)
        ta, tb = token_texts(a), token_texts(b)
        pairs = vmap.pairs()
        assert pairs and 0 < vmap.coverage <= 1
        assert all(ta[i] == tb[j] and ta[i] is not None for i, j in pairs)
        # end-of-sequence maps by role, the one pair whose texts differ
        assert vmap.student_id[a.eos_token_id] == b.eos_token_id


def test_identical_tokenizers_map_to_the_identity(byte_tok):
    vmap = build_vocab_map(byte_tok, byte_tok)
    assert vmap.student_id.tolist() == list(range(len(byte_tok))) and not vmap.by_role
    # bytes that are no whole character map too (to themselves), unlike across tokenizers
    assert any(t is None for t in token_texts(byte_tok))


def test_token_text_reads_spaces_and_markers(meta_tok, byte_tok):
    # '▁' (SentencePiece) and 'Ġ' (byte-level) both read as a space inside a text
    for tok in (meta_tok, byte_tok):
        texts = token_texts(tok)
        ids = tok(" sold", add_special_tokens=False).input_ids
        assert "".join(texts[i] for i in ids).endswith("sold") and " " in "".join(texts[i] for i in ids)


def test_id_spans_rejoin_the_text(byte_tok):
    for text in TEXTS + ["café 🙂 中文 and 7 %", "  two\n\nlines "]:
        ids = byte_tok(text, add_special_tokens=False).input_ids
        decoded, spans = id_spans(byte_tok, ids)
        assert decoded == text and len(spans) == len(ids)
        assert spans[-1][1] == len(text)


# --- targets in the student's ids ---------------------------------------------------------------------

def test_identical_tokenizers_give_the_teachers_own_arrays(byte_tok):
    model = make_model(byte_tok)
    vmap = build_vocab_map(byte_tok, byte_tok)
    for rec in records(byte_tok, model):
        t, counts = map_record(rec, byte_tok, byte_tok, vmap)
        assert np.array_equal(t.token_ids, rec.token_ids)
        assert (t.unit == TOKEN).all() and counts["one_to_one"] == len(rec)
        assert np.array_equal(t.topk_ids, rec.topk_ids)
        assert np.array_equal(t.topk_logprobs, rec.topk_logprobs)
        assert np.array_equal(t.tail_logprobs, rec.tail_logprobs)


def cross_targets(teacher_tok, student_tok, k=16, texts=TEXTS):
    model = make_model(teacher_tok, seed=1)
    vmap = build_vocab_map(teacher_tok, student_tok)
    recs = records(teacher_tok, model, texts, k)
    return model, recs, [map_record(r, teacher_tok, student_tok, vmap)[0] for r in recs], vmap


def test_cross_tokenizer_targets_are_distributions(meta_tok, byte_tok):
    _, recs, targets, vmap = cross_targets(meta_tok, byte_tok)
    for rec, t in zip(recs, targets):
        assert t.text == rec.response and byte_tok.decode(t.token_ids[:-1]) == t.text
        assert t.token_ids[-1] == byte_tok.eos_token_id and t.unit[-1] == TOKEN
        rows = t.unit == TOKEN
        lp = t.topk_logprobs[rows].astype(np.float64)
        total = np.exp(lp).sum(-1) + np.exp(t.tail_logprobs[rows].astype(np.float64))
        assert np.allclose(total, 1.0, atol=5e-3)  # fp16 top-k rounding only
        for ids, vals in zip(t.topk_ids[rows], lp):
            live = np.isfinite(vals)
            assert len(set(ids[live].tolist())) == live.sum()          # no id twice among categories
            assert set(ids[~live].tolist()) <= set(ids[live].tolist()) or not live.any()  # filler copies a live id
            assert (np.diff(vals[live]) <= 0).all()
        assert (t.unit == PIECE).any() and (t.unit == TOKEN).any()


def test_piece_probability_is_the_teachers_score_of_it(meta_tok, byte_tok):
    """A multi-token piece's stored log-prob equals the teacher's own chain-rule score of the
    piece's tokens, recomputed by a fresh forward pass."""
    model, recs, targets, _ = cross_targets(meta_tok, byte_tok)
    prompt = meta_tok.apply_chat_template([{"role": "user", "content": "q"}], tokenize=False, add_generation_prompt=True)
    p_ids = meta_tok(prompt, add_special_tokens=False).input_ids
    from helpers.fusion.align import align_offsets, token_offsets
    checked = 0
    for rec, t in zip(recs, targets):
        ids = [int(i) for i in rec.token_ids]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([p_ids + ids])).logits[0].double(), -1)
        body = ids[:-1]
        text, spans_a = id_spans(meta_tok, body)
        _, spans_b = token_offsets(byte_tok, text)
        for p in align_offsets(spans_a, spans_b, len(text)):
            if (p.a_end - p.a_start, p.b_end - p.b_start) == (1, 1):
                continue
            score = sum(lp[len(p_ids) + i - 1, ids[i]].item() for i in range(p.a_start, p.a_end))
            j = p.b_end - 1
            assert t.unit[j] == PIECE and t.piece_len[j] == p.b_end - p.b_start
            assert t.piece_logprob[j] == pytest.approx(score, abs=1e-4)
            checked += 1
    assert checked > 3


def test_targets_round_trip_through_a_file(tmp_path, meta_tok, byte_tok):
    _, _, targets, _ = cross_targets(meta_tok, byte_tok)
    back = read_targets(write_targets(tmp_path / "t.safetensors", targets))
    for t in targets:
        u = back[t.id]
        assert u.text == t.text and u.teacher_nll == t.teacher_nll
        for f in ("token_ids", "topk_ids", "topk_logprobs", "tail_logprobs", "unit", "piece_len"):
            assert np.array_equal(getattr(u, f), getattr(t, f))
        assert np.array_equal(np.isnan(u.piece_logprob), np.isnan(t.piece_logprob))
    size = (tmp_path / "t.safetensors").stat().st_size
    assert size / sum(len(t) for t in targets) <= 8 * 16 + 64  # 6k + 15 per token, plus the index


# --- losses -------------------------------------------------------------------------------------------

def test_piece_logprobs_are_window_sums():
    lp = torch.randn(2, 9, dtype=torch.float64)
    plen = torch.tensor([[0, 1, 2, 0, 3, 0, 0, 2, 9], [1] * 9])
    got = piece_logprobs(lp, plen)
    for b in range(2):
        for j in range(9):
            n = int(plen[b, j])
            assert got[b, j].item() == pytest.approx(lp[b, j - n + 1:j + 1].sum().item() if n else 0.0, abs=1e-12)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("T", [0.5, 1.0, 2.0])
def test_identical_tokenizers_equal_the_same_tokenizer_loss(byte_tok, kind, T):
    model = make_model(byte_tok)
    vmap = build_vocab_map(byte_tok, byte_tok)
    recs = records(byte_tok, model)
    targets = {r.id: map_record(r, byte_tok, byte_tok, vmap)[0] for r in recs}
    qs = [Record(r.id, "what is it?", "x #### 1", 1.0) for r in recs]
    fused = fused_examples(qs, byte_tok, {"t": targets}, max_length=64)
    plain = [Example(e.id, e.input_ids, e.n_prompt, r.topk_ids[:len(e.input_ids) - e.n_prompt],
                     r.topk_logprobs[:len(e.input_ids) - e.n_prompt], r.tail_logprobs[:len(e.input_ids) - e.n_prompt])
             for e, r in zip(fused, recs)]
    a, b = collate(plain, byte_tok.pad_token_id), collate_fused(fused, byte_tok.pad_token_id)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["mask"], b["mask"])
    logits = torch.randn(*a["input_ids"].shape[:2], len(byte_tok), dtype=torch.float32)[:, :-1] * 3
    l1, g1 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ref, _ = kd_loss(kind, l1, a["targets"], a["mask"], a["topk_ids"], a["topk_logprobs"], T=T, alpha=0.7,
                     tail_logprobs=a["tail_logprobs"])
    got, parts = cross_kd_loss(kind, g1, b["targets"], b["mask"], b["teachers"], T=T, alpha=0.7)
    assert got.item() == pytest.approx(ref.item(), abs=1e-6)
    ref.backward()
    got.backward()
    assert torch.allclose(l1.grad, g1.grad, atol=1e-6)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_student_equal_to_teacher_has_zero_piece_and_token_loss(kind):
    """Targets built from the student's own distribution: every unit's divergence is 0."""
    torch.manual_seed(0)
    V, L, k = 40, 7, 5
    logits = torch.randn(1, L, V) * 2
    lp = torch.log_softmax(logits, -1)
    targets = torch.randint(0, V, (1, L))
    top_v, top_i = lp.topk(k, -1)
    tok_lp = lp.gather(-1, targets[..., None])[..., 0]
    unit = torch.tensor([[TOKEN, 0, PIECE, TOKEN, 0, 0, PIECE]])
    plen = torch.tensor([[0, 0, 2, 0, 0, 0, 3]])
    teachers = {"topk_ids": top_i[None], "topk_logprobs": top_v[None],
                "tail_logprobs": torch.log1p(-top_v.exp().sum(-1)).clamp(max=0)[None],
                "unit": unit[None], "piece_len": plen[None], "piece_logprob": piece_logprobs(tok_lp, plen)[None],
                "weight": torch.ones(1, 1)}
    for T in (0.5, 1.0, 4.0):
        z = logits.clone().requires_grad_()
        loss, parts = cross_kd_loss(kind, z, targets, torch.ones(1, L), teachers, T=T, alpha=1.0)
        assert abs(parts["kd"]) < 1e-5
        loss.backward()
        assert z.grad.abs().max() < 1e-4


def test_filler_keeps_reverse_kl_finite(meta_tok, byte_tok):
    """Positions with fewer than k mapped ids carry -inf filler: every divergence stays finite."""
    _, _, targets, _ = cross_targets(meta_tok, byte_tok)
    assert any(not np.isfinite(t.topk_logprobs[t.unit == TOKEN]).all() for t in targets)
    qs = [Record(t.id, "what is it?", "x #### 1", 1.0) for t in targets]
    b = collate_fused(fused_examples(qs, byte_tok, {"m": {t.id: t for t in targets}}, max_length=96),
                      byte_tok.pad_token_id)
    for kind in DIVERGENCES:
        z = (torch.randn(*b["input_ids"].shape, len(byte_tok)) * 3)[:, :-1].requires_grad_()
        loss, _ = cross_kd_loss(kind, z, b["targets"], b["mask"], b["teachers"], T=2.0, alpha=0.5)
        loss.backward()
        assert math.isfinite(loss.item()) and torch.isfinite(z.grad).all()


# --- fusion -------------------------------------------------------------------------------------------

def test_teacher_weights():
    assert teacher_weights([0.9, 0.4, 0.7], "minCE").tolist() == [0, 1, 0]
    w = teacher_weights([0.5, 1.0], "avgCE")
    assert w.sum() == pytest.approx(1) and w[0] == pytest.approx(2 / 3)
    s = teacher_weights([0.5, 0.6], "softmax", tau=0.1)
    assert s[0] == pytest.approx(1 / (1 + math.exp(-1)))
    for m in ("minCE", "avgCE", "softmax"):
        assert teacher_weights([0.3], m).tolist() == [1.0]
    with pytest.raises(ValueError, match="unknown fusion method"):
        teacher_weights([0.3], "max")
    with pytest.raises(ValueError, match="finite"):
        teacher_weights([float("nan"), 1.0])


def test_fused_targets_with_one_teacher_are_that_teachers(meta_tok, byte_tok):
    _, _, targets, _ = cross_targets(meta_tok, byte_tok)
    qs = [Record(t.id, "what is it?", "x #### 1", 1.0) for t in targets]
    one = {"m": {t.id: t for t in targets}}
    for method in ("minCE", "avgCE", "softmax"):
        for e, t in zip(fused_examples(qs, byte_tok, one, method=method), targets):
            assert e.weights.tolist() == [1.0] and e.targets[0] is not t
            assert all(np.array_equal(getattr(e.targets[0], f), getattr(t, f), equal_nan=True)
                       for f in ("token_ids", "topk_ids", "topk_logprobs", "tail_logprobs", "unit", "piece_logprob"))
    # a second teacher: the loss with one-hot weights equals that teacher alone
    two = {"m": one["m"], "m2": one["m"]}
    ex = fused_examples(qs, byte_tok, two, method="minCE", max_length=96)
    assert all(e.weights.tolist() == [1.0, 0.0] for e in ex)
    b2, b1 = collate_fused(ex, 0), collate_fused(fused_examples(qs, byte_tok, one, max_length=96), 0)
    z = torch.randn(*b1["input_ids"].shape, len(byte_tok))[:, :-1]
    assert cross_kd_loss("forward_kl", z, b2["targets"], b2["mask"], b2["teachers"])[0].item() == pytest.approx(
        cross_kd_loss("forward_kl", z, b1["targets"], b1["mask"], b1["teachers"])[0].item(), abs=1e-6)


def test_teachers_must_score_the_same_text(meta_tok, byte_tok):
    _, _, targets, _ = cross_targets(meta_tok, byte_tok)
    qs = [Record(t.id, "what is it?", "x #### 1", 1.0) for t in targets]
    shifted = {t.id: s for t, s in zip(targets, targets[1:] + targets[:1])}
    with pytest.raises(ValueError, match="scored another text"):
        fused_examples(qs, byte_tok, {"a": {t.id: t for t in targets}, "b": shifted})
    with pytest.raises(ValueError, match="has no targets for example"):
        fused_examples(qs, byte_tok, {"a": {}})
