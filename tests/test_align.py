"""Alignment of two tokenizations by character offsets."""
import random

import pytest

from conftest import CORPUS, make_metaspace_tokenizer, make_tokenizer
from helpers.fusion import Piece, align_offsets, align_texts, token_offsets

TEXTS = ["Natalia sold 48 clips in April.\nShe sold half as many in May: 48 / 2 = 24.",
         "  two  spaces, tabs\tand a trailing space ",
         "Unicode: café, naïve, 3·4 = 12 — done. Emoji 🙂🍎 and 中文.",
         "$1,234.50 + 7% = ?\n\n#### 18", "", "x"]


def metaspace_tokenizer():
    return make_metaspace_tokenizer()


@pytest.fixture(scope="module")
def pair():
    return make_tokenizer(), metaspace_tokenizer()


def random_texts(n=40, seed=0):
    rng = random.Random(seed)
    alphabet = list("abcdefghij0123456789 .,+-=$%\n\t") + ["é", "ß", "中", "🙂", "🍎", "—", "  ", "\n\n"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(n)]


def check(text, ids_a, ids_b, pieces):
    """Pieces tile the text and both token lists, in order, with no gap and no overlap."""
    assert [p.start for p in pieces[1:]] == [p.end for p in pieces[:-1]]
    assert [p.a_start for p in pieces[1:]] == [p.a_end for p in pieces[:-1]]
    assert [p.b_start for p in pieces[1:]] == [p.b_end for p in pieces[:-1]]
    if text:
        assert pieces[0].start == 0 and pieces[-1].end == len(text)
        assert pieces[0].a_start == pieces[0].b_start == 0
        assert pieces[-1].a_end == len(ids_a) and pieces[-1].b_end == len(ids_b)
    assert "".join(text[p.start:p.end] for p in pieces) == text


@pytest.mark.parametrize("text", TEXTS + random_texts())
def test_pieces_tile_the_text_and_the_tokens(pair, text):
    a, b = pair
    ids_a, ids_b, pieces = align_texts(a, b, text)
    check(text, ids_a, ids_b, pieces)
    # the byte-level side is lossless: each piece's tokens decode to exactly its characters
    assert "".join(a.decode(ids_a[p.a_start:p.a_end]) for p in pieces) == text
    for p in pieces:
        assert a.decode(ids_a[p.a_start:p.a_end]) == text[p.start:p.end]
    # every token of either side lies inside its piece
    _, spans_a = token_offsets(a, text)
    _, spans_b = token_offsets(b, text)
    for p in pieces:
        assert all(p.start <= s and e <= p.end for s, e in spans_a[p.a_start:p.a_end] if e > s)
        assert all(p.start <= s and e <= p.end for s, e in spans_b[p.b_start:p.b_end] if e > s)


@pytest.mark.parametrize("text", TEXTS + random_texts(seed=1))
def test_identical_tokenizers_align_to_the_identity(pair, text):
    a, _ = pair
    ids, ids2, pieces = align_texts(a, a, text)
    assert ids == ids2
    assert all(p.a_start == p.b_start and p.a_end == p.b_end for p in pieces)
    _, spans = token_offsets(a, text)
    # a token that covers characters of its own is a 1:1 piece; several byte tokens of one
    # character (an emoji) form one piece together
    for p in pieces:
        own = {spans[k] for k in range(p.a_start, p.a_end)}
        assert (p.kind == "1:1") == (p.a_end - p.a_start == 1)
        assert len(own) == 1 or p.kind == "1:1"


def test_kinds_and_hand_made_offsets():
    # text "ab cd": a = [ab][ cd], b = [a][b ][cd]  ->  pieces "ab" 1:n? no: a ends 2,5; b ends 1,3,5
    pieces = align_offsets([(0, 2), (2, 5)], [(0, 1), (1, 3), (3, 5)], 5)
    assert pieces == [Piece(0, 2, 0, 3, 0, 5)] and pieces[0].kind == "n:m"
    pieces = align_offsets([(0, 2), (2, 5)], [(0, 1), (1, 2), (2, 5)], 5)
    assert [p.kind for p in pieces] == ["1:n", "1:1"] and pieces[0] == Piece(0, 1, 0, 2, 0, 2)
    pieces = align_offsets([(0, 1), (1, 2), (2, 5)], [(0, 2), (2, 5)], 5)
    assert [p.kind for p in pieces] == ["n:1", "1:1"]
    # a zero-width token (e.g. a lone '▁') joins the piece it falls in
    pieces = align_offsets([(0, 0), (0, 2), (2, 5)], [(0, 2), (2, 5)], 5)
    assert pieces == [Piece(0, 2, 0, 1, 0, 2), Piece(2, 3, 1, 2, 2, 5)]
    assert align_offsets([], [], 0) == []


def test_alignment_is_linear_time(pair):
    import time

    a, b = pair
    text = " ".join(CORPUS) * 40
    _, spans_a = token_offsets(a, text)
    _, spans_b = token_offsets(b, text)
    start = time.perf_counter()
    pieces = align_offsets(spans_a, spans_b, len(text))
    small = time.perf_counter() - start
    start = time.perf_counter()
    align_offsets(spans_a * 4, [(s, e) for s, e in spans_b] * 4, len(text))  # 4x the tokens
    big = time.perf_counter() - start
    assert pieces and big < 20 * small + 0.05  # generous: linear, not quadratic (which would be ~16x)


def test_slow_tokenizers_are_refused():
    class Slow:
        is_fast = False

    with pytest.raises(ValueError, match="not a fast tokenizer"):
        token_offsets(Slow(), "x")
