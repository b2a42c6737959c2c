"""The ``vllm`` back end: the serving engine for teachers that need several GPUs or nodes (tensor and
pipeline parallelism; Ray for several nodes). Optional extra ``[vllm]``.

Two ways in:
- in-process (the default): ``vllm.LLM`` on this machine's GPUs (``tensor_parallel_size``,
  ``pipeline_parallel_size``, ``gpu_memory_utilization``, ``max_model_len``); the CUDA check comes
  first, so a machine without a GPU gets one line before anything is loaded;
- ``url``: an OpenAI-compatible vLLM server already running elsewhere (``vllm serve <model>
  --max-logprobs 128``), reached over HTTP with the standard library; this side needs no GPU and no
  vLLM, only the teacher's tokenizer (``tokenizer``, default the teacher's name).

Prompts go in as token ids of the teacher's ``transformers`` tokenizer, and tokens come back as ids
(``return_tokens_as_token_ids``), so nothing is re-tokenized. Per generated token vLLM returns the
top-N log-probs of the raw distribution (``logprobs=N``, N = k + ``tail_ranks``, 2k by default;
its ``max_logprobs`` is raised to 128) and the taken token's; scoring uses the prompt log-probs
(``prompt_logprobs=N``, or ``echo`` on a server), the whole batch in one call. vLLM does not
return the mass outside what it lists, so the tail is built from the ranks below k and the
resolved remainder (``capture_from_logprobs``). Generation stops at every end-of-sequence id of the
model's generation config and tokenizer (``capture.eos_ids``), the rule every engine follows.
Sampling seeds come from the torch generator ``build_store`` seeds, one per row. A repetition loop
is cut after generation, at the first multiple of 8 new tokens where the row loops, which is where
the ``transformers`` engine would have stopped it.

Checked against vLLM 0.33.0's source (its wheel on PyPI; the extra pins ``vllm>=0.33,<0.34``):
``LLM(model, tokenizer, dtype, tensor_parallel_size, gpu_memory_utilization, **EngineArgs:
pipeline_parallel_size, max_model_len, max_logprobs)`` and ``LLM.generate(prompts, sampling_params,
use_tqdm)`` in ``vllm/entrypoints/llm.py``; ``SamplingParams(max_tokens, temperature, top_p, seed,
logprobs, prompt_logprobs, stop_token_ids, detokenize)`` in ``vllm/sampling_params.py``;
``TokensPrompt(prompt_token_ids)`` in ``vllm/inputs/llm.py``; ``RequestOutput.prompt_logprobs`` (None
at the first position), ``.outputs[0].token_ids`` and ``.logprobs`` (a list of {id: ``Logprob``}
with ``.logprob``; the flat form only with ``flat_logprobs=True``, left off) in ``vllm/outputs.py``
and ``vllm/logprobs.py``; the server's completions request (``prompt`` as token-id lists, ``echo``,
``logprobs``, ``return_tokens_as_token_ids``, ``skip_special_tokens``, ``stop_token_ids``, ``seed``)
in ``vllm/entrypoints/openai/completion/protocol.py``. The names are recorded in
``tests/data/vllm_0.33.0_api.json``; the tests run the engine against a stand-in that accepts only
those.
"""
from __future__ import annotations

import json
import math
import urllib.error
import urllib.request

import numpy as np
import torch

from .needs import missing_package, need_cuda
from .capture import LOOP_CHECK_EVERY, engine_eos, eos_ids, looping, scored_row, solution_row


# vLLM's log-probs are an fp32 log-softmax: its normaliser, a sum of probabilities near 1, is rounded
# (2^-24 at best, more after summing a large vocabulary), so a mass obtained as 1 − Σ (returned
# probabilities) is noise below about this much; the most likely token reads log-prob exactly 0
# where the mass outside it is under ~6e-8.
MASS_RESOLUTION = 2.0 ** -17  # 128 ulps of 1.0 in fp32


def capture_from_logprobs(positions: list[dict[int, float]], taken: list[int], k: int, vocab_size: int) -> dict:
    """Capture arrays from per-position {token id: log-prob} maps (vLLM's top-N, N ≥ k, possibly plus
    the taken token): the top-k sorted, the taken token's log-prob and the tail, the log-mass outside
    the top-k (-inf only when k covers the vocabulary).

    The tail is not log(1 − Σ top-k): from fp32 log-probs that subtraction is noise for a confident
    teacher, and -inf where the top token reads log-prob 0. It is the log-sum-exp of the returned
    tokens ranked below k (each accurate to fp32), plus the mass none of the returned tokens holds,
    1 − Σ returned, only where that difference is above the fp32 resolution (``MASS_RESOLUTION``).
    With N = 2k (what the engine asks for) a confident teacher's tail is then finite and, where the
    difference is resolved, exact to rounding; where it is not, it is the returned ranks' mass (a
    lower bound), or, when the engine returned no token below the top-k, an upper bound: that
    resolution, or the k-th probability times the ids outside the top-k where that is smaller."""
    n = len(positions)
    ids, lps = np.zeros((n, k), np.int32), np.full((n, k), -np.inf, np.float32)
    tails, token = np.zeros(n, np.float32), np.zeros(n, np.float32)
    for j, (top, t) in enumerate(zip(positions, taken)):
        ranked = sorted(top.items(), key=lambda kv: -kv[1])
        if len(ranked) < k:
            raise ValueError(f"the engine returned {len(ranked)} log-probs at a position, fewer than k={k}: raise its "
                             "max_logprobs")
        best, below = ranked[:k], [lp for _, lp in ranked[k:]]
        ids[j], lps[j] = [i for i, _ in best], [lp for _, lp in best]
        token[j] = top[t]
        tails[j] = -np.inf if k >= vocab_size else _tail(best, below, vocab_size - k)
    return {"topk_ids": ids, "topk_logprobs": lps.astype(np.float16), "tail_logprobs": tails, "token_logprobs": token}


def _tail(best: list[tuple[int, float]], below: list[float], outside: int) -> float:
    """log(mass outside the top-k) from the top-k and the returned log-probs ranked below it;
    ``outside`` is the number of ids outside the top-k."""
    parts = [lp for lp in below if lp > -math.inf]
    unseen = 1.0 - math.fsum(math.exp(lp) for lp in [*(lp for _, lp in best), *parts])
    if unseen > MASS_RESOLUTION:
        parts.append(math.log(unseen))
    if not parts:  # nothing resolved outside the top-k: the tail is under the resolution, and under
        # `outside` ids each no likelier than the k-th
        return min(math.log(MASS_RESOLUTION), math.log(outside) + best[-1][1])
    m = max(parts)
    return m + math.log(math.fsum(math.exp(lp - m) for lp in parts))


def check_share_beside_training(options: dict | None, free_bytes: int, total_bytes: int) -> None:
    """In-process vLLM next to a student in training (on-policy KD): vLLM takes
    ``gpu_memory_utilization`` × the GPU for itself, 0.9 unless told, and refuses to start when less
    than that is free. So the share must be given, and must fit in what is free once the student is
    loaded, leaving the rest to training; otherwise one line says what to set (or to use a server)."""
    options = options or {}
    gib = 2 ** 30
    if options.get("url"):
        return
    share = options.get("gpu_memory_utilization")
    advice = (f"{free_bytes / gib:.1f} of {total_bytes / gib:.1f} GiB are free with the student loaded; give vLLM "
              "a share that leaves training its activations, gradients and optimizer state (e.g. half of what is "
              "free: teacher_backend_options: {gpu_memory_utilization: "
              f"{max(0.01, 0.5 * free_bytes / total_bytes):.2f}}}), or serve the teacher elsewhere with "
              "`vllm serve <teacher> --max-logprobs 128` and pass its url")
    if share is None:
        raise ValueError("on-policy KD with in-process vLLM needs teacher_backend_options.gpu_memory_utilization "
                         f"(vLLM would claim 90 % of the GPU): {advice}")
    if share * total_bytes > free_bytes:
        raise ValueError(f"on-policy KD: vLLM's gpu_memory_utilization {share} asks for "
                         f"{share * total_bytes / gib:.1f} GiB, more than is free: {advice}")


def loop_cut(tokenizer, new: list[int], eos) -> int | None:
    """Where a loop stop would have ended ``new`` (a multiple of 8 new tokens), or None."""
    stops = set(eos)
    for n in range(LOOP_CHECK_EVERY, len(new) + 1, LOOP_CHECK_EVERY):
        if stops.intersection(new[:n]):
            return None
        if looping(tokenizer, new[:n]):
            return n
    return None


def _seeds(n: int) -> list[int]:
    return [int(s) for s in torch.randint(0, 2 ** 31 - 1, (n,))]


class VllmEngine:
    """vLLM in this process (``llm``) or behind an OpenAI-compatible ``url``, as a teacher engine."""

    name = "vllm"

    def __init__(self, tokenizer, *, llm=None, url: str | None = None, model_name: str | None = None,
                 api_key: str | None = None, timeout: float = 600.0, eos: list[int] | None = None,
                 tail_ranks: int = 64, max_logprobs: int | None = None):
        self.tokenizer, self.llm, self.url = tokenizer, llm, url.rstrip("/") if url else None
        self.model_name, self.api_key, self.timeout = model_name, api_key, timeout
        self.eos = list(eos) if eos is not None else eos_ids(tokenizer=tokenizer)
        self.vocab_size = len(tokenizer)
        self.tail_ranks, self.max_logprobs = tail_ranks, max_logprobs

    def n_logprobs(self, k: int) -> int:
        """How many log-probs to ask for per position: the top-k and ``tail_ranks`` more (the tail's
        accurate part), within the engine's ``max_logprobs``."""
        n = k + self.tail_ranks
        return n if self.max_logprobs is None else max(k, min(n, self.max_logprobs))

    @classmethod
    def open(cls, teacher: str, *, dtype: str = "auto", device: str = "auto", url: str | None = None,
             tokenizer: str | None = None, api_key: str | None = None, timeout: float = 600.0,
             tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
             max_model_len: int | None = None, max_logprobs: int = 128, tail_ranks: int = 64,
             **llm_options) -> VllmEngine:
        from ..models import load_tokenizer, resolve

        if not url:  # before anything is loaded: without a GPU, one line and nothing else
            need_cuda("vllm", "vllm")
        tok = load_tokenizer(tokenizer or teacher)
        eos = engine_eos(tok, teacher, tokenizer)
        if url:
            return cls(tok, url=url, model_name=teacher, api_key=api_key, timeout=timeout, eos=eos,
                       tail_ranks=tail_ranks)
        try:
            from vllm import LLM
        except ImportError as e:
            raise missing_package("vllm", "vllm", "vllm", e) from None

        dtypes = {"auto": "auto", "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16",
                  "float16": "float16", "fp32": "float32", "float32": "float32"}
        llm = LLM(model=resolve(teacher), tokenizer=resolve(tokenizer or teacher), dtype=dtypes[dtype],
                  tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size,
                  gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                  max_logprobs=max_logprobs, **llm_options)
        return cls(tok, llm=llm, eos=eos, tail_ranks=tail_ranks, max_logprobs=max_logprobs)

    # ------------------------------------------------------------------ generation
    def generate(self, prompt_ids: list[list[int]], *, k: int, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, stop_loops: bool = False) -> list[dict]:
        seeds = _seeds(len(prompt_ids))
        sampling = {"max_tokens": max_new_tokens, "temperature": temperature if do_sample else 0.0,
                    "top_p": top_p if do_sample else 1.0, "logprobs": self.n_logprobs(k), "stop_token_ids": self.eos}
        got = self._generate_local(prompt_ids, sampling, seeds) if self.llm is not None else \
            self._generate_remote(prompt_ids, sampling, seeds)
        rows = []
        for new, positions in got:
            cap = capture_from_logprobs(positions, new, k, self.vocab_size)
            looped = loop_cut(self.tokenizer, new, self.eos) if stop_loops else None
            rows.append(solution_row(self.tokenizer, new, self.eos, looped_at=looped, capture=cap))
        return rows

    def _generate_local(self, prompt_ids, sampling, seeds):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(**sampling, seed=s, detokenize=False) for s in seeds]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], params, use_tqdm=False)
        return [(list(o.outputs[0].token_ids), [{i: lp.logprob for i, lp in pos.items()} for pos in o.outputs[0].logprobs])
                for o in outs]

    def _generate_remote(self, prompt_ids, sampling, seeds):
        out = []
        for p, s in zip(prompt_ids, seeds):  # one request per row: each has its own seed
            choice = self._post({"prompt": [list(p)], **sampling, "seed": s})[0]
            out.append(_parse_choice(choice))
        return out

    # ------------------------------------------------------------------ scoring
    def score(self, prompt_ids: list[list[int]], text_ids: list[list[int]], *, k: int) -> list[dict]:
        seqs = [list(p) + list(t) for p, t in zip(prompt_ids, text_ids)]
        n = self.n_logprobs(k)
        if self.llm is not None:  # one call for the batch: vLLM schedules the sequences together
            from vllm import SamplingParams
            from vllm.inputs import TokensPrompt

            outs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs],
                                     SamplingParams(max_tokens=1, prompt_logprobs=n, detokenize=False), use_tqdm=False)
            every = [[{i: lp.logprob for i, lp in pos.items()} for pos in o.prompt_logprobs[len(p):]]
                     for o, p in zip(outs, prompt_ids)]
        else:  # one request for the batch: the completions API takes a list of prompts
            choices = self._post({"prompt": seqs, "max_tokens": 1, "echo": True, "logprobs": n, "temperature": 0.0})
            every = [_parse_choice(c)[1][len(p):len(s)] for c, p, s in zip(choices, prompt_ids, seqs)]
        return [scored_row(self.tokenizer, text, capture_from_logprobs(positions, list(text), k, self.vocab_size))
                for text, positions in zip(text_ids, every)]

    def _post(self, body: dict) -> list[dict]:
        body = {"model": self.model_name, "return_tokens_as_token_ids": True, "skip_special_tokens": False, **body}
        request = urllib.request.Request(f"{self.url}/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json",
                                                  **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"the vLLM server at {self.url} refused the request ({e.code}): "
                               f"{e.read().decode(errors='replace')[:300]}") from None
        except (urllib.error.URLError, OSError) as e:
            raise RuntimeError(f"could not reach the vLLM server at {self.url} ({getattr(e, 'reason', e)}); start it "
                               f"with `vllm serve <teacher> --max-logprobs 64` or fix the option 'url'") from None
        return sorted(answer["choices"], key=lambda c: c["index"])

    def close(self) -> None:
        self.llm = None


def _token_id(token: str) -> int:
    """``"token_id:123"`` (vLLM's ``return_tokens_as_token_ids``) -> 123."""
    if not token.startswith("token_id:"):
        raise ValueError(f"the server returned the token {token!r} as text: it must be a vLLM server, which "
                         "returns token ids when asked (return_tokens_as_token_ids)")
    return int(token[len("token_id:"):])


def _parse_choice(choice: dict) -> tuple[list[int], list[dict[int, float]]]:
    """A completions choice -> (its token ids, the {id: log-prob} map at each of them); positions
    without log-probs (the first echoed token) get an empty map."""
    lp = choice["logprobs"]
    ids = [_token_id(t) for t in lp["tokens"]]
    tops = [{_token_id(t): v for t, v in (top or {}).items()} for top in lp["top_logprobs"]]
    for top, i, v in zip(tops, ids, lp["token_logprobs"]):
        if v is not None:
            top.setdefault(i, v)
    return ids, tops
