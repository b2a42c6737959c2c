"""Speculative decoding: greedy output equals the target's greedy ``generate``, sampling is lossless
(χ² against the exact joint distribution, and a wrong residual fails it), α matches Σ min(p, q),
caches are rolled back to the committed length, and neither model is changed."""
import copy
import itertools
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from helpers.backends import transformers_engine as hf
from helpers.speculative import (
    Drafter,
    ModelDrafter,
    ReducedHead,
    Sampling,
    acceptance_rate,
    decode,
    draft_vocabulary,
    expected_tokens_per_call,
    restrict_vocabulary,
    speculative_decode,
    speculative_generate,
    truncated_drafter,
    truncated_model,
)

PROMPTS = ["Question: what is 3 + 4?", "Natalia sold clips to 48 of her friends in April, and then",
           "Weng earns $12 an hour"]
N_NEW = 24
HALF = list(range(0, 300, 2))


def llama(vocab: int, layers: int, seed: int, *, hidden: int = 32, init: float = 0.3, eos=None, pad=0):
    """A tiny random fp32 Llama; a wide init so its text depends on the context (the default init
    writes one token over and over, which every drafter predicts)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=eos, pad_token_id=pad, bos_token_id=None, tie_word_embeddings=True,
                      initializer_range=init)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    from conftest import make_tokenizer

    t = make_tokenizer()
    t.padding_side = "left"
    return t


@pytest.fixture(scope="module")
def target(tok):
    """A 3-layer target whose second end-of-sequence id is a token it writes in row 0's answer but
    never in row 1's, so batches mix rows that stop at eos with rows that hit the cap."""
    model = llama(len(tok), 3, 0, eos=tok.eos_token_id, pad=tok.pad_token_id)
    free = hf.generate_with_capture(model, tok, PROMPTS, capture=False, max_new_tokens=N_NEW)
    row0, row1 = free[0]["token_ids"], free[1]["token_ids"]
    stop = next(t for j, t in enumerate(row0) if j >= 12 and t not in row0[:j] and t not in row1)
    model.generation_config.eos_token_id = [tok.eos_token_id, stop]
    return model


@pytest.fixture(scope="module")
def reference(target, tok):
    return {b: hf.generate_with_capture(target, tok, PROMPTS[:b], capture=False, max_new_tokens=N_NEW)
            for b in (1, 3)}


def make_drafter(kind, target, tok):
    if kind == "truncated":
        return truncated_drafter(target, 1)
    if kind == "reduced":  # a head over every other token id
        return truncated_drafter(target, 1, vocab_ids=HALF)
    if kind == "unrelated":
        return ModelDrafter(llama(len(tok), 2, 7, init=0.1), name="unrelated")
    return ModelDrafter(copy.deepcopy(target), name="copy of the target")


@pytest.mark.parametrize("kind", ["truncated", "unrelated", "reduced"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_greedy_equals_target_generate(target, tok, reference, kind, batch, gamma):
    ref = reference[batch]
    rows, stats = speculative_generate(target, make_drafter(kind, target, tok), tok, PROMPTS[:batch],
                                       gamma=gamma, max_new_tokens=N_NEW)
    for r, x in zip(rows, ref):
        assert r["token_ids"] == x["token_ids"]
        assert (r["finished"], r["stop"], r["response"]) == (x["finished"], x["stop"], x["response"])
    if batch == 3:  # one row stops at eos, another runs to the cap
        assert rows[0]["finished"] and not rows[1]["finished"]
    if kind == "reduced":  # drafts from the reduced head were accepted and rejected
        assert 0 < stats.accepted < stats.evaluated
    assert stats.generated == sum(len(r["token_ids"]) for r in rows)
    assert stats.target_calls == len(stats.iterations) <= stats.generated
    assert sum(stats.evaluated_at) == stats.evaluated and sum(stats.accepted_at) == stats.accepted


@pytest.mark.parametrize("do_sample", [False, True])
def test_drafter_equal_to_target_accepts_everything(target, tok, do_sample):
    gamma = 3
    rows, stats = speculative_generate(target, make_drafter("copy", target, tok), tok, PROMPTS, gamma=gamma,
                                       max_new_tokens=N_NEW, do_sample=do_sample, seed=1)
    assert stats.accepted == stats.evaluated > 0  # drafted can be more: drafts past eos or the cap are not examined
    assert stats.alpha()[0] == 1.0
    left = [len(r["token_ids"]) for r in rows]
    for it in stats.iterations:  # γ + 1 tokens per target call, except a row's last iteration
        for b, n in enumerate(it["committed"]):
            if n:
                left[b] -= n
                assert n == gamma + 1 or left[b] == 0
    assert left == [0, 0, 0]
    assert stats.tokens_per_target_call() > 0.8 * (gamma + 1)


def _prompt_lengths(tok, prompts):
    return [len(tok(p, add_special_tokens=False).input_ids) for p in prompts]


class CheckedDrafter(ModelDrafter):
    """A ModelDrafter that checks its cache after every rollback: cached + pending tokens equal the
    committed sequence, at most two pending, and the physical KV length equals the mask's width."""

    def reset(self, input_ids, attention_mask):
        super().reset(input_ids, attention_mask)
        self.total = attention_mask.sum(1).tolist()
        self.checks = 0

    def commit(self, new_tokens):
        super().commit(new_tokens)
        for b, new in enumerate(new_tokens):
            self.total[b] += len(new)
        cached, pending = self.cached_tokens(), self.pending_tokens()
        assert [c + p for c, p in zip(cached, pending)] == self.total
        assert all(p <= 2 for p in pending)
        assert self.state.length() == self.state.mask.shape[1]
        self.checks += 1


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("do_sample", [False, True])
def test_caches_hold_the_committed_tokens_after_every_rollback(target, tok, batch, do_sample):
    drafter = CheckedDrafter(truncated_model(target, 2))
    prompts = PROMPTS[:batch]
    rows, stats = speculative_generate(target, drafter, tok, prompts, gamma=4, max_new_tokens=N_NEW,
                                       do_sample=do_sample, seed=3)
    assert drafter.checks == stats.drafter_calls > 0
    done = _prompt_lengths(tok, prompts)
    for it in stats.iterations:
        done = [d + n for d, n in zip(done, it["committed"])]
        # the target's cache holds every committed token but the last (read next time)
        assert it["target_cached"] == [d - 1 for d in done]
        assert it["cache_slots"] == it["cache_length"]
        if batch == 1:  # one row: the rollback is an exact crop
            assert it["cache_slots"] == it["target_cached"][0]
    assert [d - p for d, p in zip(done, _prompt_lengths(tok, prompts))] == [len(r["token_ids"]) for r in rows]
    if batch == 3:  # rows accepted different counts in one iteration
        assert any(len(set(it["accepted"])) > 1 for it in stats.iterations)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_models_are_unchanged_and_the_truncated_drafter_is_a_copy(target, tok):
    before, config = _state(target), target.config.to_dict()
    drafter = truncated_drafter(target, 2)
    assert _same(_state(target), before) and target.config.to_dict() == config
    assert len(drafter.model.model.layers) == drafter.model.config.num_hidden_layers == 2
    theirs = {t.data_ptr() for t in itertools.chain(target.parameters(), target.buffers())}
    assert not theirs & {t.data_ptr() for t in itertools.chain(drafter.model.parameters(), drafter.model.buffers())}
    assert drafter.model.lm_head.weight is drafter.model.model.embed_tokens.weight  # tied like the target's
    # its logits: the target's hidden state after two layers through the final norm and LM head
    ids = tok(PROMPTS[:1], return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = target(ids, output_hidden_states=True).hidden_states[2]
        expected = target.lm_head(target.model.norm(hidden))
        torch.testing.assert_close(drafter.model(ids).logits, expected)
    snapshot = copy.deepcopy(drafter.model)
    for do_sample in (False, True):
        speculative_generate(target, drafter, tok, PROMPTS, gamma=3, max_new_tokens=12, do_sample=do_sample)
    assert _same(_state(drafter.model), _state(snapshot))
    assert _same(_state(target), before)


# ---------------------------------------------------------------- a drafter with a reduced head
def test_a_reduced_head_is_the_full_head_at_its_ids_and_minus_infinity_elsewhere(target, tok):
    """The id map round-trips: the logit at id ids[i] is row i's, equal to the full copy's logit there,
    every other id is -inf, so the argmax is ids[the best row]. The rows are copies, untied from the
    embeddings (which keep every id), and stay so when transformers ties weights again."""
    before = _state(target)
    ids = torch.tensor([7, 2, 40, 3, 299])  # in any order
    full, reduced = truncated_model(target, 2), truncated_model(target, 2, vocab_ids=ids)
    x = tok(PROMPTS[:1], return_tensors="pt").input_ids
    with torch.no_grad():
        want, got = full(x).logits, reduced(x).logits
    head = reduced.lm_head
    assert isinstance(head, ReducedHead) and tuple(head.weight.shape) == (5, 32)
    assert torch.equal(head.rows[ids], torch.arange(5)) and torch.equal(head.ids[head.rows[ids]], ids)
    torch.testing.assert_close(got[..., ids], want[..., ids])
    outside = torch.ones(len(tok), dtype=torch.bool)
    outside[ids] = False
    assert (head.rows[outside] == 5).all()
    assert torch.isneginf(got[..., outside]).all() and torch.isfinite(got[..., ids]).all()
    assert torch.equal(got.argmax(-1), ids[want[..., ids].argmax(-1)])
    assert reduced.model.embed_tokens.weight.shape[0] == len(tok)
    reduced.tie_weights()
    assert tuple(reduced.lm_head.weight.shape) == (5, 32)
    assert reduced.lm_head.weight.data_ptr() != reduced.model.embed_tokens.weight.data_ptr()
    assert _same(_state(target), before)
    with pytest.raises(ValueError, match="distinct"):
        ReducedHead(torch.zeros(2, 32), torch.tensor([4, 4]), len(tok))


def test_a_reduced_drafter_proposes_only_its_ids_and_its_q_is_zero_elsewhere(target, tok):
    drafter = truncated_drafter(target, 1, vocab_ids=HALF)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    outside = torch.ones(len(tok), dtype=torch.bool)
    outside[HALF] = False
    for sampling in (Sampling(), Sampling(do_sample=True, temperature=0.9, top_p=0.9,
                                          generator=torch.Generator().manual_seed(0))):
        drafter.reset(enc.input_ids, enc.attention_mask)
        tokens, q = drafter.propose(4, sampling)
        assert set(tokens.flatten().tolist()) <= set(HALF)
        if sampling.do_sample:
            assert (q[..., outside] == 0).all() and (q.gather(-1, tokens[..., None]) > 0).all()
            torch.testing.assert_close(q.sum(-1), torch.ones(q.shape[:2]))


def test_draft_vocabulary_takes_the_ids_the_target_puts_most_mass_on():
    import numpy as np

    from helpers.kd.distill import Example

    def example(ids, probs):
        return Example("x", [0] * (len(ids) + 1), 1, np.array(ids), np.log(np.array(probs, dtype=np.float32)))

    # mass: id 4 1.5, id 1 0.5, ids 5 and 7 0.25 each (a tie: the lower id first), id 9 none
    examples = [example([[4, 1], [4, 5]], [[0.5, 0.5], [0.75, 0.25]]), example([[4, 7]], [[0.25, 0.25]])]
    assert draft_vocabulary(examples, 2, 10).tolist() == [1, 4]
    assert draft_vocabulary(examples, 3, 10).tolist() == [1, 4, 5]
    assert draft_vocabulary(examples, 3, 10, keep=[9]).tolist() == [1, 4, 9]
    for size in (0, 11):
        with pytest.raises(ValueError, match="size must be in"):
            draft_vocabulary(examples, size, 10, keep=[9])


def test_a_drafter_with_another_vocabulary_is_refused_in_one_line(target, tok):
    drafter = ModelDrafter(llama(len(tok) + 5, 1, 0), name="other")
    with pytest.raises(ValueError, match="vocabulary of 305 token ids but the target has 300") as err:
        speculative_generate(target, drafter, tok, PROMPTS, gamma=2, max_new_tokens=4)
    assert "\n" not in str(err.value)


def test_alpha_matches_the_mean_overlap_of_p_and_q(target, tok):
    """α (accepted ÷ evaluated) estimates Σ_x min(p(x), q(x)) averaged over the evaluated positions;
    computed here by teacher forcing both models on the output, at exactly those positions."""
    drafter = ModelDrafter(llama(len(tok), 2, 7, init=0.1))
    prompts = PROMPTS * 4
    rows, stats = speculative_generate(target, drafter, tok, prompts, gamma=3, max_new_tokens=32, do_sample=True,
                                       temperature=0.9, seed=5)
    sampling = Sampling(do_sample=True, temperature=0.9)
    lengths = _prompt_lengths(tok, prompts)
    overlap = []
    for b, (prompt, row) in enumerate(zip(prompts, rows)):
        ids = torch.tensor([tok(prompt, add_special_tokens=False).input_ids + row["token_ids"]])
        with torch.no_grad():
            p, q = sampling.probs(target(ids).logits[0]), sampling.probs(drafter.model(ids).logits[0])
        beta = torch.minimum(p, q).sum(-1)  # beta[i]: overlap for the token at i + 1
        start = 0
        for it in stats.iterations:
            for j in range(start, start + it["evaluated"][b]):
                overlap.append(float(beta[lengths[b] - 1 + j]))
            start += it["committed"][b]
    assert len(overlap) == stats.evaluated > 100
    alpha, low, high = stats.alpha()
    mean = sum(overlap) / len(overlap)
    assert low <= mean <= high, (alpha, low, high, mean)
    assert 0.2 < alpha < 0.9
    assert stats.accepted_per_drafted() < alpha  # drafts after a rejection are never examined


# ---------------------------------------------------------------- sampling is lossless (χ²)
V, N_SAMPLES, PROMPT = 8, 20000, [1, 5, 3, 7]
TINY = Sampling(do_sample=True, temperature=0.9, top_p=0.9)


class EchoDrafter(Drafter):
    """A deterministic drafter (q is None, i.e. one-hot): proposes the last token again; odd rows
    make one proposal and mark the rest "no proposal" (-1)."""

    name = "echo"

    def reset(self, input_ids, attention_mask):
        self.last = input_ids[:, -1].clone()

    def propose(self, gamma, sampling):
        drafts = self.last[:, None].repeat(1, gamma)
        drafts[1::2, 1:] = -1
        return drafts, None

    def commit(self, new_tokens):
        self.last = torch.tensor([t[-1] if t else int(x) for t, x in zip(new_tokens, self.last)])


@pytest.fixture(scope="module")
def tiny():
    """Tiny-vocabulary target and drafter, and the target's exact joint distribution of the first
    three tokens (processed by ``Sampling.probs``, as the loop does), by enumeration."""
    t, d = llama(V, 2, 0, hidden=16, init=0.2), llama(V, 1, 1, hidden=16, init=0.2)
    pairs = torch.tensor(list(itertools.product(range(V), repeat=2)))
    with torch.no_grad():
        p = TINY.probs(t(torch.cat([torch.tensor([PROMPT]).repeat(len(pairs), 1), pairs], 1)).logits[:, 3:])
    joint = p[:, 0].gather(1, pairs[:, :1]) * p[:, 1].gather(1, pairs[:, 1:]) * p[:, 2]  # [x1 x2, x3]
    return t, d, joint.flatten().double()


def chi2_pvalue(samples: list[list[int]], joint: torch.Tensor) -> tuple[float, int]:
    """Pearson χ² of the sampled triples against ``joint`` (cells expecting < 5 pooled); (p, samples
    in cells of probability zero)."""
    obs = torch.bincount(torch.tensor(samples) @ torch.tensor([V * V, V, 1]), minlength=V ** 3).double()
    exp = joint * len(samples)
    big = exp >= 5
    rest = exp[~big].sum()
    stat = ((obs[big] - exp[big]) ** 2 / exp[big]).sum() + ((obs[~big].sum() - rest) ** 2 / rest if rest > 0 else 0)
    df = int(big.sum()) - (0 if rest > 0 else 1)
    p = torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2)
    return float(p), int(obs[joint == 0].sum())


def _sample(t, drafter, seed=0):
    ids = torch.tensor([PROMPT]).repeat(N_SAMPLES, 1)
    sampling = Sampling(do_sample=True, temperature=TINY.temperature, top_p=TINY.top_p,
                        generator=torch.Generator().manual_seed(seed))
    out, stats = speculative_decode(t, drafter, ids, torch.ones_like(ids), gamma=2, max_new_tokens=3,
                                    sampling=sampling, eos=[])
    assert all(len(o) == 3 for o in out)
    return out, stats


@pytest.mark.parametrize("kind", ["model", "reduced", "echo"])
def test_sampling_is_lossless_and_a_wrong_residual_is_caught(tiny, monkeypatch, kind):
    t, d, joint = tiny
    drafter = {"model": lambda: ModelDrafter(d), "echo": EchoDrafter,
               "reduced": lambda: ModelDrafter(restrict_vocabulary(copy.deepcopy(d), [0, 2, 3, 5, 6]))}[kind]
    out, stats = _sample(t, drafter())
    assert 0.1 < stats.alpha()[0] < 0.9 and stats.evaluated > stats.accepted  # rejections happened
    p, impossible = chi2_pvalue(out, joint)
    assert impossible == 0 and p > 1e-3, p
    # the published mistake: after a rejection, resample from p instead of norm(max(0, p - q))
    monkeypatch.setattr(decode, "residual_distribution", lambda p, q: p)
    wrong, _ = _sample(t, drafter())
    assert chi2_pvalue(wrong, joint)[0] < 1e-6


# ---------------------------------------------------------------- small pieces
def test_acceptance_rate_and_prediction():
    a, low, high = acceptance_rate(8, 10)
    assert a == 0.8 and low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert all(math.isnan(x) for x in acceptance_rate(0, 0))
    assert expected_tokens_per_call(0.5, 3) == pytest.approx(1.875) and expected_tokens_per_call(1.0, 4) == 5


def test_sampling_probs_temperature_top_p_and_greedy():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).log_softmax(-1) * 1.0
    p = Sampling(do_sample=True, temperature=1.0, top_p=0.8).probs(logits)
    full = logits.softmax(-1)  # masses ≈ .64 .24 .09 .03: the two most likely reach 0.8
    torch.testing.assert_close(p, torch.cat([full[:2] / full[:2].sum(), torch.zeros(2)]))
    torch.testing.assert_close(Sampling(do_sample=True, temperature=0.5).probs(logits), (logits / 0.5).softmax(-1))
    assert Sampling().probs(logits).tolist() == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="top_p"):
        Sampling(do_sample=True, top_p=0.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (not present on this machine)")
@pytest.mark.parametrize("kind", ["truncated", "reduced", "copy", "ngram", "prompt-lookup"])
def test_every_drafter_samples_on_the_targets_device(target, tok, kind):
    """On a GPU the run's generator lives on the target's device: every drafter draws there (the
    n-gram drafter drew on the CPU with it, which fails)."""
    from helpers.speculative.ngram import NgramDrafter, NgramModel, PromptLookupDrafter

    gpu_target = copy.deepcopy(target).cuda()
    if kind == "ngram":
        corpus = [tok(p).input_ids for p in PROMPTS]
        drafter = NgramDrafter(NgramModel(vocab_size=len(tok), order=3).fit(corpus))
    elif kind == "prompt-lookup":
        drafter = PromptLookupDrafter()
    else:
        drafter = make_drafter(kind, gpu_target, tok)
    rows, stats = speculative_generate(gpu_target, drafter, tok, PROMPTS, gamma=3, max_new_tokens=12, do_sample=True,
                                       seed=0)
    assert stats.generated == sum(len(r["token_ids"]) for r in rows) > 0
