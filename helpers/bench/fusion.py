"""Entries of distillation across tokenizers (``helpers.fusion``): (g) alignment throughput, a DTW
reference written here for timing only (``dtw_reference``) ÷ ``fusion.align``, on GSM-style text
against a second tokenizer (``align_tokenizer_b``, or one trained here: ``trained_tokenizer``);
(h) a KD step on targets moved across tokenizers ÷ a same-tokenizer KD step."""
from __future__ import annotations

import math
import statistics
import time

import torch

from .common import _alternate, _lora_student, _sgd_step, _sparse_teacher


def bench_cross_kd_step(model, *, batch: int, length: int, k: int, repeats: int, piece_share: float = 0.2) -> dict:
    """One KD training step on targets moved across tokenizers (``fusion.losses``: token units with
    filler columns, multi-token piece units) ÷ one same-tokenizer KD step (``kd_loss``) on the same
    batch, ids and log-probs: the cost of distilling from a teacher with another tokenizer."""
    from ..fusion.losses import cross_kd_loss
    from ..fusion.targets import PIECE, TOKEN
    from ..kd.losses import kd_loss

    peft_model, ids, opt, g = _lora_student(model, batch=batch, length=length)
    dev = peft_model.device
    L = length - 1
    mask = torch.ones(batch, L, device=dev)
    topk_ids, topk_lps = _sparse_teacher(g, model.config.get_text_config().vocab_size, (batch, L), k, dev)
    tail = torch.full((batch, L), -3.0, device=dev)
    # a realistic mix: most positions 1:1 (a few unmapped columns as filler), some ending a 2-token piece
    unit = torch.full((batch, L), TOKEN, dtype=torch.long)
    ends = torch.rand(batch, L, generator=g) < piece_share
    ends[:, 0] = False
    unit[ends] = PIECE
    unit[:, :-1][ends[:, 1:]] = 0  # the first token of each piece is no unit of its own
    cross_lps = topk_lps.clone()
    cross_lps[..., -k // 8:] = float("-inf")
    teachers = {"topk_ids": topk_ids[None], "topk_logprobs": cross_lps[None], "tail_logprobs": tail[None],
                "unit": unit[None].to(dev), "piece_len": (ends.long() * 2)[None].to(dev),
                "piece_logprob": torch.where(ends, -1.5, float("nan"))[None].to(dev), "weight": torch.ones(1, batch, device=dev)}

    def step(cross):
        logits = peft_model(input_ids=ids).logits[:, :-1]
        if cross:
            loss, _ = cross_kd_loss("forward_kl", logits, ids[:, 1:], mask, teachers, T=1.0, alpha=0.5)
        else:
            loss, _ = kd_loss("forward_kl", logits, ids[:, 1:], mask, topk_ids, topk_lps, T=1.0, alpha=0.5,
                              tail_logprobs=tail)
        _sgd_step(opt, loss)

    t_cross, t_same = _alternate(lambda: step(True), lambda: step(False), repeats)
    peft_model.unload()
    return {"cross_kd_step_s": statistics.median(t_cross), "same_kd_step_s": statistics.median(t_same),
            "cross_kd_step_ratio": statistics.median(t_cross) / statistics.median(t_same)}


# --------------------------------------------------------------------------- (g) alignment throughput
ALIGN_TOKENIZER = "gemma3-270m"  # B by default; a Unigram tokenizer trained here when it is not installed
ALIGN_TEXTS = 300  # gsm_symbolic training solutions: the texts cut to length, and the trained B's corpus
_MARKERS = str.maketrans("", "", "Ġ▁Ċĉ")  # whitespace markers of byte-level BPE and SentencePiece


def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertion, deletion, substitution each cost 1), one row at a time."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        diag, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diag + (ca != cb))
    return row[-1]


def dtw_reference(tokens_a: list[str], tokens_b: list[str]) -> list[tuple[int, int]]:
    """A reference for timing only (benchmark (g)); the toolkit aligns with ``helpers.fusion.align``.

    Dynamic time warping over two token-string sequences, as FuseLLM-style fusion aligns
    tokenizations: whitespace markers (Ġ Ċ ĉ ▁) are stripped, the cost of pairing two tokens is the
    edit distance between their strings (computed once per distinct pair), every one of the n·m
    cells of the cumulative-cost table is filled in a plain Python loop, and the cheapest path is
    traced back (ties prefer the diagonal). Returns that path as (i, j) pairs from (0, 0) to
    (n-1, m-1), each step advancing i, j or both by one."""
    a, b = [t.translate(_MARKERS) for t in tokens_a], [t.translate(_MARKERS) for t in tokens_b]
    n, m = len(a), len(b)
    if not n or not m:
        return []
    inf, pair_cost = math.inf, {}
    table = [[0.0] + [inf] * m]  # table[i][j]: cheapest path over a[:i], b[:j] that pairs a[i-1] with b[j-1]
    for x in a:
        above, row = table[-1], [inf] * (m + 1)
        costs = pair_cost.setdefault(x, {})
        for j, y in enumerate(b, 1):
            c = costs.get(y)
            if c is None:
                c = costs[y] = _edit_distance(x, y)
            row[j] = c + min(above[j - 1], above[j], row[j - 1])
        table.append(row)
    i, j, path = n, m, [(n - 1, m - 1)]
    while i > 1 or j > 1:
        _, i, j = min((table[i - 1][j - 1], i - 1, j - 1), (table[i - 1][j], i - 1, j), (table[i][j - 1], i, j - 1),
                      key=lambda t: t[0])  # min keeps the first of equals: the diagonal
        path.append((i - 1, j - 1))
    return path[::-1]


def trained_tokenizer(texts: list[str], vocab_size: int = 2000):
    """Another segmentation of the same texts for (g) when no second tokenizer is installed: a
    SentencePiece-style Unigram tokenizer ('▁' for spaces) trained on ``texts`` (a fraction of a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.Unigram())
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<unk>"],
                                                          unk_token="<unk>", show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")


def align_tokenizer_b(name: str, texts: list[str]):
    """(tokenizer B, its description, a note or None). ``trained``: a Unigram tokenizer trained on
    ``texts``; the default ``gemma3-270m`` falls back to it (with a note) when that embedded model
    is not installed; any other name loads like ``--model`` and fails loudly."""
    from ..models import EMBEDDED, load_tokenizer

    trained = f"Unigram/Metaspace trained on {len(texts)} gsm_symbolic solutions"
    if name == "trained":
        return trained_tokenizer(texts), trained, None
    if name == ALIGN_TOKENIZER:
        why = "it is not an embedded model in this version" if name not in EMBEDDED else None
        if why is None:
            try:
                return load_tokenizer(name), name, None
            except (ValueError, OSError, ImportError) as e:
                why = f"it could not be loaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        return trained_tokenizer(texts), trained, f"(g) tokenizer B {name!r} is not installed ({why}); using a {trained}"
    return load_tokenizer(name), name, None


def align_text(tokenizer, texts: list[str], n_tokens: int) -> str:
    """``texts`` joined by blank lines (cycled when too few) and cut after the ``n_tokens``-th token of ``tokenizer``."""
    from ..fusion.align import token_offsets

    if not texts:
        raise ValueError("no texts to build the alignment benchmark's text from")
    parts, count, target = [], 0, n_tokens + 8
    while True:
        while count < target:
            parts.append(texts[len(parts) % len(texts)])
            count += len(tokenizer(parts[-1], add_special_tokens=False)["input_ids"]) + 1
        text = "\n\n".join(parts)
        _, spans = token_offsets(tokenizer, text)
        if len(spans) >= n_tokens:
            return text[:spans[n_tokens - 1][1]]
        target += n_tokens - len(spans) + 8  # the joined text tokenized shorter than its parts: add more


def bench_align(tok_a, tok_b, texts: list[str], *, sizes: list[int], repeats: int) -> dict:
    """(g) Alignment throughput: ``helpers.fusion.align`` ÷ a DTW reference on the same text, per size
    (tokens of A). Alignment alone: both sides get the same finished tokenizations (ours their
    character spans, DTW their token strings); tokenization is excluded from both. End to end:
    ``align_texts`` (both tokenizations with offsets, then the walk) against tokenizing to token
    strings plus DTW. Ours is the median of ``repeats`` runs (half before and half after the DTW
    run); DTW runs once per size (seconds at 2048 tokens), its tokenization the median of ``repeats``."""
    from ..fusion.align import align_offsets, align_texts, token_offsets

    def times(fn, n):
        out = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return out

    per_size = {}
    for size in sizes:
        text = align_text(tok_a, texts, size)
        (ids_a, spans_a), (ids_b, spans_b) = token_offsets(tok_a, text), token_offsets(tok_b, text)
        strings_a, strings_b = tok_a.convert_ids_to_tokens(ids_a), tok_b.convert_ids_to_tokens(ids_b)
        ours = lambda: align_offsets(spans_a, spans_b, len(text))  # noqa: E731
        pieces = ours()  # warm-up
        half = max(1, repeats // 2)
        t_ours = times(ours, half)
        t = time.perf_counter()
        path = dtw_reference(strings_a, strings_b)
        dtw_s = time.perf_counter() - t
        t_ours += times(ours, max(1, repeats - half))

        def tokenize_strings():
            return [tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"]) for tok in (tok_a, tok_b)]

        t_e2e, t_tok = _alternate(lambda: align_texts(tok_a, tok_b, text), tokenize_strings, max(1, repeats))
        ours_s, ours_e2e_s, tok_s = (statistics.median(v) for v in (t_ours, t_e2e, t_tok))
        one_to_one = [p for p in pieces if p.kind == "1:1"]
        on_path = set(path)
        per_size[size] = {
            "tokens_a": len(ids_a), "tokens_b": len(ids_b), "chars": len(text), "pieces": len(pieces),
            "one_to_one_share": len(one_to_one) / max(len(pieces), 1),
            "dtw_agrees_on_one_to_one": sum((p.a_start, p.b_start) in on_path for p in one_to_one) / max(len(one_to_one), 1),
            "ours_s": ours_s, "dtw_s": dtw_s, "ratio": dtw_s / ours_s,
            "ours_e2e_s": ours_e2e_s, "dtw_tokenize_s": tok_s, "dtw_e2e_s": tok_s + dtw_s,
            "e2e_ratio": (tok_s + dtw_s) / ours_e2e_s, "dtw_path": path}
    return per_size
