"""On-policy KD (GKD): λ = 0 is exactly off-policy KD; a rebuilt batch holds the student's own
samples and the teacher's top-k on exactly those tokens; a student equal to its teacher has zero
KD loss on its own samples; the settings refuse what cannot work."""
import pytest
import torch

from helpers import models, settings
from helpers.backends import transformers_engine as hf
from helpers.backends.transformers_engine import TransformersEngine
from helpers.data import Record
from helpers.kd import distill, losses, teacher
from helpers.kd.on_policy import OnPolicy

RECORDS = [Record(f"r{i}", q, f"{i} + 1 = {i + 1}\n#### {i + 1}", float(i + 1)) for i, q in enumerate([
    "Tom has 3 apples and buys 4 more. How many?", "What is 10 - 5?",
    "Natalia sold 48 clips in April and half as many in May. How many altogether?", "What is 2 * 6?"])]
CFG = {"loss": "jsd", "alpha": 1.0, "optimizer": "adamw", "lr": 5e-3, "epochs": 1, "batch_size": 2,
       "lora_dropout": 0.0, "on_policy_max_new_tokens": 6}


@pytest.fixture(scope="module")
def store(loaded, tiny_dir, tmp_path_factory):
    return teacher.build_store(tmp_path_factory.mktemp("store"), RECORDS, teacher=tiny_dir, strategy="gold-hint",
                               k=8, max_new_tokens=7, batch_size=4, shard_size=4, loaded=loaded, progress=False)


def _lora(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def test_lambda_zero_is_exactly_off_policy_kd(tiny_dir, loaded, store):
    _, tok = loaded
    exs = distill.build_examples(RECORDS, tok, store, teacher_prompts=True)
    off, h_off = distill.train(models.load_model(tiny_dir, dtype="fp32")[0], tok, exs, exs[:2], CFG, progress=False)
    hook = OnPolicy(TransformersEngine(*loaded), tok, 0.0, k=8, max_new_tokens=6, max_length=512)
    on, h_on = distill.train(models.load_model(tiny_dir, dtype="fp32")[0], tok, exs, exs[:2], CFG, progress=False,
                             prepare_batch=hook)
    assert hook.batches == 2 and hook.sampled == 0
    a, b = _lora(off), _lora(on)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert h_off["train_loss"] == h_on["train_loss"] and h_off["val_loss"] == h_on["val_loss"]


def test_a_rebuilt_batch_is_the_students_sample_scored_by_the_teacher(tiny_dir, loaded, store):
    model, tok = loaded
    exs = distill.build_examples(RECORDS[:3], tok, store, teacher_prompts=True)
    # the teacher's prompt is the store's strategy prompt (gold-hint shows the reference), not the student's
    assert all(e.teacher_prompt != e.input_ids[:e.n_prompt] for e in exs)
    student = models.load_model(tiny_dir, dtype="fp32")[0]
    hook = OnPolicy(TransformersEngine(*loaded), tok, 1.0, k=8, max_new_tokens=6, max_length=512, seed=3)
    torch.manual_seed(0)
    batch = hook(student, {**distill.collate(exs, tok.pad_token_id), "examples": exs})
    assert hook.sampled == hook.batches == 1
    torch.manual_seed(0)  # the same draw: the student's sample, made again by hand
    prompts = [e.input_ids[:e.n_prompt] for e in exs]
    rows = hf.generate_with_capture(student, tok, prompts, capture=False, do_sample=True, max_new_tokens=6)
    scored = hf.score_ids(model, tok.pad_token_id, [e.teacher_prompt for e in exs], [r["token_ids"] for r in rows], k=8)
    for b, (e, r, s) in enumerate(zip(exs, rows, scored)):
        n, m = e.n_prompt, len(r["token_ids"])
        assert batch["input_ids"][b, :n + m].tolist() == prompts[b] + r["token_ids"]
        pos = torch.nonzero(batch["mask"][b]).squeeze(1)
        assert pos.tolist() == list(range(n - 1, n - 1 + m))
        assert torch.equal(batch["topk_ids"][b, pos], s["topk_ids"].long())
        assert torch.equal(batch["topk_logprobs"][b, pos], s["topk_logprobs"].float())
        assert torch.equal(batch["tail_logprobs"][b, pos], s["tail_logprobs"])


def test_a_student_equal_to_its_teacher_has_zero_kd_on_its_own_samples(tiny_dir, loaded, store):
    """LoRA starts at zero, so the student is its teacher: the divergence on its samples is 0."""
    from peft import LoraConfig, get_peft_model

    _, tok = loaded
    exs = distill.build_examples(RECORDS, tok, store)  # the student's prompt for the teacher too
    for e in exs:
        e.teacher_prompt = e.input_ids[:e.n_prompt]
    student = get_peft_model(models.load_model(tiny_dir, dtype="fp32")[0],
                             LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    hook = OnPolicy(TransformersEngine(*loaded), tok, 1.0, k=8, max_new_tokens=6, max_length=512)
    batch = hook(student, {**distill.collate(exs, tok.pad_token_id), "examples": exs})
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    for kind in ("forward_kl", "reverse_kl", "jsd", "tv"):
        loss, parts = losses.kd_loss(kind, logits, batch["targets"], batch["mask"], batch["topk_ids"],
                                     batch["topk_logprobs"], alpha=1.0, tail_logprobs=batch["tail_logprobs"])
        # zero up to the fp16 rounding of the stored log-probs (relative 2^-11): second order for the
        # KL family, first order for total variation
        assert abs(parts["kd"]) < (1e-4 if kind == "tv" else 1e-6), (kind, parts["kd"])


def test_on_policy_training_samples_the_share_asked_and_learns(tiny_dir, loaded, store):
    _, tok = loaded
    exs = distill.build_examples(RECORDS, tok, store, teacher_prompts=True)
    hook = OnPolicy(TransformersEngine(*loaded), tok, 1.0, k=8, max_new_tokens=6, max_length=512)
    model, hist = distill.train(models.load_model(tiny_dir, dtype="fp32")[0], tok, exs, exs[:2],
                                {**CFG, "epochs": 2}, progress=False, prepare_batch=hook)
    assert hook.sampled == hook.batches == 4
    assert all(torch.isfinite(torch.tensor(hist["train_loss"])))
    assert any(v.abs().max() > 0 for k, v in _lora(model).items() if "lora_B" in k)


def test_settings_on_policy_needs_a_teacher_store_and_defaults_to_jsd():
    row = settings.check_variant("gkd", {"strategy": "base", "on_policy": 0.5})
    assert row["loss"] == "jsd" and row["on_policy"] == 0.5
    assert settings.check_variant("gkd", {"strategy": "base", "on_policy": 0.5, "loss": "reverse_kl"})["loss"] == "reverse_kl"
    assert "loss" not in settings.check_variant("kd", {"strategy": "base", "on_policy": 0})
    with pytest.raises(settings.SettingsError, match="on_policy: 0.5 .* needs a strategy"):
        settings.check_variant("gkd", {"loss": "ce", "on_policy": 0.5})
    with pytest.raises(settings.SettingsError, match="on_policy"):
        settings.check_variant("gkd", {"strategy": "base", "on_policy": 1.5})
    with pytest.raises(settings.SettingsError, match="on_policy belongs to variants"):
        settings.check_fusion_row("f", {"loss": "forward_kl", "on_policy": 0.5})


def test_on_policy_refuses_another_tokenizer_or_another_teacher(tiny_dir, tiny_base_dir, loaded, store, tmp_path):
    _, tok = loaded
    other = TransformersEngine(*models.load_model(tiny_base_dir, dtype="fp32"))
    if models.tokenizer_fingerprint(other.tokenizer) != models.tokenizer_fingerprint(tok):
        with pytest.raises(ValueError, match="the student's tokenizer"):
            OnPolicy(other, tok, 0.5, k=8, max_new_tokens=4, max_length=64)
    with pytest.raises(ValueError, match="not the one that wrote"):
        distill._check_on_policy_teacher("some/other-teacher", store)
    with pytest.raises(ValueError, match="needs the teacher"):
        distill._check_on_policy_teacher(None, store)
