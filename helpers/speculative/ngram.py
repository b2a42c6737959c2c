"""Drafters that need no neural network: an n-gram model of the training solutions, and prompt lookup.

``NgramModel`` is an interpolated Kneser-Ney model (Chen & Goodman 1998) over token ids: the
highest order uses counts, the lower orders continuation counts (in how many distinct contexts a
token follows), each order discounts its counts by D (estimated per order as n1 / (n1 + 2·n2),
from the number of n-grams seen once and twice) and gives the freed mass to the next lower order,
down to a uniform distribution over the vocabulary. So every token has some probability, the
unigram level follows how tokens are actually used, and ``distribution`` is an exact
probability vector over the vocabulary, as a drafter's q must be.

Prompt lookup (Saxena 2023) copies: it finds the latest earlier occurrence of the sequence's last
few tokens (in the prompt or in what was generated so far) and proposes the tokens that followed it.
Its proposals are deterministic (q is one-hot on them).
"""
from __future__ import annotations

from collections import defaultdict

import torch

from .drafters import Drafter, Sampling


class NgramModel:
    """Interpolated Kneser-Ney over token ids, fitted on token sequences (e.g. training solutions)."""

    def __init__(self, vocab_size: int, order: int = 3):
        if order < 1:
            raise ValueError(f"order must be at least 1, got {order}")
        self.vocab_size, self.order = vocab_size, order
        # per order n (1..order): context tuple (length n - 1) -> {token: count}
        self.counts: list[dict[tuple, dict[int, int]]] = [defaultdict(dict) for _ in range(order + 1)]
        self.discount = [0.0] * (order + 1)
        self._totals: list[dict[tuple, tuple[int, int]]] = [{} for _ in range(order + 1)]

    def fit(self, sequences) -> "NgramModel":
        """Count the n-grams of every sequence, each left-padded with order − 1 start markers (-1),
        so every lower-order n-gram has a left neighbour to count continuations from."""
        pad = [-1] * (self.order - 1)
        grams: list[dict[tuple, int]] = [defaultdict(int) for _ in range(self.order + 1)]
        for seq in sequences:
            seq = [int(t) for t in seq]
            bad = [t for t in seq if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"token id {bad[0]} is outside the vocabulary of size {self.vocab_size}")
            s = pad + seq
            for n in range(1, self.order + 1):
                for i in range(max(0, len(pad) - n + 1), len(s) - n + 1):  # n-grams ending at a real token
                    grams[n][tuple(s[i:i + n])] += 1
        for n in range(1, self.order + 1):
            if n == self.order:
                counts = grams[n]
            else:  # continuation count: in how many distinct contexts the n-gram follows a token
                counts = defaultdict(int)
                for g in grams[n + 1]:
                    counts[g[1:]] += 1
            for g, c in counts.items():
                if g[-1] >= 0:  # never predict the start marker
                    self.counts[n][g[:-1]][g[-1]] = c
            n1 = sum(1 for h in self.counts[n].values() for c in h.values() if c == 1)
            n2 = sum(1 for h in self.counts[n].values() for c in h.values() if c == 2)
            self.discount[n] = min(0.9, max(0.1, n1 / (n1 + 2 * n2))) if n1 + n2 else 0.5
            self._totals[n] = {h: (sum(ws.values()), len(ws)) for h, ws in self.counts[n].items()}
        return self

    def distribution(self, context, max_order: int | None = None) -> torch.Tensor:
        """P(next token | the last order − 1 tokens of ``context``), a float64 vector over the
        vocabulary; a context shorter than that is the start of a sequence. ``max_order`` stops
        the interpolation at a lower order."""
        context = ((-1,) * (self.order - 1) + tuple(int(t) for t in context))[len(context):]
        p = torch.full((self.vocab_size,), 1.0 / self.vocab_size, dtype=torch.float64)
        for n in range(1, min(self.order, max_order or self.order) + 1):
            h = context[len(context) - (n - 1):] if n > 1 else ()
            total = self._totals[n].get(h)
            if total is None:
                continue  # an unseen history: the lower order's distribution stands
            count, types = total
            d = self.discount[n]
            ws = self.counts[n][h]
            ids = torch.tensor(list(ws), dtype=torch.long)
            cs = torch.tensor(list(ws.values()), dtype=torch.float64)
            p = p * (d * types / count)
            p.index_add_(0, ids, (cs - d).clamp_min(0.0) / count)
        return p

    def unigram(self) -> torch.Tensor:
        """The lowest order alone: continuation counts interpolated with the uniform floor."""
        return self.distribution((), max_order=1)


def prompt_lookup(sequence: list[int], gamma: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Up to ``gamma`` tokens copied from after the latest earlier occurrence of the longest suffix
    (``max_ngram`` down to ``min_ngram`` tokens) of ``sequence`` found elsewhere in it; [] if none."""
    n_tokens = len(sequence)
    for n in range(min(max_ngram, n_tokens - 1), min_ngram - 1, -1):
        suffix = sequence[n_tokens - n:]
        for start in range(n_tokens - n - 1, -1, -1):  # latest occurrence first, not the suffix itself
            if sequence[start:start + n] == suffix:
                return sequence[start + n:start + n + gamma]
    return []


class _SequenceDrafter(Drafter):
    """A drafter that needs only each row's tokens so far (the prompt, then what was committed)."""

    rows: list[list[int]]

    def reset(self, input_ids, attention_mask) -> None:
        self.rows = [[int(t) for t, m in zip(ids, mask) if m] for ids, mask in
                     zip(input_ids.tolist(), attention_mask.tolist())]

    def commit(self, new_tokens: list[list[int]]) -> None:
        for row, new in zip(self.rows, new_tokens):
            row.extend(new)


class NgramDrafter(_SequenceDrafter):
    """Drafts from an ``NgramModel``: at each step the model's distribution given the row's last
    tokens (greedy: its argmax; sampling: drawn from it after the run's temperature/top-p, and that
    processed distribution is q)."""

    def __init__(self, model: NgramModel, name: str = "n-gram"):
        self.model, self.name = model, name
        self.vocab_size = model.vocab_size
        self.rows: list[list[int]] = []

    def propose(self, gamma: int, sampling: Sampling):
        # drawn where the run's generator lives (the target's device): a CUDA generator cannot draw
        # for a CPU tensor
        dev = sampling.generator.device if sampling.generator is not None else torch.device("cpu")
        tokens = torch.zeros(len(self.rows), gamma, dtype=torch.long, device=dev)
        qs = torch.zeros(len(self.rows), gamma, self.vocab_size, device=dev) if sampling.do_sample else None
        for b, row in enumerate(self.rows):
            context = row[max(0, len(row) - self.model.order + 1):] if self.model.order > 1 else []
            for i in range(gamma):
                token, q = sampling.choose(self.model.distribution(context).log().float()[None].to(dev))
                tokens[b, i] = token[0]
                if qs is not None:
                    qs[b, i] = q[0]
                context = context + [int(token[0])]
        return tokens, qs


class PromptLookupDrafter(_SequenceDrafter):
    """Proposes the tokens that followed the latest earlier occurrence of the row's last
    ``max_ngram`` (down to 1) tokens, in the prompt or the text so far; deterministic (q one-hot).
    A row with no match proposes nothing this step."""

    def __init__(self, max_ngram: int = 3, name: str = "prompt lookup"):
        self.max_ngram, self.name = max_ngram, name
        self.rows: list[list[int]] = []

    def propose(self, gamma: int, sampling: Sampling):
        found = [prompt_lookup(row, gamma, self.max_ngram) for row in self.rows]
        width = max(map(len, found), default=0)
        tokens = torch.full((len(self.rows), width), -1, dtype=torch.long)
        for b, copy in enumerate(found):
            tokens[b, :len(copy)] = torch.tensor(copy, dtype=torch.long)
        return tokens, None
