"""Sparse top-k losses against exact full-vocabulary references."""
import math

import pytest
import torch

from helpers import losses

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


@pytest.mark.parametrize("k", [1, 5, 20])
def test_topk_with_tail_is_the_exact_folded_divergence(setup, k):
    """For k < V the loss is the exact KL between the (k + 1)-category folds described in the module."""
    s, t, y, m = setup
    ids, lps = sparse(t, k)
    p = torch.log_softmax(t, -1).gather(-1, ids).exp()
    p_fold = torch.cat([p, 1 - p.sum(-1, keepdim=True)], -1)
    q_all = torch.softmax(s.double(), -1)
    q = q_all.gather(-1, ids)
    q_fold = torch.cat([q, 1 - q.sum(-1, keepdim=True)], -1)
    ref = mean((p_fold * (p_fold.log() - q_fold.log())).sum(-1), m)
    torch.testing.assert_close(losses.forward_kl(s, ids, lps, m).double(), ref, atol=1e-4, rtol=0)
    assert losses.forward_kl(s, ids, lps, m) >= 0 and losses.reverse_kl(s, ids, lps, m) >= 0


def test_zero_when_student_equals_teacher(setup):
    _, t, y, m = setup
    for k in (4, V):
        ids, lps = sparse(t, k)
        s = t.float()
        for fn in (losses.forward_kl, losses.reverse_kl, losses.jsd):
            assert abs(fn(s, ids, lps, m).item()) < 1e-4


def test_gradients_flow_and_are_finite(setup):
    s, t, y, m = setup
    ids, lps = sparse(t, 4)
    s = s.clone().requires_grad_(True)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        s.grad = None
        loss, _ = losses.kd_loss(kind, s, y, m, ids, lps, T=2.0, alpha=1.0)
        loss.backward()
        assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
        assert s.grad[m == 0].abs().sum() == 0


def test_errors():
    z = torch.zeros(1, 1, 4)
    with pytest.raises(ValueError, match="unknown loss kind 'kl'"):
        losses.kd_loss("kl", z, torch.zeros(1, 1), torch.ones(1, 1))
    with pytest.raises(ValueError, match="needs the teacher"):
        losses.kd_loss("forward_kl", z, torch.zeros(1, 1), torch.ones(1, 1))
    with pytest.raises(ValueError, match="0 < beta < 1"):
        losses.jsd(z, torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), torch.ones(1, 1), beta=1.0)
    assert math.isnan(losses.kd_loss("ce", z, torch.zeros(1, 1), torch.ones(1, 1))[1]["kd"])
