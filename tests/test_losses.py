"""Sparse top-k losses against exact full-vocabulary references."""
import math

import pytest
import torch

from helpers.kd import losses

V, B, L = 50, 3, 7


@pytest.fixture
def setup():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(B, L, V, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(B, L, V, generator=g, dtype=torch.float64) * 2
    targets = torch.randint(0, V, (B, L), generator=g)
    mask = torch.ones(B, L)
    mask[0, :2] = 0   # prompt positions
    mask[2, -3:] = 0  # padding
    return student.float(), teacher, targets, mask


def sparse(teacher_logits, k):
    lp = torch.log_softmax(teacher_logits, -1)
    v, i = lp.topk(k, -1)
    return i, v.float()


def sparse_with_tail(teacher_logits, k):
    """Top-k ids, their log-probs and the exact tail log-mass (float64, then float32, like the store)."""
    lp = torch.log_softmax(teacher_logits.double(), -1)
    v, i = lp.topk(k, -1)
    tail = torch.logsumexp(lp.scatter(-1, i, float("-inf")), -1)
    return i, v.float(), tail.float()


def mean(x, mask):
    return (x * mask).sum() / mask.sum()


def ref_kl(logp, logq):
    return (logp.exp() * (logp - logq)).sum(-1)


@pytest.mark.parametrize("T", [1.0, 2.0, 0.7])
def test_full_vocabulary_equivalence(setup, T):
    s, t, y, m = setup
    ids, lps = sparse(t, V)
    lp = torch.log_softmax(t / T, -1)
    lq = torch.log_softmax(s.double() / T, -1)
    fwd = mean(ref_kl(lp, lq), m)
    rev = mean(ref_kl(lq, lp), m)
    torch.testing.assert_close(losses.forward_kl(s, ids, lps, m, T).double(), fwd, atol=1e-5, rtol=0)
    torch.testing.assert_close(losses.reverse_kl(s, ids, lps, m, T).double(), rev, atol=1e-5, rtol=0)
    for beta in (0.1, 0.5, 0.9):
        lm = torch.log(beta * lp.exp() + (1 - beta) * lq.exp())
        ref = mean(beta * ref_kl(lp, lm) + (1 - beta) * ref_kl(lq, lm), m)
        torch.testing.assert_close(losses.jsd(s, ids, lps, m, T, beta).double(), ref, atol=1e-5, rtol=0)


def test_cross_entropy_and_mixture(setup):
    s, t, y, m = setup
    ce_ref = mean(torch.nn.functional.cross_entropy(s.reshape(-1, V), y.reshape(-1), reduction="none").reshape(B, L), m)
    torch.testing.assert_close(losses.cross_entropy(s, y, m), ce_ref.float(), atol=1e-5, rtol=0)
    ids, lps = sparse(t, V)
    T, alpha = 2.0, 0.3
    loss, parts = losses.kd_loss("forward_kl", s, y, m, ids, lps, T=T, alpha=alpha)
    fwd = mean(ref_kl(torch.log_softmax(t / T, -1), torch.log_softmax(s.double() / T, -1)), m)
    torch.testing.assert_close(loss.double(), alpha * T * T * fwd + (1 - alpha) * ce_ref, atol=1e-5, rtol=0)
    assert parts["kd"] == pytest.approx(fwd.item(), abs=1e-5)
    ce_only, _ = losses.kd_loss("ce", s, y, m)
    torch.testing.assert_close(ce_only, ce_ref.float(), atol=1e-5, rtol=0)


def test_masked_positions_do_not_count(setup):
    s, t, y, m = setup
    ids, lps = sparse(t, 8)
    s2 = s.clone()
    s2[m == 0] = torch.randn_like(s2[m == 0]) * 10  # anything at masked positions
    for kind in ("forward_kl", "reverse_kl", "jsd", "ce"):
        a, _ = losses.kd_loss(kind, s, y, m, ids, lps, T=1.5)
        b, _ = losses.kd_loss(kind, s2, y, m, ids, lps, T=1.5)
        torch.testing.assert_close(a, b)


def folds64(student_logits, teacher_logits, k, T):
    """An independent float64 reference of the definition: both sides folded at T = 1 into the
    teacher's top-k ids + one tail (the tail summed in probability space from the full softmax),
    then tempered identically."""
    lt = torch.log_softmax(teacher_logits.double(), -1)
    ls = torch.log_softmax(student_logits.double(), -1)
    ids = lt.topk(k, -1).indices
    outside = torch.ones_like(lt, dtype=torch.bool).scatter(-1, ids, False)

    def fold(logp):
        tail = (logp.exp() * outside).sum(-1, keepdim=True).log()
        return torch.log_softmax(torch.cat([logp.gather(-1, ids), tail], -1) / T, -1)

    return fold(lt), fold(ls)


def ref_jsd(lp, lq, beta):
    lm = torch.log(beta * lp.exp() + (1 - beta) * lq.exp())
    return beta * ref_kl(lp, lm) + (1 - beta) * ref_kl(lq, lm)


@pytest.mark.parametrize("T", [0.5, 2.0, 6.0])
@pytest.mark.parametrize("k", [1, 5, 20])
def test_matches_float64_reference_of_the_one_fold_definition(setup, k, T):
    """k < V and T != 1: the losses are the exact divergences between the tempered (k + 1)-way folds,
    with the stored tail and with the tail derived from the top-k."""
    s, t, y, m = setup
    ids, lps, tail = sparse_with_tail(t, k)
    lp, lq = folds64(s, t, k, T)
    refs = {"forward_kl": mean(ref_kl(lp, lq), m), "reverse_kl": mean(ref_kl(lq, lp), m),
            "tv": mean(0.5 * (lp.exp() - lq.exp()).abs().sum(-1), m)}
    for beta in (0.1, 0.5, 0.9):
        refs[f"jsd{beta}"] = mean(ref_jsd(lp, lq, beta), m)
    for given in (tail, None):
        got = {"forward_kl": losses.forward_kl(s, ids, lps, m, T, tail_logprobs=given),
               "reverse_kl": losses.reverse_kl(s, ids, lps, m, T, tail_logprobs=given),
               "tv": losses.total_variation(s, ids, lps, m, T, tail_logprobs=given)}
        for beta in (0.1, 0.5, 0.9):
            got[f"jsd{beta}"] = losses.jsd(s, ids, lps, m, T, beta, tail_logprobs=given)
        for name, ref in refs.items():
            assert abs(got[name].item() - ref.item()) <= 1e-5, (name, given is None, got[name].item(), ref.item())
    # the mixture: alpha · T² · KD + (1 - alpha) · CE, with the same KD
    ce = mean(torch.nn.functional.cross_entropy(s.double().reshape(-1, V), y.reshape(-1), reduction="none").reshape(B, L), m)
    loss, parts = losses.kd_loss("reverse_kl", s, y, m, ids, lps, T=T, alpha=0.3, tail_logprobs=tail)
    assert parts["kd"] == pytest.approx(refs["reverse_kl"].item(), abs=1e-5)
    assert loss.item() == pytest.approx(0.3 * T * T * refs["reverse_kl"].item() + 0.7 * ce.item(), abs=1e-4)


def equal_student_divergences(s, ids, lps, tail, m, T):
    """Every kind's KD value for student logits ``s`` (which require grad), with its gradient."""
    out = {}
    fns = {"forward_kl": lambda: losses.forward_kl(s, ids, lps, m, T, tail_logprobs=tail),
           "reverse_kl": lambda: losses.reverse_kl(s, ids, lps, m, T, tail_logprobs=tail),
           "tv": lambda: losses.total_variation(s, ids, lps, m, T, tail_logprobs=tail)}
    for beta in (0.1, 0.5, 0.9):
        fns[f"jsd{beta}"] = lambda beta=beta: losses.jsd(s, ids, lps, m, T, beta, tail_logprobs=tail)
    for kind in ("forward_kl", "reverse_kl", "jsd", "tv"):
        fns[f"kd_loss {kind}"] = lambda kind=kind: losses.kd_loss(kind, s, m.long(), m, ids, lps, T=T, alpha=1.0,
                                                                  tail_logprobs=tail)[0] / (T * T)
    for name, fn in fns.items():
        s.grad = None
        value = fn()
        value.backward()
        out[name] = (value.item(), s.grad.abs().max().item())
    return out


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 6.0])
@pytest.mark.parametrize("k", [8, 64, None])
def test_student_equal_to_teacher_has_zero_loss_and_zero_gradient(T, k):
    """A divergence between a distribution and itself is zero however it is tempered or folded."""
    Vb = 3000
    g = torch.Generator().manual_seed(1)
    t = torch.randn(2, 3, Vb, generator=g, dtype=torch.float64) * 3
    ids, lps, tail = sparse_with_tail(t, k or Vb)
    s = t.float().requires_grad_(True)
    m = torch.ones(2, 3)
    for name, (value, grad) in equal_student_divergences(s, ids, lps, tail, m, T).items():
        assert abs(value) <= 1e-6 and grad <= 1e-6, (name, value, grad)
    _, parts = losses.kd_loss("jsd", s, m.long(), m, ids, lps, T=T, alpha=0.5, tail_logprobs=tail)
    assert abs(parts["kd"]) <= 1e-6, parts


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 6.0])
def test_confident_teacher_tiny_tail_equal_student(T):
    """One logit far above the rest: the tail is ~1e-12, below fp32 resolution of 1 - sum(top-k).
    Tempering at T = 6 raises it to ~1e-2, so it must be exact on both sides."""
    Vb, k = 3000, 8
    g = torch.Generator().manual_seed(2)
    t = torch.randn(2, 3, Vb, generator=g, dtype=torch.float64)
    t[..., 7] += 35.0
    ids, lps, tail = sparse_with_tail(t, k)
    assert (tail < math.log(1e-10)).all() and (tail > math.log(1e-14)).all()
    s = t.float().requires_grad_(True)
    m = torch.ones(2, 3)
    for name, (value, grad) in equal_student_divergences(s, ids, lps, tail, m, T).items():
        assert abs(value) <= 1e-6 and grad <= 1e-6, (name, value, grad)


@pytest.mark.parametrize("k", [4, V])
def test_gradients_flow_are_finite_and_filler_counts_nothing(setup, k):
    """Masked positions hold filler (ids 0 repeated, log-probs -30, tail 0); with k = V the tail is
    empty on both sides. Values and gradients stay finite and masked positions get no gradient."""
    s, t, y, m = setup
    ids, lps, tail = sparse_with_tail(t, k)
    ids[m == 0], lps[m == 0], tail[m == 0] = 0, -30.0, 0.0
    if k == V:
        tail[m == 1] = float("-inf")  # what the teacher stores when its ids cover the vocabulary
    s = s.clone().requires_grad_(True)
    for kind in ("forward_kl", "reverse_kl", "jsd", "tv"):
        for T in (0.5, 1.0, 2.0):
            for given in (tail, None):
                s.grad = None
                loss, _ = losses.kd_loss(kind, s, y, m, ids, lps, T=T, alpha=0.7, tail_logprobs=given)
                loss.backward()
                assert torch.isfinite(loss) and torch.isfinite(s.grad).all(), (kind, T)
                assert s.grad.abs().sum() > 0 and s.grad[m == 0].abs().sum() == 0, (kind, T)
    # the folds themselves: the tail is exactly -inf on both sides when the ids cover the vocabulary
    lp = losses.fold_teacher(lps, 2.0, tail, vocab_size=V)
    lq = losses.fold_student(s, ids, 2.0)
    assert lp.shape == lq.shape == (B, L, k + 1)
    assert bool(torch.isneginf(lp[..., -1][m == 1]).all()) == (k == V)
    assert bool(torch.isneginf(lq[..., -1]).all()) == (k == V)


def test_errors():
    z = torch.zeros(1, 1, 4)
    with pytest.raises(ValueError, match="unknown loss kind 'kl'"):
        losses.kd_loss("kl", z, torch.zeros(1, 1), torch.ones(1, 1))
    with pytest.raises(ValueError, match="needs the teacher"):
        losses.kd_loss("forward_kl", z, torch.zeros(1, 1), torch.ones(1, 1))
    with pytest.raises(ValueError, match="0 < beta < 1"):
        losses.jsd(z, torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), torch.ones(1, 1), beta=1.0)
    assert math.isnan(losses.kd_loss("ce", z, torch.zeros(1, 1), torch.ones(1, 1))[1]["kd"])


def test_outside_logsumexp_matches_a_masked_reference_and_its_gradient():
    """The student's tail: summed over the entries outside the ids, also where every outside entry
    is far below the largest logit (the shifted sum underflows there and is recomputed)."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(3, 5, 40, generator=g, dtype=torch.float64) * 3
    ids = torch.stack([torch.randperm(40, generator=g)[:6] for _ in range(15)]).view(3, 5, 6)
    z[0, 0, ids[0, 0, 0]] = 200.0  # outside entries ~200 nats below the maximum
    ids[1, 1, 1] = ids[1, 1, 0]  # a repeated id (filler rows repeat id 0)
    ref = torch.logsumexp(z.scatter(-1, ids, float("-inf")), -1)
    got = losses.outside_logsumexp(z, ids)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: losses.outside_logsumexp(x, ids), (z.clone().requires_grad_(True),))
    # float32, as in training: the tail of a confident row keeps its relative precision
    z32 = z.float().requires_grad_(True)
    torch.testing.assert_close(losses.outside_logsumexp(z32, ids).double(), ref, rtol=0, atol=1e-5)


def test_inside_out_logsumexp_matches_both_references_and_their_gradients():
    """The fused normaliser and tail of a KD step, including rows whose tail is far below the total."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, 6, 50, generator=g, dtype=torch.float64) * 3
    ids = torch.stack([torch.randperm(50, generator=g)[:7] for _ in range(12)]).view(2, 6, 7)
    z[0, 0, ids[0, 0, 0]] = 150.0  # tail ~150 nats below the total: the far-row path
    z[1, 2, ids[1, 2, 3]] = 60.0   # ~60 nats below: the fused path
    lse, out = losses.logsumexp_inside_out(z, ids)
    torch.testing.assert_close(lse, torch.logsumexp(z, -1), rtol=0, atol=1e-12)
    torch.testing.assert_close(out, torch.logsumexp(z.scatter(-1, ids, float("-inf")), -1), rtol=0, atol=1e-12)
    w = torch.randn(2, 2, 6, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: sum((t * wi).sum() for t, wi in zip(losses.logsumexp_inside_out(x, ids), w)),
                                    (z.clone().requires_grad_(True),))


# --- chunked loss from hidden states (large vocabularies) ---------------------------------------------

@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tv", "ce"])
@pytest.mark.parametrize("T", [0.5, 1.0, 2.0])
def test_chunked_loss_equals_the_plain_loss_in_value_and_gradient(kind, T):
    """``chunked_kd_loss`` from hidden states and the LM head equals ``kd_loss`` on the full logits
    (fp32, 1e-5) for every divergence, chunk sizes below, around and above the counted positions,
    with masked positions inside and a bias on the head."""
    g = torch.Generator().manual_seed(3)
    B, L, H, V, k = 2, 23, 12, 97, 6
    h = torch.randn(B, L, H, generator=g)
    W, bias = torch.randn(V, H, generator=g) * 0.7, torch.randn(V, generator=g)
    targets = torch.randint(0, V, (B, L), generator=g)
    mask = torch.ones(B, L)
    mask[0, :4] = 0
    mask[1, 17:] = 0
    ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(B * L)]).view(B, L, k)
    lps = torch.log_softmax(torch.randn(B, L, k, generator=g), -1) - 0.4
    tail = torch.log1p(-lps.exp().sum(-1))
    for chunk in (1, 7, 64):
        h1, W1, b1 = (t.clone().requires_grad_() for t in (h, W, bias))
        h2, W2, b2 = (t.clone().requires_grad_() for t in (h, W, bias))
        ref, ref_parts = losses.kd_loss(kind, torch.nn.functional.linear(h1, W1, b1), targets, mask, ids, lps, T=T, alpha=0.7,
                                 tail_logprobs=tail)
        got, parts = losses.chunked_kd_loss(kind, h2, W2, targets, mask, ids, lps, T=T, alpha=0.7, tail_logprobs=tail,
                                     lm_head_bias=b2, chunk=chunk)
        assert got.item() == pytest.approx(ref.item(), abs=1e-5)
        assert parts["ce"] == pytest.approx(ref_parts["ce"], abs=1e-5)
        ref.backward()
        got.backward()
        for a, b in ((h1, h2), (W1, W2), (b1, b2)):
            assert torch.allclose(a.grad, b.grad, atol=1e-5)
