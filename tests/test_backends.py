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
from dataclasses import dataclass

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
    print(conform(engine, reference, Tolerance(tie=0.05, mean_abs=5e-3, max_abs=5e-2, tail=5e-2)))


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("exllamav2") is None,
                    reason="exllamav2 is not installed (pip install -e .[exl2])")
@gpu
def test_exllamav2_conforms_to_transformers_on_the_gpu(tmp_path_factory):
    path = _gpu_model(tmp_path_factory)
    engine = backends.open_backend("exllamav2", path)
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
