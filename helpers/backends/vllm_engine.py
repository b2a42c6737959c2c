"""The ``vllm`` back end: the serving engine for teachers that need several GPUs or nodes (tensor and
pipeline parallelism; Ray for several nodes). Optional extra ``[vllm]``.

Two ways in:
- in-process (the default): ``vllm.LLM`` on this machine's GPUs (``tensor_parallel_size``,
  ``pipeline_parallel_size``, ``gpu_memory_utilization``, ``max_model_len``); imported only after a
  CUDA check that fails in one line without a GPU;
- ``url``: an OpenAI-compatible vLLM server already running elsewhere (``vllm serve <model>
  --max-logprobs 64``), reached over HTTP with the standard library; this side needs no GPU and no
  vLLM, only the teacher's tokenizer (``tokenizer``, default the teacher's name).

Prompts go in as token ids of the teacher's ``transformers`` tokenizer, and tokens come back as ids
(``return_tokens_as_token_ids``), so nothing is re-tokenized. Per generated token vLLM returns the
top-k log-probs (``logprobs=k``; its ``max_logprobs`` is raised to k) of the raw distribution, and
the taken token's; scoring uses the prompt log-probs (``prompt_logprobs=k``, or ``echo`` on a server).
vLLM does not return the mass outside the top-k, so the tail is log(1 − Σ top-k probabilities),
exact up to float rounding. Sampling seeds come from the torch generator ``build_store`` seeds, one
per row. A repetition loop is cut after generation, at the first multiple of 8 new tokens where the
row loops, which is where the ``transformers`` engine would have stopped it.
"""
from __future__ import annotations

import json
import math
import urllib.error
import urllib.request

import numpy as np
import torch

from . import missing_package, need_cuda
from .capture import LOOP_CHECK_EVERY, eos_ids, looping, scored_row, solution_row


def capture_from_logprobs(positions: list[dict[int, float]], taken: list[int], k: int, vocab_size: int) -> dict:
    """Capture arrays from per-position {token id: log-prob} maps (the top-k, possibly plus the taken
    token): top-k sorted, the taken token's log-prob, the tail log(1 − Σ exp(top-k)) (-inf when k
    covers the vocabulary)."""
    n = len(positions)
    ids, lps = np.zeros((n, k), np.int32), np.full((n, k), -np.inf, np.float32)
    tails, token = np.zeros(n, np.float32), np.zeros(n, np.float32)
    for j, (top, t) in enumerate(zip(positions, taken)):
        best = sorted(top.items(), key=lambda kv: -kv[1])[:k]
        if len(best) < k:
            raise ValueError(f"the engine returned {len(best)} log-probs at a position, fewer than k={k}: raise its "
                             "max_logprobs")
        ids[j], lps[j] = [i for i, _ in best], [lp for _, lp in best]
        token[j] = top[t]
        mass = math.fsum(math.exp(lp) for _, lp in best)
        tails[j] = -np.inf if k >= vocab_size or mass >= 1.0 else math.log1p(-mass)
    return {"topk_ids": ids, "topk_logprobs": lps.astype(np.float16), "tail_logprobs": tails, "token_logprobs": token}


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
                 api_key: str | None = None, timeout: float = 600.0):
        self.tokenizer, self.llm, self.url = tokenizer, llm, url.rstrip("/") if url else None
        self.model_name, self.api_key, self.timeout = model_name, api_key, timeout
        self.eos = eos_ids(tokenizer=tokenizer)
        self.vocab_size = len(tokenizer)

    @classmethod
    def open(cls, teacher: str, *, dtype: str = "auto", device: str = "auto", url: str | None = None,
             tokenizer: str | None = None, api_key: str | None = None, timeout: float = 600.0,
             tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
             max_model_len: int | None = None, max_logprobs: int = 64, **llm_options) -> VllmEngine:
        from ..models import load_tokenizer

        tok = load_tokenizer(tokenizer or teacher)
        if url:
            return cls(tok, url=url, model_name=teacher, api_key=api_key, timeout=timeout)
        need_cuda("vllm", "vllm")
        try:
            from vllm import LLM
        except ImportError as e:
            raise missing_package("vllm", "vllm", "vllm", e) from None
        from ..models import resolve

        dtypes = {"auto": "auto", "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16",
                  "float16": "float16", "fp32": "float32", "float32": "float32"}
        llm = LLM(model=resolve(teacher), tokenizer=resolve(tokenizer or teacher), dtype=dtypes[dtype],
                  tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size,
                  gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                  max_logprobs=max_logprobs, **llm_options)
        return cls(tok, llm=llm)

    # ------------------------------------------------------------------ generation
    def generate(self, prompt_ids: list[list[int]], *, k: int, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, stop_loops: bool = False) -> list[dict]:
        seeds = _seeds(len(prompt_ids))
        sampling = {"max_tokens": max_new_tokens, "temperature": temperature if do_sample else 0.0,
                    "top_p": top_p if do_sample else 1.0, "logprobs": k, "stop_token_ids": self.eos}
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
        rows = []
        for prompt, text in zip(prompt_ids, text_ids):
            seq = list(prompt) + list(text)
            if self.llm is not None:
                from vllm import SamplingParams
                from vllm.inputs import TokensPrompt

                o = self.llm.generate([TokensPrompt(prompt_token_ids=seq)],
                                      SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False), use_tqdm=False)[0]
                positions = [{i: lp.logprob for i, lp in pos.items()} for pos in o.prompt_logprobs[len(prompt):]]
            else:
                choice = self._post({"prompt": [seq], "max_tokens": 1, "echo": True, "logprobs": k,
                                     "temperature": 0.0})[0]
                positions = _parse_choice(choice)[1][len(prompt):len(seq)]
            rows.append(scored_row(self.tokenizer, text, capture_from_logprobs(positions, list(text), k,
                                                                               self.vocab_size)))
        return rows

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
