"""The ``exllamav2`` back end: EXL2/GPTQ-quantised teachers on one or several CUDA GPUs (the study
ran its 405B teacher this way, EXL2 at 6 bits per weight). Optional extra ``[exl2]``. ExLlamaV2 is
unmaintained since July 2025; EXL3 models run on its successor, the ``exllamav3`` engine.

ExLlamaV2 compiles CUDA code when it is imported, so it is imported only inside ``open``, after a
CUDA check that fails in one line on a machine without a GPU. The engine uses ExLlamaV2 for the
forward passes only (its cache split over the GPUs); the top-k capture and the decoding (greedy,
or the ``transformers`` temperature and top-p warpers with the seeded torch generator) are the
project's own, as for ``llama_cpp``, one sequence at a time.

Teachers: a local folder holding an EXL2 (or GPTQ, or fp16 safetensors) model with its
``tokenizer.json``; the ``transformers`` tokenizer is read from the same folder (or from
``tokenizer``). Options: ``gpu_split`` (GiB per GPU, e.g. ``[70, 70]``; default: fill the GPUs in
turn), ``max_seq_len`` (the longest prompt plus text or new tokens; default the model's own length,
at most 4096), ``cache_bits`` (16, 8, 6 or 4: the key/value cache's precision; 8, 6 and 4 are
ExLlamaV2's grouped Q8/Q6/Q4 caches), ``tokenizer``.

Checked against ExLlamaV2 0.3.2's source (its wheel on PyPI; the extra pins ``exllamav2>=0.3.2,<0.4``):

- ``ExLlamaV2Config(model_dir)`` reads ``config.json`` (``exllamav2/config.py``:167): ``max_seq_len``
  from ``max_position_embeddings`` (:369), ``vocab_size`` (:250), ``max_input_len`` 2048 (:175); a
  model folder only (it asserts the folder exists, :213). ``max_seq_len`` is set before the model
  is loaded (it sizes the RoPE tables, ``device.py``:148). ``arch_compat_overrides()`` (:629) turns
  off the attention kernels a model cannot use (softcapping, sliding windows), as the library's own
  ``model_init.py``:132 does;
- ``ExLlamaV2(config)`` (``model.py``:78); ``load_autosplit(cache, progress=...)`` (:476) with a cache
  made ``lazy=True``, allocated as the layers land; ``load(gpu_split=..., progress=...)`` (:266), the
  cache made afterwards (its tensors go where the attention layers went, ``cache.py``:90);
- ``ExLlamaV2Cache``, ``ExLlamaV2Cache_Q8/Q6/Q4(model, batch_size=1, max_seq_len=-1, copy_from,
  lazy=False, ...)`` (``cache.py``:235, :636, :611, :586); the Q caches round ``max_seq_len`` up to
  their block (:454), so the room checked is ``cache.max_seq_len``. ``ExLlamaV2Cache_8bit`` (:306)
  is FP8 e5m2 by truncation and is not used; ``cache.reset()`` (:226) sets ``current_seq_len`` to 0;
- ``forward(input_ids, cache, ..., last_id_only=False)`` (``model.py``:765): ``input_ids`` a
  [batch, n] int64 tensor on the CPU (the embedding stays in system memory: ``model.py``:215 for
  ``load``, :582 for ``load_autosplit``); with a cache it takes a prompt of any length in one call,
  in chunks of ``config.max_input_len`` (:873-:928; with ``last_id_only`` the chunks before the
  last only fill the cache, :904), writes at ``cache.current_seq_len`` and advances it (:1027),
  and asserts that the sequence fits the cache (:865). It returns fp16 logits [batch, n or 1,
  vocabulary] on the last layer's GPU; the head's width is ``vocab_size`` rounded up to 32
  (``linear.py``:82, ``pad32`` defaults to True) and those columns read -65504 (``model.py``:1051),
  so the logits kept are the model's ``vocab_size`` columns, the ones the ``transformers`` engine
  has;
- ``unload()`` (``model.py``:682) frees the weights; the cache goes with the engine.

The names are recorded in ``tests/data/exllamav2_0.3.2_api.json`` (``scripts/record_api.py``); the
tests run the engine against a stand-in that accepts only those.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .needs import missing_package, need_cuda
from .capture import OneSequenceAtATime, engine_eos, eos_ids

DEFAULT_MAX_SEQ_LEN = 4096
CACHES = {16: "ExLlamaV2Cache", 8: "ExLlamaV2Cache_Q8", 6: "ExLlamaV2Cache_Q6", 4: "ExLlamaV2Cache_Q4"}


def model_folder(teacher: str, backend: str) -> str:
    """The local folder ``teacher`` names (ExLlama reads folders, not hub ids; an embedded name is its
    cached copy), or one line saying so."""
    from ..models import resolve

    teacher = resolve(teacher)
    if not (Path(teacher) / "config.json").is_file():
        raise ValueError(f"teacher_backend {backend!r} reads a local model folder with its config.json; {teacher!r} "
                         "is not one (download it first, e.g. `huggingface-cli download <repo> --local-dir <folder>`)")
    return str(teacher)


def check_vocabulary(vocab_size: int, tokenizer, backend: str) -> None:
    if vocab_size < len(tokenizer):
        raise ValueError(f"the {backend} model has {vocab_size} token ids but its tokenizer has {len(tokenizer)}: "
                         "they do not belong together")


class ExLlamaV2Engine(OneSequenceAtATime):
    """An ExLlamaV2 model as a teacher engine (see ``helpers.backends``)."""

    name = "exllamav2"

    def __init__(self, model, cache, tokenizer, eos: list[int] | None = None, vocab_size: int | None = None):
        self.model, self.cache, self.tokenizer = model, cache, tokenizer
        self.eos = list(eos) if eos is not None else eos_ids(tokenizer=tokenizer)
        self.vocab_size = vocab_size if vocab_size is not None else model.config.vocab_size
        check_vocabulary(self.vocab_size, tokenizer, self.name)

    @classmethod
    def open(cls, teacher: str, *, dtype: str = "auto", device: str = "auto", gpu_split: list[float] | None = None,
             max_seq_len: int | None = None, cache_bits: int = 16, tokenizer: str | None = None) -> ExLlamaV2Engine:
        need_cuda("exllamav2", "exl2")
        if cache_bits not in CACHES:
            raise ValueError(f"exllamav2 option cache_bits={cache_bits!r}: use 16, 8, 6 or 4")
        folder = model_folder(teacher, "exllamav2")
        try:
            import exllamav2
        except ImportError as e:
            raise missing_package("exllamav2", "exllamav2", "exl2", e) from None
        from ..models import load_tokenizer

        config = exllamav2.ExLlamaV2Config(folder)
        config.max_seq_len = max_seq_len or min(DEFAULT_MAX_SEQ_LEN, config.max_seq_len)
        config.arch_compat_overrides()
        model = exllamav2.ExLlamaV2(config)
        make_cache = getattr(exllamav2, CACHES[cache_bits])
        if gpu_split is None:  # fill the GPUs in turn, the cache allocated as the layers land
            cache = make_cache(model, max_seq_len=config.max_seq_len, lazy=True)
            model.load_autosplit(cache, progress=True)
        else:
            model.load(gpu_split=list(gpu_split), progress=True)
            cache = make_cache(model, max_seq_len=config.max_seq_len)
        tok = load_tokenizer(tokenizer or folder)
        return cls(model, cache, tok, engine_eos(tok, folder, tokenizer), config.vocab_size)

    def _begin(self) -> None:
        self.cache.reset()

    def _fits(self, n: int) -> None:
        if n > self.cache.max_seq_len:
            raise ValueError(f"a sequence of up to {n} tokens does not fit exllamav2's cache of "
                             f"{self.cache.max_seq_len} tokens: raise the exllamav2 option max_seq_len")

    def _forward(self, ids: list[int], *, last_only: bool) -> torch.Tensor:
        """Feed ``ids`` after what the cache holds; the logits of the fed positions (of the last one
        with ``last_only``), [n, vocab_size] fp32 on the model's last GPU."""
        out = self.model.forward(torch.tensor([ids], dtype=torch.long), self.cache, last_id_only=last_only)
        return out[0, :, :self.vocab_size].float()  # the head's padding columns dropped

    def close(self) -> None:
        self.model.unload()  # the weights; the cache's tensors go with the reference to it
        self.cache = None
