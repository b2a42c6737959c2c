"""Sparse teacher distributions on disk: sharded, keyed by example id, resumable, verified.

A store is a directory::

    manifest.json            what wrote it: teacher, tokenizer fingerprint, strategy, decoding, k,
                             the store format, and each shard's size and sha256
    shard-00000.safetensors  one shard = a fixed slice of the example list

Each shard holds, for every generated (or scored) token of its examples, concatenated:

    token_ids       int32   [N]     the token the teacher wrote (the student's target)
    topk_ids        int32   [N, k]  the teacher's k most likely tokens at that position
    topk_logprobs   float16 [N, k]  their log-probabilities (full-vocabulary softmax, T = 1)
    token_logprobs  float32 [N]     log-probability of the token actually taken
    tail_logprobs   float32 [N]     log of the mass outside the top-k, computed in fp32 from the
                                    full distribution (-inf when k covers the vocabulary)
    offsets         int64   [n + 1] example i owns rows offsets[i]:offsets[i+1]

plus, in the safetensors metadata, the example ids and response texts. That is 6k + 12 bytes
per token (396 bytes at k = 64, within 8·k for k >= 6, against ~96 KiB for full fp16 logits of
a 49k vocabulary).

A shard file is written atomically, so a shard on disk is complete; an interrupted run
resumes at the first missing shard, and because shards are fixed slices processed the same
way, a resumed store is identical to an uninterrupted one. The manifest records each shard's
size and sha256 before the shard is renamed into place; the writer (``teacher.build_store``)
re-verifies shards when it resumes and rebuilds damaged ones, and the reader checks sizes
when it opens a store and digests when it first loads a shard. ``settings["format"]`` is
``STORE_FORMAT``: stores of another format are rebuilt by the writer and refused by the reader.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..artifacts import atomic_path, file_problem, read_manifest

FIELDS = ("token_ids", "topk_ids", "topk_logprobs", "token_logprobs", "tail_logprobs")
STORE_FORMAT = 2  # 2: per-token tail_logprobs and per-shard size + sha256 in the manifest
RERUN = "re-run notebooks/01_teacher_logits (python -m helpers.pipeline --only 01_teacher_logits --force)"


@dataclass
class TeacherRecord:
    id: str
    response: str
    finished: bool
    token_ids: np.ndarray       # [n]
    topk_ids: np.ndarray        # [n, k]
    topk_logprobs: np.ndarray   # [n, k]
    token_logprobs: np.ndarray  # [n]
    tail_logprobs: np.ndarray   # [n]  log-mass outside the top-k (fp32; -inf when k covers the vocabulary)
    stop: str = "eos"           # why generation ended: eos (finished), loop (repetition stopped) or cap

    def __len__(self) -> int:
        return len(self.token_ids)


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def write_shard(path: str | Path, rows: list[dict], before_rename: Callable[[Path], None] | None = None) -> Path:
    """Write one shard from per-example dicts (id, response, finished and the five arrays).

    ``before_rename(tmp)`` runs on the complete temporary file before it is renamed into place
    (``build_store`` records the shard's size and digest there, so a shard on disk always has one).
    """
    from safetensors.numpy import save_file

    lengths = [len(r["token_ids"]) for r in rows]
    tensors = {
        "token_ids": np.concatenate([np.asarray(r["token_ids"], np.int32) for r in rows]),
        "topk_ids": np.concatenate([np.asarray(r["topk_ids"], np.int32) for r in rows]),
        "topk_logprobs": np.concatenate([np.asarray(r["topk_logprobs"], np.float16) for r in rows]),
        "token_logprobs": np.concatenate([np.asarray(r["token_logprobs"], np.float32) for r in rows]),
        "tail_logprobs": np.concatenate([np.asarray(r["tail_logprobs"], np.float32) for r in rows]),
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
    }
    meta = {"index": json.dumps([{"id": r["id"], "response": r["response"], "finished": bool(r["finished"]),
                                  "stop": r.get("stop") or ("eos" if r["finished"] else "cap")}
                                 for r in rows], ensure_ascii=False)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
        if before_rename is not None:
            before_rename(tmp)
    return Path(path)


def damaged(p: Path, why: str) -> ValueError:
    """The one-line error for a damaged shard file."""
    return ValueError(f"teacher store shard {p} is damaged ({why}): {RERUN}: it rebuilds damaged shards")


class LogitStore:
    """Read access to a finished (or partly written) store, by example id.

    Opening checks the store format and each shard's size against the manifest; a shard's
    sha256 is checked when it is first loaded. A damaged shard raises ``ValueError`` in one
    line naming the file and how to rebuild it.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if self.manifest is None:
            raise FileNotFoundError(f"{self.path} is not a teacher logit store (no manifest.json); "
                                    "run notebooks/01_teacher_logits first")
        fmt = (self.manifest.get("settings") or {}).get("format", 1)
        if fmt != STORE_FORMAT:
            raise ValueError(f"teacher store {self.path} was written in store format {fmt}, this version reads "
                             f"format {STORE_FORMAT} (with per-token tail_logprobs): {RERUN} to rebuild it")
        self._records: dict = self.manifest.get("shards") or {}
        self._where: dict[str, tuple[int, int]] = {}
        self._index: list[list[dict]] = []
        self._arrays: dict[int, dict[str, np.ndarray]] = {}
        for s in range(self.manifest["n_shards"]):
            p = self.path / shard_name(s)
            if not p.is_file():
                break
            record = self._records.get(p.name)
            if record is None:
                raise damaged(p, "no size and digest recorded in the manifest")
            problem = file_problem(p, record, digest=False)  # size now, digest when first loaded
            if problem:
                raise damaged(p, problem)
            index = self._read_index(p)
            self._index.append(index)
            for j, row in enumerate(index):
                self._where[row["id"]] = (s, j)

    @staticmethod
    def _read_index(p: Path) -> list[dict]:
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="numpy") as f:
                return json.loads(f.metadata()["index"])
        except Exception as e:  # a damaged header: name the file, not the library's internals
            raise damaged(p, f"unreadable header: {type(e).__name__}") from None

    @property
    def complete(self) -> bool:
        return len(self._index) == self.manifest["n_shards"]

    @property
    def k(self) -> int:
        return int(self.manifest["settings"]["k"])

    def ids(self) -> list[str]:
        return list(self._where)

    def __contains__(self, rid: str) -> bool:
        return rid in self._where

    def __len__(self) -> int:
        return len(self._where)

    def _shard(self, s: int) -> dict[str, np.ndarray]:
        if s not in self._arrays:
            from safetensors.numpy import load

            p = self.path / shard_name(s)
            data = p.read_bytes()
            if hashlib.sha256(data).hexdigest() != self._records[p.name]["sha256"]:
                raise damaged(p, "its bytes differ from those written (corrupted)")
            try:
                arrays = load(data)
            except Exception as e:
                raise damaged(p, f"unreadable: {type(e).__name__}") from None
            missing = [f for f in (*FIELDS, "offsets") if f not in arrays]
            if missing:
                raise damaged(p, f"no {', '.join(missing)}")
            self._arrays[s] = arrays
        return self._arrays[s]

    def get(self, rid: str) -> TeacherRecord:
        if rid not in self._where:
            raise KeyError(f"example {rid!r} is not in the teacher store {self.path}")
        s, j = self._where[rid]
        arrays, row = self._shard(s), self._index[s][j]
        a, b = arrays["offsets"][j], arrays["offsets"][j + 1]
        return TeacherRecord(rid, row["response"], row["finished"], *(arrays[f][a:b] for f in FIELDS),
                             stop=row.get("stop") or ("eos" if row["finished"] else "cap"))

    def tokens(self) -> int:
        return int(sum(self._shard(s)["offsets"][-1] for s in range(len(self._index))))

    def bytes_per_token(self) -> float:
        size = sum((self.path / shard_name(s)).stat().st_size for s in range(len(self._index)))
        return size / max(1, self.tokens())

    def check_tokenizer(self, fingerprint: str, who: str = "the student") -> None:
        """Refuse a store whose token ids mean something else for ``who``."""
        mine = self.manifest["settings"]["tokenizer"]
        if mine != fingerprint:
            raise ValueError(
                f"teacher store {self.path} was written with tokenizer {mine} "
                f"(teacher {self.manifest['settings']['teacher']!r}), but {who} uses tokenizer {fingerprint}: "
                "token ids would not line up. Use a teacher and student that share a tokenizer.")
