"""Co-LLM invariants: limits of the threshold, cached = uncached decoding, the loss, the refusal."""
import math

import numpy as np
import pytest
import torch

from helpers import collm, distill, models, teacher
from helpers.data import Record
from helpers.prompts import student_messages, teacher_messages

RECORDS = [Record(f"r{i}", q, f"{i} + 1 = {i + 1}\n#### {i + 1}", float(i + 1)) for i, q in enumerate([
    "Tom has 3 apples and buys 4 more. How many?", "What is 10 - 5?",
    "Natalia sold 48 clips in April and half as many in May. How many altogether?", "What is 2 * 6?"])]


@pytest.fixture(scope="module")
def pair(tiny_dir, tmp_path_factory):
    """A base (tiny model, seed 0) with a random head, and an assistant (same architecture, seed 1)."""
    from conftest import make_model

    base, tok = models.load_model(tiny_dir, dtype="fp32")
    path = tmp_path_factory.mktemp("asst")
    make_model(tok, seed=1).save_pretrained(path)
    tok.save_pretrained(path)
    asst, _ = models.load_model(str(path), dtype="fp32")
    torch.manual_seed(0)
    head = collm.DeferralHead(base.config.hidden_size)
    torch.nn.init.normal_(head.proj.weight, std=2.0)
    torch.nn.init.zeros_(head.proj.bias)
    return base, asst, tok, head.eval()


def _prompts(tok):
    base = [models.prompt_text(tok, student_messages(r.question)) for r in RECORDS]
    asst = [models.prompt_text(tok, teacher_messages("teacher", r.question)) for r in RECORDS]
    return base, asst


def _greedy(model, tok, prompts, n):
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[:, enc.input_ids.shape[1]:].tolist()


def test_eta_above_one_is_the_base_model_alone(pair):
    base, asst, tok, head = pair
    bp, ap = _prompts(tok)
    rows = collm.co_generate(base, head, tok, asst, bp, ap, eta=1.01, max_new_tokens=10)
    assert [r["token_ids"] for r in rows] == _greedy(base, tok, bp, 10)
    assert all(sum(r["who"]) == 0 for r in rows)


def test_eta_below_zero_is_the_assistant_alone(pair):
    base, asst, tok, head = pair
    bp, ap = _prompts(tok)
    rows = collm.co_generate(base, head, tok, asst, bp, ap, eta=-0.01, max_new_tokens=10)
    assert [r["token_ids"] for r in rows] == _greedy(asst, tok, ap, 10)
    assert all(all(r["who"]) for r in rows)


def test_cached_equals_uncached_at_a_mixed_threshold(pair):
    base, asst, tok, head = pair
    bp, ap = _prompts(tok)
    alone = collm.co_generate(base, head, tok, asst, bp, ap, eta=1.01, max_new_tokens=12)
    eta = float(np.median([s for r in alone for s in r["sigma"]]))
    stats = collm.DecodeStats()
    cached = collm.co_generate(base, head, tok, asst, bp, ap, eta=eta, max_new_tokens=12, stats=stats)
    freq = collm.deferral_frequency(cached)
    assert 0.1 < freq < 0.9  # the random head really mixes the two models
    plain = collm.co_generate(base, head, tok, asst, bp, ap, eta=eta, max_new_tokens=12, base_cache=False,
                              asst_cache=False)
    reread = collm.co_generate(base, head, tok, asst, bp, ap, eta=eta, max_new_tokens=12, asst_cache=False)
    for a, b, c in zip(cached, plain, reread):
        assert a["token_ids"] == b["token_ids"] == c["token_ids"] and a["who"] == b["who"] == c["who"]
        np.testing.assert_allclose(a["sigma"], b["sigma"], atol=1e-5)
    # with its cache the assistant reads each position once; the others re-read the prefix
    assert stats.asst_tokens_read <= max(len(p) for p in tok(ap).input_ids) + 12


def test_per_row_thresholds_act_as_a_grid(pair):
    base, asst, tok, head = pair
    bp, ap = _prompts(tok)
    alone = collm.co_generate(base, head, tok, asst, bp[:1], ap[:1], eta=1.01, max_new_tokens=8)[0]
    etas = [1.01, float(np.median(alone["sigma"])), -0.01]
    grid = collm.co_generate(base, head, tok, asst, [bp[0]] * 3, [ap[0]] * 3, eta=etas, max_new_tokens=8)
    assert 0 < sum(grid[1]["who"]) < len(grid[1]["who"])
    for row, eta in zip(grid, etas):
        alone = collm.co_generate(base, head, tok, asst, [bp[0]], [ap[0]], eta=eta, max_new_tokens=8)[0]
        assert row["token_ids"] == alone["token_ids"] and row["who"] == alone["who"]


def test_random_deferral_is_seeded(pair):
    base, asst, tok, head = pair
    bp, ap = _prompts(tok)
    a = collm.co_generate(base, head, tok, asst, bp, ap, random_prob=0.3, seed=1, max_new_tokens=10)
    b = collm.co_generate(base, head, tok, asst, bp, ap, random_prob=0.3, seed=1, max_new_tokens=10)
    assert [r["who"] for r in a] == [r["who"] for r in b]
    assert 0 < collm.deferral_frequency(a) < 1


def test_marginal_loss_equals_exact_reference():
    g = torch.Generator().manual_seed(0)
    bl = torch.log_softmax(torch.randn(2, 5, 7, generator=g, dtype=torch.float64), -1)
    al = torch.log_softmax(torch.randn(2, 5, 7, generator=g, dtype=torch.float64), -1)
    d = torch.randn(2, 5, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 7, (2, 5), generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.float64)
    ref, n = 0.0, 0
    for b in range(2):
        for t in range(5):
            if mask[b, t]:
                s = 1 / (1 + math.exp(-d[b, t].item()))
                ref -= math.log((1 - s) * bl[b, t, y[b, t]].exp().item() + s * al[b, t, y[b, t]].exp().item())
                n += 1
    got = collm.marginal_nll(bl.gather(-1, y[..., None])[..., 0], al.gather(-1, y[..., None])[..., 0], d, mask)
    assert got.item() == pytest.approx(ref / n, abs=1e-10)


def test_weak_labels():
    targets = torch.tensor([1, 2, 3, 4])
    z = collm.weak_labels(base_top1=torch.tensor([1, 0, 3, 0]), asst_top1=torch.tensor([1, 2, 0, 4]), targets=targets)
    assert z.tolist() == [0, 1, 0, 1]


def test_training_pipeline_on_stored_assistant_logprobs(pair, tmp_path):
    base, asst, tok, _ = pair
    store = teacher.build_store(tmp_path / "asst", RECORDS, teacher="asst", strategy="teacher", mode="score", k=1,
                                loaded=(asst, tok), progress=False)
    examples = distill.build_examples(RECORDS, tok)
    feats = collm.frozen_features(base, tok, examples, store, batch_size=3)
    n_tokens = sum(len(e.input_ids) - e.n_prompt for e in examples)
    assert feats.hidden.shape == (n_tokens, base.config.hidden_size) and feats.labels.shape == (n_tokens,)
    np.testing.assert_allclose(feats.asst_logp.numpy(),
                               np.concatenate([store.get(r.id).token_logprobs for r in RECORDS]), atol=1e-6)
    head = collm.DeferralHead(base.config.hidden_size)
    weak = collm.fit_head_weak(head, feats, epochs=30)
    assert weak[-1] < weak[0]
    main = collm.fit_head_marginal(head, feats, epochs=30)
    assert main[-1] < main[0]
    # the marginal likelihood never does worse than the better model alone on average
    with torch.no_grad():
        mixed = -collm.marginal_nll(feats.base_logp, feats.asst_logp, head(feats.hidden), torch.ones(n_tokens))
    assert mixed.item() >= max(feats.base_logp.mean().item(), feats.asst_logp.mean().item()) - 1e-3
    logits = collm.deferral_logits(base, head, tok, examples)
    assert logits.shape == (n_tokens,)
    probs = 1 / (1 + np.exp(-logits))
    etas = collm.thresholds_for(logits, [0.0, 0.5, 1.0])
    assert etas[0] > 1 and etas[2] < 0 and probs.min() <= etas[1] <= probs.max()
    assert abs((probs > etas[1]).mean() - 0.5) <= 1 / n_tokens + 1e-9
    # a confident head saturates σ at 1.0 in float32; thresholds cut on logits still spread out
    saturated = np.array([20.0, 25.0, 30.0, 35.0])
    cuts = collm.thresholds_for(saturated, [0.25, 0.5, 0.75])
    assert len(set(cuts)) == 3 and all(c < 1.0 for c in cuts)
    assert [(saturated > collm.logit_threshold(c)).mean() for c in cuts] == [0.25, 0.5, 0.75]
    path = collm.save_head(head, tmp_path / "head.safetensors")
    again = collm.load_head(path)
    torch.testing.assert_close(again(feats.hidden[:5]), head(feats.hidden[:5]))


def test_joint_training_with_lora(pair, tiny_dir, tmp_path):
    _, asst, tok, _ = pair
    base, _ = models.load_model(tiny_dir, dtype="fp32")
    store = teacher.build_store(tmp_path / "asst", RECORDS, teacher="asst", strategy="base", mode="score", k=1,
                                loaded=(asst, tok), progress=False)
    head = collm.DeferralHead(base.config.hidden_size)
    model, losses = collm.train_joint(base, head, tok, distill.build_examples(RECORDS, tok), store, epochs=3,
                                      lr=1e-2, batch_size=2, lora={"lora_dropout": 0.0})
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_mismatched_tokenizers_are_refused(tiny_dir):
    from conftest import CORPUS, make_tokenizer

    tok = models.load_tokenizer(tiny_dir)
    CORPUS.append("another vocabulary entirely qqq")
    try:
        other = make_tokenizer()
    finally:
        CORPUS.pop()
    collm.check_same_tokenizer(tok, tok)
    with pytest.raises(ValueError, match="Co-LLM needs one tokenizer"):
        collm.check_same_tokenizer(tok, other, "base-x", "asst-y")


def test_token_kinds_and_rates():
    assert [collm.token_kind(t) for t in [" 12", " +", " apples", ".", " ", "="]] == [
        "digit", "operator", "word", "punctuation", "space/other", "operator"]
    rows = [{"token_ids": [1, 2, 3, 4], "who": [1, 0, 0, 1]}]
    pos = collm.deferral_by_position(rows, bins=2)
    assert pos["deferral rate"].tolist() == [0.5, 0.5]
