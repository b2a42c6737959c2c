"""Teacher engines behind one interface (``helpers.backends``).

One conformance check, ``conform``, holds every engine to the ``transformers`` reference on the same
token ids: the rows have the store's fields, shapes and dtypes; scored texts get the same top-1 id
wherever the reference's two most likely tokens are not tied, and log-probs within a tolerance
stated per engine (zero for ``transformers`` itself; the quantised GGUF's for ``llama_cpp``); greedy
generation writes the same tokens up to the first near-tie of the reference. ``transformers`` runs
it on a tiny model; ``llama_cpp`` on the embedded SmolLM2 GGUF (skipped, with the reason, where
``llama-cpp-python`` is not installed); ``vllm`` and ``exllamav2`` are marked ``gpu`` and skipped
without CUDA."""
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


def _problems(tok, n=6):
    recs = load_splits("gsm_symbolic", n_train=n)["train"]
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


def conform(engine, reference, tol: Tolerance, *, k=8, max_new_tokens=24):
    """``engine`` against ``reference`` (a TransformersEngine) on the same token ids; returns the
    measured differences."""
    prompts, texts = _problems(reference.tokenizer)
    got, want = engine.score(prompts, texts, k=k), reference.score(prompts, texts, k=k)
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
        for name, extra in (("vllm", "vllm"), ("exllamav2", "exl2")):
            with pytest.raises(RuntimeError, match=rf"'{name}' needs a CUDA GPU.*pip install -e \.\[{extra}\]"):
                backends.open_backend(name, tiny_dir)


def test_vllm_server_url_needs_no_cuda_but_a_server(tiny_dir):
    with pytest.raises(RuntimeError, match="could not reach the vLLM server at http://127.0.0.1:9/v1"):
        engine = backends.open_backend("vllm", tiny_dir, options={"url": "http://127.0.0.1:9/v1", "timeout": 2})
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
        prompts, _ = _problems(engine.tokenizer, 2)
        draw = lambda: engine.generate(prompts, k=4, max_new_tokens=10, do_sample=True, temperature=1.5)  # noqa: E731
        torch.manual_seed(7)
        a = draw()
        torch.manual_seed(7)
        b = draw()
        assert [r["token_ids"] for r in a] == [r["token_ids"] for r in b]
        greedy = engine.generate(prompts, k=4, max_new_tokens=10)
        assert [r["token_ids"] for r in a] != [r["token_ids"] for r in greedy]
    finally:
        engine.close()


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
