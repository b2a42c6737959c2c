"""The ``openai`` back end: a teacher behind any OpenAI-compatible completions server (``vllm serve``,
SGLang, llama.cpp's servers), reached over HTTP with the standard library. This side needs no GPU
and no serving library, only the teacher's ``transformers`` tokenizer (``tokenizer``, default the
teacher's name). Options: ``url`` (e.g. ``http://127.0.0.1:8000/v1``), ``model`` (the served
model's name, default the teacher), ``api_key``, ``timeout`` (seconds per request), ``retries``
(tries after a failed connection or a 502/503/504, ``backoff`` × 1, 2, 4 … s apart; 1 s), ``tokens`` (``auto``,
``ids`` or ``text``), ``tail_ranks``.

Servers come in two kinds, told apart at ``open`` by one probe request (``tokens: auto``):

- ``ids``: the server takes prompts as token-id lists and names the tokens it returns by id when
  asked (vLLM's ``return_tokens_as_token_ids``: ``"token_id:123"``). The teacher's ids go in and
  come out unchanged; a batch of texts to score is one request.
- ``text``: the server takes text prompts and names tokens by their text (llama-cpp-python's
  ``llama_cpp.server``: one string prompt per request; top log-probs a {text: log-prob} map). The
  engine sends the text the teacher's tokenizer decodes from the prompt ids, and checks that the
  server read it as the same tokens (the echoed pieces). Generation is two requests per row: the
  server writes (its own sampler: greedy, or temperature and top-p with ``top_k``/``min_p`` off),
  then reads back prompt + solution with ``echo`` for the log-probs at every solution token. The
  solution's ids are the teacher tokenizer's for the written text, then end-of-sequence where the
  server stopped there (such a server does not say which end id it met: the tokenizer's eos). The
  top-N texts are mapped back to ids through the tokenizer's pieces (``token_pieces``); a text that
  names no one id (special tokens and partial UTF-8 bytes, read as "") cannot be attributed: its
  mass stays in the tail, which ``capture_from_logprobs`` builds from what was listed (the token
  read or written at a position is always named: its id is known).

Per position the engine asks for the top ``k + tail_ranks`` log-probs (the tail's accurate part;
see ``capture_from_logprobs``). A repetition loop is cut after generation, where the
``transformers`` engine's loop stop would have ended the row (``loop_cut``). A server that is down,
or dies while a store is written, is named in one line after the bounded retries; shards already
written stay, and the store resumes at its first missing shard.
"""
from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request

import numpy as np
import torch

from .capture import LOOP_CHECK_EVERY, engine_eos, eos_ids, looping, scored_row, solution_row

# An fp32 log-softmax's normaliser, a sum of probabilities near 1, is rounded (2^-24 at best, more
# after summing a large vocabulary), so a mass obtained as 1 − Σ (returned probabilities) is noise
# below about this much; the most likely token reads log-prob exactly 0 where the mass outside it
# is under ~6e-8.
MASS_RESOLUTION = 2.0 ** -17  # 128 ulps of 1.0 in fp32
TRANSIENT_HTTP = (502, 503, 504)


def capture_from_logprobs(positions: list[dict[int, float]], taken: list[int], k: int, vocab_size: int) -> dict:
    """Capture arrays from per-position {token id: log-prob} maps (a server's top-N, N ≥ k, possibly
    plus the taken token): the top-k sorted, the taken token's log-prob and the tail, the log-mass
    outside the top-k (-inf only when k covers the vocabulary).

    The tail is not log(1 − Σ top-k): from fp32 log-probs that subtraction is noise for a confident
    teacher, and -inf where the top token reads log-prob 0. It is the log-sum-exp of the returned
    tokens ranked below k (each accurate to fp32), plus the mass none of the returned tokens holds,
    1 − Σ returned, only where that difference is above the fp32 resolution (``MASS_RESOLUTION``).
    With N = 2k (what the engines ask for) a confident teacher's tail is then finite and, where the
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


def loop_cut(tokenizer, new: list[int], eos) -> int | None:
    """Where a loop stop would have ended ``new`` (a multiple of 8 new tokens), or None."""
    stops = set(eos)
    for n in range(LOOP_CHECK_EVERY, len(new) + 1, LOOP_CHECK_EVERY):
        if stops.intersection(new[:n]):
            return None
        if looping(tokenizer, new[:n]):
            return n
    return None


def seeds(n: int) -> list[int]:
    """One sampling seed per row, from the torch generator ``build_store`` seeds."""
    return [int(s) for s in torch.randint(0, 2 ** 31 - 1, (n,))]


def token_pieces(tokenizer) -> tuple[list[str], dict[str, int]]:
    """Each token's text as a text server names it (``by_id``), and the piece → id map of the pieces
    that name one id (``named``). A token's text is read after an anchor (so a leading space is
    kept); special tokens read as "" and bytes that are not whole UTF-8 characters are left out, as
    llama.cpp renders them. A piece names an id only where no other id reads the same: " " + the
    lead byte of "£" also reads " ", and the server's {text: log-prob} map keeps one value per text
    (llama-cpp-python: the last, least likely), so " " then names no id, like special tokens and
    pure partial bytes (read "")."""
    anchor = tokenizer("a", add_special_tokens=False).input_ids[-1:]
    lead = tokenizer.decode(anchor, clean_up_tokenization_spaces=False)
    special = set(tokenizer.all_special_ids)
    by_id, ids_of, exact = [], {}, set()
    for i in range(len(tokenizer)):
        text = "" if i in special else tokenizer.decode(anchor + [i], clean_up_tokenization_spaces=False)[len(lead):]
        piece = text.replace("\ufffd", "")
        by_id.append(piece)
        ids_of.setdefault(piece, []).append(i)
        if piece == text:
            exact.add(i)
    return by_id, {piece: ids[0] for piece, ids in ids_of.items() if piece and len(ids) == 1 and ids[0] in exact}


class OpenAIEngine:
    """A teacher behind an OpenAI-compatible completions server (see the module's docstring)."""

    name = "openai"

    def __init__(self, tokenizer, *, url: str | None, model_name: str | None = None, api_key: str | None = None,
                 timeout: float = 600.0, retries: int = 3, backoff: float = 1.0, eos: list[int] | None = None,
                 tokens: str = "ids", tail_ranks: int = 64, max_logprobs: int | None = None):
        if tokens not in ("ids", "text"):
            raise ValueError(f"{self.name} option tokens={tokens!r}: use auto, ids or text")
        self.tokenizer, self.url = tokenizer, url.rstrip("/") if url else None
        self.model_name, self.api_key, self.timeout, self.retries = model_name, api_key, timeout, retries
        self.backoff = backoff
        self.eos = list(eos) if eos is not None else eos_ids(tokenizer=tokenizer)
        self.vocab_size = len(tokenizer)
        self.tokens, self.tail_ranks, self.max_logprobs = tokens, tail_ranks, max_logprobs
        self._pieces: tuple[list[str], dict[str, int]] | None = None
        self.usage: dict | None = None  # the last answer's token counts

    @classmethod
    def open(cls, teacher: str, *, dtype: str = "auto", device: str = "auto", url: str | None = None,
             model: str | None = None, tokenizer: str | None = None, api_key: str | None = None,
             timeout: float = 600.0, retries: int = 3, backoff: float = 1.0, tokens: str = "auto",
             tail_ranks: int = 64, max_logprobs: int | None = None) -> OpenAIEngine:
        from ..models import load_tokenizer

        if not url:
            raise ValueError(f"teacher_backend {cls.name!r} reads a running server: give teacher_backend_options.url "
                             "(e.g. http://127.0.0.1:8000/v1)")
        tok = load_tokenizer(tokenizer or teacher)
        engine = cls(tok, url=url, model_name=model or teacher, api_key=api_key, timeout=timeout, retries=retries,
                     backoff=backoff, eos=engine_eos(tok, teacher, tokenizer), tokens="ids" if tokens == "auto" else tokens,
                     tail_ranks=tail_ranks, max_logprobs=max_logprobs)
        if tokens == "auto":
            engine.tokens = engine.probe()
        return engine

    def probe(self) -> str:
        """``ids`` if the server takes a token-id prompt and names tokens by id, else ``text``."""
        ids = self.tokenizer("a", add_special_tokens=False).input_ids
        try:
            choice = self._post({"prompt": [ids], "max_tokens": 1, "logprobs": 1, "temperature": 0.0})[0]
        except _Refused:
            return "text"
        if not (choice.get("logprobs") or {}).get("tokens"):
            raise RuntimeError(f"the {self.name} server at {self.url} returned no log-probs for a completion: the "
                               "teacher engine needs a server that gives them (`logprobs` on /completions)")
        return "ids" if all(t.startswith("token_id:") for t in choice["logprobs"]["tokens"]) else "text"

    def n_logprobs(self, k: int) -> int:
        """How many log-probs to ask for per position: the top-k and ``tail_ranks`` more (the tail's
        accurate part), within the server's ``max_logprobs`` where given."""
        n = k + self.tail_ranks
        return n if self.max_logprobs is None else max(k, min(n, self.max_logprobs))

    # ------------------------------------------------------------------ generation
    def generate(self, prompt_ids: list[list[int]], *, k: int, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, stop_loops: bool = False) -> list[dict]:
        row_seeds = seeds(len(prompt_ids))
        sampling = {"max_tokens": max_new_tokens, "temperature": temperature if do_sample else 0.0,
                    "top_p": top_p if do_sample else 1.0}
        if self.tokens == "text":
            return [self._generate_text(list(p), sampling, s, k, stop_loops) for p, s in zip(prompt_ids, row_seeds)]
        rows = []
        for p, s in zip(prompt_ids, row_seeds):  # one request per row: each has its own seed
            choice = self._post({"prompt": [list(p)], **sampling, "logprobs": self.n_logprobs(k),
                                 "stop_token_ids": self.eos, "seed": s})[0]
            new, positions = _parse_choice(choice)
            rows.append(self._row(new, positions, k, stop_loops))
        return rows

    def _row(self, new: list[int], positions: list[dict[int, float]], k: int, stop_loops: bool) -> dict:
        cap = capture_from_logprobs(positions, new, k, self.vocab_size)
        looped = loop_cut(self.tokenizer, new, self.eos) if stop_loops else None
        return solution_row(self.tokenizer, new, self.eos, looped_at=looped, capture=cap)

    def _generate_text(self, prompt: list[int], sampling: dict, seed: int, k: int, stop_loops: bool) -> dict:
        body = {"prompt": self._text(prompt), **sampling, "seed": seed, "top_k": 0, "min_p": 0.0,
                "typical_p": 1.0, "repeat_penalty": 1.0}
        choice = self._post(body)[0]
        new = self.tokenizer(choice["text"], add_special_tokens=False).input_ids
        if choice.get("finish_reason") == "stop":
            new.append(self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.eos[0])
        new = new[:sampling["max_tokens"]]
        if not new:
            raise RuntimeError(f"the {self.name} server at {self.url} wrote nothing for a prompt "
                               f"(finish_reason {choice.get('finish_reason')!r})")
        positions = self._read_text(prompt, new, k)
        return self._row(new, positions, k, stop_loops)

    # ------------------------------------------------------------------ scoring
    def score(self, prompt_ids: list[list[int]], text_ids: list[list[int]], *, k: int) -> list[dict]:
        if self.tokens == "text":
            every = [self._read_text(list(p), list(t), k) for p, t in zip(prompt_ids, text_ids)]
        else:  # one request for the batch: the completions API takes a list of prompts
            seqs = [list(p) + list(t) for p, t in zip(prompt_ids, text_ids)]
            choices = self._post({"prompt": seqs, "max_tokens": 1, "echo": True, "logprobs": self.n_logprobs(k),
                                  "temperature": 0.0})
            every = [_parse_choice(c)[1][len(p):len(s)] for c, p, s in zip(choices, prompt_ids, seqs)]
        return [scored_row(self.tokenizer, text, capture_from_logprobs(positions, list(text), k, self.vocab_size))
                for text, positions in zip(text_ids, every)]

    def _read_text(self, prompt: list[int], text: list[int], k: int | None = None) -> list[dict[int, float]]:
        """A text server's {id: log-prob} maps at every token of ``text`` after ``prompt``: the two
        sent as text with ``echo``; the echoed pieces must be the teacher tokenizer's."""
        k = k if k is not None else 0
        seq = prompt + text
        choice = self._post({"prompt": self._text(seq), "max_tokens": 1, "echo": True, "temperature": 0.0,
                             "logprobs": self.n_logprobs(k)})[0]
        lp = choice["logprobs"]
        by_id, named = self.pieces()
        written = (self.usage or {}).get("completion_tokens")
        if written is None:
            raise RuntimeError(f"the {self.name} server at {self.url} gave no usage with its answer: the engine needs "
                               "its completion_tokens to tell echoed tokens from written ones")
        echoed = len(lp["tokens"]) - written
        # which of seq's tokens were echoed: all, or all but the BOS ids (llama-cpp-python leaves out
        # every token equal to its BOS, which for ChatML models is each turn's <|im_start|>)
        at = [j for j in range(len(seq)) if seq[j] != self.tokenizer.bos_token_id]
        if echoed == len(seq):
            at = list(range(len(seq)))
        elif echoed != len(at):
            raise RuntimeError(f"the {self.name} server at {self.url} read {echoed} tokens where the teacher's "
                               f"tokenizer has {len(seq)}: it tokenizes the prompt differently (another tokenizer "
                               "or model?)")
        entry = {j: e for e, j in enumerate(at)}
        out = []
        for j in range(len(prompt), len(seq)):
            if j not in entry:
                raise RuntimeError(f"the {self.name} server at {self.url} leaves the BOS token out of what it echoes, "
                                   f"and token {j} of a text is that token: it cannot be scored there")
            e = entry[j]
            want = by_id[seq[j]] if seq[j] < len(by_id) else ""
            if lp["tokens"][e].replace("\ufffd", "") != want:
                raise RuntimeError(f"the {self.name} server at {self.url} read token {j} of a sequence as "
                                   f"{lp['tokens'][e]!r} where the teacher's tokenizer has {want!r} (id {seq[j]}): "
                                   "it tokenizes the prompt differently (another tokenizer or model?)")
            top: dict[int, float] = {}
            for piece, value in (lp["top_logprobs"][e] or {}).items():
                i = named.get(piece)
                if i is not None:  # a piece that names no one id is left to the tail
                    top[i] = value
            top[seq[j]] = lp["token_logprobs"][e]
            out.append(top)
        return out

    def pieces(self) -> tuple[list[str], dict[str, int]]:
        """``token_pieces`` of the teacher's tokenizer (computed once)."""
        if self._pieces is None:
            self._pieces = token_pieces(self.tokenizer)
        return self._pieces

    def unnameable(self) -> list[int]:
        """The ids no piece names: their mass is in the tail unless they are the token read or written."""
        by_id, named = self.pieces()
        return sorted(set(range(len(by_id))) - set(named.values()))

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    # ------------------------------------------------------------------ transport
    def _post(self, body: dict) -> list[dict]:
        """One completions request, retried ``retries`` times (1, 2, 4 … s apart) when the server
        cannot be reached or answers 502/503/504; the choices in order."""
        body = {"model": self.model_name, **body}
        if self.tokens == "ids":
            body = {"return_tokens_as_token_ids": True, "skip_special_tokens": False, **body}
        request = urllib.request.Request(f"{self.url}/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json",
                                                  **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})})
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    answer = json.load(response)
                self.usage = answer.get("usage")
                return sorted(answer["choices"], key=lambda c: c["index"])
            except urllib.error.HTTPError as e:
                if e.code not in TRANSIENT_HTTP:
                    raise _Refused(f"the {self.name} server at {self.url} refused the request ({e.code}): "
                                   f"{e.read().decode(errors='replace')[:300]}") from None
                why = f"HTTP {e.code}"
            except (urllib.error.URLError, OSError, json.JSONDecodeError) as e:
                why = str(getattr(e, "reason", e))
            if attempt < self.retries:
                time.sleep(self.backoff * 2.0 ** attempt)
        raise RuntimeError(f"could not reach the {self.name} server at {self.url} after {self.retries + 1} tries "
                           f"({why}): start it (e.g. `vllm serve <teacher> --max-logprobs 128`, or `python -m "
                           "llama_cpp.server --model <file.gguf>`) or fix teacher_backend_options.url; a store being "
                           "written resumes at its first missing shard")

    def close(self) -> None:
        pass


class _Refused(RuntimeError):
    """The server answered, with an error that retrying will not change."""


def _token_id(token: str) -> int:
    """``"token_id:123"`` (vLLM's ``return_tokens_as_token_ids``) -> 123."""
    if not token.startswith("token_id:"):
        raise ValueError(f"the server returned the token {token!r} as text where ids were expected: use "
                         "teacher_backend_options.tokens: text (or auto)")
    return int(token[len("token_id:"):])


def _parse_choice(choice: dict) -> tuple[list[int], list[dict[int, float]]]:
    """A completions choice (tokens named by id) -> (its token ids, the {id: log-prob} map at each of
    them); positions without log-probs (the first echoed token) get an empty map."""
    lp = choice["logprobs"]
    ids = [_token_id(t) for t in lp["tokens"]]
    tops = [{_token_id(t): v for t, v in (top or {}).items()} for top in lp["top_logprobs"]]
    for top, i, v in zip(tops, ids, lp["token_logprobs"]):
        if v is not None:
            top.setdefault(i, v)
    return ids, tops
