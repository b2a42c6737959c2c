"""Co-LLM invariants: limits of the threshold, cached = uncached decoding, the loss, the refusal; and across
tokenizers: the same limits and cache agreement, and the assistant's log-probs put on the base's tokens."""
import math

import numpy as np
import pytest
import torch

from helpers import collm, models
from helpers.data import Record
from helpers.kd import distill, teacher
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


def _scaled_head(head, lo, hi, target_lo=-50.0, target_hi=50.0):
    """A copy of ``head`` whose logits are mapped linearly from [lo, hi] onto [target_lo, target_hi]."""
    a = (target_hi - target_lo) / (hi - lo)
    out = collm.DeferralHead(head.proj.in_features)
    with torch.no_grad():
        out.proj.weight.copy_(a * head.proj.weight)
        out.proj.bias.copy_(a * head.proj.bias + target_lo - a * lo)
    return out.eval()


def _constant_head(hidden, logit):
    h = collm.DeferralHead(hidden)
    with torch.no_grad():
        h.proj.bias.fill_(logit)
    return h.eval()


def test_plus_inf_threshold_is_the_base_model_alone(pair):
    base, asst, tok, head = pair
    bp, ap = _prompts(tok)
    # even a head that is certain the assistant should write (σ = 1.0) never defers at +inf
    sure = _constant_head(base.config.hidden_size, 1e4)
    for h in (head, sure):
        rows = collm.co_generate(base, h, tok, asst, bp, ap, eta_logit=math.inf, max_new_tokens=10)
        assert [r["token_ids"] for r in rows] == _greedy(base, tok, bp, 10)
        assert all(sum(r["who"]) == 0 for r in rows)
    # the σ-scale alias: η ≥ 1 is the same cut
    alias = collm.co_generate(base, head, tok, asst, bp, ap, eta=1.0, max_new_tokens=10)
    assert [r["token_ids"] for r in alias] == [r["token_ids"] for r in rows]


def test_minus_inf_threshold_is_the_assistant_alone(pair):
    base, asst, tok, head = pair
    bp, ap = _prompts(tok)
    never = _constant_head(base.config.hidden_size, -1e4)
    for h in (head, never):
        rows = collm.co_generate(base, h, tok, asst, bp, ap, eta_logit=-math.inf, max_new_tokens=10)
        assert [r["token_ids"] for r in rows] == _greedy(asst, tok, ap, 10)
        assert all(all(r["who"]) for r in rows)


def test_one_threshold_kind_at_a_time(pair):
    base, asst, tok, head = pair
    bp, ap = _prompts(tok)
    with pytest.raises(ValueError, match="exactly one of"):
        collm.co_generate(base, head, tok, asst, bp, ap, eta_logit=0.0, random_prob=0.5, max_new_tokens=2)
    with pytest.raises(ValueError, match="eta_logit"):
        collm.decode_grid(base, head, tok, asst, RECORDS, [{"eta": 0.5}], progress=False)


def test_cached_equals_uncached_at_a_mixed_threshold(pair):
    base, asst, tok, head = pair
    bp, ap = _prompts(tok)
    alone = collm.co_generate(base, head, tok, asst, bp, ap, eta_logit=math.inf, max_new_tokens=12)
    cut = float(np.median([s for r in alone for s in r["logit"]]))
    stats = collm.DecodeStats()
    cached = collm.co_generate(base, head, tok, asst, bp, ap, eta_logit=cut, max_new_tokens=12, stats=stats)
    freq = collm.deferral_frequency(cached)
    assert 0.1 < freq < 0.9  # the random head really mixes the two models
    plain = collm.co_generate(base, head, tok, asst, bp, ap, eta_logit=cut, max_new_tokens=12, base_cache=False,
                              asst_cache=False)
    reread = collm.co_generate(base, head, tok, asst, bp, ap, eta_logit=cut, max_new_tokens=12, asst_cache=False)
    for a, b, c in zip(cached, plain, reread):
        assert a["token_ids"] == b["token_ids"] == c["token_ids"] and a["who"] == b["who"] == c["who"]
        np.testing.assert_allclose(a["logit"], b["logit"], atol=1e-4)
        assert [w for w in a["who"]] == [int(x > cut) for x in a["logit"]]
    # with its cache the assistant reads each position once; the others re-read the prefix
    assert stats.asst_tokens_read <= max(len(p) for p in tok(ap).input_ids) + 12


def test_per_row_thresholds_act_as_a_grid(pair):
    base, asst, tok, head = pair
    bp, ap = _prompts(tok)
    alone = collm.co_generate(base, head, tok, asst, bp[:1], ap[:1], eta_logit=math.inf, max_new_tokens=8)[0]
    cuts = [math.inf, float(np.median(alone["logit"])), -math.inf]
    grid = collm.co_generate(base, head, tok, asst, [bp[0]] * 3, [ap[0]] * 3, eta_logit=cuts, max_new_tokens=8)
    assert 0 < sum(grid[1]["who"]) < len(grid[1]["who"])
    for row, cut in zip(grid, cuts):
        alone = collm.co_generate(base, head, tok, asst, [bp[0]], [ap[0]], eta_logit=cut, max_new_tokens=8)[0]
        assert row["token_ids"] == alone["token_ids"] and row["who"] == alone["who"]


def test_logit_thresholds_spread_where_sigma_saturates():
    logits = np.linspace(-50.0, 50.0, 200)
    rng = np.random.default_rng(0)
    logits = rng.permutation(logits)
    freqs = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    cuts = collm.thresholds_for(logits, [0.0] + freqs + [1.0])
    assert cuts[0] == math.inf and cuts[-1] == -math.inf
    inner = cuts[1:-1]
    assert all(math.isfinite(c) for c in inner) and len(set(inner)) == len(inner)
    assert inner == sorted(inner, reverse=True)
    assert [(logits > c).mean() for c in inner] == pytest.approx(freqs, abs=1e-12)
    # the top cuts lie where σ is 1.0 even in float64: a σ threshold could not tell them apart
    assert collm.sigma(inner[0]) == 1.0 and inner[0] > 36.7
    # with ties a target frequency cannot be met exactly, but the cut never goes infinite
    assert math.isfinite(collm.thresholds_for(np.full(10, 40.0), [0.5])[0])
    with pytest.raises(ValueError, match="inf or NaN"):
        collm.thresholds_for(np.array([1.0, np.inf]), [0.5])


def test_decoding_defers_at_the_target_rate_with_saturated_logits(pair):
    """The base is its own assistant under the same prompt, so deferring does not change the text:
    the deferral rate must then be exactly the share of the run's logits above each cut."""
    base, _, tok, head = pair
    bp, _ = _prompts(tok)
    probe = collm.co_generate(base, head, tok, base, bp, bp, eta_logit=math.inf, max_new_tokens=16)
    seen = np.concatenate([r["logit"] for r in probe])
    sure = _scaled_head(head, seen.min(), seen.max())  # logits spread over ±50
    alone = collm.co_generate(base, sure, tok, base, bp, bp, eta_logit=math.inf, max_new_tokens=16)
    logits = np.concatenate([r["logit"] for r in alone])
    assert logits.min() < -45 and logits.max() > 45 and (logits > 36.7).any()
    freqs = [0.1, 0.3, 0.5, 0.7, 0.9]
    cuts = collm.thresholds_for(logits, freqs)
    rows = collm.decode_grid(base, sure, tok, base, RECORDS, [{"eta_logit": c} for c in cuts], progress=False,
                             max_new_tokens=16, assistant_strategy="base", batch_size=len(RECORDS))
    for f, c, got in zip(freqs, cuts, rows):
        assert [r["token_ids"] for r in got] == [r["token_ids"] for r in alone]
        assert collm.deferral_frequency(got) == pytest.approx(f, abs=1 / len(logits) + 1e-12)
        assert collm.deferral_frequency(got) == pytest.approx((logits > c).mean(), abs=1e-12)


def test_grid_settings_do_not_depend_on_their_neighbours(pair):
    base, asst, tok, head = pair
    kw = dict(max_new_tokens=8, batch_size=3, progress=False, assistant_strategy="teacher")
    alone = collm.decode_grid(base, head, tok, asst, RECORDS, [{"eta_logit": 0.0}], **kw)[0]
    grid = collm.decode_grid(base, head, tok, asst, RECORDS, [{"eta_logit": -math.inf}, {"random_prob": 1.0},
                                                                {"eta_logit": 0.0}, {"random_prob": 0.0},
                                                                {"eta_logit": math.inf}], **kw)
    assert [r["id"] for r in grid[2]] == [r.id for r in RECORDS]
    assert [(r["token_ids"], r["who"]) for r in grid[2]] == [(r["token_ids"], r["who"]) for r in alone]
    # always deferring is the same decoding whether a threshold or a coin says so; likewise never
    assert [r["token_ids"] for r in grid[0]] == [r["token_ids"] for r in grid[1]]
    assert [r["token_ids"] for r in grid[3]] == [r["token_ids"] for r in grid[4]]
    assert collm.deferral_frequency(grid[0]) == 1.0 and collm.deferral_frequency(grid[4]) == 0.0


def test_the_grid_runs_the_bases_prompt_pass_once_per_batch_and_decodes_as_separate_calls(pair):
    base, asst, tok, head = pair
    settings = [{"eta_logit": 0.0}, {"random_prob": 0.5}, {"eta_logit": math.inf}]
    grid_stats = collm.DecodeStats()
    grid = collm.decode_grid(base, head, tok, asst, RECORDS, settings, max_new_tokens=8, batch_size=2, progress=False,
                             assistant_strategy="teacher", stats=grid_stats)
    bp, ap = collm.prompts_for(tok, RECORDS, "teacher")
    own_stats, batches = collm.DecodeStats(), range(0, len(RECORDS), 2)
    for setting, got in zip(settings, grid):
        (key, value), = setting.items()
        want = [row for c in batches for row in collm.co_generate(
            base, head, tok, asst, bp[c:c + 2], ap[c:c + 2], **{key: value}, seed=c, max_new_tokens=8, stats=own_stats)]
        assert [(r["token_ids"], r["who"], r["logit"]) for r in got] == [(r["token_ids"], r["who"], r["logit"]) for r in want]
    assert grid_stats.base_calls == own_stats.base_calls - (len(settings) - 1) * len(batches)
    assert grid_stats.asst_calls == own_stats.asst_calls


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


def _synthetic(n, hidden=16, seed=0, mode="mixed", noise=0.0):
    """Cached token features where a direction of the hidden state says which model explains the
    token (``mixed``), or where the assistant is better at every token (``assistant``). ``noise``:
    share of tokens whose better model is flipped at random (nothing a head can learn)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g)
    good, bad = -0.1 - 0.2 * torch.rand(n, generator=g), -3.0 - torch.rand(n, generator=g)
    if mode == "assistant":
        asst_better = torch.ones(n, dtype=torch.bool)
    else:
        asst_better = h[:, 0] + 0.3 * h[:, 1] > 0.5
        flip = torch.rand(n, generator=g) < noise
        asst_better = asst_better ^ flip
    a = torch.where(asst_better, good, bad)
    b = torch.where(asst_better, bad, good)
    return collm.Features(h, b, a, asst_better.float())


def test_marginal_training_beats_both_models_alone_on_validation():
    train, val = _synthetic(3000, seed=0), _synthetic(1000, seed=1)
    ref = collm.reference_nll(val)
    head = collm.DeferralHead(16)
    start = collm.features_nll(head, val)
    hist = collm.fit_head_marginal(head, train, val=val, epochs=40, lr=1e-2, weight_decay=1e-3, batch_size=128, seed=0)
    got = collm.features_nll(head, val)
    assert hist["validation_before"] == pytest.approx(start, abs=1e-12)
    # well below the start and below both fixed choices (1.26 and 2.45 nats here), above the per-token oracle
    assert got < start - 0.4
    assert got < min(ref["always base"], ref["always assistant"]) - 0.5
    assert got >= ref["better per token"] - 1e-9
    assert len(hist["train"]) == hist["epochs_run"] == len(hist["validation"])
    # the head learned the direction: it defers where the assistant is better
    d = collm.head_logits(head, val)
    assert ((d > 0) == val.labels.bool().numpy()).mean() > 0.95


def test_weak_supervision_fits_held_out_labels():
    train, val = _synthetic(3000, seed=0), _synthetic(1000, seed=1)
    head = collm.DeferralHead(16)
    hist = collm.fit_head_weak(head, train, val=val, epochs=30, lr=1e-2, batch_size=128, seed=0)
    assert hist["validation_best"] < 0.5 * hist["validation_before"]
    d = collm.head_logits(head, val)
    assert ((d > 0) == val.labels.bool().numpy()).mean() > 0.9


def test_early_stopping_keeps_the_best_epoch():
    # few noisy training tokens in many dimensions: the head overfits and validation NLL turns up
    train, val = _synthetic(40, hidden=64, seed=2, noise=0.3), _synthetic(2000, hidden=64, seed=3)
    head = collm.DeferralHead(64)
    hist = collm.fit_head_marginal(head, train, val=val, epochs=200, lr=5e-2, weight_decay=0.0, patience=5,
                                   batch_size=8, seed=0)
    curve = [hist["validation_before"]] + hist["validation"]
    assert hist["epochs_run"] < 200  # stopped by patience
    assert 0 < hist["best_epoch"] < hist["epochs_run"]
    assert hist["validation_best"] == min(curve) == curve[hist["best_epoch"]]
    assert curve[-1] > hist["validation_best"] + 1e-3
    # the returned head is the best epoch's, not the last one's
    assert collm.features_nll(head, val) == pytest.approx(hist["validation_best"], abs=1e-12)
    # without early stopping the last epoch's weights come back, and they are worse
    last = collm.DeferralHead(64)
    kept = collm.fit_head_marginal(last, train, val=None, epochs=hist["epochs_run"], lr=5e-2, weight_decay=0.0,
                                   batch_size=8, seed=0)
    assert kept["best_epoch"] == hist["epochs_run"]
    assert collm.features_nll(last, val) == pytest.approx(curve[-1], abs=1e-9)


def test_logits_stay_bounded_where_the_assistant_always_wins():
    """No finite optimum without the penalty: the logits keep growing; with it they settle."""
    train, val = _synthetic(1000, seed=4, mode="assistant"), _synthetic(300, seed=5, mode="assistant")

    def top(weight_decay, epochs):
        head = collm.DeferralHead(16)
        hist = collm.fit_head_marginal(head, train, val=val, epochs=epochs, lr=5e-2, weight_decay=weight_decay,
                                       patience=None, batch_size=50, seed=0)
        if not weight_decay:  # validation NLL only falls (σ → 1 is right on held-out tokens too): early stopping cannot help
            assert hist["best_epoch"] == epochs
        return float(np.max(collm.head_logits(head, val)))

    free_short, free_long = top(0.0, 40), top(0.0, 80)
    decayed_short, decayed_long = top(1e-2, 40), top(1e-2, 80)
    assert free_long > free_short + 0.8  # without the penalty: runs away with training time
    assert abs(decayed_long - decayed_short) < 0.2  # with it: converged to the penalised optimum
    assert decayed_long < free_long - 2.0


def test_calibration_against_the_posterior_responsibility():
    """Tokens drawn from the latent-variable model itself: Z ~ Bernoulli(σ), then x from the chosen
    model. A head reporting the true σ is calibrated (small ECE); one that is 3 logits too sure is not."""
    rng = np.random.default_rng(0)
    n, vocab = 40000, 8
    true = rng.normal(0.0, 2.0, n)
    p_base, p_asst = rng.dirichlet(np.ones(vocab), n), rng.dirichlet(np.ones(vocab), n)
    z = rng.random(n) < 1 / (1 + np.exp(-true))
    x = np.array([rng.choice(vocab, p=(pa if zi else pb)) for zi, pa, pb in zip(z, p_asst, p_base)])
    feats = collm.Features(torch.zeros(n, 1), torch.as_tensor(np.log(p_base[np.arange(n), x])),
                           torch.as_tensor(np.log(p_asst[np.arange(n), x])), torch.as_tensor(z, dtype=torch.float32))
    good = collm.calibration_table(true, feats)
    bad = collm.calibration_table(true + 3.0, feats)
    assert good["tokens"].sum() == n and list(good.columns[:3]) == ["bin low", "bin high", "tokens"]
    assert collm.expected_calibration_error(good) < 0.02
    # r uses the head's own σ, so a too-sure head drags r along: the gap shows, though understated
    assert collm.expected_calibration_error(bad) > 0.04
    r = collm.responsibilities(true, feats)
    assert r.mean() == pytest.approx(z.mean(), abs=0.01)
    s = collm.logit_summary(np.array([-1.0, 0.0, 20.0, 40.0]))
    assert s["q00"] == -1.0 and s["q100"] == 40.0 and s["share sigma=1 (fp32)"] == 0.5
    from helpers import plots
    fig = plots.reliability({"true": good, "too sure": bad})
    assert len(fig.axes) == 2


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
    # the base's log-probs and weak labels agree with a plain forward pass of each example
    ids = torch.tensor([examples[0].input_ids])
    with torch.no_grad():
        lp = torch.log_softmax(base(input_ids=ids).logits[0, :-1].float(), -1)
    tgt = ids[0, 1:]
    n0 = len(examples[0].input_ids) - examples[0].n_prompt
    own = lp.gather(-1, tgt[:, None])[:, 0][examples[0].n_prompt - 1:]
    np.testing.assert_allclose(feats.base_logp[:n0].numpy(), own.numpy(), atol=1e-5)
    head = collm.DeferralHead(base.config.hidden_size)
    torch.nn.init.normal_(head.proj.weight, std=0.5)
    # the cached path gives the same logits as the decoding-time forward pass
    logits = collm.deferral_logits(base, head, tok, examples)
    np.testing.assert_allclose(logits, collm.head_logits(head, feats), atol=1e-5)
    # features of the same examples serve as validation: the marginal NLL of the kept head is the recorded best
    hist = collm.fit_head_marginal(head, feats, val=feats, epochs=5, lr=1e-2, seed=0)
    assert collm.features_nll(head, feats) == pytest.approx(hist["validation_best"], abs=1e-9)
    assert hist["validation_best"] <= hist["validation_before"]
    path = collm.save_head(head, tmp_path / "head.safetensors")
    again = collm.load_head(path)
    torch.testing.assert_close(again(feats.hidden[:5]), head(feats.hidden[:5]))


def test_joint_training_with_lora_keeps_the_best_epoch(pair, tiny_dir, tmp_path):
    _, asst, tok, _ = pair
    base, _ = models.load_model(tiny_dir, dtype="fp32")
    store = teacher.build_store(tmp_path / "asst", RECORDS, teacher="asst", strategy="base", mode="score", k=1,
                                loaded=(asst, tok), progress=False)
    examples = distill.build_examples(RECORDS, tok)
    head = collm.DeferralHead(base.config.hidden_size)
    model, hist = collm.train_joint(base, head, tok, examples[:3], store, val_examples=examples[3:], val_store=store,
                                    epochs=4, lr=1e-2, batch_size=2, lora={"lora_dropout": 0.0}, patience=None)
    assert len(hist["train_step"]) == 8 and len(hist["train"]) == len(hist["validation"]) == 4
    curve = [hist["validation_before"]] + hist["validation"]
    assert hist["validation_best"] == min(curve) < hist["validation_before"]
    # the returned LoRA weights and head are the best epoch's: recomputing gives the recorded value
    again = collm.examples_nll(model, head, tok, examples[3:], store)
    assert again == pytest.approx(hist["validation_best"], abs=1e-6)
    if hist["best_epoch"] < 4:
        assert again < curve[-1] - 1e-6


def test_token_kinds_and_rates():
    assert [collm.token_kind(t) for t in [" 12", " +", " apples", ".", " ", "="]] == [
        "digit", "operator", "word", "punctuation", "space/other", "operator"]
    rows = [{"token_ids": [1, 2, 3, 4], "who": [1, 0, 0, 1]}]
    pos = collm.deferral_by_position(rows, bins=2)
    assert pos["deferral rate"].tolist() == [0.5, 0.5]


# --------------------------------------------------------------------------- across tokenizers
SHARED_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,+-*/=$%:()?#")


def _ascii_bpe(vocab_size=200):
    """Another byte-level BPE (smaller vocabulary, its own special tokens and chat template) with only
    the corpus's characters and newline in its alphabet: a different tokenizer that round-trips them."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tk_models
    from transformers import PreTrainedTokenizerFast

    from conftest import CORPUS

    tk = Tokenizer(tk_models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=["Ċ"], show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="</s>")
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant:\n{% endif %}")
    return tok


def _chatty_model(tok, seed, eos=False, chars=SHARED_CHARS):
    """A tiny Llama whose greedy text varies (untied output layer, larger initial weights) and stays
    in ``chars``: the output rows of every other token (and of end-of-sequence unless ``eos``) are
    zero, so the random logits of the allowed ones win. Texts then round-trip through both tokenizers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      tie_word_embeddings=False, initializer_range=0.2)
    model = LlamaForCausalLM(cfg).eval()
    text = [tok.decode([i]) for i in range(len(tok))]
    keep = torch.tensor([i not in tok.all_special_ids and bool(t) and set(t) <= chars for i, t in enumerate(text)])
    if eos:
        keep[tok.eos_token_id] = True
    with torch.no_grad():
        model.lm_head.weight[~keep] = 0.0
    return model


@pytest.fixture(scope="module")
def cross():
    """A base (the shared byte-level tokenizer) with a random head, and assistants with other
    tokenizers, each with its own special tokens and template: a smaller byte-level BPE, one with no
    merges at all (one token per character) and a Unigram/Metaspace one."""
    from conftest import make_metaspace_tokenizer, make_tokenizer

    tok = make_tokenizer()
    base = _chatty_model(tok, 0)
    torch.manual_seed(0)
    head = collm.DeferralHead(base.config.hidden_size)
    torch.nn.init.normal_(head.proj.weight, std=2.0)
    torch.nn.init.zeros_(head.proj.bias)
    assistants = {}
    for name, atok, seed, chars in (("bpe", _ascii_bpe(), 1, SHARED_CHARS),
                                    ("chars", _ascii_bpe(vocab_size=1), 8, set("Natlies ")),  # letters the base merges
                                    ("metaspace", make_metaspace_tokenizer(chat_template=True), 2, SHARED_CHARS)):
        assistants[name] = (_chatty_model(atok, seed, eos=True, chars=chars), atok)
    return base, tok, head.eval(), assistants


def _cross_prompts(tok, atok):
    return collm.prompts_for(tok, RECORDS, "teacher", asst_tok=atok)


def _greedy_rows(model, tok, prompts, n):
    """Greedy ``generate`` one prompt at a time (the text path decodes row by row): ids and text."""
    out = []
    for p in prompts:
        enc = tok(p, return_tensors="pt", add_special_tokens=models.add_special_tokens(tok))
        ids = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)[0]
        ids = ids[enc.input_ids.shape[1]:].tolist()
        out.append((ids, tok.decode(ids, skip_special_tokens=True).strip()))
    return out


@pytest.mark.parametrize("name", ["bpe", "chars", "metaspace"])
def test_across_tokenizers_never_deferring_is_the_base_alone(cross, name):
    base, tok, head, assistants = cross
    asst, atok = assistants[name]
    bp, ap = _cross_prompts(tok, atok)
    assert collm.cross_tokenizer(tok, atok) is not None
    ref = _greedy_rows(base, tok, bp, 12)
    for kw in ({"eta_logit": math.inf}, {"eta": 1.0}, {"random_prob": 0.0}):
        rows = collm.co_generate(base, head, tok, asst, bp, ap, max_new_tokens=12, asst_tok=atok, **kw)
        assert [(r["token_ids"], r["response"]) for r in rows] == ref
        assert all(sum(r["who"]) == 0 and len(r["logit"]) == len(r["token_ids"]) for r in rows)


@pytest.mark.parametrize("name", ["bpe", "chars", "metaspace"])
def test_across_tokenizers_always_deferring_is_the_assistant_alone(cross, name):
    """The assistant's text, whatever the chunk size: it keeps its own tokens, and max_new_tokens
    counts the tokens it writes. The base's tokens are its tokenizer's split of that text."""
    base, tok, head, assistants = cross
    asst, atok = assistants[name]
    bp, ap = _cross_prompts(tok, atok)
    n = 24
    ref = _greedy_rows(asst, atok, ap, n)
    assert len({text for _, text in ref}) == len(ref) and all(ref_text for _, ref_text in ref)
    runs = {}
    for chunk in (1, 8, 100):
        stats = collm.DecodeStats()
        rows = collm.co_generate(base, head, tok, asst, bp, ap, eta_logit=-math.inf, max_new_tokens=n, asst_tok=atok,
                                 asst_chunk=chunk, stats=stats)
        assert [r["response"] for r in rows] == [text for _, text in ref]
        for r, (ids, _) in zip(rows, ref):
            finished = atok.eos_token_id in ids
            assert r["finished"] == finished and all(r["who"]) and [w for w, _ in r["segments"]] == [1]
            assert r["token_ids"][len(r["token_ids"]) - finished:] == [tok.eos_token_id] * finished
            assert tok.decode(r["token_ids"], skip_special_tokens=True) == r["segments"][0][1]
        runs[chunk] = stats
    # the assistant reads each of its positions once, however often it hands back; it hands back
    # only where a piece ends (or at the cap), so larger chunks need no more decisions of the base
    assert runs[1].asst_tokens_read == runs[8].asst_tokens_read == runs[100].asst_tokens_read
    assert runs[1].base_calls >= runs[8].base_calls >= runs[100].base_calls
    if name == "chars":  # one character per token: the base's multi-character tokens are written whole
        assert runs[1].base_calls > runs[100].base_calls


@pytest.mark.parametrize("name", ["bpe", "metaspace"])
def test_across_tokenizers_at_a_mixed_threshold(cross, name):
    """Cached and uncached decoding agree; the assistant writes exactly where the logit is above the
    cut; the base's tokens spell the text both wrote; rows do not depend on their neighbours."""
    base, tok, head, assistants = cross
    asst, atok = assistants[name]
    bp, ap = _cross_prompts(tok, atok)
    assert ap[0].startswith("<s>") and not bp[0].startswith("<s>")  # each model reads its own template
    alone = collm.co_generate(base, head, tok, asst, bp, ap, eta_logit=math.inf, max_new_tokens=16, asst_tok=atok)
    cut = float(np.median([s for r in alone for s in r["logit"]]))
    kw = dict(eta_logit=cut, max_new_tokens=16, asst_tok=atok)
    cached_stats, plain_stats = collm.DecodeStats(), collm.DecodeStats()
    cached = collm.co_generate(base, head, tok, asst, bp, ap, stats=cached_stats, **kw)
    plain = collm.co_generate(base, head, tok, asst, bp, ap, base_cache=False, asst_cache=False, stats=plain_stats, **kw)
    assert 0.1 < collm.deferral_frequency(cached) < 0.9
    for a, b in zip(cached, plain):
        assert (a["token_ids"], a["who"], a["segments"], a["response"]) == (b["token_ids"], b["who"], b["segments"],
                                                                            b["response"])
        np.testing.assert_allclose(a["logit"], b["logit"], atol=1e-4)
        assert a["who"] == [int(x > cut) for x in a["logit"]]
        text = "".join(t for _, t in a["segments"])
        assert text.strip() == a["response"] and tok.decode(a["token_ids"], skip_special_tokens=True) == text
    assert {w for r in cached for w, _ in r["segments"]} == {0, 1}
    assert cached_stats.asst_tokens_read < plain_stats.asst_tokens_read
    # per-row thresholds in one batch give each row's own decoding
    cuts = [math.inf, cut, -math.inf]
    grid = collm.co_generate(base, head, tok, asst, [bp[0]] * 3, [ap[0]] * 3, eta_logit=cuts, max_new_tokens=16,
                             asst_tok=atok)
    for row, c in zip(grid, cuts):
        one = collm.co_generate(base, head, tok, asst, bp[:1], ap[:1], eta_logit=c, max_new_tokens=16, asst_tok=atok)[0]
        assert (row["token_ids"], row["segments"]) == (one["token_ids"], one["segments"])


def test_decode_grid_across_tokenizers(cross):
    base, tok, head, assistants = cross
    asst, atok = assistants["bpe"]
    kw = dict(max_new_tokens=8, batch_size=3, progress=False, assistant_strategy="teacher", asst_tok=atok)
    grid = collm.decode_grid(base, head, tok, asst, RECORDS, [{"eta_logit": -math.inf}, {"random_prob": 1.0},
                                                                {"random_prob": 0.0}, {"eta_logit": math.inf},
                                                                {"random_prob": 0.5}], **kw)
    assert [r["id"] for r in grid[0]] == [r.id for r in RECORDS]
    assert [r["response"] for r in grid[0]] == [r["response"] for r in grid[1]]
    assert [r["token_ids"] for r in grid[2]] == [r["token_ids"] for r in grid[3]]
    assert collm.deferral_frequency(grid[0]) == 1.0 and collm.deferral_frequency(grid[3]) == 0.0
    assert 0 < collm.deferral_frequency(grid[4]) < 1
    again = collm.decode_grid(base, head, tok, asst, RECORDS, [{"random_prob": 0.5}], **kw)[0]
    assert [r["segments"] for r in again] == [r["segments"] for r in grid[4]]  # seeded coins


def test_assistant_logprobs_on_base_tokens(cross, tmp_path):
    base, tok, _, assistants = cross
    asst, atok = assistants["bpe"]
    store = teacher.build_store(tmp_path / "asst", RECORDS, teacher="asst", strategy="teacher", mode="score", k=1,
                                loaded=(asst, atok), progress=False)
    # one tokenizer on both sides: every piece is 1:1 and the mapping is the identity
    for e in distill.build_examples(RECORDS, atok):
        rec = store.get(e.id)
        logp, agree, pieces = collm.assistant_on_base(atok, atok, e, rec)
        assert all(p.kind == "1:1" for p in pieces)
        np.testing.assert_array_equal(logp, rec.token_logprobs.astype(np.float64))
        np.testing.assert_array_equal(agree, rec.topk_ids[:, 0] == rec.token_ids)
    # across tokenizers: a 1:1 piece carries the assistant's log-prob of that token, an n-token piece
    # its chain-rule log-prob split evenly; so every piece, and the whole solution, keeps its log-prob
    examples = distill.build_examples(RECORDS, tok)
    mapped, kinds = [], set()
    for e in examples:
        rec = store.get(e.id)
        logp, agree, pieces = collm.assistant_on_base(tok, atok, e, rec)
        lp, hit = rec.token_logprobs.astype(np.float64), rec.topk_ids[:, 0] == rec.token_ids
        assert len(logp) == len(e.input_ids) - e.n_prompt and logp.sum() == pytest.approx(lp.sum(), abs=1e-9)
        for p in pieces:
            kinds.add(p.kind)
            got = logp[p.a_start:p.a_end]
            assert got.sum() == pytest.approx(lp[p.b_start:p.b_end].sum(), abs=1e-9) and np.ptp(got) == 0
            assert (agree[p.a_start:p.a_end] == hit[p.b_start:p.b_end].all()).all()
            if p.kind == "1:1":
                assert got[0] == lp[p.b_start]
        assert logp[-1] == lp[-1] and agree[-1] == hit[-1]  # end-of-sequence
        mapped.append((logp, agree))
    assert "1:1" in kinds and len(kinds) > 1
    summary = collm.alignment_summary(tok, atok, examples, store)
    assert summary["pieces"] == sum(summary["kinds"].values()) and 0 < summary["share 1:1"] < 1
    assert set(summary["kinds"]) == kinds
    # the training features carry them, and weak labels are "the assistant agrees, the base's top-1 does not"
    feats = collm.frozen_features(base, tok, examples, store, batch_size=3, asst_tok=atok)
    np.testing.assert_allclose(feats.asst_logp.numpy(), np.concatenate([m[0] for m in mapped]), atol=1e-6)
    base_top1 = []
    for e in examples:
        with torch.no_grad():
            base_top1.append(base(input_ids=torch.tensor([e.input_ids])).logits[0, e.n_prompt - 1:-1].argmax(-1).numpy())
    targets = np.concatenate([e.input_ids[e.n_prompt:] for e in examples])
    labels = np.concatenate([m[1] for m in mapped]) & (np.concatenate(base_top1) != targets)
    np.testing.assert_array_equal(feats.labels.numpy(), labels.astype(np.float32))
    # the marginal NLL through the model equals the one on cached features; joint training reads the same values
    head = collm.DeferralHead(base.config.hidden_size)
    torch.nn.init.normal_(head.proj.weight, std=0.5)
    nll = collm.examples_nll(base, head, tok, examples, store, asst_tok=atok)
    assert nll == pytest.approx(collm.features_nll(head, feats), abs=1e-5)
    fresh = _chatty_model(tok, 0)  # LoRA wraps the model it is given
    _, hist = collm.train_joint(fresh, head, tok, examples[:2], store, val_examples=examples, val_store=store, epochs=1,
                                lr=1e-3, batch_size=2, lora={"lora_dropout": 0.0}, asst_tok=atok)
    assert hist["validation_before"] == pytest.approx(nll, abs=1e-5)


def test_across_tokenizers_refusals(cross, tmp_path):
    base, tok, _, assistants = cross
    asst, atok = assistants["bpe"]
    store = teacher.build_store(tmp_path / "asst", RECORDS, teacher="asst", strategy="teacher", mode="score", k=1,
                                loaded=(asst, atok), progress=False)
    examples = distill.build_examples(RECORDS, tok)
    with pytest.raises(ValueError, match="tokens of 'r0' differ from the training example"):
        collm.frozen_features(base, tok, examples, store)  # the assistant's tokenizer not given
    cut = distill.build_examples(RECORDS, tok, max_length=len(examples[0].input_ids) - 2)
    with pytest.raises(ValueError, match="'r0' .*does not end with end-of-sequence"):
        collm.frozen_features(base, tok, cut, store, asst_tok=atok)
    swapped = [Record(r.id, r.question, o.solution, o.answer) for r, o in zip(RECORDS, RECORDS[1:] + RECORDS[:1])]
    other = teacher.build_store(tmp_path / "other", swapped, teacher="asst", strategy="teacher", mode="score", k=1,
                                loaded=(asst, atok), progress=False)
    with pytest.raises(ValueError, match="tokens of 'r0' are not the assistant tokenizer's tokens"):
        collm.frozen_features(base, tok, examples, other, asst_tok=atok)
