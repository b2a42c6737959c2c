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
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: malformed JSON") as err:
        artifacts.read_jsonl(tmp_path / "bad.jsonl")
    assert str(err.value).endswith("""'{"id": '""")  # the offending line, quoted in full
    long = '{"id": "q9", "response": "' + "x" * 500 + ' tail" oops}'
    (tmp_path / "long.jsonl").write_text(long + "\n")
    with pytest.raises(ValueError) as err:
        artifacts.read_jsonl(tmp_path / "long.jsonl")
    assert repr(long) in str(err.value) and "\n" not in str(err.value)
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


def test_file_records_catch_truncation_and_corruption(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"0123456789" * 100)
    rec = artifacts.file_record(f)
    assert rec["size"] == 1000 and len(rec["sha256"]) == 64 and artifacts.file_problem(f, rec) is None
    f.write_bytes(b"0123456789" * 50)
    assert "500 bytes, expected 1000" in artifacts.file_problem(f, rec)
    f.write_bytes(b"0123456789" * 99 + b"012345678X")
    assert "corrupted" in artifacts.file_problem(f, rec)
    assert artifacts.file_problem(f, rec, digest=False) is None  # same size: only the digest can tell
    assert artifacts.file_problem(tmp_path / "gone", rec) == "missing"


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / ".shard-00001.safetensors.abc123.tmp").write_bytes(b"half")
    (tmp_path / ".adapter.x1.tmp").mkdir()
    (tmp_path / "shard-00000.safetensors").write_bytes(b"whole")
    gone = artifacts.remove_stale_temporaries(tmp_path)
    assert len(gone) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.safetensors"]
