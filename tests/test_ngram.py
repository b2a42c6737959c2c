import math

import pytest
import torch

from helpers.speculative.ngram import NgramModel, prompt_lookup

CORPUS = [[1, 2, 3, 1, 2, 4], [1, 2, 3, 5], [2, 3, 1, 2, 3]]


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("context", [[], [1], [1, 2], [9, 9], [7, 1, 2], [2, 3, 1, 2]])
def test_every_distribution_is_a_probability_vector_with_no_zero(order, context):
    m = NgramModel(vocab_size=10, order=order).fit(CORPUS)
    p = m.distribution(context)
    assert p.shape == (10,) and p.dtype == torch.float64
    assert abs(p.sum().item() - 1.0) < 1e-12 and (p > 0).all()


def test_bigram_by_hand():
    """Order 2 on [[1, 2, 1, 3]] (start marker s): bigrams s1, 12, 21, 13 seen once each, so
    D2 = 1 / (1 + 0) -> 0.9 (the cap); unigram continuation counts: 1 follows s and 2 (2), 2 and 3
    follow 1 (1 each); D1 = 2 / (2 + 2·1) = 0.5."""
    m = NgramModel(vocab_size=5, order=2).fit([[1, 2, 1, 3]])
    assert m.discount[1] == pytest.approx(0.5) and m.discount[2] == pytest.approx(0.9)
    uni = torch.tensor([0, 1.5, 0.5, 0.5, 0]) / 4 + 0.5 * 3 / 4 * torch.full((5,), 0.2)
    torch.testing.assert_close(m.unigram(), uni.double())
    # after token 1: seen twice (2 and 3), two types
    after1 = torch.tensor([0, 0, 0.1, 0.1, 0]) / 2 + 0.9 * 2 / 2 * uni
    torch.testing.assert_close(m.distribution([1]), after1.double())
    # an unseen history falls back to the unigram
    torch.testing.assert_close(m.distribution([4]), uni.double())


def test_unigram_follows_usage_not_uniform():
    g = torch.Generator().manual_seed(0)
    common = torch.randint(0, 20, (4000,), generator=g).tolist()  # text uses 20 of 1000 tokens
    m = NgramModel(vocab_size=1000, order=3).fit([common[i:i + 200] for i in range(0, 4000, 200)])
    uni = m.unigram()
    entropy = -(uni * uni.log()).sum().item()
    assert uni[:20].sum() > 0.9 and entropy < 0.6 * math.log(1000)


def test_greedy_continuation_reproduces_a_memorised_sequence():
    seq = [5, 8, 2, 9, 4, 7, 3]
    m = NgramModel(vocab_size=12, order=3).fit([seq] * 3)
    assert [int(m.distribution(seq[:i]).argmax()) for i in range(2, len(seq))] == seq[2:]


def test_fit_refuses_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match="token id 12 is outside the vocabulary of size 10"):
        NgramModel(10).fit([[1, 12]])


@pytest.mark.parametrize("seq, gamma, want", [
    ([1, 2, 3, 4, 9, 1, 2, 3], 2, [4, 9]),        # the longest suffix (1 2 3) seen before
    ([1, 2, 3, 4, 9, 1, 2, 3], 9, [4, 9, 1, 2, 3]),
    ([5, 6, 1, 7, 8, 1], 3, [7, 8, 1]),           # one token suffix: its latest earlier occurrence
    ([5, 6, 7], 3, []),                           # nothing to copy
    ([4, 4, 4], 2, [4]),                          # copies what follows, never past the end
    ([], 3, []), ([3], 3, []),
])
def test_prompt_lookup(seq, gamma, want):
    assert prompt_lookup(seq, gamma) == want


def _batch(rows, pad=0):
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def test_ngram_drafter_proposes_the_models_greedy_chain_and_rolls_forward():
    from helpers.speculative.drafters import Sampling
    from helpers.speculative.ngram import NgramDrafter

    seq = [5, 8, 2, 9, 4, 7, 3]
    m = NgramModel(vocab_size=12, order=3).fit([seq] * 3)
    d = NgramDrafter(m)
    d.reset(*_batch([[5, 8], [1, 5, 8, 2, 9]]))
    tokens, q = d.propose(3, Sampling())
    assert q is None and tokens.tolist() == [[2, 9, 4], [4, 7, 3]]
    d.commit([[2, 9], [4]])  # row 0 kept two drafts; row 1 one
    assert d.propose(2, Sampling())[0].tolist() == [[4, 7], [7, 3]]
    g = torch.Generator().manual_seed(0)
    tokens, q = d.propose(2, Sampling(do_sample=True, temperature=1.0, generator=g))
    assert q.shape == (2, 2, 12) and torch.allclose(q.sum(-1), torch.ones(2, 2))
    torch.testing.assert_close(q[0, 0].double(), m.distribution([2, 9]), atol=1e-6, rtol=0)


def test_prompt_lookup_drafter_pads_rows_without_a_match():
    from helpers.speculative.drafters import Sampling
    from helpers.speculative.ngram import PromptLookupDrafter

    d = PromptLookupDrafter(max_ngram=2)
    d.reset(*_batch([[1, 2, 3, 4, 1, 2], [7, 8, 9]]))
    tokens, q = d.propose(3, Sampling())
    assert q is None and tokens.tolist() == [[3, 4, 1], [-1, -1, -1]]
    d.commit([[3], [9]])  # row 1 now ends 9 9: the earlier 9 is followed by 9
    assert d.propose(2, Sampling())[0].tolist() == [[4, 1], [9, -1]]
