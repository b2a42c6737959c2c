"""A map from a teacher's token ids to a student's, by decoded text.

Teacher id ``a`` maps to student id ``b`` when both decode to exactly the same text. A token's
text is read the way it reads inside a text, not at its start: each id is decoded after a fixed
one-character anchor token and the anchor's own text is removed, so SentencePiece's ``▁`` (which
its decoder drops at the start of a text) and byte-level BPE's ``Ġ``/``Ċ`` both come out as the
spaces and newlines they stand for. Token names are never looked at. An id whose text is not whole
characters (a byte-fallback byte, a partial UTF-8 byte of byte-level BPE: the decoder gives
U+FFFD) or is empty maps nowhere. Special tokens decode to their own names, so the same special
token on both sides maps; end-of-sequence also maps by role (``<|im_end|>`` to ``<eos>``), the
one pair whose texts differ. Identical tokenizers get the identity.

When several student ids share a text, the one the student's tokenizer itself produces for that
text is taken (else the smallest id), so a mapped target is always a token the student would
write. Several teacher ids may map to one student id; ``helpers.fusion.targets`` adds their
probabilities. The decoding runs in the tokenizers' Rust back end (no Python-side clean-up of
spaces before punctuation), in batches: about a second for a 262k vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_BAD = "\ufffd"


def _anchor(tokenizer) -> int:
    """A token that decodes to one plain character, twice in a row to the same character twice."""
    back = tokenizer.backend_tokenizer
    for ch in "a0xQeE1":
        for i in sorted(set(tokenizer(ch, add_special_tokens=False).input_ids) | {back.token_to_id(ch) or 0}):
            if back.decode([i], skip_special_tokens=False) == ch and back.decode([i, i], skip_special_tokens=False) == ch * 2:
                return i
    raise ValueError(f"{type(tokenizer).__name__}: no single-character token to decode token texts after")


def token_texts(tokenizer, batch: int = 8192) -> list[str | None]:
    """Each id's text as it reads inside a text (None where it is not whole characters)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer: decoding by id needs one")
    back = tokenizer.backend_tokenizer
    anchor = _anchor(tokenizer)
    head = back.decode([anchor], skip_special_tokens=False)
    n = max(len(tokenizer), back.get_vocab_size(with_added_tokens=True))
    out: list[str | None] = []
    for s in range(0, n, batch):
        for t in back.decode_batch([[anchor, i] for i in range(s, min(n, s + batch))], skip_special_tokens=False):
            text = t[len(head):] if t.startswith(head) else None
            out.append(text if text and _BAD not in text else None)
    return out


@dataclass
class VocabMap:
    """``student_id[a]`` is the student id with teacher id ``a``'s text, or -1."""

    student_id: np.ndarray      # int32 [teacher vocabulary]
    teacher_texts: list         # per teacher id: its text (None: not whole characters)
    by_role: dict[int, int]     # teacher id -> student id mapped by role (end-of-sequence), not by text
    student_size: int

    @property
    def coverage(self) -> float:
        """Share of the teacher's ids that map (ids that are no whole character map only between
        identical tokenizers)."""
        return float((self.student_id >= 0).sum()) / max(1, len(self.student_id))

    def pairs(self) -> list[tuple[int, int]]:
        """The (teacher id, student id) pairs matched by text."""
        return [(a, int(b)) for a, b in enumerate(self.student_id) if b >= 0 and a not in self.by_role]

    def stats(self) -> dict:
        return {"teacher_vocab": len(self.student_id), "student_vocab": self.student_size,
                "mapped": int((self.student_id >= 0).sum()), "coverage": round(self.coverage, 4),
                "student_reached": round(len(set(self.student_id[self.student_id >= 0].tolist()))
                                         / max(1, self.student_size), 4)}


def build_vocab_map(teacher_tok, student_tok) -> VocabMap:
    """Map the teacher's ids to the student's by exact decoded text (see the module notes).
    Identical tokenizers map every id to itself, bytes that are no whole character included."""
    from ..backends.capture import eos_ids
    from ..models import tokenizer_fingerprint

    t_texts, s_texts = token_texts(teacher_tok), token_texts(student_tok)
    if tokenizer_fingerprint(teacher_tok) == tokenizer_fingerprint(student_tok):
        return VocabMap(np.arange(len(t_texts), dtype=np.int32), t_texts, {}, len(s_texts))
    by_text: dict[str, list[int]] = {}
    for b, text in enumerate(s_texts):
        if text is not None:
            by_text.setdefault(text, []).append(b)
    chosen: dict[str, int] = {}
    for text, ids in by_text.items():
        if len(ids) > 1:  # prefer the id the student's tokenizer writes for this text
            own = student_tok(text, add_special_tokens=False).input_ids
            ids = own if len(own) == 1 and own[0] in ids else ids
        chosen[text] = min(ids)
    student_id = np.array([chosen.get(t, -1) if t is not None else -1 for t in t_texts], dtype=np.int32)
    by_role = {}
    s_eos = eos_ids(tokenizer=student_tok)
    if s_eos:
        for a in eos_ids(tokenizer=teacher_tok):
            if a < len(student_id) and student_id[a] not in s_eos:
                student_id[a] = s_eos[0]
                by_role[a] = s_eos[0]
    return VocabMap(student_id, t_texts, by_role, len(s_texts))
