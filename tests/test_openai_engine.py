"""The ``openai`` engine against a real OpenAI-compatible server on 127.0.0.1: llama-cpp-python's
``llama_cpp.server`` serving the embedded SmolLM2 GGUF (a server that takes text prompts and names
tokens by their text). Held to the ``transformers`` reference by ``conform`` with the quantised
GGUF's tolerance; a server that is down, answers 503, or dies while a store is written. Skipped,
with the reason, where llama-cpp-python or its server's packages are not installed."""
import http.server
import importlib.util
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import pytest

from helpers import backends
from helpers.data import Record
from helpers.kd import teacher

from test_backends import GGUF_Q4, conform, samples_with_the_seeded_torch_generator

SERVER_PACKAGES = ("llama_cpp", "fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")
missing = [p for p in SERVER_PACKAGES if importlib.util.find_spec(p) is None]
# under pytest-xdist these tests stay on one worker, which starts the module's server once
pytestmark = pytest.mark.xdist_group("llama_cpp_server")
needs_server = pytest.mark.skipif(bool(missing), reason=f"llama-cpp-python's server is not installed (missing "
                                  f"{', '.join(missing)}; pip install -e .[cpu-fast,test])")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(port: int) -> subprocess.Popen:
    from helpers.backends.llama_cpp_engine import _gguf

    gguf, _ = _gguf("smollm2-135m-instruct")
    log = tempfile.TemporaryFile("w+")  # llama.cpp logs a lot: a pipe nobody reads would fill and stall it
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--n_ctx", "1024",
                             "--host", "127.0.0.1", "--port", str(port), "--logits_all", "true"],
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"llama_cpp.server exited: {log.read()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1).read()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("llama_cpp.server did not answer within 120 s")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    proc = _start(port)
    yield f"http://127.0.0.1:{port}/v1"
    _stop(proc)


@needs_server
def test_a_llama_cpp_server_conforms_to_transformers(server):
    engine = backends.open_backend("openai", "smollm2-135m-instruct", options={"url": server})
    assert engine.tokens == "text"  # found by the probe: the server takes text and names tokens by text
    reference = backends.open_backend("transformers", "smollm2-135m-instruct", dtype="fp32")
    # ids no piece names (special tokens, partial UTF-8 bytes) have their mass in the tail unless
    # read or written; everything else is held to the llama_cpp engine's tolerance
    # 2 short problems (word_arith) scored and written: the server ranks the whole vocabulary in Python
    # at every token it echoes (about 35 ms a token here)
    measured = conform(engine, reference, GGUF_Q4, max_new_tokens=32, unnameable=engine.unnameable(), n=2,
                       source="word_arith")
    assert measured["greedy_tokens_agreed"] >= 16


@needs_server
def test_text_pieces_map_back_to_the_teachers_ids(server):
    """The ids of ordinary text are named by their pieces; the ids no piece names (special tokens,
    partial UTF-8 bytes) are under 1 % of the vocabulary."""
    engine = backends.open_backend("openai", "smollm2-135m-instruct", options={"url": server})
    by_id, named = engine.pieces()
    assert len(engine.unnameable()) < 0.01 * engine.vocab_size
    assert set(engine.tokenizer.all_special_ids) <= set(engine.unnameable())
    tok = engine.tokenizer
    ids = tok("Natalia sold clips in April, and half as many in May: 48 + 24 = 72.", add_special_tokens=False).input_ids
    assert sum(by_id[i] in named and named[by_id[i]] == i for i in ids) >= 0.8 * len(ids)
    assert " " not in named  # " " + a lead byte also reads " ": the server's map cannot tell them apart


@needs_server
def test_the_server_samples_with_the_seeds_of_the_torch_generator(server):
    from helpers.models import prompt_text

    engine = backends.open_backend("openai", "smollm2-135m-instruct", options={"url": server})
    tok = engine.tokenizer  # short chat prompts: the server echoes every prompt token back
    prompts = [tok(prompt_text(tok, [{"role": "user", "content": q}]), add_special_tokens=False).input_ids
               for q in ("Name a colour.", "Count to five.")]
    samples_with_the_seeded_torch_generator(engine, prompts)


def test_a_server_that_is_down_is_named_in_one_line():
    port = _free_port()  # nothing listens there
    with pytest.raises(RuntimeError, match=rf"could not reach the openai server at http://127.0.0.1:{port}/v1 after 2 "
                                           r"tries .*resumes at its first missing shard"):
        backends.open_backend("openai", "smollm2-135m-instruct",
                              options={"url": f"http://127.0.0.1:{port}/v1", "retries": 1, "timeout": 2,
                                       "backoff": 0.01})


def test_busy_answers_are_retried_a_bounded_number_of_times():
    """503 twice, then an answer: three requests, one result; with fewer retries than that, one line."""
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            if len(seen) % 3:
                self.send_response(503)
                self.end_headers()
                return
            body = json.dumps({"choices": [{"index": 0, "text": "", "logprobs": {
                "tokens": ["token_id:5"], "token_logprobs": [-0.1], "top_logprobs": [{"token_id:5": -0.1}]}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_port}/v1"
        engine = backends.open_backend("openai", "smollm2-135m-instruct",
                                       options={"url": url, "tokens": "ids", "backoff": 0.01})
        assert engine._post({"prompt": [[1]], "max_tokens": 1})[0]["logprobs"]["tokens"] == ["token_id:5"]
        assert len(seen) == 3
        post = engine._post
        engine._post = lambda body: [{"index": 0, "text": "x", "logprobs": None}]  # an answer without log-probs
        with pytest.raises(RuntimeError, match="returned no log-probs for a completion"):
            engine.probe()
        engine._post = post
        engine.retries = 1
        with pytest.raises(RuntimeError, match=r"after 2 tries \(HTTP 503\)"):
            engine._post({"prompt": [[1]], "max_tokens": 1})
        assert len(seen) == 5
    finally:
        httpd.shutdown()


@needs_server
def test_a_server_dying_mid_store_leaves_a_store_that_resumes(tmp_path):
    """The server is stopped after the first shard: one line naming it, the first shard kept and no
    temporary file; with the server back the store completes, the same as one written in one go."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}/v1"
    records = [Record(f"r{i}", f"What is {i} + {i + 1}?", f"{i} + {i + 1} = {2 * i + 1}\n#### {2 * i + 1}",
                      2.0 * i + 1) for i in range(2)]
    kw = dict(teacher="smollm2-135m-instruct", strategy="base", k=4, max_new_tokens=8, batch_size=1, shard_size=1,
              progress=False)
    proc = _start(port)
    try:
        engine = backends.open_backend("openai", "smollm2-135m-instruct",
                                       options={"url": url, "retries": 1, "timeout": 5, "backoff": 0.01})
        whole = teacher.build_store(tmp_path / "whole", records, loaded=engine, **kw)
        original, calls = engine.generate, []

        def generate_then_die(*a, **k):
            out = original(*a, **k)
            calls.append(1)
            if len(calls) == 1:
                _stop(proc)
            return out

        engine.generate = generate_then_die
        with pytest.raises(RuntimeError, match=f"could not reach the openai server at {url}"):
            teacher.build_store(tmp_path / "cut", records, loaded=engine, **kw)
        cut = tmp_path / "cut"
        assert sorted(p.name for p in cut.glob("shard-*")) == ["shard-00000.safetensors"]
        assert not list(cut.glob("*.tmp"))
        proc = _start(port)
        engine.generate = original
        resumed = teacher.build_store(cut, records, loaded=engine, **kw)
        assert resumed.complete and len(calls) == 1
        assert resumed.manifest["shards"] == whole.manifest["shards"]
    finally:
        _stop(proc)
