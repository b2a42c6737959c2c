"""Teacher engines behind one interface (``helpers.backends``).

One conformance check, ``conform``, holds every engine to the ``transformers`` reference on the same
token ids: the rows have the store's fields, shapes and dtypes; scored texts get the same top-1 id
wherever the reference's two most likely tokens are not tied, and log-probs within a tolerance
stated per engine (zero for ``transformers`` itself; the quantised GGUF's for ``llama_cpp``); greedy
generation writes the same tokens up to the first near-tie of the reference. ``transformers`` runs
it on a tiny model; ``llama_cpp`` on the embedded SmolLM2 GGUF (skipped, with the reason, where
``llama-cpp-python`` is not installed); ``vllm``, ``exllamav2`` and ``exllamav3`` are marked ``gpu``
and skipped without CUDA. Without a GPU, the CUDA engines are held to their libraries' interfaces as
recorded from the libraries' source (``tests/data/*_api.json``, written by ``scripts/record_api.py``):
stand-ins that accept only those names run the engines on a tiny model on the CPU."""
import importlib.util
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import backends, models
from helpers.backends import capture
from helpers.backends import transformers_engine as hf
from helpers.backends.transformers_engine import TransformersEngine
from helpers.data import load_splits, plain_solution
from helpers.kd import teacher
from helpers.kd.logit_store import LogitStore

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (not present on this machine)")


@dataclass
class Tolerance:
    tie: float        # a reference gap (nats) between its two most likely tokens below this is a tie
    mean_abs: float   # mean |Δ log-prob| of the tokens read or written
    max_abs: float    # largest |Δ log-prob| of those tokens with reference probability > 0.1
    tail: float       # largest |Δ| of the log-mass outside the top-k where it is above log 0.01


EXACT = Tolerance(tie=0.0, mean_abs=1e-6, max_abs=1e-5, tail=1e-5)
# llama.cpp runs the Q4_1 weights with 8-bit activations; the reference is the de-quantised model
GGUF_Q4 = Tolerance(tie=1.0, mean_abs=0.1, max_abs=0.75, tail=0.75)
# a CUDA engine in fp16 against the transformers engine in fp16 on the same GPU (the gpu-marked tests
# here and scripts/gpu_check.py): the same weights, other kernels and summation orders
GPU_FP16 = Tolerance(tie=0.05, mean_abs=5e-3, max_abs=5e-2, tail=5e-2)


def _problems(tok, n=6, source="gsm_symbolic"):
    recs = load_splits(source, n_train=n)["train"]
    prompts = capture.prompt_ids(tok, [models.prompt_text(tok, [{"role": "user", "content": r.question}])
                                       for r in recs])
    return prompts, capture.text_ids(tok, [plain_solution(r.solution) for r in recs])


def _check_row(row, k):
    n = len(row["token_ids"])
    assert set(row) >= {"token_ids", "response", "finished", "stop", "topk_ids", "topk_logprobs",
                        "tail_logprobs", "token_logprobs"}
    assert row["topk_ids"].shape == row["topk_logprobs"].shape == (n, k)
    assert row["tail_logprobs"].shape == row["token_logprobs"].shape == (n,)
    assert (row["topk_ids"].dtype, row["topk_logprobs"].dtype) == (np.int32, np.float16)
    assert row["tail_logprobs"].dtype == row["token_logprobs"].dtype == np.float32
    assert row["stop"] in ("eos", "loop", "cap") and row["finished"] == (row["stop"] == "eos")
    assert np.all(np.diff(row["topk_logprobs"].astype(np.float32), axis=1) <= 0)  # sorted, most likely first


def unnamed(row: dict, ids) -> dict:
    """A reference row as an engine sees it that cannot name ``ids`` (a text server's pieces that
    several ids share) except the token read or written at each position: their probability moved
    from the top-k into the tail, the rest moved up."""
    out = {**row, "topk_ids": row["topk_ids"].copy(), "topk_logprobs": row["topk_logprobs"].copy(),
           "tail_logprobs": row["tail_logprobs"].copy()}
    taken = np.asarray(row["token_ids"])[:len(row["topk_ids"]), None]
    drop = np.isin(row["topk_ids"], list(ids)) & (row["topk_ids"] != taken)  # the token read or written is named
    for j in np.flatnonzero(drop.any(1)):
        lps = row["topk_logprobs"][j].astype(np.float64)
        out["tail_logprobs"][j] = np.logaddexp.reduce([float(row["tail_logprobs"][j]), *lps[drop[j]]])
        kept = ~drop[j]
        n = int(kept.sum())
        out["topk_ids"][j, :n], out["topk_ids"][j, n:] = row["topk_ids"][j][kept], -1
        out["topk_logprobs"][j, :n], out["topk_logprobs"][j, n:] = row["topk_logprobs"][j][kept], -np.inf
    return out


def conform(engine, reference, tol: Tolerance, *, k=8, max_new_tokens=24, unnameable=(), n=6, source="gsm_symbolic"):
    """``engine`` against ``reference`` (a TransformersEngine) on the same token ids (``n`` problems
    of ``source`` scored, the first 3 written); returns the measured differences. ``unnameable``: ids
    the engine cannot name (``unnamed``)."""
    prompts, texts = _problems(reference.tokenizer, n, source)
    got, want = engine.score(prompts, texts, k=k), reference.score(prompts, texts, k=k)
    if len(unnameable):
        want = [unnamed(w, unnameable) for w in want]
    d_taken, ties_missed = [], 0
    for g, w, t in zip(got, want, texts):
        _check_row(g, k)
        assert list(g["token_ids"]) == list(t) and g["response"] == w["response"]
        gap = w["topk_logprobs"][:, 0].astype(np.float32) - w["topk_logprobs"][:, 1].astype(np.float32)
        clear = gap > tol.tie
        ties_missed += int((g["topk_ids"][:, 0] != w["topk_ids"][:, 0])[clear].sum())
        d = np.abs(g["token_logprobs"] - w["token_logprobs"])
        d_taken.append(d)
        likely = np.exp(w["token_logprobs"]) > 0.1
        assert d[likely].max(initial=0) <= tol.max_abs, d[likely].max()
        heavy = w["tail_logprobs"] > np.log(0.01)
        assert np.abs(g["tail_logprobs"] - w["tail_logprobs"])[heavy].max(initial=0) <= tol.tail
    assert ties_missed == 0, f"{ties_missed} top-1 ids differ where the reference is not tied"
    mean = float(np.concatenate(d_taken).mean())
    assert mean <= tol.mean_abs, mean
    # greedy generation: the same tokens up to the reference's first near-tie
    gen, ref = (e.generate(prompts[:3], k=k, max_new_tokens=max_new_tokens) for e in (engine, reference))
    if len(unnameable):
        ref = [unnamed(w, unnameable) for w in ref]
    agreed = 0
    for g, w in zip(gen, ref):
        _check_row(g, k)
        n = next((j for j, (a, b) in enumerate(zip(g["token_ids"], w["token_ids"])) if a != b), None)
        if n is None:
            assert len(g["token_ids"]) == len(w["token_ids"]) and g["stop"] == w["stop"]
            n = len(w["token_ids"])
        else:
            gap = float(w["topk_logprobs"][n, 0]) - float(w["topk_logprobs"][n, 1])
            assert gap <= tol.tie, f"greedy paths part at token {n} where the reference leads by {gap:.3f} nats"
        assert np.array_equal(g["topk_ids"][:n, 0], w["topk_ids"][:n, 0])
        agreed += n
    return {"mean_abs": mean, "greedy_tokens_agreed": agreed}


def test_the_transformers_engine_conforms_to_itself_and_to_the_plain_functions(tiny_dir):
    model, tok = models.load_model(tiny_dir, dtype="fp32")
    engine = backends.open_backend("transformers", tiny_dir, dtype="fp32")
    conform(engine, TransformersEngine(model, tok), EXACT)
    prompts, texts = _problems(tok, 3)
    rendered = [tok.decode(p) for p in prompts]
    by_text = hf.generate_with_capture(model, tok, rendered, k=8, max_new_tokens=12)
    by_ids = engine.generate(prompts, k=8, max_new_tokens=12)
    for a, b in zip(by_text, by_ids):
        assert a["token_ids"] == b["token_ids"] and np.array_equal(a["topk_ids"], b["topk_ids"])


def test_a_store_written_through_an_engine_is_the_store_of_the_model_pair(tiny_dir, tmp_path):
    from helpers.data import Record

    records = [Record(f"r{i}", f"What is {i} + {i}?", f"{i} + {i} = {2 * i}\n#### {2 * i}", 2.0 * i) for i in range(3)]
    loaded = models.load_model(tiny_dir, dtype="fp32")
    kw = dict(teacher=tiny_dir, strategy="base", k=4, max_new_tokens=6, batch_size=2, shard_size=2, progress=False)
    a = teacher.build_store(tmp_path / "pair", records, loaded=loaded, **kw)
    b = teacher.build_store(tmp_path / "engine", records, loaded=TransformersEngine(*loaded), **kw)
    assert a.manifest["settings"] == b.manifest["settings"] and a.manifest["settings"]["backend"] == "transformers"
    assert a.manifest["shards"] == b.manifest["shards"]  # byte-identical shards (same sizes and sha256)


def test_unknown_or_unavailable_back_ends_are_refused_in_one_line(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown teacher_backend 'tensorrt'; choose one of transformers, llama_cpp"):
        backends.open_backend("tensorrt", tiny_dir)
    with pytest.raises(ValueError, match="llama_cpp' runs GGUF files: .* is neither an embedded model"):
        backends.open_backend("llama_cpp", tiny_dir)
    if not HAS_CUDA:
        for name, extra in (("vllm", "vllm"), ("exllamav2", "exl2"), ("exllamav3", "exl3")):
            with pytest.raises(RuntimeError, match=rf"'{name}' needs a CUDA GPU.*pip install -e \.\[{extra}\]"):
                backends.open_backend(name, tiny_dir)


def test_vllm_server_url_needs_no_cuda_but_a_server(tiny_dir):
    with pytest.raises(RuntimeError, match="could not reach the vllm server at http://127.0.0.1:9/v1 after 1 tries"):
        engine = backends.open_backend("vllm", tiny_dir, options={"url": "http://127.0.0.1:9/v1", "timeout": 2, "retries": 0})
        engine.score([[1, 2, 3]], [[4, 5]], k=2)


needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed (pip install -e .[cpu-fast])")


@needs_llama_cpp
def test_llama_cpp_on_the_embedded_smollm2_gguf_conforms_to_transformers():
    engine = backends.open_backend("llama_cpp", "smollm2-135m-instruct", options={"n_ctx": 1024})
    try:
        reference = backends.open_backend("transformers", "smollm2-135m-instruct", dtype="fp32")
        measured = conform(engine, reference, GGUF_Q4, max_new_tokens=32)
        assert measured["greedy_tokens_agreed"] >= 24
    finally:
        engine.close()


@needs_llama_cpp
def test_llama_cpp_samples_with_the_seeded_torch_generator():
    engine = backends.open_backend("llama_cpp", "smollm2-135m-instruct", options={"n_ctx": 512})
    try:
        samples_with_the_seeded_torch_generator(engine, _problems(engine.tokenizer, 2)[0])
    finally:
        engine.close()


def samples_with_the_seeded_torch_generator(engine, prompts):
    """Sampling twice from the same torch seed writes the same tokens, and not greedy's."""
    draw = lambda: engine.generate(prompts, k=4, max_new_tokens=10, do_sample=True, temperature=1.5)  # noqa: E731
    torch.manual_seed(7)
    a = draw()
    torch.manual_seed(7)
    b = draw()
    assert [r["token_ids"] for r in a] == [r["token_ids"] for r in b]
    greedy = engine.generate(prompts, k=4, max_new_tokens=10)
    assert [r["token_ids"] for r in a] != [r["token_ids"] for r in greedy]


def _gpu_model(tmp_path_factory):
    """A small random Llama with head size 64 (what the CUDA kernels expect), saved with its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import make_tokenizer

    path = tmp_path_factory.mktemp("gpu-model")
    tok = make_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed (pip install -e .[vllm])")
@gpu
def test_vllm_conforms_to_transformers_on_the_gpu(tmp_path_factory):
    path = _gpu_model(tmp_path_factory)
    engine = backends.open_backend("vllm", path, dtype="fp16", options={"gpu_memory_utilization": 0.3})
    reference = backends.open_backend("transformers", path, dtype="fp16", device="cuda")
    print(conform(engine, reference, GPU_FP16))


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("exllamav2") is None,
                    reason="exllamav2 is not installed (pip install -e .[exl2])")
@gpu
def test_exllamav2_conforms_to_transformers_on_the_gpu(tmp_path_factory):
    path = _gpu_model(tmp_path_factory)
    engine = backends.open_backend("exllamav2", path)
    reference = backends.open_backend("transformers", path, dtype="fp16", device="cuda")
    print(conform(engine, reference, GPU_FP16))


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("exllamav3") is None,
                    reason="exllamav3 is not installed (pip install -e .[exl3])")
@gpu
def test_exllamav3_conforms_to_transformers_on_the_gpu(tmp_path_factory):
    path = _gpu_model(tmp_path_factory)
    engine = backends.open_backend("exllamav3", path)
    reference = backends.open_backend("transformers", path, dtype="fp16", device="cuda")
    print(conform(engine, reference, Tolerance(tie=0.05, mean_abs=5e-3, max_abs=5e-2, tail=5e-2)))


def test_vllm_log_prob_maps_give_the_capture_of_the_full_distribution(tiny_dir):
    """What the vllm engine builds from {id: log-prob} maps (the top-k plus the taken token, as vLLM
    returns them) equals the capture of the full logits; the tail is log(1 − Σ top-k)."""
    from helpers.backends.vllm_engine import capture_from_logprobs

    torch.manual_seed(0)
    logits = torch.randn(5, 300) * 3
    taken = torch.tensor([3, 17, 250, 0, 99])
    want = capture.topk_capture(logits, 8, taken)
    logp = torch.log_softmax(logits, -1)
    maps = [{int(i): float(logp[j, i]) for i in [*logp[j].topk(8).indices.tolist(), int(taken[j])]} for j in range(5)]
    got = capture_from_logprobs(maps, taken.tolist(), 8, vocab_size=300)
    assert np.array_equal(got["topk_ids"], want["topk_ids"].numpy())
    assert np.array_equal(got["topk_logprobs"], want["topk_logprobs"].numpy())
    np.testing.assert_allclose(got["token_logprobs"], want["token_logprobs"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(got["tail_logprobs"], want["tail_logprobs"].numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="fewer than k=8: raise its max_logprobs"):
        capture_from_logprobs([{1: -0.1, 2: -3.0}], [1], 8, vocab_size=300)


def test_a_loop_cut_after_generation_is_where_the_loop_stop_ends_the_row(tiny_dir):
    """vLLM cannot stop a row mid-flight on the project's loop rule; cutting the finished row at the
    first multiple of 8 where it loops gives exactly the row the transformers engine stops."""
    from helpers.backends.vllm_engine import loop_cut

    model, tok = models.load_model(tiny_dir, dtype="fp32")
    prompts, _ = _problems(tok, 4)
    free = hf.generate_with_capture(model, tok, prompts, k=4, max_new_tokens=96)
    stopped = hf.generate_with_capture(model, tok, prompts, k=4, max_new_tokens=96, stop_loops=True)
    eos = capture.eos_ids(model, tok)
    assert any(r["stop"] == "loop" for r in stopped)  # the untrained tiny model loops
    for a, b in zip(free, stopped):
        cut = loop_cut(tok, a["token_ids"], eos)
        row = capture.solution_row(tok, a["token_ids"], eos, looped_at=cut)
        assert (row["token_ids"], row["stop"]) == (b["token_ids"], b["stop"])


@needs_llama_cpp
def test_a_store_written_by_llama_cpp_is_a_store_like_any_other(tmp_path):
    """build_store on the llama_cpp engine: the same format and tokenizer fingerprint as the
    transformers engine's store, the engine named in its settings, and the student reads it."""
    from helpers.data import Record
    from helpers.kd import distill

    records = [Record(f"r{i}", f"What is {i} + {i}?", f"{i} + {i} = {2 * i}\n#### {2 * i}", 2.0 * i) for i in range(3)]
    kw = dict(teacher="smollm2-135m-instruct", strategy="base", k=8, max_new_tokens=12, batch_size=2, shard_size=2,
              progress=False)
    store = teacher.build_store(tmp_path / "cpp", records, backend="llama_cpp", backend_options={"n_ctx": 512}, **kw)
    assert store.complete and store.manifest["settings"]["backend"] == "llama_cpp"
    tok = models.load_tokenizer("smollm2-135m-instruct")
    store.check_tokenizer(models.tokenizer_fingerprint(tok))
    again = LogitStore(tmp_path / "cpp")
    for r in records:
        rec = again.get(r.id)
        assert 1 <= len(rec) <= 12 and rec.topk_ids.shape == (len(rec), 8)
        assert rec.response == tok.decode(rec.token_ids, skip_special_tokens=True).strip()
    exs = distill.build_examples(records, tok, store)
    assert [e.input_ids[e.n_prompt:] for e in exs] == [list(store.get(r.id).token_ids) for r in records]


@needs_llama_cpp
def test_llama_cpp_refuses_what_does_not_fit_its_context_before_decoding():
    engine = backends.open_backend("llama_cpp", "smollm2-135m-instruct", options={"n_ctx": 64})
    try:
        with pytest.raises(ValueError, match="up to 90 tokens does not fit llama.cpp's context of 64 tokens: "
                                             "raise the llama_cpp option n_ctx"):
            engine.generate([[1] * 10], k=4, max_new_tokens=80)
        with pytest.raises(ValueError, match="does not fit llama.cpp's context"):
            engine.score([[1] * 40], [[2] * 40], k=4)
    finally:
        engine.close()


@needs_llama_cpp
def test_llama_cpp_reads_a_gguf_path_with_the_tokenizer_inside_it():
    folder, name = models.gguf_location("smollm2-135m-instruct")
    engine = backends.open_backend("llama_cpp", str(folder / name), options={"n_ctx": 256})
    try:
        want = models.load_tokenizer("smollm2-135m-instruct")
        assert models.tokenizer_fingerprint(engine.tokenizer) == models.tokenizer_fingerprint(want)
        assert engine.tokenizer.padding_side == "left" and engine.tokenizer.pad_token_id is not None
    finally:
        engine.close()


def _vllm_like(logits: torch.Tensor, n: int) -> list[dict[int, float]]:
    """What vLLM returns per position for ``logprobs=n``: the top-n of an fp32 log-softmax."""
    logp = torch.log_softmax(logits.float(), -1)
    top = logp.topk(n, -1)
    return [dict(zip(i.tolist(), v.tolist())) for i, v in zip(top.indices, top.values)]


def test_vllm_tails_stay_finite_and_right_on_a_confident_teacher():
    """The tail from fp32 log-probs: log(1 − Σ top-k) is -inf where the top token reads log-prob 0,
    and noise where the mass outside is tiny; the engine's tail is finite everywhere, exact where
    the mass is resolved, a lower bound where it is not, and a student equal to its teacher is at
    divergence ~0 in every direction (reverse KL was inf)."""
    from helpers.backends.vllm_engine import MASS_RESOLUTION, capture_from_logprobs
    from helpers.kd import losses

    torch.manual_seed(0)
    V, k = 4000, 8
    logits = torch.randn(24, V) * 2
    logits[torch.arange(24), torch.arange(24)] += torch.linspace(2, 40, 24)  # from unsure to very sure
    maps = _vllm_like(logits, 2 * k)
    exact = torch.log_softmax(logits.double(), -1)
    ids = exact.topk(k, -1).indices
    exact_tail = torch.logsumexp(exact.scatter(-1, ids, float("-inf")), -1).numpy()
    naive = np.array([math.log1p(-min(1.0, math.fsum(math.exp(v) for v in sorted(m.values())[::-1][:k])))
                      if math.fsum(math.exp(v) for v in sorted(m.values())[::-1][:k]) < 1 else -np.inf for m in maps])
    assert np.isneginf(naive).sum() >= 3  # the defect this guards against is present in the data
    got = capture_from_logprobs(maps, ids[:, 0].tolist(), k, V)
    tail = got["tail_logprobs"].astype(np.float64)
    assert np.isfinite(tail).all()
    resolved = exact_tail > math.log(16 * MASS_RESOLUTION)
    assert resolved.sum() >= 5 and (~resolved).sum() >= 5
    np.testing.assert_allclose(tail[resolved], exact_tail[resolved], atol=0.02)
    assert (tail[~resolved] <= exact_tail[~resolved] + 0.02).all()  # never above the truth beyond rounding
    below = torch.log_softmax(logits.float(), -1).topk(2 * k, -1).values[:, k:].double().logsumexp(-1).numpy()
    assert (tail >= below - 1e-4).all()  # at least the mass of the returned ranks below k
    # the old way: a student equal to its teacher was infinitely far in reverse KL
    mask = torch.ones(1, 24)
    kw = dict(topk_ids=torch.from_numpy(got["topk_ids"])[None].long(),
              topk_logprobs=torch.from_numpy(got["topk_logprobs"].astype(np.float32))[None], mask=mask)
    for loss in (losses.forward_kl, losses.reverse_kl, losses.jsd, losses.total_variation):
        value = loss(logits[None], tail_logprobs=torch.from_numpy(got["tail_logprobs"])[None], **kw)
        assert torch.isfinite(value) and value < 2e-3, loss.__name__
    naive_rkl = losses.reverse_kl(logits[None], tail_logprobs=torch.from_numpy(naive).float()[None], **kw)
    assert torch.isinf(naive_rkl)


def test_a_vllm_tail_with_nothing_returned_below_the_top_k_is_bounded():
    from helpers.backends.vllm_engine import MASS_RESOLUTION, capture_from_logprobs

    got = capture_from_logprobs([{1: 0.0, 2: -30.0}, {1: 0.0, 2: -8.0}], [1, 1], 2, vocab_size=10)["tail_logprobs"]
    assert got[0] == np.float32(math.log(8) - 30.0)  # 8 ids outside, none likelier than the 2nd
    assert got[1] == np.float32(math.log(MASS_RESOLUTION))


def test_every_engine_stops_at_the_generation_configs_end_of_sequence_ids(tmp_path):
    """Llama 3.1 ends a turn with <|eot_id|> though its tokenizer's eos is <|end_of_text|>: the stop
    ids come from the generation config, for every engine, not from the tokenizer alone."""
    from transformers import GenerationConfig

    from conftest import make_model, make_tokenizer
    from helpers.backends.vllm_engine import VllmEngine

    tok = make_tokenizer()
    model = make_model(tok)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    turn_end = tok.convert_tokens_to_ids("<|im_start|>")  # stands in for <|eot_id|>
    GenerationConfig(eos_token_id=[turn_end, tok.eos_token_id]).save_pretrained(tmp_path)
    assert models.generation_eos(str(tmp_path)) == [turn_end, tok.eos_token_id]
    assert models.generation_eos(str(tmp_path / "absent")) == []
    loaded, _ = models.load_model(str(tmp_path), dtype="fp32")
    reference = capture.eos_ids(loaded, tok)
    assert reference == [turn_end, tok.eos_token_id]
    engine = VllmEngine.open(str(tmp_path), url="http://127.0.0.1:9/v1")  # a server engine opens without one
    assert engine.eos == reference
    assert capture.eos_ids(tokenizer=tok, extra=[turn_end]) == [turn_end, tok.eos_token_id]


@needs_llama_cpp
def test_llama_cpp_stops_where_transformers_does_on_the_embedded_model():
    engine = backends.open_backend("llama_cpp", "smollm2-135m-instruct", options={"n_ctx": 256})
    try:
        model, tok = models.load_model("smollm2-135m-instruct", dtype="fp32")
        assert engine.eos == capture.eos_ids(model, tok)
    finally:
        engine.close()


def test_vllm_needs_cuda_before_it_reads_anything(tmp_path):
    if HAS_CUDA:
        pytest.skip("checks the message of a machine without a GPU")
    with pytest.raises(RuntimeError, match="'vllm' needs a CUDA GPU"):  # not: could not load the tokenizer
        backends.open_backend("vllm", str(tmp_path / "no-such-teacher"))


def test_vllm_scores_a_batch_in_one_request(loaded, monkeypatch):
    """Scoring through a server: one completions request for the whole batch (it was one per
    text), each choice read back in order; the capture equals the transformers engine's."""
    from helpers.backends.vllm_engine import VllmEngine

    model, tok = loaded
    engine = VllmEngine(tok, url="http://server/v1", model_name="tiny", eos=capture.eos_ids(model, tok))
    prompts, texts = _problems(tok, 3)
    requests = []

    def post(body):
        requests.append(body)
        out = []
        for index, seq in enumerate(body["prompt"]):
            with torch.no_grad():
                logits = model(torch.tensor([seq])).logits[0]
            maps = [{}] + _vllm_like(logits[:-1], body["logprobs"])  # the first echoed token has none
            logp = torch.log_softmax(logits.float(), -1)
            token_lp = [None] + [float(logp[j, seq[j + 1]]) for j in range(len(seq) - 1)]
            out.append({"index": index, "logprobs": {
                "tokens": [f"token_id:{t}" for t in seq], "token_logprobs": token_lp,
                "top_logprobs": [{f"token_id:{i}": v for i, v in m.items()} for m in maps]}})
        return out

    monkeypatch.setattr(engine, "_post", post)
    got = engine.score(prompts, texts, k=4)
    assert len(requests) == 1 and len(requests[0]["prompt"]) == 3 and requests[0]["logprobs"] == 4 + 64
    want = TransformersEngine(model, tok).score(prompts, texts, k=4)
    for a, b in zip(got, want):
        assert a["token_ids"] == b["token_ids"]
        assert np.array_equal(a["topk_ids"], b["topk_ids"])
        np.testing.assert_allclose(a["token_logprobs"], b["token_logprobs"], atol=1e-5)
        np.testing.assert_allclose(a["tail_logprobs"], b["tail_logprobs"], atol=1e-3)


def test_in_process_vllm_beside_training_needs_a_share_that_fits():
    """vLLM claims 0.9 of the GPU unless told and refuses to start with less free: next to a student
    in training its share must be given and fit in what is free, or a server used."""
    from helpers.backends.vllm_engine import check_share_beside_training

    gib = 2 ** 30
    with pytest.raises(ValueError, match=r"needs teacher_backend_options.gpu_memory_utilization .*60.0 of 80.0 GiB "
                                         r"are free.*gpu_memory_utilization: 0.38"):
        check_share_beside_training({}, 60 * gib, 80 * gib)
    with pytest.raises(ValueError, match="gpu_memory_utilization 0.9 asks for 72.0 GiB, more than is free"):
        check_share_beside_training({"gpu_memory_utilization": 0.9}, 60 * gib, 80 * gib)
    check_share_beside_training({"gpu_memory_utilization": 0.3}, 60 * gib, 80 * gib)
    check_share_beside_training({"url": "http://teacher:8000/v1"}, 1 * gib, 80 * gib)  # a server needs none here


# ---------------------------------------------------------------- vLLM's interface, as recorded from its source
VLLM_API = json.loads((Path(__file__).parent / "data" / "vllm_0.33.0_api.json").read_text())


def _stand_in_vllm(model):
    """A ``vllm`` package that accepts exactly the names vLLM 0.33.0 declares (constructor and call
    keywords, prompt keys) and answers with the recorded output fields, computed by ``model``: a
    renamed argument or field fails here as it would on a GPU."""
    import types

    def checked(what, given, allowed):
        unknown = set(given) - set(allowed)
        if unknown:
            raise TypeError(f"{what} got unexpected keyword(s) {sorted(unknown)} (vLLM {VLLM_API['version']})")

    def record(kind, **fields):
        checked(kind, fields, VLLM_API[kind])
        return types.SimpleNamespace(**fields)

    class SamplingParams:
        def __init__(self, **kw):
            checked("SamplingParams", kw, VLLM_API["SamplingParams"])
            self.__dict__.update({"max_tokens": 16, "temperature": 1.0, "logprobs": None, "prompt_logprobs": None,
                                  "stop_token_ids": None, **kw})

    def TokensPrompt(**kw):  # a TypedDict: a dict with declared keys
        checked("TokensPrompt", kw, VLLM_API["TokensPrompt"])
        return dict(kw)

    def top(logits, n, chosen):
        logp = torch.log_softmax(logits.float(), -1)
        values, ids = logp.topk(n)
        out = {int(i): record("Logprob", logprob=float(v), rank=r + 1) for r, (i, v) in enumerate(zip(ids, values))}
        out.setdefault(int(chosen), record("Logprob", logprob=float(logp[chosen])))
        return out

    class LLM:
        def __init__(self, **kw):
            checked("LLM", kw, VLLM_API["LLM.__init__"] + VLLM_API["EngineArgs"])

        def generate(self, prompts, sampling_params=None, **kw):
            checked("LLM.generate", kw, VLLM_API["LLM.generate"])
            params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
            outs = []
            for prompt, sp in zip(prompts, params):
                assert sp.temperature == 0.0 or sp.prompt_logprobs is not None  # the engine decodes greedily here
                ids = list(prompt["prompt_token_ids"])
                with torch.no_grad():
                    logits = model(torch.tensor([ids])).logits[0]
                prompt_lps = None
                if sp.prompt_logprobs is not None:
                    prompt_lps = [None] + [top(logits[j - 1], sp.prompt_logprobs, ids[j]) for j in range(1, len(ids))]
                new, lps = [], []
                for _ in range(sp.max_tokens):
                    token = int(logits[-1].argmax())
                    new.append(token)
                    lps.append(top(logits[-1], sp.logprobs or 1, token))
                    if token in (sp.stop_token_ids or []):
                        break
                    with torch.no_grad():
                        logits = model(torch.tensor([ids + new])).logits[0]
                outs.append(record("RequestOutput", prompt_logprobs=prompt_lps,
                                   outputs=[record("CompletionOutput", token_ids=new, logprobs=lps)]))
            return outs

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = TokensPrompt
    vllm.inputs = inputs
    return vllm, inputs


def test_the_vllm_engine_speaks_vllms_recorded_interface(tiny_dir, monkeypatch):
    """In process: every keyword the engine gives ``LLM``, ``SamplingParams``, ``TokensPrompt`` and
    ``LLM.generate``, and every output field it reads, is one vLLM 0.33.0 declares
    (``tests/data/vllm_0.33.0_api.json``, read from the wheel's source); on a tiny model the stand-in
    answers as vLLM would, and the stores agree with the transformers engine."""
    from helpers.backends import vllm_engine

    model, tok = models.load_model(tiny_dir, dtype="fp32")
    vllm, inputs = _stand_in_vllm(model)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    monkeypatch.setattr(vllm_engine, "need_cuda", lambda *a: None)
    engine = backends.open_backend("vllm", tiny_dir, dtype="fp32", options={"max_model_len": 512})
    reference = TransformersEngine(model, tok)
    prompts, texts = _problems(tok, 3)
    for got, want in [(engine.generate(prompts, k=4, max_new_tokens=10), reference.generate(prompts, k=4, max_new_tokens=10)),
                      (engine.score(prompts, texts, k=4), reference.score(prompts, texts, k=4))]:
        for a, b in zip(got, want):
            assert a["token_ids"] == b["token_ids"] and np.array_equal(a["topk_ids"], b["topk_ids"])
            np.testing.assert_allclose(a["token_logprobs"], b["token_logprobs"], atol=1e-5)
            np.testing.assert_allclose(a["tail_logprobs"], b["tail_logprobs"], atol=1e-3)
    with pytest.raises(TypeError, match="unexpected keyword"):  # the stand-in does refuse what vLLM does not take
        vllm.SamplingParams(logprob=4)


def test_the_vllm_server_request_names_only_fields_of_vllms_completion_request(tiny_dir, monkeypatch):
    import urllib.request

    from helpers.backends.vllm_engine import VllmEngine

    bodies = []

    class Sent(Exception):
        pass

    def urlopen(request, timeout=None):
        bodies.append(json.loads(request.data))
        raise Sent

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    engine = VllmEngine.open(tiny_dir, url="http://server/v1")
    for call in (lambda: engine.generate([[1, 2]], k=4, max_new_tokens=3), lambda: engine.score([[1, 2]], [[3]], k=4)):
        with pytest.raises(Sent):
            call()
    assert len(bodies) == 2
    for body in bodies:
        assert set(body) <= set(VLLM_API["CompletionRequest"]), set(body) - set(VLLM_API["CompletionRequest"])


# ---------------------------------------------------------------- ExLlamaV2's and ExLlamaV3's interfaces, as recorded
EXL2_API = json.loads((Path(__file__).parent / "data" / "exllamav2_0.3.2_api.json").read_text())
EXL3_API = json.loads((Path(__file__).parent / "data" / "exllamav3_1.6.5_api.json").read_text())


def _bind(api, lib, key, args, kwargs) -> dict:
    """The arguments of a call to ``key`` as the recorded signature binds them: too many positional
    arguments, a name it does not declare, a value given twice or a parameter without default left
    out raise TypeError. Stricter than the library where it takes ``**kwargs``: those go on to other
    calls (module forwards, the architecture's constructor) and a misspelt name would vanish there."""
    import ast

    names, defaults = api[key], api[f"{key} defaults"]
    where = f"({lib} {api['version']}, tests/data)"
    if len(args) > len(names):
        raise TypeError(f"{key} takes {len(names)} arguments, got {len(args)} positional {where}")
    bound = dict(zip(names, args))
    for name, value in kwargs.items():
        if name not in names:
            raise TypeError(f"{key} got an unexpected keyword argument {name!r} {where}")
        if name in bound:
            raise TypeError(f"{key} got multiple values for {name!r} {where}")
        bound[name] = value
    for name in names:
        if name not in bound:
            if name not in defaults:
                raise TypeError(f"{key} is missing the argument {name!r} {where}")
            try:
                bound[name] = ast.literal_eval(defaults[name])
            except ValueError:
                bound[name] = defaults[name]  # an expression (e.g. torch.half): its source
    return bound


class _Recorded:
    """An object whose public attributes must be ones the library's class has."""

    _attributes: list[str] = []

    def __setattr__(self, name, value):
        if not name.startswith("_") and name not in self._attributes:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r} in the recorded source")
        object.__setattr__(self, name, value)


def _module(name, api, **members):
    import types

    module = types.ModuleType(name)
    for member, value in members.items():
        assert member in api["exports"], f"{name} does not export {member}"
        setattr(module, member, value)
    return module


def _pass_after(hf_model, holder, past: int, ids: torch.Tensor) -> torch.Tensor:
    """``hf_model``'s logits for ``ids`` written after the first ``past`` positions of the
    ``transformers`` cache ``holder._kv`` (what lies beyond them is overwritten, as in a paged or
    ExLlama cache)."""
    from transformers import DynamicCache

    from helpers.backends.continuous import _CACHE

    held = holder._kv.get_seq_length()
    assert held >= past, "positions before the pass were never written"
    if past == 0:
        holder._kv = DynamicCache()
    elif held > past:
        holder._kv.crop(past - held)
    with torch.no_grad():
        return hf_model(input_ids=ids, use_cache=True, **{_CACHE: holder._kv}).logits


def _padded(logits: torch.Tensor, multiple: int, value: float) -> torch.Tensor:
    """fp16 logits with the head's width rounded up to ``multiple``, the new columns set to ``value``."""
    return torch.nn.functional.pad(logits.half(), (0, -logits.shape[-1] % multiple), value=value)


def _stand_in_exllamav2(hf_model, api=EXL2_API):
    """An ``exllamav2`` package that takes exactly the arguments ExLlamaV2 0.3.2 declares
    (``api``, read from its source) and behaves as its source says: the config read from the folder's
    config.json; a lazy cache for ``load_autosplit`` and a cache made after ``load``; ``forward``
    wants int64 ids on the CPU, writes at ``cache.current_seq_len`` and advances it, refuses what
    does not fit the cache, feeds a long input in chunks of ``config.max_input_len`` and returns
    fp16 logits whose width is the vocabulary rounded up to 32, the extra columns -65504. The
    forward passes are ``hf_model``'s, with a ``transformers`` cache."""
    from transformers import DynamicCache

    bind = lambda key, args, kwargs: _bind(api, "ExLlamaV2", key, args, kwargs)  # noqa: E731
    pad32 = api["ExLlamaV2Linear.__init__ defaults"]["pad32"] == "True"

    class ExLlamaV2Config(_Recorded):
        _attributes = api["ExLlamaV2Config attributes"]

        def __init__(self, *args, **kwargs):
            a = bind("ExLlamaV2Config.__init__", args, kwargs)
            self.model_dir = a["model_dir"]
            assert Path(self.model_dir).exists(), "Can't find " + self.model_dir
            read = json.loads((Path(self.model_dir) / "config.json").read_text())
            self.vocab_size, self.max_seq_len = read["vocab_size"], read.get("max_position_embeddings", 2048)
            self.max_input_len, self.max_batch_size = 2048, 1
            self._compat = False

        def arch_compat_overrides(self, *args, **kwargs):
            bind("ExLlamaV2Config.arch_compat_overrides", args, kwargs)
            self._compat = True

    class ExLlamaV2(_Recorded):
        _attributes = ["config", "modules", "loaded"]

        def __init__(self, *args, **kwargs):
            self.config = bind("ExLlamaV2.__init__", args, kwargs)["config"]
            self.modules, self.loaded = [hf_model], False

        def load(self, *args, **kwargs):
            bind("ExLlamaV2.load", args, kwargs)
            self.loaded = True

        def load_autosplit(self, *args, **kwargs):
            cache = bind("ExLlamaV2.load_autosplit", args, kwargs)["cache"]
            assert cache._lazy, "load_autosplit allocates a cache made with lazy=True"
            self.config.max_input_len = min(self.config.max_input_len, self.config.max_seq_len)
            cache._allocated, self.loaded = True, True

        def unload(self, *args, **kwargs):
            bind("ExLlamaV2.unload", args, kwargs)
            self.modules, self.loaded = [], False

        def forward(self, *args, **kwargs):
            a = bind("ExLlamaV2.forward", args, kwargs)
            ids, cache = a["input_ids"], a["cache"]
            assert self.loaded and cache is not None and cache._allocated
            assert ids.device.type == "cpu" and ids.dtype == torch.long and ids.dim() == 2, (ids.device, ids.dtype)
            q = ids.shape[1]
            assert cache.current_seq_len + q <= cache.max_seq_len, \
                "Total sequence length exceeds cache size in model.forward"
            step, out = self.config.max_input_len, []
            for begin in range(0, q, step):  # a pass writes from current_seq_len on
                logits = _pass_after(hf_model, cache, cache.current_seq_len, ids[:, begin:begin + step])
                cache.current_seq_len += logits.shape[1]
                if a["last_id_only"]:
                    if begin + step < q:
                        continue  # the chunks before the last only fill the cache
                    logits = logits[:, -1:]
                out.append(logits)
            return _padded(torch.cat(out, 1), 32 if pad32 else 1, -65504.0)

    def cache_class(name):
        class Cache(_Recorded):
            _attributes = api["ExLlamaV2CacheBase attributes"]

            def __init__(self, *args, **kwargs):
                a = bind(f"{name}.__init__", args, kwargs)
                self.model = a["model"]
                self.max_seq_len = a["max_seq_len"] if a["max_seq_len"] != -1 else self.model.config.max_seq_len
                if name != "ExLlamaV2Cache":  # the Q caches round up to their block (cache.py)
                    self.max_seq_len = -(-self.max_seq_len // 256) * 256
                self.current_seq_len, self._lazy, self._kv = 0, a["lazy"], DynamicCache()
                # made before the model is loaded and not lazy, its tensors would land on the CPU
                assert self._lazy or self.model.loaded, "a cache made before load() without lazy=True"
                self._allocated = not self._lazy

            def reset(self, *args, **kwargs):
                bind("ExLlamaV2CacheBase.reset", args, kwargs)
                self.current_seq_len = 0

        Cache.__name__ = name
        return Cache

    return _module("exllamav2", api, ExLlamaV2Config=ExLlamaV2Config, ExLlamaV2=ExLlamaV2,
                   **{name: cache_class(name) for name in ("ExLlamaV2Cache", "ExLlamaV2Cache_Q8", "ExLlamaV2Cache_Q6",
                                                           "ExLlamaV2Cache_Q4")})


def _stand_in_exllamav3(hf_model, api=EXL3_API, recurrent=False):
    """An ``exllamav3`` package that takes exactly the arguments and ``params`` keys ExLlamaV3 1.6.5
    declares (``api``, read from its source) and behaves as its source says: the cache attached to
    the model gets its tensors when the model loads (made after, it is never usable); a pass writes
    at ``past_len`` within ``batch_shape`` (a multiple of 256 no larger than the cache), ``prefill``
    returns nothing, ``last_tokens_only`` keeps the last positions, and the logits are fp16 with the
    head's width rounded up to 128, the extra columns zero. ``recurrent``: the model has recurrent
    layers, whose per-sequence states come from a pool of ``max_batch_size`` slots."""
    import collections
    import types

    from transformers import DynamicCache

    bind = lambda key, args, kwargs: _bind(api, "ExLlamaV3", key, args, kwargs)  # noqa: E731
    page, pad_to = api["PAGE_SIZE"], int(api["Linear.__init__ defaults"]["pad_to"])

    class Config(_Recorded):
        _attributes = api["Config attributes"]

        @staticmethod
        def from_directory(*args, **kwargs):
            a = bind("Config.from_directory", args, kwargs)
            config = Config()
            config.directory = a["directory"]
            read = json.loads((Path(config.directory) / "config.json").read_text())
            config.vocab_size, config.max_position_embeddings = read["vocab_size"], read["max_position_embeddings"]
            return config

    class CacheLayer_fp16:
        pass

    class CacheLayer_quant:
        pass

    class State:
        def __init__(self, slot):
            self.slot, self.position = slot, 0

    class Model(_Recorded):
        _attributes = ["config", "modules"]

        @staticmethod
        def from_config(*args, **kwargs):
            a = bind("Model.from_config", args, kwargs)
            model = Model()
            model.config, model.modules, model._caches, model._load = a["config"], [hf_model], [], None
            return model

        def load(self, *args, **kwargs):
            self._load = bind("Model.load_gen", args, kwargs)  # load(*args, **kwargs) calls load_gen with them
            for cache in self._caches:
                cache.initialized = True

        def unload(self, *args, **kwargs):
            bind("Model.unload", args, kwargs)
            for cache in self._caches:
                cache.initialized = False

        def forward(self, *args, **kwargs):
            return self._pass(**bind("Model.forward", args, kwargs), logits=True)

        def prefill(self, *args, **kwargs):
            return self._pass(**bind("Model.prefill", args, kwargs), logits=False)

        def _pass(self, input_ids, params, logits):
            unknown = set(params) - set(api["Model.forward params keys"])
            if unknown:
                raise TypeError(f"params keys {sorted(unknown)} are read by no pass of ExLlamaV3 {api['version']}")
            assert params.get("attn_mode") == "flash_attn" and "block_table" not in params
            cache = params["cache"]
            assert cache.initialized, "Cache tensors were never allocated. Construct the Cache BEFORE model.load()"
            bsz, width = params["batch_shape"]
            assert width % page == 0 and bsz * width <= cache.max_num_tokens, "Cache too small for batch shape"
            ids, past = input_ids, params["past_len"]
            assert ids.dtype == torch.long and ids.dim() == 2 and ids.shape[0] <= bsz and past + ids.shape[1] <= width
            states = params.get("recurrent_states")
            if recurrent:  # as cache/recurrent_util.py's prepare_for_recurrence
                if past > 0:
                    if states is None:
                        raise ValueError("Past length given, but no previous state for recurrence in params")
                    assert all(s.position == past for s in states), "recurrent states don't match input past_len"
                elif states is None:
                    params["recurrent_states"] = states = [cache._new_state() for _ in range(ids.shape[0])]
                else:
                    assert all(s.position == 0 for s in states), "recurrent states don't match input past_len"
            params.update(cache_seqlens=torch.tensor([past], dtype=torch.int32), position=past)  # filled in by the pass
            out = _pass_after(hf_model, cache, past, ids)
            for state in states or []:
                state.position += ids.shape[1]
            if not logits:
                return None
            if params.get("last_tokens_only"):
                out = out[:, -params["last_tokens_only"]:]
            return _padded(out, pad_to, 0.0)

    class Cache(_Recorded):
        _attributes = api["Cache attributes"]

        def __init__(self, *args, **kwargs):
            names = api["Cache.__init__"]
            own = _bind(api, "ExLlamaV3", "Cache.__init__", args, {k: v for k, v in kwargs.items() if k in names})
            layer = own["layer_type"] or CacheLayer_fp16  # the rest of the keywords go to the layer type
            bind(f"{layer.__name__}.__init__", (None, None, 0, own["max_num_tokens"]),
                 {k: v for k, v in kwargs.items() if k not in names})
            assert own["max_num_tokens"] % page == 0, f"max_num_tokens must be a multiple of {page}."
            self.model, self.max_num_tokens, self.initialized = own["model"], own["max_num_tokens"], False
            self.free_list, self._kv = collections.deque(range(own["max_batch_size"])), DynamicCache()
            self.model._caches.append(self)

        def _new_state(self):
            assert self.free_list, "Cannot create new state: no available slots"
            return State(self.free_list.popleft())

        def release_state(self, *args, **kwargs):
            self.free_list.appendleft(bind("Cache.release_state", args, kwargs)["state"].slot)

    exllamav3 = _module("exllamav3", api, Config=Config, Model=Model, Cache=Cache, CacheLayer_fp16=CacheLayer_fp16,
                        CacheLayer_quant=CacheLayer_quant)
    constants = types.ModuleType("exllamav3.constants")
    constants.PAGE_SIZE = page
    exllamav3.constants = constants
    return exllamav3, constants


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    """The tiny model with 7 more rows in its head than its tokenizer has ids (as Qwen2.5 has, and
    many models padded to a round size): the ids an engine keeps are the model's, as transformers'."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import make_tokenizer

    path = tmp_path_factory.mktemp("wide")
    tok = make_tokenizer()
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=len(tok) + 7, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _fp16_head(hf_model):
    """``hf_model`` with its logits rounded to fp16, as ExLlama's are: the stand-ins return them as
    fp16 without a further rounding, and the transformers engine on the same model reads the same
    values, so stores computed from them can be compared exactly."""
    hf_model.lm_head.register_forward_hook(lambda module, args, out: out.half().float())
    return hf_model


def _same_stores(engine, reference, prompts, texts, *, k=4, max_new_tokens=10):
    """The engine's rows against the transformers engine's on the same ids: the same tokens and
    top-k ids, the same log-probs (up to fp32 rounding: the engine's passes use the KV cache)."""
    for got, want in [(engine.generate(prompts, k=k, max_new_tokens=max_new_tokens),
                       reference.generate(prompts, k=k, max_new_tokens=max_new_tokens)),
                      (engine.score(prompts, texts, k=k), reference.score(prompts, texts, k=k))]:
        for a, b in zip(got, want):
            _check_row(a, k)
            assert a["token_ids"] == b["token_ids"] and np.array_equal(a["topk_ids"], b["topk_ids"])
            np.testing.assert_allclose(a["token_logprobs"], b["token_logprobs"], atol=1e-5)
            np.testing.assert_allclose(a["tail_logprobs"], b["tail_logprobs"], atol=1e-5)


@pytest.mark.parametrize("options", [{}, {"gpu_split": [20], "cache_bits": 4}, {"max_seq_len": 700, "cache_bits": 8},
                                     {"cache_bits": 6, "max_input_len": 16}],
                         ids=["autosplit", "split-q4", "q8", "chunked"])
def test_the_exllamav2_engine_speaks_exllamav2s_recorded_interface(wide_dir, monkeypatch, options):
    """Every call the engine makes to ExLlamaV2, with its arguments, and every attribute it reads or
    sets, is one ExLlamaV2 0.3.2 declares (``tests/data/exllamav2_0.3.2_api.json``, read from the
    wheel's source); on a tiny model whose head is wider than its tokenizer the stand-in answers as
    ExLlamaV2 would, and the stores agree with the transformers engine's. ``max_input_len`` 16
    makes the library feed prompts in chunks."""
    from helpers.backends import exllamav2_engine

    model, tok = models.load_model(wide_dir, dtype="fp32")
    model = _fp16_head(model)
    monkeypatch.setitem(sys.modules, "exllamav2", _stand_in_exllamav2(model))
    monkeypatch.setattr(exllamav2_engine, "need_cuda", lambda *a: None)
    options = dict(options)
    chunk = options.pop("max_input_len", None)
    engine = backends.open_backend("exllamav2", wide_dir, options=options)
    assert engine.model.config._compat and engine.vocab_size == len(tok) + 7
    if chunk:
        engine.model.config.max_input_len = chunk
    prompts, texts = _problems(tok, 3)
    _same_stores(engine, TransformersEngine(model, tok), prompts, texts)
    with pytest.raises(ValueError, match="does not fit exllamav2's cache of .* raise the exllamav2 option max_seq_len"):
        engine.generate([[1] * 1000], k=4, max_new_tokens=100)
    engine.close()
    assert not engine.model.loaded and engine.cache is None


@pytest.mark.parametrize("options", [{}, {"gpu_split": [20], "cache_bits": 4, "max_chunk_size": 16},
                                     {"max_seq_len": 700, "max_chunk_size": 7}], ids=["autosplit", "split-q4-chunked",
                                                                                      "rounded-chunked"])
@pytest.mark.parametrize("recurrent", [False, True], ids=["attention", "recurrent"])
def test_the_exllamav3_engine_speaks_exllamav3s_recorded_interface(wide_dir, monkeypatch, options, recurrent):
    """As for ExLlamaV2, against ExLlamaV3 1.6.5 (``tests/data/exllamav3_1.6.5_api.json``): the
    calls, their keywords and the ``params`` keys of each pass. The engine feeds ``max_chunk_size``
    tokens a pass (the library does not split a pass), rounds the cache to whole pages, and, for a
    model with recurrent layers, gives each sequence's states back to the pool of one slot."""
    from helpers.backends import exllamav3_engine

    model, tok = models.load_model(wide_dir, dtype="fp32")
    model = _fp16_head(model)
    exllamav3, constants = _stand_in_exllamav3(model, recurrent=recurrent)
    monkeypatch.setitem(sys.modules, "exllamav3", exllamav3)
    monkeypatch.setitem(sys.modules, "exllamav3.constants", constants)
    monkeypatch.setattr(exllamav3_engine, "need_cuda", lambda *a: None)
    engine = backends.open_backend("exllamav3", wide_dir, options=options)
    length = 768 if "max_seq_len" in options else 1024  # whole pages of 256
    assert engine.max_seq_len == engine.cache.max_num_tokens == length and engine.vocab_size == len(tok) + 7
    assert engine.model._load["max_output_size"] == engine.chunk_size == options.get("max_chunk_size", 2048)
    prompts, texts = _problems(tok, 3)
    _same_stores(engine, TransformersEngine(model, tok), prompts, texts)
    with pytest.raises(ValueError, match=f"does not fit exllamav3's cache of {length} tokens"):
        engine.score([[1] * 1000], [[2] * 30], k=4)
    cache = engine.cache
    engine.close()
    assert not cache.initialized and engine.cache is None and len(cache.free_list) == 1  # the states went back


@pytest.mark.parametrize("lib,key,name,options", [
    ("exllamav2", "ExLlamaV2.forward", "last_id_only", {}),
    ("exllamav2", "ExLlamaV2Cache.__init__", "lazy", {}),
    ("exllamav2", "ExLlamaV2.load_autosplit", "progress", {}),
    ("exllamav2", "ExLlamaV2.load", "gpu_split", {"gpu_split": [20]}),
    ("exllamav2", "ExLlamaV2Cache_Q4.__init__", "max_seq_len", {"cache_bits": 4}),
    ("exllamav3", "Model.load_gen", "progressbar", {}),
    ("exllamav3", "Model.load_gen", "use_per_device", {"gpu_split": [20]}),
    ("exllamav3", "Cache.__init__", "max_num_tokens", {}),
    ("exllamav3", "Model.forward params keys", "last_tokens_only", {}),
    ("exllamav3", "Model.forward params keys", "past_len", {}),
    ("exllamav3", "CacheLayer_quant.__init__", "k_bits", {"cache_bits": 4})],
    ids=lambda v: v if isinstance(v, str) else None)
def test_a_name_the_library_renamed_fails_the_contract_test(wide_dir, monkeypatch, lib, key, name, options):
    """The stand-ins are built from the record: were a name the engine uses renamed there (as a new
    release of the library would), the engine's calls fail, so the record is what holds the engine."""
    import copy

    from helpers.backends import exllamav2_engine, exllamav3_engine

    model, tok = models.load_model(wide_dir, dtype="fp32")
    api = copy.deepcopy(EXL2_API if lib == "exllamav2" else EXL3_API)
    api[key] = [n + "_renamed" if n == name else n for n in api[key]]
    if f"{key} defaults" in api and name in api[f"{key} defaults"]:
        api[f"{key} defaults"][f"{name}_renamed"] = api[f"{key} defaults"].pop(name)
    if lib == "exllamav2":
        monkeypatch.setitem(sys.modules, "exllamav2", _stand_in_exllamav2(model, api))
        monkeypatch.setattr(exllamav2_engine, "need_cuda", lambda *a: None)
    else:
        exllamav3, constants = _stand_in_exllamav3(model, api)
        monkeypatch.setitem(sys.modules, "exllamav3", exllamav3)
        monkeypatch.setitem(sys.modules, "exllamav3.constants", constants)
        monkeypatch.setattr(exllamav3_engine, "need_cuda", lambda *a: None)
    prompts, texts = _problems(tok, 1)
    with pytest.raises((TypeError, AttributeError), match=name):  # the name, or its renamed form, in the message
        engine = backends.open_backend(lib, wide_dir, options=options)
        engine.generate(prompts, k=4, max_new_tokens=2)


@pytest.mark.parametrize("name,extra", [("exllamav2", "exl2"), ("exllamav3", "exl3")])
def test_the_exllama_engines_need_cuda_before_they_import_or_read_anything(tmp_path, monkeypatch, name, extra):
    """Without CUDA: the one line of ``need_cuda``, before the library is imported and before the
    teacher's folder is looked at (here it does not exist)."""
    tried = []

    class Watch:
        @staticmethod
        def find_spec(fullname, path=None, target=None):
            tried.append(fullname)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "meta_path", [Watch(), *sys.meta_path])
    monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(RuntimeError, match=rf"^teacher_backend '{name}' needs a CUDA GPU, and this machine has none "
                                           rf".*pip install -e \.\[{extra}\]`$"):
        backends.open_backend(name, str(tmp_path / "no-such-teacher"))
    assert name not in tried


def test_the_exllama_engines_read_local_folders_and_refuse_a_tokenizer_larger_than_the_model(tiny_dir, monkeypatch):
    from helpers.backends import exllamav2_engine, exllamav3_engine
    from helpers.backends.exllamav2_engine import ExLlamaV2Engine

    for module, name in ((exllamav2_engine, "exllamav2"), (exllamav3_engine, "exllamav3")):
        monkeypatch.setattr(module, "need_cuda", lambda *a: None)
        with pytest.raises(ValueError, match=rf"'{name}' reads a local model folder with its config.json; "
                                             r"'meta-llama/Llama-3.1-8B' is not one"):
            backends.open_backend(name, "meta-llama/Llama-3.1-8B")
    model, tok = models.load_model(tiny_dir, dtype="fp32")
    with pytest.raises(ValueError, match=r"has 100 token ids but its tokenizer has \d+: they do not belong together"):
        ExLlamaV2Engine(None, None, tok, vocab_size=100)
