"""A teacher's stored distributions moved onto the student's tokens of the same text.

The teacher's tokens of a solution (its store: ids, top-k, tail) and the student's tokens of the
same text are aligned by character offsets (``align``); each piece then gives the student:

- a **1:1 piece** (one teacher token, one student token, the same characters): the teacher's
  top-k at the position that predicts its token, moved into student ids by the vocabulary map
  (``vocab``). Ids that map nowhere, and the teacher's mass beyond its top-k, make the tail
  category; teacher ids that map to one student id have their probabilities added. The existing
  sparse losses then apply unchanged at the student position that predicts its token.
- a **multi-token piece** (1:n, n:1, n:m): the teacher's log-probability of the whole piece, the
  sum of its log-probs of the piece's tokens (chain rule, as it read them), stored at the student
  position that predicts the piece's last token with the piece's student length, for a
  piece-level likelihood term (``fusion.losses``).

The end-of-sequence token of a finished solution is a 1:1 piece of its own (teacher eos ↔ student
eos). With identical tokenizers every piece is 1:1 and the map is the identity, so the targets
are the teacher's own arrays, value for value.

Fewer than k mapped ids at a position: the row is filled with copies of its first id carrying a
log-prob of -inf. A copy adds no id the student's tail could lose, and the loss reads -inf as "no
category", on both sides, so no divergence (reverse KL included) sees a zero-probability
category. A position where nothing maps holds only the tail (its divergence is 0).

Per student token this stores int32 target id, int32 [k] ids, fp16 [k] log-probs, fp32 tail,
int8 unit, fp32 piece log-prob and int16 piece length: 6k + 15 bytes (399 at k = 64, within 8·k).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..backends.capture import eos_ids
from .align import align_offsets, id_spans, token_offsets

NONE, TOKEN, PIECE = 0, 1, 2  # unit kinds per student position: CE only, token KD, end of a multi-token piece
FIELDS = ("token_ids", "topk_ids", "topk_logprobs", "tail_logprobs", "unit", "piece_logprob", "piece_len")


@dataclass
class Targets:
    """One solution's KD targets in the student's ids (one row per student target token)."""

    id: str
    text: str
    token_ids: np.ndarray       # int32 [n]     the student's tokens of the text (+ eos when finished)
    topk_ids: np.ndarray        # int32 [n, k]  mapped teacher ids (student ids); filler copies its first id
    topk_logprobs: np.ndarray   # fp16  [n, k]  their teacher log-probs (T = 1); -inf marks filler
    tail_logprobs: np.ndarray   # fp32  [n]     teacher log-mass outside the mapped ids
    unit: np.ndarray            # int8  [n]     NONE / TOKEN / PIECE
    piece_logprob: np.ndarray   # fp32  [n]     teacher log-prob of the piece ending here (PIECE rows; else nan)
    piece_len: np.ndarray       # int16 [n]     student tokens in that piece (PIECE rows; else 0)
    teacher_nll: float          # the teacher's NLL of the text's tokens (nats, end-of-sequence excluded)
    n_bytes: int                # UTF-8 bytes of the text

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def nll_per_byte(self) -> float:
        return self.teacher_nll / max(1, self.n_bytes)


def _move(ids: np.ndarray, lps: np.ndarray, tail: float, to_student: np.ndarray, k: int):
    """One position's teacher top-k moved into student ids: (ids [k], log-probs [k], tail)."""
    lps = lps.astype(np.float32)
    mapped = to_student[ids]
    live = mapped >= 0
    if not live.all():  # unmapped ids join the tail
        tail = float(np.logaddexp.reduce(np.append(lps[~live], np.float32(tail))))
    b, v = mapped[live], lps[live]
    if len(np.unique(b)) < len(b):  # several teacher ids with one text: add their probabilities
        uniq, inverse = np.unique(b, return_inverse=True)
        v = np.array([np.logaddexp.reduce(v[inverse == u]) for u in range(len(uniq))], np.float32)
        b = uniq
    order = np.argsort(-v, kind="stable")
    b, v = b[order], v[order]
    out_ids = np.full(k, b[0] if len(b) else 0, np.int32)
    out_lps = np.full(k, -np.inf, np.float32)
    out_ids[:len(b)], out_lps[:len(b)] = b, v
    return out_ids, out_lps, tail


def map_record(record, teacher_tok, student_tok, vmap, *, student_eos: int | None = None) -> tuple[Targets, dict]:
    """``record`` (a ``TeacherRecord``) as student targets, and counts for the alignment statistics."""
    teacher_eos = set(vmap.by_role) | set(eos_ids(tokenizer=teacher_tok))
    student_eos = student_tok.eos_token_id if student_eos is None else student_eos
    ids = [int(i) for i in record.token_ids]
    finished = bool(ids) and ids[-1] in teacher_eos
    body = ids[:-1] if finished else ids
    text, spans_a = id_spans(teacher_tok, body)
    s_ids, spans_b = token_offsets(student_tok, text) if text else ([], [])
    pieces = align_offsets(spans_a, spans_b, len(text)) if text else []
    n, k = len(s_ids) + finished, record.topk_ids.shape[1]
    t = Targets(record.id, text, np.array(s_ids + [student_eos] * finished, np.int32),
                np.zeros((n, k), np.int32), np.full((n, k), -np.inf, np.float16), np.zeros(n, np.float32),
                np.zeros(n, np.int8), np.full(n, np.nan, np.float32), np.zeros(n, np.int16),
                float(-np.asarray(record.token_logprobs[:len(body)], np.float64).sum()), len(text.encode()))
    counts = {"pieces": 0, "one_to_one": 0, "student_tokens": n, "tail_mass": 0.0}
    pairs = [(p.a_start, p.b_start) for p in pieces if p.a_end - p.a_start == 1 and p.b_end - p.b_start == 1]
    if finished:
        pairs.append((len(body), len(s_ids)))
    to_student = vmap.student_id
    for i, j in pairs:
        t.topk_ids[j], lps, t.tail_logprobs[j] = _move(record.topk_ids[i], record.topk_logprobs[i],
                                                      record.tail_logprobs[i], to_student, k)
        t.topk_logprobs[j] = lps
        t.unit[j] = TOKEN
        counts["tail_mass"] += float(np.exp(t.tail_logprobs[j]))
    for p in pieces:
        la, lb = p.a_end - p.a_start, p.b_end - p.b_start
        if (la, lb) == (1, 1) or la == 0 or lb == 0:
            continue
        j = p.b_end - 1
        t.unit[j] = PIECE
        t.piece_logprob[j] = float(np.asarray(record.token_logprobs[p.a_start:p.a_end], np.float64).sum())
        t.piece_len[j] = lb
    counts["pieces"] = len(pieces) + finished
    counts["one_to_one"] = len(pairs)  # 1:1 pieces: as many as student tokens in them, and token units
    return t, counts


def alignment_stats(counts: list[dict], bytes_per_token: float | None = None) -> dict:
    """Totals over records: share of 1:1 pieces, of student tokens in 1:1 pieces, mean tail mass."""
    tot = {key: sum(c[key] for c in counts) for key in counts[0]} if counts else {}
    if not tot:
        return {}
    out = {"pieces": tot["pieces"], "share_1to1_pieces": round(tot["one_to_one"] / max(1, tot["pieces"]), 4),
           "share_tokens_1to1": round(tot["one_to_one"] / max(1, tot["student_tokens"]), 4),
           "mean_tail_mass": round(tot["tail_mass"] / max(1, tot["one_to_one"]), 4)}
    if bytes_per_token is not None:
        out["bytes_per_token"] = round(bytes_per_token, 1)
    return out


def write_targets(path: str | Path, rows: list[Targets], meta: dict | None = None) -> Path:
    """All of a split's targets in one safetensors file (written atomically)."""
    from safetensors.numpy import save_file

    from ..artifacts import atomic_path

    lengths = [len(r) for r in rows]
    tensors = {f: np.concatenate([getattr(r, f) for r in rows]) if rows else np.zeros(0) for f in FIELDS}
    tensors["offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    index = [{"id": r.id, "text": r.text, "teacher_nll": r.teacher_nll, "n_bytes": r.n_bytes} for r in rows]
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"index": json.dumps(index, ensure_ascii=False),
                                               "meta": json.dumps(meta or {})})
    return Path(path)


def read_targets(path: str | Path) -> dict[str, Targets]:
    """The targets of a file written by ``write_targets``, by example id."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no mapped teacher targets here; run notebooks/06_fusion to build them")
    with safe_open(str(path), framework="numpy") as f:
        index = json.loads(f.metadata()["index"])
    arrays = load_file(str(path))
    off = arrays["offsets"]
    return {row["id"]: Targets(row["id"], row["text"], *(arrays[f][off[i]:off[i + 1]] for f in FIELDS),
                               teacher_nll=row["teacher_nll"], n_bytes=row["n_bytes"])
            for i, row in enumerate(index)}
