"""Continuous batching (``backends.continuous``): token for token what ``generate`` writes, however
many rows are in flight, with the same capture, stop reasons and loop stops."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from helpers.backends import continuous
from helpers.backends.capture import prompt_ids
from helpers.backends.transformers_engine import TransformersEngine, generate_with_capture

TEXTS = ["Natalia sold clips", "How many", "Weng earns $12 an hour for babysitting. Yesterday",
         "Question: what is 3 + 4?", "0 1 2", "clips in May", "The answer is", "Answer: 7. #### 7"]


@pytest.fixture(scope="module")
def stopping():
    """A tiny Llama whose greedy text varies (weights drawn wider than the default, which repeats one
    token), with extra end-of-sequence ids chosen from what it writes, so rows end at many different
    steps (a random model rarely writes its tokenizer's eos)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import make_tokenizer

    tok = make_tokenizer()
    tok.padding_side = "left"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, initializer_range=0.2)).eval()
    free = [r["token_ids"] for r in generate_with_capture(model, tok, prompt_ids(tok, TEXTS * 2), capture=False,
                                                             max_new_tokens=24)]

    def spread(stops):  # distinct steps at which rows would end, while some row never ends
        ends = [next((j for j, t in enumerate(seq) if t in stops), None) for seq in free]
        return len(set(ends)) if None in ends else 0

    stops: set[int] = set()
    for _ in range(4):  # a few extra end ids, each chosen to spread the end steps most
        stops.add(max({t for seq in free for t in seq} - stops, key=lambda t: spread(stops | {t})))
    model.generation_config.eos_token_id = [tok.eos_token_id, *sorted(stops)]
    return model, tok


def _reference(model, tok, ids, batch, **kw):
    return [row for b in range(0, len(ids), batch) for row in generate_with_capture(model, tok, ids[b:b + batch], **kw)]


@pytest.mark.parametrize("rows_in_flight", [1, 3, 8])
def test_greedy_rows_and_capture_equal_generate(stopping, rows_in_flight):
    model, tok = stopping
    ids = prompt_ids(tok, TEXTS * 2)
    want = _reference(model, tok, ids, 4, k=8, max_new_tokens=24)
    got = continuous.decode(model, tok, ids, batch_size=rows_in_flight, k=8, max_new_tokens=24)
    stops = Counter(r["stop"] for r in want)
    assert stops["eos"] >= 3 and stops["cap"] >= 1 and len({len(r["token_ids"]) for r in want}) >= 3
    for g, w in zip(got, want):
        assert g["token_ids"] == w["token_ids"] and g["stop"] == w["stop"] and g["response"] == w["response"]
        np.testing.assert_array_equal(g["topk_ids"], w["topk_ids"])
        for key in ("topk_logprobs", "tail_logprobs", "token_logprobs"):
            np.testing.assert_allclose(g[key], w[key], atol=1e-5, rtol=0)


def test_loop_stops_equal_generate(loaded):
    """A model that repeats itself: loop stops at the same token as ``LoopStop`` inside ``generate``."""
    model, tok = loaded
    ids = prompt_ids(tok, TEXTS)
    want = _reference(model, tok, ids, 3, capture=False, max_new_tokens=120, stop_loops=True)
    got = continuous.decode(model, tok, ids, batch_size=2, max_new_tokens=120, stop_loops=True)
    assert any(r["stop"] == "loop" for r in want)
    assert [(r["token_ids"], r["stop"]) for r in got] == [(r["token_ids"], r["stop"]) for r in want]


def test_sampling_is_seeded_and_rows_arrive_as_they_end(stopping):
    model, tok = stopping
    ids = prompt_ids(tok, TEXTS)
    seen = []
    torch.manual_seed(3)
    a = continuous.decode(model, tok, ids, batch_size=3, max_new_tokens=20, do_sample=True, temperature=0.8,
                          top_p=0.9, on_row=lambda i, row: seen.append((i, row["token_ids"])))
    torch.manual_seed(3)
    b = continuous.decode(model, tok, ids, batch_size=3, max_new_tokens=20, do_sample=True, temperature=0.8, top_p=0.9)
    assert [r["token_ids"] for r in a] == [r["token_ids"] for r in b]
    assert sorted(seen) == sorted((i, r["token_ids"]) for i, r in enumerate(a))
    assert [i for i, _ in seen] != list(range(len(ids)))  # short rows came back before long ones


def test_engine_refills_and_falls_back(stopping, monkeypatch):
    """The transformers engine decodes a shard with refilling; a model whose cache cannot be
    refilled (``supported`` False) goes through ``generate`` in batches, with the same rows."""
    model, tok = stopping
    ids = prompt_ids(tok, TEXTS)
    engine = TransformersEngine(model, tok, batch_size=3)
    refilled = engine.generate(ids, k=4, max_new_tokens=16)
    monkeypatch.setattr(continuous, "supported", lambda model: False)
    batched = engine.generate(ids, k=4, max_new_tokens=16)
    assert [r["token_ids"] for r in refilled] == [r["token_ids"] for r in batched]


def test_sliding_window_models_are_not_refilled():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=8, sliding_window=4)
    assert not continuous.supported(Gemma3ForCausalLM(cfg))
    with pytest.raises(ValueError, match="batch_size"):
        continuous.decode(None, None, [], batch_size=0, max_new_tokens=1)


def test_shared_prefix_window_moves_and_compaction_keep_rows_equal_generate(stopping, monkeypatch):
    """Prompts that open alike (a chat template's system turn) have that prefix run once and copied;
    with many more steps than the buffer has columns the window is moved back to its start, and the
    last rows are compacted: greedy rows and captures still equal ``generate``'s."""
    model, tok = stopping
    ids = prompt_ids(tok, [f"System: answer briefly. Question: {t}" for t in TEXTS * 3])
    assert len(continuous._shared_prefix(ids)) >= 5
    calls = Counter()
    for name in ("_rewind", "compact"):
        original = getattr(continuous._Batch, name)
        monkeypatch.setattr(continuous._Batch, name,
                            lambda self, *a, _f=original, _n=name: (calls.update([_n]), _f(self, *a))[1])
    want = _reference(model, tok, ids, 4, k=8, max_new_tokens=24)
    got = continuous.decode(model, tok, ids, batch_size=3, k=8, max_new_tokens=24)
    assert calls["_rewind"] >= 2 and calls["compact"] >= 1
    for g, w in zip(got, want):
        assert g["token_ids"] == w["token_ids"] and g["stop"] == w["stop"]
        np.testing.assert_array_equal(g["topk_ids"], w["topk_ids"])
        for key in ("topk_logprobs", "tail_logprobs", "token_logprobs"):
            np.testing.assert_allclose(g[key], w[key], atol=1e-5, rtol=0)
