"""Drafter distillation: off-policy on the target's store and on-policy on the drafter's own drafts."""
import pytest
import torch

from conftest import make_model
from helpers import models
from helpers.backends import transformers_engine as hf
from helpers.data import Record
from helpers.kd import distill, losses, teacher
from helpers.speculative import ReducedHead, draft_vocabulary, kd, restrict_vocabulary

RECORDS = [Record(f"r{i}", q, f"{i} + 1 = {i + 1}\n#### {i + 1}", float(i + 1)) for i, q in enumerate([
    "Tom has 3 apples and buys 4 more. How many?", "What is 10 - 5?",
    "Natalia sold 48 clips in April and half as many in May. How many altogether?", "What is 2 * 6?",
    "Weng earns $12 an hour for babysitting 50 minutes. How much?", "What is 7 + 7?"])]


def mean_tv(model, tok, examples) -> float:
    batch = distill.collate(examples, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return losses.total_variation(logits, batch["topk_ids"], batch["topk_logprobs"], batch["mask"],
                                  tail_logprobs=batch["tail_logprobs"]).item()


@pytest.fixture(scope="module")
def target(tiny_dir):
    return models.load_model(tiny_dir, dtype="fp32")


def test_kd_brings_the_drafter_towards_the_target(target, tiny_dir, tmp_path):
    """Off-policy KD with the TV loss lowers the drafter's TV to the target (1 − its acceptance
    rate) on the training solutions; the merged drafter is a plain model, the target unchanged."""
    model, tok = target
    before_target = {k: v.clone() for k, v in model.state_dict().items()}
    store = teacher.build_store(tmp_path / "store", RECORDS, teacher=tiny_dir, strategy="base", k=16,
                                max_new_tokens=16, batch_size=6, shard_size=6, loaded=target, progress=False)
    examples = distill.build_examples(RECORDS, tok, store)
    drafter = make_model(tok, seed=5)
    start = mean_tv(drafter, tok, examples)
    cfg = {"loss": "tv", "alpha": 1.0, "epochs": 8, "batch_size": 3, "lr": 0.01, "optimizer": "adamw",
           "lora_r": 8, "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    trained, history = kd.distill_drafter(drafter, tok, examples, examples, cfg, progress=False)
    assert not hasattr(trained, "peft_config")  # merged: drafts without peft
    end = mean_tv(trained, tok, examples)
    assert end < 0.8 * start, (start, end)
    assert history["val_loss"][-1] < history["val_loss_before"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before_target.items())


def test_on_policy_store_scores_the_drafters_own_text(target, tiny_dir, tmp_path):
    model, tok = target
    drafter = make_model(tok, seed=7)
    sampled = dict(do_sample=True, seed=3)  # an untrained tiny model's greedy text is often empty
    store = kd.on_policy_store(drafter, tiny_dir, target, RECORDS[:4], tmp_path, k=8, max_new_tokens=12,
                               batch_size=4, progress=False, **sampled)
    drafted = kd.drafter_solutions(drafter, tok, RECORDS[:4], max_new_tokens=12, batch_size=4, **sampled)
    assert all(r.solution for r in drafted)
    for r in drafted:
        rec = store.get(r.id)
        assert rec.response == r.solution.strip()
        # the target's own log-probs of the drafter's tokens, by teacher forcing
        want = hf.score_with_capture(model, tok, [models.prompt_text(tok, [{"role": "user", "content": r.question}])],
                                          [r.solution], k=8)[0]
        assert list(rec.token_ids) == list(want["token_ids"])
        torch.testing.assert_close(torch.tensor(rec.token_logprobs), torch.tensor(want["token_logprobs"]))
    again = kd.on_policy_store(drafter, tiny_dir, target, RECORDS[:4], tmp_path, k=8, max_new_tokens=12,
                               batch_size=4, progress=False, **sampled)
    assert again.path == store.path  # the same drafts reuse their store
    other = kd.on_policy_store(make_model(tok, seed=8), tiny_dir, target, RECORDS[:4], tmp_path, k=8,
                               max_new_tokens=12, batch_size=4, progress=False, **sampled)
    assert other.path != store.path


@pytest.mark.parametrize("loss", ["tv", "jsd", "reverse_kl"])
def test_the_reduced_head_loss_is_the_full_vocabulary_loss(tiny_dir, loss):
    """On the head's n + 1 columns: KD alone has the value and gradients of the loss on the full
    -inf-filled logits; mixed with cross-entropy, the CE counts the targets the head holds."""
    tok = models.load_tokenizer(tiny_dir)
    torch.manual_seed(0)
    B, L, k = 2, 12, 16
    ids = torch.randint(0, len(tok), (B, L))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "targets": ids[:, 1:],
             "mask": torch.ones(B, L - 1), "topk_logprobs": torch.randn(B, L - 1, k).log_softmax(-1) - 0.1,
             "topk_ids": torch.stack([torch.randperm(len(tok))[:k] for _ in range(B * (L - 1))]).view(B, L - 1, k),
             "tail_logprobs": torch.full((B, L - 1), -2.4)}
    cfg = {**distill.DEFAULTS, "loss": loss, "alpha": 1.0}
    half = range(0, len(tok), 2)
    grads = []
    for fn in (distill.batch_loss, kd.reduced_head_loss):
        model = restrict_vocabulary(make_model(tok, seed=3), half)
        value = fn(model, batch, cfg)[0]
        value.backward()
        grads.append((value.detach(), [p.grad for p in model.parameters() if p.grad is not None]))
    (a, ga), (b, gb) = grads
    torch.testing.assert_close(a, b)
    assert len(ga) == len(gb) > 2
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)
    with torch.no_grad():
        mixed = kd.reduced_head_loss(model, batch, {**cfg, "alpha": 0.25})[0]
        full = model(input_ids=ids).logits[:, :-1]
        inside = batch["targets"] % 2 == 0
        assert 0 < inside.sum() < inside.numel()
        ce = losses.cross_entropy(full, torch.where(inside, batch["targets"], 0), batch["mask"] * inside)
        torch.testing.assert_close(mixed, 0.25 * a + 0.75 * ce)


def test_kd_trains_a_drafter_with_a_reduced_head(target, tiny_dir, tmp_path):
    """The TV to the target falls, the merged drafter keeps its head's ids (probability 0 elsewhere),
    and a loss that is infinite there is refused in one line."""
    model, tok = target
    store = teacher.build_store(tmp_path / "store", RECORDS, teacher=tiny_dir, strategy="base", k=16,
                                max_new_tokens=16, batch_size=6, shard_size=6, loaded=target, progress=False)
    examples = distill.build_examples(RECORDS, tok, store)
    ids = draft_vocabulary(examples, 64, len(tok), keep=[tok.eos_token_id])
    drafter = restrict_vocabulary(make_model(tok, seed=5), ids)
    with pytest.raises(ValueError, match="reduced head gives the tokens outside it probability 0") as err:
        kd.distill_drafter(drafter, tok, examples, examples, {"loss": "forward_kl"}, progress=False)
    assert "\n" not in str(err.value)
    start = mean_tv(drafter, tok, examples)
    cfg = {"loss": "tv", "alpha": 1.0, "epochs": 8, "batch_size": 3, "lr": 0.01, "optimizer": "adamw",
           "lora_r": 8, "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    trained, history = kd.distill_drafter(drafter, tok, examples, examples, cfg, progress=False)
    assert isinstance(trained.lm_head, ReducedHead) and torch.equal(trained.lm_head.ids, ids)
    end = mean_tv(trained, tok, examples)
    assert end < 0.8 * start, (start, end)
    assert history["val_loss"][-1] < history["val_loss_before"]
    outside = torch.ones(len(tok), dtype=torch.bool)
    outside[ids] = False
    with torch.no_grad():
        assert torch.isneginf(trained(torch.tensor([examples[0].input_ids])).logits[..., outside]).all()
