"""The ``exllamav3`` back end: EXL3-quantised teachers on one or several CUDA GPUs. Optional extra
``[exl3]``. ExLlamaV3 is the maintained successor of ExLlamaV2 (unmaintained since July 2025) and
what consumer-GPU users run quantised models with now; EXL2 folders still need ``exllamav2``.

Like ``exllamav2``: ExLlamaV3 compiles CUDA code when it is imported, so it is imported only inside
``open``, after a CUDA check that fails in one line on a machine without a GPU; the engine uses it
for the forward passes only, and the top-k capture and the decoding (greedy, or the
``transformers`` temperature and top-p warpers with the seeded torch generator) are the project's
own, one sequence at a time. ExLlamaV3's generator, tokenizer and samplers are not used.

Teachers: a local folder holding an EXL3 (or fp16 safetensors) model of an architecture ExLlamaV3
supports, with its tokenizer; the ``transformers`` tokenizer is read from the same folder (or from
``tokenizer``). Options: ``gpu_split`` (GiB to use per GPU, cache included, e.g. ``[22, 22]``;
default: fill the GPUs in turn, 0.5 GiB kept free on each), ``max_seq_len`` (the longest prompt plus
text or new tokens, rounded up to a multiple of 256; default the model's own length, at most 4096),
``cache_bits`` (16, or 2 to 8 for ExLlamaV3's quantised cache), ``max_chunk_size`` (the most tokens
one forward pass takes, 2048), ``tokenizer``.

Checked against ExLlamaV3 1.6.5's source (its wheel on PyPI; the extra pins ``exllamav3>=1.6.5,<1.7``):

- ``Config.from_directory(directory)`` (``exllamav3/model/config.py``:259) reads ``config.json`` of a
  local folder: ``vocab_size`` (:167), ``max_position_embeddings`` (:189);
  ``Model.from_config(config)`` (``model/model.py``:171) builds the text model;
- ``Cache(model, max_num_tokens, layer_type=None, max_batch_size=16, ...)`` (``cache/cache.py``:95)
  attaches to the model and gets its tensors when the model loads (:144; "Construct the Cache
  BEFORE calling model.load()", ``generator/generator.py``:740), so it is made first;
  ``max_num_tokens`` is a multiple of ``PAGE_SIZE`` 256 (``constants.py``:2, ``cache/fp16.py``:24).
  ``layer_type`` is ``CacheLayer_fp16`` or ``CacheLayer_quant`` with ``k_bits``, ``v_bits`` (2 to 8,
  ``cache/quant.py``:30), passed through ``**kwargs``. ``max_batch_size`` is the number of
  recurrent-state slots (one here: one sequence at a time);
- ``model.load(...)`` passes its keywords to ``load_gen`` (:758, :475): ``use_per_device`` (GiB per
  GPU), ``progressbar``, ``max_chunk_size`` (2048), ``max_output_size`` (32: the logit rows the split
  plans for; here a whole chunk, since scoring takes every position) and ``max_output_factor`` (3:
  the logits are cast to fp32 at once); without a split it reserves 0.5 GiB per GPU (:644);
- ``model.forward(input_ids, params)`` and ``model.prefill(input_ids, params)`` (:436, :368):
  ``input_ids`` int64 [batch, n], read on the CPU (``modules/embedding.py``:61); ``params`` is a dict
  the call fills in, so each pass gets a fresh one. With ``attn_mode`` ``"flash_attn"``, ``cache``,
  ``batch_shape`` (batch, a multiple of 256 no larger than the cache) and ``past_len``
  (``modules/attn.py``:46-72, :95-122) a pass writes its keys and values at ``past_len`` and reads
  the positions before it: the cache holds no position of its own, and a new sequence starts at
  ``past_len`` 0. No pass is split into chunks by the library (the generator feeds
  ``max_chunk_size`` tokens at a time), so the engine feeds its own chunks: ``prefill`` for those
  whose logits are not needed (it stops at the last layer writing the cache,
  ``model/model_ls.py``:339), ``forward`` otherwise, with ``last_tokens_only`` 1 for the last position
  alone (:369). Models with recurrent layers take a state per sequence from the cache at
  ``past_len`` 0 (``cache/recurrent_util.py``:46), which later passes of the sequence are given
  back (``recurrent_states``) and which returns to the cache (``Cache.release_state``, ``cache.py``:394)
  when the next sequence starts;
- ``forward`` returns the head's logits, fp16 for the common architectures, [batch, n or 1, width]
  on the output device; the head's width is ``vocab_size`` rounded up to 128 (``modules/linear.py``:54,
  :77) and those columns hold zeros or quantisation noise (:692; the library's own argmax crops them,
  ``model/model.py``:422), so the logits kept are the model's ``vocab_size`` columns;
- ``model.unload()`` (:460) frees the weights and the cache's tensors.

The names are recorded in ``tests/data/exllamav3_1.6.5_api.json`` (``scripts/record_api.py``); the
tests run the engine against a stand-in that accepts only those.
"""
from __future__ import annotations

import torch

from .needs import missing_package, need_cuda
from .capture import OneSequenceAtATime, engine_eos, eos_ids
from .exllamav2_engine import DEFAULT_MAX_SEQ_LEN, check_vocabulary, model_folder


class ExLlamaV3Engine(OneSequenceAtATime):
    """An ExLlamaV3 model as a teacher engine (see ``helpers.backends``)."""

    name = "exllamav3"

    def __init__(self, model, cache, tokenizer, eos: list[int] | None = None, *, vocab_size: int, max_seq_len: int,
                 chunk_size: int = 2048):
        self.model, self.cache, self.tokenizer = model, cache, tokenizer
        self.eos = list(eos) if eos is not None else eos_ids(tokenizer=tokenizer)
        self.vocab_size, self.max_seq_len, self.chunk_size = vocab_size, max_seq_len, chunk_size
        check_vocabulary(vocab_size, tokenizer, self.name)
        self._length, self._states = 0, None  # the sequence in the cache: its length, its recurrent states

    @classmethod
    def open(cls, teacher: str, *, dtype: str = "auto", device: str = "auto", gpu_split: list[float] | None = None,
             max_seq_len: int | None = None, cache_bits: int = 16, max_chunk_size: int = 2048,
             tokenizer: str | None = None) -> ExLlamaV3Engine:
        need_cuda("exllamav3", "exl3")
        if cache_bits != 16 and not 2 <= cache_bits <= 8:
            raise ValueError(f"exllamav3 option cache_bits={cache_bits!r}: use 16, or 2 to 8")
        folder = model_folder(teacher, "exllamav3")
        try:
            import exllamav3
            from exllamav3.constants import PAGE_SIZE
        except ImportError as e:
            raise missing_package("exllamav3", "exllamav3", "exl3", e) from None
        from ..models import load_tokenizer

        config = exllamav3.Config.from_directory(folder)
        length = max_seq_len or min(DEFAULT_MAX_SEQ_LEN, config.max_position_embeddings)
        length = -(-length // PAGE_SIZE) * PAGE_SIZE
        model = exllamav3.Model.from_config(config)
        layers = {"layer_type": exllamav3.CacheLayer_fp16} if cache_bits == 16 else \
            {"layer_type": exllamav3.CacheLayer_quant, "k_bits": cache_bits, "v_bits": cache_bits}
        cache = exllamav3.Cache(model, max_num_tokens=length, max_batch_size=1, **layers)  # before the load
        split = {} if gpu_split is None else {"use_per_device": list(gpu_split)}
        model.load(progressbar=True, max_chunk_size=max_chunk_size, max_output_size=max_chunk_size,
                   max_output_factor=3, **split)
        tok = load_tokenizer(tokenizer or folder)
        return cls(model, cache, tok, engine_eos(tok, folder, tokenizer), vocab_size=config.vocab_size,
                   max_seq_len=length, chunk_size=max_chunk_size)

    def _fits(self, n: int) -> None:
        if n > self.max_seq_len:
            raise ValueError(f"a sequence of up to {n} tokens does not fit exllamav3's cache of {self.max_seq_len} "
                             "tokens: raise the exllamav3 option max_seq_len")

    def _begin(self) -> None:
        """A new sequence: the cache is written from position 0, the last one's states go back."""
        for state in self._states or []:
            self.cache.release_state(state)
        self._length, self._states = 0, None

    def _forward(self, ids: list[int], *, last_only: bool) -> torch.Tensor:
        """Feed ``ids`` after the sequence in the cache, ``chunk_size`` tokens a pass; the logits of
        the fed positions (of the last one with ``last_only``), [n, vocab_size] fp32."""
        out = []
        for start in range(0, len(ids), self.chunk_size):
            chunk = torch.tensor([ids[start:start + self.chunk_size]], dtype=torch.long)
            params = {"attn_mode": "flash_attn", "cache": self.cache, "batch_shape": (1, self.max_seq_len),
                      "past_len": self._length}
            if self._states is not None:
                params["recurrent_states"] = self._states
            if last_only and start + self.chunk_size < len(ids):
                self.model.prefill(chunk, params)  # fills the cache; no logits
            else:
                if last_only:
                    params["last_tokens_only"] = 1
                out.append(self.model.forward(chunk, params)[0, :, :self.vocab_size].float())
            self._states = params.get("recurrent_states")
            self._length += chunk.shape[1]
        return torch.cat(out)

    def close(self) -> None:
        self._begin()
        self.model.unload()  # the weights and the cache's tensors
        self.cache = None
