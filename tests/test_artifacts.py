import pytest

from helpers import artifacts


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "table.csv"
    artifacts.write_text(target, "old\n")
    with pytest.raises(RuntimeError):
        with artifacts.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]


def test_jsonl_roundtrip_and_errors(tmp_path):
    rows = [{"id": "a", "x": 1}, {"id": "b", "x": "ü"}]
    artifacts.write_jsonl(tmp_path / "r.jsonl", rows)
    assert artifacts.read_jsonl(tmp_path / "r.jsonl") == rows
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n\n{"id": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: malformed JSON"):
        artifacts.read_jsonl(tmp_path / "bad.jsonl")
    (tmp_path / "list.jsonl").write_text("[1]\n")
    with pytest.raises(ValueError, match=r"list\.jsonl:1: expected a JSON object"):
        artifacts.read_jsonl(tmp_path / "list.jsonl")


def test_fingerprint_and_manifest(tmp_path):
    assert artifacts.fingerprint({"a": 1, "b": [1, 2]}) == artifacts.fingerprint({"b": [1, 2], "a": 1})
    assert artifacts.fingerprint({"a": 1}) != artifacts.fingerprint({"a": 2})
    assert artifacts.file_digest(tmp_path / "missing") is None
    assert not artifacts.is_done(tmp_path, {"k": 1})
    artifacts.write_manifest(tmp_path, {"settings": {"k": 1}})
    assert artifacts.is_done(tmp_path, {"k": 1}) and not artifacts.is_done(tmp_path, {"k": 2})
    (tmp_path / artifacts.MANIFEST).write_text("{torn")
    assert artifacts.read_manifest(tmp_path) is None
