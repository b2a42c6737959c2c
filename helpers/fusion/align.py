"""Aligning two tokenizations of one text by character offsets (linear time).

Each tokenizer's fast implementation gives, per token, the span of characters it came from
(``return_offsets_mapping``). Two tokenizations of the same text agree on a boundary wherever a
token of each ends at the same character; between two consecutive shared boundaries lies one
**piece**: a run of tokens on each side covering exactly the same characters (1:1, 1:n, n:1 or
n:m). A two-pointer walk over the end offsets finds them all in O(len(a) + len(b)).

Whitespace and byte markers (``Ġ``/``Ċ`` of byte-level BPE, ``▁`` of SentencePiece, byte-fallback
tokens) are never looked at as strings: only offsets are. Tokens that carry no characters of their
own (an empty span, or one inside the previous token's, as byte-fallback pieces of one character
are) join the piece they fall in. The first piece starts at character 0 and the last ends at the
end of the text, so the pieces' texts re-join to exactly the original on both sides; characters no
token covers (e.g. whitespace a tokenizer drops) belong to the piece around them.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Piece:
    """Tokens ``a[a_start:a_end]`` and ``b[b_start:b_end]`` cover the characters ``text[start:end]``."""

    a_start: int
    a_end: int
    b_start: int
    b_end: int
    start: int
    end: int

    @property
    def kind(self) -> str:
        """"1:1", "1:n", "n:1" or "n:m" (n, m > 1), or "0:k" / "k:0" where one side has no token."""
        def size(n: int) -> str:
            return "1" if n == 1 else "0" if n == 0 else "n"
        a, b = size(self.a_end - self.a_start), size(self.b_end - self.b_start)
        return f"{a}:{'m' if a == b == 'n' else b}"


def token_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` (no special tokens) and each token's character span."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer: character offsets need one")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(span) for span in enc["offset_mapping"]]


def id_spans(tokenizer, ids) -> tuple[str, list[tuple[int, int]]]:
    """The text that token ``ids`` decode to and each token's character span, for tokens a model
    wrote (which need not be how its tokenizer would split the text). Decoded as a stream
    (``tokenizers.decoders.DecodeStream``), so spaces and byte markers come out as text; tokens that
    complete no character on their own (the bytes of one character split over byte-fallback or
    byte-level tokens) all get the span of the characters they complete together, overlapping, so
    the alignment never cuts between them."""
    from tokenizers.decoders import DecodeStream

    stream, back = DecodeStream(skip_special_tokens=False), tokenizer.backend_tokenizer
    chunks, spans, pending, pos = [], [], 0, 0
    for i in ids:
        chunk = stream.step(back, int(i))
        if chunk is None:  # bytes of a character still incomplete
            pending += 1
            continue
        spans.extend([(pos, pos + len(chunk))] * (pending + 1))
        chunks.append(chunk)
        pos, pending = pos + len(chunk), 0
    spans.extend([(pos, pos)] * pending)  # bytes that never completed a character
    return "".join(chunks), spans


def _ends(spans: list[tuple[int, int]], length: int) -> tuple[list[int], list[bool]]:
    """Per token, the character where it ends (made non-decreasing: a token inside an earlier one
    ends where that one does; the last ends at the end of the text), and whether the text may be
    cut after it (the next token does not start before that end: tokenizers that read a space as
    part of two tokens give overlapping spans)."""
    ends, reach = [], 0
    for _, end in spans:
        reach = max(reach, min(end, length))
        ends.append(reach)
    if ends:
        ends[-1] = length
    clean = [k == len(spans) - 1 or spans[k + 1][0] >= ends[k] for k in range(len(spans))]
    return ends, clean


def align_offsets(spans_a: list[tuple[int, int]], spans_b: list[tuple[int, int]], length: int) -> list[Piece]:
    """The pieces of two tokenizations of a text of ``length`` characters, given their spans."""
    (ends_a, clean_a), (ends_b, clean_b) = _ends(spans_a, length), _ends(spans_b, length)
    na, nb = len(ends_a), len(ends_b)
    pieces: list[Piece] = []
    i = j = start = 0
    while i < na and j < nb:
        si, sj = i, j
        ea, eb = ends_a[i], ends_b[j]
        i, j = i + 1, j + 1
        # take tokens on the side that ends first until both sides end at the same character, past
        # `start`, where both may be cut (the last token of each side ends at `length`: this stops)
        while not (ea == eb and ea > start and clean_a[i - 1] and clean_b[j - 1]) and (i < na or j < nb):
            stuck = ea == eb and ea <= start
            more_a = i < na and (ea < eb or j == nb or ea == eb and (stuck or not clean_a[i - 1]))
            more_b = j < nb and (eb < ea or i == na or ea == eb and (stuck or not clean_b[j - 1]))
            if more_a:
                ea, i = ends_a[i], i + 1
            if more_b:
                eb, j = ends_b[j], j + 1
        # tokens that add no characters belong to this piece
        while i < na and ends_a[i] <= ea:
            i += 1
        while j < nb and ends_b[j] <= eb:
            j += 1
        pieces.append(Piece(si, i, sj, j, start, ea))
        start = ea
    if i < na or j < nb:  # one side had no tokens at all for the rest of the text
        pieces.append(Piece(i, na, j, nb, start, length))
    return pieces


def align_texts(tokenizer_a, tokenizer_b, text: str) -> tuple[list[int], list[int], list[Piece]]:
    """Tokenize ``text`` with both tokenizers and align them: (ids a, ids b, pieces)."""
    ids_a, spans_a = token_offsets(tokenizer_a, text)
    ids_b, spans_b = token_offsets(tokenizer_b, text)
    return ids_a, ids_b, align_offsets(spans_a, spans_b, len(text))
