import importlib.util
import numpy as np
import pytest
import torch

from helpers import models
from helpers.data import Record
from helpers.kd import distill, losses, teacher

RECORDS = [Record(f"r{i}", q, f"{i} + 1 = <<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}", float(i + 1)) for i, q in enumerate([
    "Tom has 3 apples and buys 4 more. How many?", "What is 10 - 5?",
    "Natalia sold 48 clips in April and half as many in May. How many altogether?", "What is 2 * 6?",
    "Weng earns $12 an hour for babysitting 50 minutes. How much?", "What is 7 + 7?"])]


@pytest.fixture(scope="module")
def store(loaded, tiny_dir, tmp_path_factory):
    return teacher.build_store(tmp_path_factory.mktemp("store"), RECORDS, teacher=tiny_dir, strategy="teacher",
                               k=8, max_new_tokens=7, batch_size=4, shard_size=4, loaded=loaded, progress=False)


def test_plain_solution_drops_calculator_notes():
    from helpers.data import plain_solution
    assert plain_solution("48/2 = <<48/2=24>>24 clips\n#### 72") == "48/2 = 24 clips\n#### 72"


def test_examples_join_by_id_and_align_with_teacher(loaded, store):
    _, tok = loaded
    shuffled = RECORDS[::-1]
    exs = distill.build_examples(shuffled, tok, store)
    assert [e.id for e in exs] == [r.id for r in shuffled]
    for e in exs:
        t = store.get(e.id)
        assert e.input_ids[e.n_prompt:] == list(t.token_ids)
        prompt = models.prompt_text(tok, [{"role": "user", "content": RECORDS[int(e.id[1:])].question}])
        assert e.input_ids[:e.n_prompt] == tok(prompt, add_special_tokens=False).input_ids
    with pytest.raises(ValueError, match="no teacher record"):
        distill.build_examples(RECORDS + [Record("zz", "q?", "#### 1", 1.0)], tok, store)


def test_reference_examples_end_with_eos(loaded):
    _, tok = loaded
    e = distill.build_examples(RECORDS[:1], tok)[0]
    assert e.input_ids[-1] == tok.eos_token_id and e.topk_ids is None
    assert tok.decode(e.input_ids[e.n_prompt:-1]) == "0 + 1 = 1\n#### 1"
    cut = distill.build_examples(RECORDS[:1], tok, max_length=e.n_prompt + 3)[0]
    assert len(cut.input_ids) == e.n_prompt + 3


def test_collate_shifts_labels_and_aligns_teacher_rows(loaded, store):
    _, tok = loaded
    exs = distill.build_examples(RECORDS[:3], tok, store)
    b = distill.collate(exs, tok.pad_token_id)
    for i, e in enumerate(exs):
        t = store.get(e.id)
        pos = torch.nonzero(b["mask"][i]).squeeze(1)
        assert pos.tolist() == list(range(e.n_prompt - 1, len(e.input_ids) - 1))
        assert b["targets"][i, pos].tolist() == list(t.token_ids)
        assert b["topk_ids"][i, pos].tolist() == t.topk_ids.tolist()
        np.testing.assert_array_equal(b["topk_logprobs"][i, pos].numpy(), t.topk_logprobs.astype(np.float32))
        assert b["attention_mask"][i].sum() == len(e.input_ids)


def test_padded_batch_loss_equals_per_example_losses(loaded, store):
    """Padding and batching change nothing: the batch loss is the token-weighted mean of each example's."""
    model, tok = loaded
    exs = distill.build_examples(RECORDS, tok, store)
    cfg = {**distill.DEFAULTS, "loss": "jsd", "T": 2.0}
    with torch.no_grad():
        batch, _, n = distill.batch_loss(model, distill.collate(exs, tok.pad_token_id), cfg)
        single = [distill.batch_loss(model, distill.collate([e], tok.pad_token_id), cfg) for e in exs]
    ref = sum(l.item() * c.item() for l, _, c in single) / sum(c.item() for _, _, c in single)
    assert batch.item() == pytest.approx(ref, abs=1e-5)
    # and the KD part equals a direct computation from the store on unpadded inputs
    e, t = exs[0], store.get(exs[0].id)
    with torch.no_grad():
        logits = model(torch.tensor([e.input_ids])).logits[0, e.n_prompt - 1:-1]
    direct = losses.jsd(logits[None], torch.from_numpy(t.topk_ids.astype(np.int64))[None],
                        torch.from_numpy(t.topk_logprobs.astype(np.float32))[None], torch.ones(1, len(t)), T=2.0)
    _, parts, _ = single[0]
    assert parts["kd"] == pytest.approx(direct.item(), abs=1e-5)


def test_training_lowers_validation_loss_and_saves_adapter(tiny_dir, store, tmp_path):
    model, tok = models.load_model(tiny_dir, dtype="fp32")
    exs = distill.build_examples(RECORDS, tok, store)
    cfg = {"loss": "forward_kl", "optimizer": "adamw", "lr": 5e-3, "epochs": 3, "batch_size": 2,
           "lora_dropout": 0.0, "T": 1.0, "alpha": 0.5}
    peft_model, hist = distill.train(model, tok, exs, exs, cfg, progress=False)
    assert len(hist["train_loss"]) == 9 and hist["epoch_end_step"] == [3, 6, 9]
    assert hist["val_loss"][-1] < hist["val_loss_before"]
    # one cosine over the whole run: the learning rate never goes back up between epochs
    assert all(a >= b for a, b in zip(hist["lr"], hist["lr"][1:])) and hist["lr"][0] == 5e-3
    out = distill.save_adapter(peft_model, tmp_path / "adapters" / "v", hist, {"x": 1})
    assert distill.is_trained(out, {"x": 1}) and not distill.is_trained(out, {"x": 2})
    assert distill.load_history(out)["val_loss"] == hist["val_loss"]
    tuned, _ = models.load_model(tiny_dir, adapter=str(out), dtype="fp32")
    ids = torch.tensor([exs[0].input_ids])
    with torch.no_grad():
        torch.testing.assert_close(tuned(ids).logits, peft_model.eval()(ids).logits, rtol=1e-4, atol=1e-4)


def test_sgd_fine_tuning_on_reference_solutions(tiny_dir):
    model, tok = models.load_model(tiny_dir, dtype="fp32")
    exs = distill.build_examples(RECORDS, tok)
    _, hist = distill.train(model, tok, exs, exs[:2], {"loss": "ce", "lr": 0.05, "epochs": 2, "batch_size": 3},
                            progress=False)
    assert len(hist["val_loss"]) == 2 and np.isfinite(hist["train_loss"]).all()
    with pytest.raises(ValueError, match="needs teacher distributions"):
        distill.train(models.load_model(tiny_dir)[0], tok, exs, exs, {"loss": "forward_kl"}, progress=False)
    with pytest.raises(ValueError, match="unknown optimizer"):
        distill.train(models.load_model(tiny_dir)[0], tok, exs, exs, {"loss": "ce", "optimizer": "lion"})


def test_run_variant_trains_once_and_checks_its_inputs(tiny_dir, tmp_path, capsys):
    kw = dict(student=tiny_dir, results_dir=tmp_path, training={"epochs": 1, "batch_size": 2}, n_train=4,
              n_validation=2, n_test=2, dtype="fp32", progress=False)
    out = distill.run_variant("ft", {"loss": "ce", "lr": 0.05}, **kw)
    assert (out / "adapter_model.safetensors").is_file() and out == tmp_path / "adapters" / "ft"
    stamp = (out / "adapter_model.safetensors").stat().st_mtime_ns
    distill.run_variant("ft", {"loss": "ce", "lr": 0.05}, **kw)
    assert "already trained" in capsys.readouterr().out
    assert (out / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="loss 'forward_kl' learns from teacher distributions: add 'strategy"):
        distill.run_variant("kd", {"loss": "forward_kl"}, **kw)
    with pytest.raises(ValueError, match=r"unknown setting 'temperature' \(did you mean 'T'\?\)|unknown setting 'temperature'"):
        distill.run_variant("kd", {"strategy": "base", "temperature": 2.0}, **kw)
    with pytest.raises(ValueError, match="lr='2e-5x'"):
        distill.run_variant("kd", {"strategy": "base", "lr": "2e-5x"}, **kw)
    with pytest.raises(FileNotFoundError, match="run notebooks/01_teacher_logits first"):
        distill.run_variant("kd", {"strategy": "base", "loss": "forward_kl"}, **kw)


def test_cli_names_a_missing_variant(capsys):
    assert distill.main(["--profile", "smoke", "--variant", "nope"]) == 1
    assert "variant 'nope' is not in" in capsys.readouterr().err


def _weights(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def test_grad_accumulation_weights_micro_batches_by_tokens(tiny_dir, store):
    """Two micro-batches of one example = one batch of two: the step is the token mean over both,
    even though the examples have different numbers of target tokens."""
    _, tok = models.load_model(tiny_dir, dtype="fp32")
    exs = distill.build_examples(RECORDS[:4], tok)
    assert len({len(e.input_ids) - e.n_prompt for e in exs}) > 1  # unequal token counts: a mean of means differs
    base = {"loss": "ce", "lr": 0.5, "epochs": 1, "lora_dropout": 0.0, "optimizer": "sgd", "momentum": 0.0}
    one, h1 = distill.train(models.load_model(tiny_dir, dtype="fp32")[0], tok, exs, exs[:1],
                            {**base, "batch_size": 2, "grad_accum": 1}, progress=False)
    two, h2 = distill.train(models.load_model(tiny_dir, dtype="fp32")[0], tok, exs, exs[:1],
                            {**base, "batch_size": 1, "grad_accum": 2}, progress=False)
    assert h1["step"] == h2["step"] == [1, 2]
    assert len(h2["micro_loss"]) == 4 and h2["micro_step"] == [1, 1, 2, 2] and len(h1["micro_loss"]) == 2
    assert h2["micro_tokens"] != h2["micro_tokens"][::-1] or len(set(h2["micro_tokens"])) > 1
    w1, w2 = _weights(one), _weights(two)
    moved = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert moved < 1e-5
    np.testing.assert_allclose(h1["train_loss"], h2["train_loss"], rtol=1e-5)


def test_diverging_training_stops_and_saves_nothing(tiny_dir, tmp_path):
    kw = dict(student=tiny_dir, results_dir=tmp_path, training={"epochs": 2, "batch_size": 2}, n_train=4,
              n_validation=2, n_test=2, dtype="fp32", progress=False)
    with pytest.raises(distill.TrainingDiverged) as err:
        distill.run_variant("hot", {"loss": "ce", "lr": 1e30, "momentum": 0.0}, **kw)
    msg = str(err.value)
    assert "variant 'hot'" in msg and "at optimizer step" in msg and "lr=1e+30" in msg and "nothing was saved" in msg
    assert "\n" not in msg
    assert not (tmp_path / "adapters" / "hot").exists()
    assert not list((tmp_path / "adapters").glob(".*")) if (tmp_path / "adapters").exists() else True


def test_damaged_or_non_finite_adapters_are_refused(tiny_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    kw = dict(student=tiny_dir, results_dir=tmp_path, training={"epochs": 1, "batch_size": 2}, n_train=4,
              n_validation=2, n_test=2, dtype="fp32", progress=False)
    out = distill.run_variant("ft", {"loss": "ce"}, **kw)
    weights = out / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # truncated, as by a full disk
    with pytest.raises(ValueError, match=r"adapter '.*ft' is damaged \(adapter_model.safetensors: .*truncated"):
        models.load_model(tiny_dir, adapter=str(out), dtype="fp32")
    capsys.readouterr()
    distill.run_variant("ft", {"loss": "ce"}, **kw)  # recognised as damaged and trained again
    assert "is damaged" in capsys.readouterr().out and weights.read_bytes() == good
    tensors = load_file(str(weights))
    name = next(iter(tensors))
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(weights))
    (out / "manifest.json").unlink()  # no record to compare with: the weights themselves are checked
    with pytest.raises(ValueError, match=r"adapter '.*ft' has non-finite weights \(1 of \d+ values"):
        models.load_model(tiny_dir, adapter=str(out), dtype="fp32")


def test_unfinished_teacher_solutions_are_kept_or_dropped(loaded, tiny_dir, tmp_path):
    """The store says how each solution ended; 'drop' trains only on the finished ones, and says
    so when none is left."""
    model, tok = loaded
    st = teacher.build_store(tmp_path / "s", RECORDS, teacher=tiny_dir, strategy="base", k=8, max_new_tokens=64,
                             batch_size=6, shard_size=6, stop_loops=True, loaded=loaded, progress=False)
    got = {r.id: st.get(r.id) for r in RECORDS}
    assert all(t.finished == (t.stop == "eos") and t.stop in ("eos", "loop", "cap") for t in got.values())
    kept = distill.build_examples(RECORDS, tok, st)
    assert [e.id for e in kept] == [r.id for r in RECORDS]
    finished = [rid for rid, t in got.items() if t.finished]
    if finished:
        assert [e.id for e in distill.build_examples(RECORDS, tok, st, unfinished="drop")] == finished
    unfinished = [r for r in RECORDS if not got[r.id].finished]
    assert unfinished, "the untrained tiny teacher should leave some solutions unfinished"
    with pytest.raises(ValueError, match="teacher_unfinished='drop' leaves nothing to train on"):
        distill.build_examples(unfinished, tok, st, unfinished="drop")
    summary = teacher.store_summary(st, RECORDS, unfinished="drop")
    assert summary["used for training"] == len(finished)
    assert summary["finished"] + summary["looped"] + summary["hit the cap"] == pytest.approx(1.0)


def test_each_training_seed_gets_its_own_adapter(tiny_dir, tmp_path):
    kw = dict(student=tiny_dir, results_dir=tmp_path, training={"epochs": 1, "batch_size": 2}, n_train=4,
              n_validation=2, n_test=2, dtype="fp32", progress=False)
    one = distill.run_variant("ft", {"loss": "ce", "lr": 0.05}, train_seed=1, **kw)
    two = distill.run_variant("ft", {"loss": "ce", "lr": 0.05}, train_seed=2, **kw)
    assert (one, two) == (tmp_path / "adapters" / "ft@seed1", tmp_path / "adapters" / "ft@seed2")
    from safetensors.torch import load_file

    from helpers.artifacts import read_manifest

    assert [read_manifest(d)["settings"]["config"]["seed"] for d in (one, two)] == [1, 2]
    a, b = load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)  # another initialisation


def test_chunked_loss_training_step_equals_the_plain_one(loaded, store, tiny_dir):
    """loss_chunk > 0: the loss from the hidden states and the LM head, a few positions at a time,
    gives the plain loss's value and LoRA gradients (the head itself stays frozen)."""
    from peft import LoraConfig, get_peft_model

    _, tok = loaded
    exs = distill.build_examples(RECORDS[:3], tok, store)
    batch = distill.collate(exs, tok.pad_token_id)
    model = get_peft_model(models.load_model(tiny_dir, dtype="fp32")[0],
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False))
    for kind in ("forward_kl", "jsd", "ce"):
        got = {}
        for chunk in (0, 3):
            cfg = {**distill.DEFAULTS, "loss": kind, "T": 2.0, "loss_chunk": chunk}
            model.zero_grad()
            loss, parts, n = distill.batch_loss(model, batch, cfg)
            loss.backward()
            got[chunk] = (loss.item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
        assert got[0][0] == pytest.approx(got[3][0], rel=1e-5, abs=1e-6), kind
        assert got[0][1].keys() == got[3][1].keys() and all("lora_" in k for k in got[0][1])
        for k in got[0][1]:
            torch.testing.assert_close(got[3][1][k], got[0][1][k], rtol=1e-4, atol=1e-6)


def test_lora_on_the_top_layers_only(tiny_dir):
    """lora_layers: 1 puts LoRA on the last decoder layer alone; it trains, the rest stays frozen."""
    model, tok = models.load_model(tiny_dir, dtype="fp32")
    exs = distill.build_examples(RECORDS, tok)
    peft_model, hist = distill.train(model, tok, exs, exs[:2], {"loss": "ce", "lr": 0.05, "epochs": 1,
                                                                "batch_size": 3, "lora_layers": 1}, progress=False)
    lora = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert lora and all(".layers.1." in n for n in lora) and all(p.requires_grad for p in lora.values())
    assert any(float(p.abs().sum()) > 0 for n, p in lora.items() if "lora_B" in n)  # B starts at zero: it moved
    assert np.isfinite(hist["train_loss"]).all()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                    reason="tensorboard is not installed (pip install -e .[tensorboard])")
def test_tensorboard_receives_every_step_and_the_variants_settings(tiny_dir, store, tmp_path):
    """``tracker: tensorboard``: the event files, read back, hold per step the loss, both terms, the
    learning rate and the gradient norm, and per epoch the validation loss, equal to the history;
    the variant's settings are its hyper-parameters."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, tok = models.load_model(tiny_dir, dtype="fp32")
    exs = distill.build_examples(RECORDS, tok, store)
    cfg = {"loss": "forward_kl", "optimizer": "adamw", "lr": 5e-3, "epochs": 2, "batch_size": 2, "T": 1.0, "alpha": 0.5,
           "lora_dropout": 0.0}
    _, hist = distill.train(model, tok, exs, exs[:2], cfg, progress=False, name="base-kd", tracker="tensorboard",
                            tracker_dir=tmp_path, hyperparameters={"strategy": "base"})
    runs = [p.parent for p in (tmp_path / "base-kd").rglob("events.out.tfevents.*")]
    scalars = {}
    for run in runs:
        acc = EventAccumulator(str(run))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    steps = hist["step"]
    np.testing.assert_allclose([v for _, v in scalars["train/loss"]], hist["train_loss"], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in scalars["train/lr"]], hist["lr"], rtol=1e-6)
    assert [s for s, _ in scalars["train/loss"]] == steps == [s for s, _ in scalars["train/grad_norm"]]
    assert all(v > 0 for _, v in scalars["train/grad_norm"])
    # loss = alpha · KD + (1 − alpha) · CE at every step (T = 1)
    kd, ce = (np.array([v for _, v in scalars[f"train/{t}"]]) for t in ("kd", "ce"))
    np.testing.assert_allclose(0.5 * kd + 0.5 * ce, hist["train_loss"], rtol=1e-5)
    assert [s for s, _ in scalars["validation/loss"]] == [0, *hist["epoch_end_step"]]
    np.testing.assert_allclose([v for _, v in scalars["validation/loss"]], [hist["val_loss_before"], *hist["val_loss"]],
                               rtol=1e-6)
    hparams = [p for p in (tmp_path / "base-kd").rglob("hparams.yml")]
    text = hparams[0].read_text()
    assert "strategy: base" in text and "loss: forward_kl" in text and "variant: base-kd" in text


def test_an_unknown_or_missing_tracker_is_named(tiny_dir, store, monkeypatch):
    model, tok = models.load_model(tiny_dir, dtype="fp32")
    exs = distill.build_examples(RECORDS[:2], tok, store)
    with pytest.raises(ValueError, match="unknown tracker 'tensorbord'; choose one of none, tensorboard, wandb, mlflow"):
        distill.train(model, tok, exs, exs, {"loss": "ce"}, progress=False, tracker="tensorbord")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(RuntimeError, match=r"tracker 'wandb' needs the wandb package, which is not installed: pip "
                                           r"install wandb, or set tracker: none"):
        distill.train(model, tok, exs, exs, {"loss": "ce"}, progress=False, tracker="wandb")
