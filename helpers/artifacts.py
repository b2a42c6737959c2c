"""Atomic writes, manifests and fingerprints shared by every stage.

Every artifact directory carries a ``manifest.json`` saying what produced it and with which
settings. A stage compares the manifest it would write with the one on disk and skips the
work when they match. Writes go to a temporary name in the same directory and are renamed
into place, so an interrupted run never leaves a half file that looks complete.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "manifest.json"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def exclusive(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if missing) for the block, so that
    processes building the same cached file (two notebooks, two test workers) take turns instead of
    building it twice. No lock where the platform has no ``fcntl``."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_jsonl(path: str | os.PathLike, rows) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Path(path)


def iter_jsonl(path: str | os.PathLike, expected: str = "a JSON object") -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-empty line; a malformed line or one that is not an
    object raises ``ValueError`` naming the file and line (``expected`` says what was wanted)."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}): "
                                 f"{line.rstrip(chr(10))!r}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected {expected}, got {type(row).__name__}")
            yield lineno, row


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file; a malformed line raises ``ValueError`` naming the file and line."""
    return [row for _, row in iter_jsonl(path)]


def fingerprint(obj: Any, n: int = 16) -> str:
    """A short, stable hash of any JSON-serialisable object (dict order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


def file_digest(path: str | os.PathLike, n: int = 16) -> str | None:
    """sha256 of a file's bytes, or None when it does not exist."""
    path = Path(path)
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def one_line(text) -> str:
    """A message on one line (library messages may span several)."""
    return " ".join(str(text).split())


def file_record(path: str | os.PathLike) -> dict:
    """What a file should be, recorded when the toolkit writes it: ``{"size", "sha256"}``."""
    return {"size": Path(path).stat().st_size, "sha256": file_digest(path, n=64)}


def file_problem(path: str | os.PathLike, record: dict | None, *, digest: bool = True) -> str | None:
    """Why ``path`` is not the file ``record`` describes (missing, wrong size, other bytes), or None.
    ``digest=False`` checks the size only (cheap)."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    if not record:
        return None
    size = path.stat().st_size
    if size != record.get("size"):
        return f"{size} bytes, expected {record.get('size')} (truncated or overwritten)"
    if digest and record.get("sha256") and file_digest(path, n=64) != record["sha256"]:
        return "its bytes differ from those written (corrupted)"
    return None


def remove_stale_temporaries(directory: str | os.PathLike, older_than_s: float = 0.0) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files and folders an interrupted write left behind
    (only those older than ``older_than_s`` seconds, where other processes may be writing)."""
    import shutil
    import time

    gone = []
    for p in Path(directory).glob(".*.tmp"):
        if older_than_s and time.time() - p.stat().st_mtime < older_than_s:
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        gone.append(p)
    return gone


def read_json(path: str | os.PathLike) -> dict | None:
    """A JSON file's content, or None when it is missing or damaged (which means "not done")."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def read_manifest(directory: str | os.PathLike) -> dict | None:
    return read_json(Path(directory) / MANIFEST)


def write_manifest(directory: str | os.PathLike, manifest: dict) -> Path:
    return write_json(Path(directory) / MANIFEST, manifest)


def is_done(directory: str | os.PathLike, settings: dict) -> bool:
    """True when ``directory`` has a manifest whose ``settings`` equal ``settings``."""
    m = read_manifest(directory)
    return m is not None and m.get("settings") == json.loads(json.dumps(settings, default=str))
