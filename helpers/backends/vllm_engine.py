"""The ``vllm`` back end: the serving engine for teachers that need several GPUs or nodes (tensor and
pipeline parallelism; Ray for several nodes). Optional extra ``[vllm]``.

Two ways in:
- in-process (the default): ``vllm.LLM`` on this machine's GPUs (``tensor_parallel_size``,
  ``pipeline_parallel_size``, ``gpu_memory_utilization``, ``max_model_len``); the CUDA check comes
  first, so a machine without a GPU gets one line before anything is loaded;
- ``url``: an OpenAI-compatible vLLM server already running elsewhere (``vllm serve <model>
  --max-logprobs 128``): the ``openai`` engine (``helpers.backends.openai_engine``) with tokens
  named by id, which this class extends; this side needs no GPU and no vLLM, only the teacher's
  tokenizer (``tokenizer``, default the teacher's name).

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

from .needs import missing_package, need_cuda
from .capture import engine_eos, scored_row
from .openai_engine import (MASS_RESOLUTION, OpenAIEngine, capture_from_logprobs, loop_cut,  # noqa: F401
                            seeds)


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


class VllmEngine(OpenAIEngine):
    """vLLM in this process (``llm``) or behind its OpenAI-compatible ``url`` (the ``openai`` engine,
    tokens named by id), as a teacher engine."""

    name = "vllm"

    def __init__(self, tokenizer, *, llm=None, url: str | None = None, model_name: str | None = None,
                 api_key: str | None = None, timeout: float = 600.0, retries: int = 3, eos: list[int] | None = None,
                 tail_ranks: int = 64, max_logprobs: int | None = None):
        super().__init__(tokenizer, url=url or "", model_name=model_name, api_key=api_key, timeout=timeout,
                         retries=retries, eos=eos, tokens="ids", tail_ranks=tail_ranks, max_logprobs=max_logprobs)
        self.llm = llm

    @classmethod
    def open(cls, teacher: str, *, dtype: str = "auto", device: str = "auto", url: str | None = None,
             tokenizer: str | None = None, api_key: str | None = None, timeout: float = 600.0, retries: int = 3,
             tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
             max_model_len: int | None = None, max_logprobs: int = 128, tail_ranks: int = 64,
             **llm_options) -> VllmEngine:
        from ..models import load_tokenizer, resolve

        if not url:  # before anything is loaded: without a GPU, one line and nothing else
            need_cuda("vllm", "vllm")
        tok = load_tokenizer(tokenizer or teacher)
        eos = engine_eos(tok, teacher, tokenizer)
        if url:
            return cls(tok, url=url, model_name=teacher, api_key=api_key, timeout=timeout, retries=retries, eos=eos,
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
        if self.llm is None:
            return super().generate(prompt_ids, k=k, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                    temperature=temperature, top_p=top_p, stop_loops=stop_loops)
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sampling = {"max_tokens": max_new_tokens, "temperature": temperature if do_sample else 0.0,
                    "top_p": top_p if do_sample else 1.0, "logprobs": self.n_logprobs(k), "stop_token_ids": self.eos}
        params = [SamplingParams(**sampling, seed=s, detokenize=False) for s in seeds(len(prompt_ids))]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], params, use_tqdm=False)
        return [self._row(list(o.outputs[0].token_ids),
                          [{i: lp.logprob for i, lp in pos.items()} for pos in o.outputs[0].logprobs], k, stop_loops)
                for o in outs]

    # ------------------------------------------------------------------ scoring
    def score(self, prompt_ids: list[list[int]], text_ids: list[list[int]], *, k: int) -> list[dict]:
        if self.llm is None:
            return super().score(prompt_ids, text_ids, k=k)
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # one call for the batch: vLLM schedules the sequences together
        seqs = [list(p) + list(t) for p, t in zip(prompt_ids, text_ids)]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs],
                                 SamplingParams(max_tokens=1, prompt_logprobs=self.n_logprobs(k), detokenize=False),
                                 use_tqdm=False)
        every = [[{i: lp.logprob for i, lp in pos.items()} for pos in o.prompt_logprobs[len(p):]]
                 for o, p in zip(outs, prompt_ids)]
        return [scored_row(self.tokenizer, text, capture_from_logprobs(positions, list(text), k, self.vocab_size))
                for text, positions in zip(text_ids, every)]

    def close(self) -> None:
        self.llm = None
