"""The ``exllamav2`` back end: EXL2/GPTQ-quantised teachers on one or several CUDA GPUs (the study
ran its 405B teacher this way, EXL2 at 6 bits per weight). Optional extra ``[exl2]``.

ExLlamaV2 compiles CUDA code when it is imported, so it is imported only inside ``open``, after a
CUDA check that fails in one line on a machine without a GPU. The engine uses ExLlamaV2 for the
forward passes only (its cache split over the GPUs); the top-k capture and the decoding (greedy,
or the ``transformers`` temperature and top-p warpers with the seeded torch generator) are the
project's own, as for ``llama_cpp``, one sequence at a time.

Teachers: a folder holding an EXL2 (or GPTQ, or fp16 safetensors) model with its
``tokenizer.json``; the ``transformers`` tokenizer is read from the same folder (or from
``tokenizer``). Options: ``gpu_split`` (GiB per GPU, e.g. ``[70, 70]``; default: fill the GPUs in
turn), ``max_seq_len`` (default 4096), ``cache_bits`` (16, 8 or 4: the key/value cache's precision),
``tokenizer``.
"""
from __future__ import annotations

import torch

from .needs import missing_package, need_cuda
from .capture import decode_row, engine_eos, eos_ids, scored_row, topk_capture


class ExLlamaV2Engine:
    """An ExLlamaV2 model as a teacher engine (see ``helpers.backends``)."""

    name = "exllamav2"

    def __init__(self, model, cache, tokenizer, eos: list[int] | None = None):
        self.model, self.cache, self.tokenizer = model, cache, tokenizer
        self.eos = list(eos) if eos is not None else eos_ids(tokenizer=tokenizer)

    @classmethod
    def open(cls, teacher: str, *, dtype: str = "auto", device: str = "auto", gpu_split: list[float] | None = None,
             max_seq_len: int = 4096, cache_bits: int = 16, tokenizer: str | None = None) -> ExLlamaV2Engine:
        need_cuda("exllamav2", "exl2")
        try:
            import exllamav2
        except ImportError as e:
            raise missing_package("exllamav2", "exllamav2", "exl2", e) from None
        from ..models import load_tokenizer

        caches = {16: exllamav2.ExLlamaV2Cache, 8: exllamav2.ExLlamaV2Cache_8bit, 4: exllamav2.ExLlamaV2Cache_Q4}
        if cache_bits not in caches:
            raise ValueError(f"exllamav2 option cache_bits={cache_bits!r}: use 16, 8 or 4")
        config = exllamav2.ExLlamaV2Config(teacher)
        config.max_seq_len = max_seq_len
        model = exllamav2.ExLlamaV2(config)
        if gpu_split is None:  # fill the GPUs in turn, the cache allocated as the layers land
            cache = caches[cache_bits](model, max_seq_len=max_seq_len, lazy=True)
            model.load_autosplit(cache, progress=True)
        else:
            model.load(gpu_split=list(gpu_split), progress=True)
            cache = caches[cache_bits](model, max_seq_len=max_seq_len)
        tok = load_tokenizer(tokenizer or teacher)
        return cls(model, cache, tok, engine_eos(tok, teacher))

    def _forward(self, ids: list[int], *, last_only: bool) -> torch.Tensor:
        out = self.model.forward(torch.tensor([ids], dtype=torch.long), self.cache, last_id_only=last_only)
        return out[0, :, :len(self.tokenizer)].float()  # drop the head's padding columns

    def generate(self, prompt_ids: list[list[int]], *, k: int, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, stop_loops: bool = False) -> list[dict]:
        rows = []
        for prompt in prompt_ids:
            self.cache.current_seq_len = 0
            rows.append(decode_row(self.tokenizer, self.eos, self._forward(list(prompt), last_only=True)[-1],
                                   lambda token: self._forward([token], last_only=True)[-1], k=k,
                                   max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                   top_p=top_p, stop_loops=stop_loops))
        return rows

    def score(self, prompt_ids: list[list[int]], text_ids: list[list[int]], *, k: int) -> list[dict]:
        rows = []
        for prompt, text in zip(prompt_ids, text_ids):
            self.cache.current_seq_len = 0
            logits = self._forward(list(prompt) + list(text), last_only=False)
            cap = topk_capture(logits[len(prompt) - 1:-1], k, torch.tensor(text))
            rows.append(scored_row(self.tokenizer, text, cap))
        return rows

    def close(self) -> None:
        self.model.unload()
