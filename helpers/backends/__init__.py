"""Teacher engines behind one interface: the store they fill is the same whichever runs.

``teacher_backend`` in a profile picks one (``open_backend``):

| back end | runs | install | teachers |
|---|---|---|---|
| ``transformers`` | CPU, one or several GPUs | (default) | any causal LM; the reference the others are checked against |
| ``llama_cpp`` | CPU (AVX2/NEON), Metal, CUDA | ``pip install -e .[cpu-fast]`` (builds llama.cpp with cmake) | GGUF files, e.g. the embedded SmolLM2 |
| ``vllm`` | CUDA, one or several GPUs or nodes | ``pip install -e .[vllm]`` | a hub model in-process, or an OpenAI-compatible vLLM server (``url``) |
| ``openai`` | wherever the server runs | (nothing: the standard library) | any model behind an OpenAI-compatible completions server: ``vllm serve``, SGLang, ``python -m llama_cpp.server`` (``url``) |
| ``exllamav2`` | CUDA | ``pip install -e .[exl2]`` | EXL2/GPTQ-quantised folders (the study's 405B at 6 bpw) |
| ``exllamav3`` | CUDA | ``pip install -e .[exl3]`` | EXL3-quantised folders (ExLlamaV2's maintained successor) |

Every engine works on token ids produced by the teacher's ``transformers`` tokenizer (``.tokenizer``):
that tokenizer renders the prompts, fingerprints the store and decodes responses, so a store does
not depend on which engine wrote it. An engine has two methods, both on batches of token ids:

- ``generate(prompt_ids, *, k, max_new_tokens, do_sample, temperature, top_p, stop_loops)``: the
  teacher writes; per new token the top-k ids and log-probs of its raw distribution (temperature
  1), the log-mass outside them and the log-prob of the token taken;
- ``score(prompt_ids, text_ids, *, k)``: teacher forcing of ``text_ids`` after each prompt, the same
  quantities at every text token;

returning rows of the shape ``capture.solution_row`` / ``capture.scored_row`` build; and ``close()``.
Engines that need CUDA import their package only inside ``open``, after a CUDA check.
"""
from __future__ import annotations

from ..settings import BACKENDS  # noqa: F401  (declared once, with the other settings)
from .capture import eos_ids, tail_logprob, topk_capture  # noqa: F401  (the shared ground of every engine)
from .needs import missing_package, need_cuda  # noqa: F401


def open_backend(name: str, teacher: str, *, dtype: str = "auto", device: str = "auto", options: dict | None = None):
    """The engine ``name`` serving ``teacher`` (a model id, folder, embedded name or, for llama_cpp,
    a .gguf file); ``options`` are the engine's own settings (``teacher_backend_options``)."""
    options = dict(options or {})
    if name == "transformers":
        from .transformers_engine import TransformersEngine as engine
    elif name == "llama_cpp":
        from .llama_cpp_engine import LlamaCppEngine as engine
    elif name == "vllm":
        from .vllm_engine import VllmEngine as engine
    elif name == "openai":
        from .openai_engine import OpenAIEngine as engine
    elif name == "exllamav2":
        from .exllamav2_engine import ExLlamaV2Engine as engine
    elif name == "exllamav3":
        from .exllamav3_engine import ExLlamaV3Engine as engine
    else:
        raise ValueError(f"unknown teacher_backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return engine.open(teacher, dtype=dtype, device=device, **options)
