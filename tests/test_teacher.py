import numpy as np
import pytest
import torch

from helpers import models
from helpers.artifacts import read_manifest, write_manifest
from helpers.backends import capture
from helpers.backends import transformers_engine as hf
from helpers.data import Record
from helpers.kd import teacher
from helpers.kd.logit_store import FIELDS, STORE_FORMAT, LogitStore
from helpers.prompts import student_messages

RECORDS = [Record(f"r{i}", q, f"{i} + 1 = {i + 1}\n#### {i + 1}", float(i + 1)) for i, q in enumerate([
    "Tom has 3 apples and buys 4 more. How many?", "What is 10 - 5?",
    "Natalia sold 48 clips in April and half as many in May. How many altogether?", "What is 2 * 6?",
    "Weng earns $12 an hour for babysitting 50 minutes. How much?"])]


def _prompts(tok, recs=RECORDS):
    return [models.prompt_text(tok, student_messages(r.question)) for r in recs]


def test_capture_does_not_change_generation(loaded):
    model, tok = loaded
    with_cap = hf.generate_with_capture(model, tok, _prompts(tok), k=8, max_new_tokens=10)
    plain = hf.generate_with_capture(model, tok, _prompts(tok), k=8, max_new_tokens=10, capture=False)
    assert [r["token_ids"] for r in with_cap] == [r["token_ids"] for r in plain]
    for r in with_cap:
        n = len(r["token_ids"])
        assert r["topk_ids"].shape == (n, 8) and r["topk_logprobs"].shape == (n, 8) and r["token_logprobs"].shape == (n,)
        assert r["tail_logprobs"].shape == (n,) and r["tail_logprobs"].dtype == np.float32
        # greedy: the token taken is the teacher's top-1
        assert list(r["topk_ids"][:, 0]) == r["token_ids"]


def test_capture_matches_a_full_forward_pass(loaded):
    """The recorded log-probs are the model's full-vocabulary log-softmax at each generated position."""
    model, tok = loaded
    prompt = _prompts(tok)[2]
    row = hf.generate_with_capture(model, tok, [prompt], k=len(tok), max_new_tokens=8)[0]
    p_ids = tok(prompt, add_special_tokens=False).input_ids
    full = torch.tensor([p_ids + row["token_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(full).logits[0].float(), -1)[len(p_ids) - 1:-1]
    torch.testing.assert_close(torch.from_numpy(row["token_logprobs"]),
                               logp.gather(1, torch.tensor(row["token_ids"])[:, None]).squeeze(1), atol=1e-5, rtol=0)
    top = logp.topk(len(tok), -1)
    torch.testing.assert_close(torch.from_numpy(row["topk_logprobs"]).float(), top.values, atol=2e-2, rtol=1e-3)
    assert np.isneginf(row["tail_logprobs"]).all()  # k covers the vocabulary: the tail is empty
    # with k < vocabulary: the tail is the exact log-mass outside the top-k, in fp32
    row8 = hf.generate_with_capture(model, tok, [prompt], k=8, max_new_tokens=8)[0]
    assert row8["token_ids"] == row["token_ids"]
    outside = torch.ones_like(logp, dtype=torch.bool).scatter(1, torch.from_numpy(row8["topk_ids"]).long(), False)
    tail = torch.log((logp.double().exp() * outside).sum(-1))
    torch.testing.assert_close(torch.from_numpy(row8["tail_logprobs"]).double(), tail, atol=1e-5, rtol=0)


def test_sampled_capture_records_the_raw_distribution(loaded):
    """With sampling at T = 0.5 and top-p, the store still holds the untempered distribution."""
    model, tok = loaded
    prompt = _prompts(tok)[0]
    torch.manual_seed(0)
    row = hf.generate_with_capture(model, tok, [prompt], k=len(tok), max_new_tokens=6, do_sample=True,
                                        temperature=0.5, top_p=0.9)[0]
    p_ids = tok(prompt, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([p_ids + row["token_ids"]])).logits[0, len(p_ids) - 1:-1].float()
    raw = torch.log_softmax(logits, -1).gather(1, torch.tensor(row["token_ids"])[:, None]).squeeze(1)
    torch.testing.assert_close(torch.from_numpy(row["token_logprobs"]), raw, atol=1e-5, rtol=0)
    tempered = torch.log_softmax(logits / 0.5, -1).gather(1, torch.tensor(row["token_ids"])[:, None]).squeeze(1)
    assert not torch.allclose(raw, tempered, atol=1e-3)


def test_score_mode_agrees_with_generation(loaded):
    """Teacher forcing of the generated text gives the same numbers as the capture during generation."""
    model, tok = loaded
    prompts = _prompts(tok)
    gen = hf.generate_with_capture(model, tok, prompts, k=16, max_new_tokens=8)
    ids = [r["token_ids"] for r in gen]
    # score exactly these token ids: bypass detokenisation by scoring through the same tokenizer round trip
    texts = [tok.decode(t) for t in ids]
    assert [tok(t, add_special_tokens=False).input_ids for t in texts] == ids
    scored = hf.score_with_capture(model, tok, prompts, texts, k=16)
    for g, s in zip(gen, scored):
        n = len(g["token_ids"])
        assert s["token_ids"][:n] == g["token_ids"] and s["token_ids"][n] == tok.eos_token_id
        np.testing.assert_allclose(s["token_logprobs"][:n], g["token_logprobs"], atol=1e-4)
        np.testing.assert_allclose(s["tail_logprobs"][:n], g["tail_logprobs"], atol=1e-4)
        assert (s["topk_ids"][:n] == g["topk_ids"]).all()


def _store_arrays(store):
    return {rid: (store.get(rid).response, *[getattr(store.get(rid), f).tolist()
                  for f in FIELDS]) for rid in store.ids()}


def test_resumed_store_equals_uninterrupted(loaded, tiny_dir, tmp_path):
    kw = dict(teacher=tiny_dir, strategy="teacher", k=8, max_new_tokens=6, batch_size=2, shard_size=2,
              loaded=loaded, progress=False)
    whole = teacher.build_store(tmp_path / "whole", RECORDS, **kw)
    assert whole.complete and whole.ids() == [r.id for r in RECORDS]
    part = teacher.build_store(tmp_path / "part", RECORDS, stop_after_shards=1, **kw)
    assert not part.complete and len(part) == 2
    resumed = teacher.build_store(tmp_path / "part", RECORDS, **kw)
    assert resumed.complete
    assert _store_arrays(resumed) == _store_arrays(whole)
    assert read_manifest(tmp_path / "part") == read_manifest(tmp_path / "whole")
    for s in range(3):
        name = f"shard-{s:05d}.safetensors"
        assert (tmp_path / "part" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    # the arrays cost exactly 6·k + 12 bytes per token; the rest is the per-shard header (ids, texts)
    import struct
    payload = 0
    for s in range(3):
        raw = (tmp_path / "whole" / f"shard-{s:05d}.safetensors").read_bytes()
        payload += len(raw) - 8 - struct.unpack("<Q", raw[:8])[0]
    assert payload - 8 * (len(RECORDS) + 3) == whole.tokens() * (6 * 8 + 12)  # offsets: n + 1 int64 per shard


def test_changed_settings_start_afresh(loaded, tiny_dir, tmp_path):
    kw = dict(teacher=tiny_dir, strategy="base", max_new_tokens=4, batch_size=4, shard_size=4,
              loaded=loaded, progress=False)
    a = teacher.build_store(tmp_path / "s", RECORDS, k=4, **kw)
    assert a.k == 4
    b = teacher.build_store(tmp_path / "s", RECORDS, k=6, **kw)
    assert b.k == 6 and b.get("r0").topk_ids.shape[1] == 6


def test_score_mode_store_covers_reference_solutions(loaded, tiny_dir, tmp_path):
    store = teacher.build_store(tmp_path / "gh", RECORDS, teacher=tiny_dir, strategy="gold-hint", mode="score",
                                k=4, batch_size=3, shard_size=10, loaded=loaded, progress=False)
    _, tok = loaded
    rec = store.get("r3")
    assert list(rec.token_ids) == tok(RECORDS[3].solution, add_special_tokens=False).input_ids + [tok.eos_token_id]
    with pytest.raises(KeyError, match="'nope'"):
        store.get("nope")


def test_tokenizer_mismatch_is_refused(loaded, tiny_dir, tmp_path):
    store = teacher.build_store(tmp_path / "s", RECORDS[:2], teacher=tiny_dir, strategy="base", k=4,
                                max_new_tokens=3, loaded=loaded, progress=False)
    store.check_tokenizer(models.tokenizer_fingerprint(loaded[1]))
    with pytest.raises(ValueError, match="token ids would not line up"):
        store.check_tokenizer("0123456789abcdef")
    with pytest.raises(FileNotFoundError, match="not a teacher logit store"):
        LogitStore(tmp_path / "nothing")
    with pytest.raises(ValueError, match="unknown teacher mode"):
        teacher.build_store(tmp_path / "x", RECORDS, teacher=tiny_dir, strategy="base", mode="beam", loaded=loaded)


def _kw(loaded, tiny_dir):
    return dict(teacher=tiny_dir, strategy="teacher", k=8, max_new_tokens=6, batch_size=2, shard_size=2,
                loaded=loaded, progress=False)


def test_damaged_shard_is_named_and_rebuilt(loaded, tiny_dir, tmp_path, capsys):
    whole = teacher.build_store(tmp_path / "whole", RECORDS, **_kw(loaded, tiny_dir))
    store_dir = tmp_path / "s"
    teacher.build_store(store_dir, RECORDS, **_kw(loaded, tiny_dir))
    shard = store_dir / "shard-00001.safetensors"
    good = shard.read_bytes()
    # truncated: the reader refuses it when opening, in one line naming the file and the remedy
    shard.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError) as err:
        LogitStore(store_dir)
    msg = str(err.value)
    assert str(shard) in msg and "re-run notebooks/01_teacher_logits" in msg and "\n" not in msg
    assert err.value.__context__ is None
    # the writer names it, rebuilds it, and the store equals an undamaged one
    capsys.readouterr()
    rebuilt = teacher.build_store(store_dir, RECORDS, **_kw(loaded, tiny_dir))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and str(shard) in lines[0] and "damaged" in lines[0], lines
    assert shard.read_bytes() == good
    assert _store_arrays(rebuilt) == _store_arrays(whole)
    # garbage of the same size: the header still parses, the digest does not match on first load
    garbled = bytearray(good)
    garbled[-20:] = b"\xff" * 20
    shard.write_bytes(bytes(garbled))
    store = LogitStore(store_dir)
    with pytest.raises(ValueError, match="shard-00001.safetensors is damaged") as err:
        store.get("r2")
    assert str(shard) in str(err.value) and "re-run notebooks/01_teacher_logits" in str(err.value)
    # garbage in the header: the same one-line message, not a safetensors traceback
    shard.write_bytes(b"\x07" * len(good))
    with pytest.raises(ValueError, match="shard-00001.safetensors is damaged") as err:
        LogitStore(store_dir)
    assert err.value.__suppress_context__  # raised "from None": no safetensors traceback above it
    teacher.build_store(store_dir, RECORDS, **_kw(loaded, tiny_dir))
    assert shard.read_bytes() == good


def test_leftover_temporaries_are_removed(loaded, tiny_dir, tmp_path):
    store_dir = tmp_path / "s"
    teacher.build_store(store_dir, RECORDS, stop_after_shards=1, **_kw(loaded, tiny_dir))
    stray = store_dir / ".shard-00001.safetensors.abc.tmp"
    stray.write_bytes(b"half a shard")
    store = teacher.build_store(store_dir, RECORDS, **_kw(loaded, tiny_dir))
    assert store.complete and not stray.exists()
    assert sorted(p.name for p in store_dir.iterdir()) == ["manifest.json"] + [f"shard-{s:05d}.safetensors"
                                                                               for s in range(3)]


def test_old_format_store_is_refused_and_rebuilt(loaded, tiny_dir, tmp_path):
    store_dir = tmp_path / "s"
    teacher.build_store(store_dir, RECORDS[:2], **_kw(loaded, tiny_dir))
    manifest = read_manifest(store_dir)
    old = {**manifest, "settings": {k: v for k, v in manifest["settings"].items() if k != "format"}}
    write_manifest(store_dir, old)
    with pytest.raises(ValueError, match="store format 1") as err:
        LogitStore(store_dir)
    assert str(store_dir) in str(err.value) and "re-run notebooks/01_teacher_logits" in str(err.value)
    store = teacher.build_store(store_dir, RECORDS[:2], **_kw(loaded, tiny_dir))
    assert store.manifest["settings"]["format"] == STORE_FORMAT and np.isfinite(store.get("r0").tail_logprobs).all()


@pytest.mark.parametrize("text", [
    "Step 1: 3 + 4 = 7.\n" + "The total amount of money earned is 12 * 18 = 216.\n\n" * 3,
    "Start.\n" + "".join(f"The total cost of the fee is ${i} + $12 = ${i + 12}.\n" for i in range(0, 48, 12)),
    "Intro line here.\n" + "He has 4 eggs and she has 5 eggs now.\nSo together they have 9 eggs in all.\n" * 3,
])
def test_repetition_loop_is_seen_numbers_aside(text):
    assert capture.repetition_loop(text)


@pytest.mark.parametrize("text", [
    "The total is 12 * 18 = 216 dollars in all.\n" * 2,                      # two repeats only
    "- 5 eggs\n- 6 eggs\n- 7 eggs\n- 8 eggs\n",                              # short list items
    "Janet has 16 eggs.\nShe eats 3 for breakfast.\nShe bakes with 4.\nShe sells the rest: 9.\n",
    "The total amount of money earned is 216 so far.\n" * 2 + "The total amount of money earned is 2",  # last line unfinished
    "",
])
def test_repetition_loop_leaves_ordinary_text_alone(text):
    assert not capture.repetition_loop(text)


def test_token_loop_needs_an_exact_block_repeated():
    assert capture.token_loop([5, 6, 7] * 16) and capture.token_loop([9] * 48)
    assert not capture.token_loop([9] * 47)                                   # shorter than min_length
    assert not capture.token_loop(list(range(200)))
    assert not capture.token_loop([1, 2, 3] * 15 + [1, 2, 4])


class _Decoder:
    """A stand-in tokenizer: token i decodes to word i, token 0 to a newline."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join("\n" if i == 0 else f"w{i} " for i in ids)


def test_loop_stop_stops_only_the_looping_rows():
    prompt = [[1, 2], [1, 2], [1, 2]]
    loop = ([3, 4, 5, 6, 7, 8, 0] * 8)[:48]             # one 6-word line again and again
    plain = list(range(10, 58))                            # never repeats
    ended = [11, 99] + [99] * 46                           # eos (99) already written
    stop = hf.LoopStop(_Decoder(), prompt_length=2, eos=[99], every=8)
    ids = torch.tensor([p + s for p, s in zip(prompt, [loop, plain, ended])])
    assert stop(ids[:, :-1], None).tolist() == [False, False, False]  # 47 new tokens: not a multiple of 8
    assert stop(ids, None).tolist() == [True, False, False] and stop.stopped_at == {0: 48}
    assert stop(torch.cat([ids, ids[:, -1:]], 1), None).tolist() == [True, False, False]  # stays stopped


def test_stopping_loops_only_shortens_rows(loaded):
    """With ``stop_loops`` each row is a prefix of the row generated without it; a row cut short
    is one the detector calls a loop, and every row says why it ended."""
    model, tok = loaded
    plain = hf.generate_with_capture(model, tok, _prompts(tok), k=4, max_new_tokens=96)
    stopped = hf.generate_with_capture(model, tok, _prompts(tok), k=4, max_new_tokens=96, stop_loops=True)
    assert any(r["stop"] == "loop" for r in stopped)  # the untrained tiny model loops
    for a, b in zip(plain, stopped):
        assert a["token_ids"][:len(b["token_ids"])] == b["token_ids"]
        assert b["stop"] in ("eos", "loop", "cap") and b["finished"] == (b["stop"] == "eos")
        assert np.array_equal(a["topk_ids"][:len(b["token_ids"])], b["topk_ids"])
        if b["stop"] == "loop":
            ids = b["token_ids"]
            assert capture.token_loop(ids) or capture.repetition_loop(tok.decode(ids, skip_special_tokens=True))
            assert len(ids) % 8 == 0  # the detector looks every 8 new tokens
        else:
            assert b["token_ids"] == a["token_ids"] and b["stop"] == a["stop"]
