"""Non-neural drafters through the speculative loop, and the measurements notebook 05 reports."""
import pytest
import torch

from helpers import models
from helpers.prompts import student_messages
from helpers.speculative import report, speculative_generate, truncated_drafter
from helpers.speculative.ngram import NgramDrafter, NgramModel, PromptLookupDrafter

QUESTIONS = ["Tom has 3 apples and buys 4 more. How many?", "What is 10 - 5?",
             "Natalia sold 48 clips in April and half as many in May. How many altogether?"]


def _greedy(model, tok, prompt, n):
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return report._cut_at_eos(out[0, enc["input_ids"].shape[1]:].tolist(), model, tok)


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_ngram_and_prompt_lookup_drafts_leave_greedy_output_unchanged(loaded, gamma):
    model, tok = loaded
    prompts = [models.prompt_text(tok, student_messages(q)) for q in QUESTIONS]
    want = [_greedy(model, tok, p, 20) for p in prompts]
    # an n-gram model fitted on the target's own outputs drafts well; prompt lookup copies
    ngram = NgramModel(len(tok), order=3).fit([tok(p).input_ids + w for p, w in zip(prompts, want)])
    for drafter in (NgramDrafter(ngram), PromptLookupDrafter()):
        rows, stats = speculative_generate(model, drafter, tok, prompts, gamma=gamma, max_new_tokens=20)
        assert [r["token_ids"] for r in rows] == want, drafter.name
        assert 0 <= stats.accepted <= stats.evaluated <= stats.drafted
    one, stats = speculative_generate(model, NgramDrafter(ngram), tok, prompts[:1], gamma=gamma, max_new_tokens=20)
    assert one[0]["token_ids"] == want[0] and stats.alpha()[0] > 0.5  # it memorised these answers


def test_greedy_agreement_is_the_same_through_either_path(loaded):
    """A model drafter's one-pass agreement equals the generic reset/propose path, position by position."""
    model, tok = loaded
    prompt = models.prompt_text(tok, student_messages(QUESTIONS[2]))
    ids = tok(prompt).input_ids
    out = _greedy(model, tok, prompt, 12)
    drafter = truncated_drafter(model, 1, tok)
    fast = report.greedy_agreement(drafter, tok, ids, out)

    class Generic(type(drafter)):
        pass

    slow_drafter = Generic(drafter.model, tokenizer=tok)
    slow = []
    from helpers.speculative.drafters import Sampling
    for t in range(len(out)):
        seq = torch.tensor([ids + out[:t]])
        slow_drafter.reset(seq, torch.ones_like(seq))
        slow.append(int(slow_drafter.propose(1, Sampling())[0][0, 0]) == out[t])
    assert fast == slow and len(fast) == len(out)
    kinds = report.acceptance_by_kind(drafter, tok, [ids], [out])
    assert sum(n for _, n in kinds.values()) == len(out)
    assert sum(a for a, _ in kinds.values()) == sum(fast)


@pytest.mark.parametrize("text, kind", [("7", "digit"), (" 48", "digit"), ("1,2", "digit"), (" +", "operator"),
                                        ("=", "operator"), (" $", "operator"), (" apples", "word"), ("\n", "other"),
                                        (" ", "other"), ("##", "other")])
def test_token_kind(text, kind):
    assert report.token_kind(text) == kind


def test_predicted_speedup_formula():
    assert report.predicted_speedup(0.0, 4, 0.1) == pytest.approx(1 / 1.4)
    assert report.predicted_speedup(1.0, 4, 0.1) == pytest.approx(5 / 1.4)
    a, g, c = 0.8, 3, 0.2
    assert report.predicted_speedup(a, g, c) == pytest.approx((1 - a ** 4) / ((1 - a) * (g * c + 1)))


def test_speculative_plot(tmp_path):
    import pandas as pd

    from helpers import plots

    table = pd.DataFrame([{"drafter": d, "gamma": g, "alpha": 0.5, "alpha_low": 0.4, "alpha_high": 0.6,
                           "measured_speedup": 1.1, "predicted_speedup": 1.2} for d in ("a", "b") for g in (1, 3)])
    plots.speculative_curves(table, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_a_drafter_that_proposes_nothing_still_hears_every_commit(loaded):
    """Prompt lookup often finds nothing to copy; it must still be told what the target wrote, or
    its view of the sequence goes stale and it never proposes again."""
    from helpers.speculative.drafters import Drafter

    class Silent(Drafter):
        name = "silent"

        def reset(self, input_ids, attention_mask):
            self.heard = [[] for _ in range(input_ids.shape[0])]

        def propose(self, gamma, sampling):
            return torch.full((len(self.heard), 0), -1, dtype=torch.long), None

        def commit(self, new_tokens):
            for row, new in zip(self.heard, new_tokens):
                row.extend(new)

    model, tok = loaded
    prompts = [models.prompt_text(tok, student_messages(q)) for q in QUESTIONS]
    drafter = Silent()
    rows, stats = speculative_generate(model, drafter, tok, prompts, gamma=3, max_new_tokens=12)
    # every committed token but the very last one reaches the drafter (the last iteration asks no drafts)
    for heard, row in zip(drafter.heard, rows):
        assert row["token_ids"][:len(heard)] == heard and len(heard) >= len(row["token_ids"]) - 1
    assert stats.drafted == 0 and stats.evaluated == 0
