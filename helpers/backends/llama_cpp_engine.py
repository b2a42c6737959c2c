"""The ``llama_cpp`` back end: GGUF teachers on llama.cpp (``llama-cpp-python``, the optional extra
``[cpu-fast]``), the engine laptop users run quantised models with.

The quantised weights are used as they are (no de-quantised copy); llama.cpp computes the logits of
every position it is fed, and this engine takes the top-k, the tail mass and the taken token's
log-prob from those logits exactly as the ``transformers`` engine does (``capture.topk_capture``).
Decoding is the project's own on those logits (greedy: the first highest logit; sampling: the
temperature and top-p warpers of ``transformers`` and the torch generator ``build_store`` seeds),
one sequence at a time; a prompt that shares a prefix with the previous one (the system prompt)
reuses its cache. Token ids come from the teacher's ``transformers`` tokenizer, so a store written
here has the same tokens, tokenizer fingerprint and format as one written by ``transformers``.

Teachers: an embedded name (its GGUF file) or a path to a ``.gguf`` file (its tokenizer read by
``transformers`` from the same file, or from ``tokenizer``, an option naming a model or folder).
Options: ``n_ctx`` (context length, default 2048), ``n_threads`` (default: every core this process
may use; llama-cpp-python's own default is half of them, which halves the speed on a small CPU),
``n_gpu_layers`` (0; -1 offloads every layer where llama.cpp was built with a GPU back end),
``tokenizer``, and any other keyword of ``llama_cpp.Llama`` (e.g. ``type_k``).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch

from .needs import missing_package
from .capture import decode_row, engine_eos, eos_ids, scored_row, topk_capture


def _gguf(teacher: str) -> tuple[Path, Path | None]:
    """The GGUF file of ``teacher`` and a temporary folder to delete when done (or None)."""
    from ..models import EMBEDDED, Assembled, gguf_location

    if teacher in EMBEDDED:
        folder, filename = gguf_location(teacher)
        return folder / filename, folder if isinstance(EMBEDDED[teacher], Assembled) else None
    path = Path(teacher)
    if path.suffix != ".gguf" or not path.is_file():
        raise ValueError(f"teacher_backend 'llama_cpp' runs GGUF files: {teacher!r} is neither an embedded model "
                         f"({', '.join(EMBEDDED)}) nor an existing .gguf file")
    return path, None


def _tokenizer(teacher: str, gguf: Path, tokenizer: str | None):
    from ..models import EMBEDDED, for_generation, load_tokenizer

    if tokenizer is not None or teacher in EMBEDDED:
        return load_tokenizer(tokenizer or teacher)
    from transformers import AutoTokenizer

    return for_generation(AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name))


def _eos(tok, teacher: str, tokenizer: str | None, llm) -> list[int]:
    """End-of-sequence ids: the generation config of the model the GGUF was made from (an embedded
    name, or the ``tokenizer`` option's folder: where ``_tokenizer`` reads the tokenizer), else what
    the GGUF's own metadata names (end of sequence, end of turn, end of message); then the tokenizer's."""
    from ..models import EMBEDDED

    if tokenizer is not None or teacher in EMBEDDED:
        return engine_eos(tok, tokenizer or teacher)
    meta = getattr(llm, "metadata", None) or {}
    return eos_ids(tokenizer=tok, extra=[int(meta[key]) for key in ("tokenizer.ggml.eos_token_id",
                                                                     "tokenizer.ggml.eot_token_id",
                                                                     "tokenizer.ggml.eom_token_id") if key in meta])


class LlamaCppEngine:
    """A GGUF model on llama.cpp as a teacher engine (see ``helpers.backends``)."""

    name = "llama_cpp"

    def __init__(self, llm, tokenizer, *, eos: list[int], cleanup: Path | None = None):
        self.llm, self.tokenizer, self.eos, self._cleanup = llm, tokenizer, eos, cleanup
        if llm.n_vocab() < len(tokenizer):  # more ids in the GGUF (padding rows) is fine, fewer is a mismatch
            raise ValueError(f"the GGUF has {llm.n_vocab()} token ids but its tokenizer has {len(tokenizer)}: "
                             "they do not belong together")

    @classmethod
    def open(cls, teacher: str, *, dtype: str = "auto", device: str = "auto", n_ctx: int = 2048,
             n_threads: int | None = None, n_gpu_layers: int = 0, tokenizer: str | None = None,
             **llama_options) -> LlamaCppEngine:
        try:
            from llama_cpp import Llama
        except ImportError as e:
            raise missing_package("llama_cpp", "llama-cpp-python", "cpu-fast", e) from None
        gguf, cleanup = _gguf(teacher)
        try:
            tok = _tokenizer(teacher, gguf, tokenizer)
            llm = Llama(model_path=str(gguf), n_ctx=n_ctx, logits_all=True, n_gpu_layers=n_gpu_layers,
                        verbose=False, n_threads=n_threads or len(os.sched_getaffinity(0)), **llama_options)
        except BaseException:
            if cleanup is not None:
                shutil.rmtree(cleanup, ignore_errors=True)
            raise
        return cls(llm, tok, eos=_eos(tok, teacher, tokenizer, llm), cleanup=cleanup)

    def _fits(self, n: int) -> None:
        # llama.cpp may round its context up; the logits kept per position are what n_ctx asked for
        room = min(self.llm.n_ctx(), len(self.llm.scores))
        if n > room:
            raise ValueError(f"a sequence of up to {n} tokens does not fit llama.cpp's context of {room} tokens: "
                             "raise the llama_cpp option n_ctx")

    def _feed(self, ids: list[int], start: int) -> torch.Tensor:
        """Bring the context to exactly ``ids``, reusing the cached common prefix up to ``start`` at
        most, and return the logits at positions ``start`` … ``len(ids) - 1``, [n, V] fp32."""
        llm = self.llm
        self._fits(len(ids))
        cached = llm.input_ids[:llm.n_tokens].tolist()
        keep = 0
        while keep < min(len(cached), start) and cached[keep] == ids[keep]:
            keep += 1
        llm.n_tokens = keep
        llm.eval(ids[keep:])
        return torch.from_numpy(np.array(llm.scores[start:len(ids)], dtype=np.float32))

    def _step(self, token: int) -> torch.Tensor:
        self.llm.eval([token])
        return torch.from_numpy(np.array(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float32))

    def generate(self, prompt_ids: list[list[int]], *, k: int, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, stop_loops: bool = False) -> list[dict]:
        self._fits(max(map(len, prompt_ids), default=0) + max_new_tokens)
        return [decode_row(self.tokenizer, self.eos, self._feed(list(p), len(p) - 1)[-1], self._step, k=k,
                           max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                           stop_loops=stop_loops) for p in prompt_ids]

    def score(self, prompt_ids: list[list[int]], text_ids: list[list[int]], *, k: int) -> list[dict]:
        rows = []
        for prompt, text in zip(prompt_ids, text_ids):
            # the logits at position j predict token j + 1: the text's tokens are predicted by the
            # positions from the prompt's last token to the text's second to last
            logits = self._feed(list(prompt) + list(text), len(prompt) - 1)[:-1]
            cap = topk_capture(logits, k, torch.tensor(text))
            rows.append(scored_row(self.tokenizer, text, cap))
        return rows

    def close(self) -> None:
        self.llm.close()
        if self._cleanup is not None:
            shutil.rmtree(self._cleanup, ignore_errors=True)
            self._cleanup = None
