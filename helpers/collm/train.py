"""Training the deferral head: the marginal likelihood of the solution tokens (``marginal_nll``),
the weak labels that initialise it (``weak_labels``), the assistant's stored log-probs put on the
base's tokens across tokenizers (``assistant_on_base``, ``alignment_summary``), the frozen base's
features (``frozen_features``, ``Features``) and the head's numbers on them (``head_logits``,
``features_nll``, ``reference_nll``), and the fits with early stopping: ``fit_head_weak``,
``fit_head_marginal`` (head alone, cached features) and ``train_joint`` (head with LoRA on the
base; ``examples_nll`` its validation criterion). Uses ``head``."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .head import DeferralHead, _batches, cross_tokenizer


def marginal_nll(base_logp_target: torch.Tensor, asst_logp_target: torch.Tensor, defer_logit: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
    """−log[(1 − σ)·p_base + σ·p_asst] per target token, mean over counted tokens."""
    mixed = torch.logaddexp(F.logsigmoid(-defer_logit) + base_logp_target, F.logsigmoid(defer_logit) + asst_logp_target)
    mask = mask.to(mixed.dtype)
    return -(mixed * mask).sum() / mask.sum().clamp_min(1.0)


def weak_labels(base_top1: torch.Tensor, asst_top1: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Z = 1 where the target is the assistant's top-1 and not the (untuned) base model's."""
    return ((asst_top1 == targets) & (base_top1 != targets)).float()


def _gather_targets(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@dataclass
class Features:
    """What the frozen base gives at every solution token of the training data."""
    hidden: torch.Tensor        # [N, H] last hidden state (the head's input)
    base_logp: torch.Tensor     # [N] log p_base(target)
    asst_logp: torch.Tensor     # [N] log p_asst(target), from the store
    labels: torch.Tensor        # [N] weak-supervision Z


def assistant_on_base(tok, asst_tok, example, rec, where="the assistant store"):
    """The assistant's stored log-probs of a reference solution (``rec``: its own tokens, scored by
    teacher forcing) put on the base's tokens of the same text (``example``), by the alignment of
    both tokenizations by character offsets. Returns (log-prob per base target token, whether the
    assistant's top-1 agrees there, the pieces of the text).

    A 1:1 piece carries the assistant's log-prob of that token. A piece of n base tokens carries the
    chain-rule log-prob of the piece (the sum over the assistant's tokens in it) split evenly, L/n
    on each, so the per-token probabilities multiply to the piece's probability and the marginal
    likelihood of "always the assistant" is the assistant's log-likelihood of the text. Its top-1
    agrees on a piece when it is each of the assistant's tokens there. The closing end-of-sequence
    tokens form one more 1:1 piece."""
    from ..fusion.align import align_offsets, token_offsets

    target = example.input_ids[example.n_prompt:]
    asst = [int(t) for t in rec.token_ids]
    if not target or target[-1] != tok.eos_token_id or not asst or asst[-1] != asst_tok.eos_token_id:
        raise ValueError(f"example {example.id!r} (or its record in {where}) does not end with end-of-sequence, "
                         "e.g. it was cut at max_length: across tokenizers only whole solutions can be aligned")
    text = tok.decode(target[:-1], clean_up_tokenization_spaces=False)
    ids_b, spans_b = token_offsets(tok, text)
    ids_a, spans_a = token_offsets(asst_tok, text)
    if ids_b != target[:-1]:
        raise ValueError(f"example {example.id!r}: the base tokenizer does not give back its tokens from their text "
                         f"({text[:40]!r}…); aligning needs a tokenizer that round-trips the solutions")
    if ids_a != asst[:-1]:
        raise ValueError(f"{where}: tokens of {example.id!r} are not the assistant tokenizer's tokens of the training "
                         "example's text; build it from the same records (mode 'score')")
    pieces = align_offsets(spans_b, spans_a, len(text))
    lp = np.asarray(rec.token_logprobs, np.float64)
    hit = np.asarray(rec.topk_ids[:, 0]) == np.asarray(asst)
    logp, agree = np.empty(len(target)), np.empty(len(target), bool)
    for p in pieces:
        if p.a_end == p.a_start or p.b_end == p.b_start:
            raise ValueError(f"example {example.id!r}: characters {p.start}:{p.end} ({text[p.start:p.end]!r}) have "
                             f"no {'base' if p.a_end == p.a_start else 'assistant'} token ({p.kind} piece), so the "
                             "assistant's log-probs cannot be put on base tokens there")
        logp[p.a_start:p.a_end] = lp[p.b_start:p.b_end].sum() / (p.a_end - p.a_start)
        agree[p.a_start:p.a_end] = hit[p.b_start:p.b_end].all()
    logp[-1], agree[-1] = lp[-1], hit[-1]
    return logp, agree, pieces


def alignment_summary(tok, asst_tok, examples, store) -> dict:
    """How the assistant's tokens line up with the base's on ``examples``: pieces by kind, the share
    of 1:1 pieces and the share of base tokens (end-of-sequence left out) that lie in them."""
    kinds, tokens, one = {}, 0, 0
    for e in examples:
        *_, pieces = assistant_on_base(tok, asst_tok, e, store.get(e.id), store.path)
        for p in pieces:
            kinds[p.kind] = kinds.get(p.kind, 0) + 1
            tokens += p.a_end - p.a_start
            one += p.a_end - p.a_start if p.kind == "1:1" else 0
    n = sum(kinds.values())
    return {"pieces": n, "share 1:1": kinds.get("1:1", 0) / max(n, 1), "base tokens in 1:1": one / max(tokens, 1),
            "kinds": dict(sorted(kinds.items()))}


def _aligned(chunk, batch, store, field: str, cross=None) -> torch.Tensor:
    """A per-token store field laid out like the collated batch's targets (zeros elsewhere); across
    tokenizers (``cross`` = (tok, asst_tok)) put on the base's tokens by ``assistant_on_base``, the
    top-1 then being the target where the assistant agrees and −1 (no token) elsewhere."""
    out = torch.zeros(batch["targets"].shape, dtype=torch.float32)
    for b, e in enumerate(chunk):
        rec = store.get(e.id)
        n = len(e.input_ids) - e.n_prompt
        if cross is not None:
            logp, agree, _ = assistant_on_base(*cross, e, rec, store.path)
            values = logp if field == "logp" else np.where(agree, e.input_ids[e.n_prompt:], -1)
        elif list(rec.token_ids[:n]) != e.input_ids[e.n_prompt:]:
            raise ValueError(f"assistant store {store.path}: tokens of {e.id!r} differ from the training example; "
                             "build it from the same records (mode 'score')")
        else:
            values = rec.token_logprobs if field == "logp" else rec.topk_ids[:, 0]
        out[b, e.n_prompt - 1:len(e.input_ids) - 1] = torch.as_tensor(np.asarray(values[:n], np.float32))
    return out


@torch.no_grad()
def frozen_features(base, tok, examples, store, batch_size: int = 8, asst_tok=None) -> Features:
    """One pass of the base over reference solutions (training or validation): hidden states, base
    and assistant log-probs of the targets, and the weak labels. The base is used as given: the
    untuned base for the head-alone path and for the weak head, the LoRA-tuned one for a jointly
    trained head. ``asst_tok``: the assistant's tokenizer, when it may differ from ``tok``."""
    cross = cross_tokenizer(tok, asst_tok)
    hs, bl, al, zs = [], [], [], []
    for chunk, batch in _batches(examples, batch_size, tok.pad_token_id):
        batch = {k: v.to(base.device) for k, v in batch.items()}
        out = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        logits, hidden = out.logits[:, :-1], out.hidden_states[-1][:, :-1]
        m = batch["mask"].bool()
        asst_logp = _aligned(chunk, batch, store, "logp", cross).to(base.device)
        asst_top1 = _aligned(chunk, batch, store, "top1", cross).to(base.device).long()
        z = weak_labels(logits.argmax(-1), asst_top1, batch["targets"])
        hs.append(hidden[m].float().cpu())
        bl.append(_gather_targets(logits, batch["targets"])[m].cpu())
        al.append(asst_logp[m].cpu())
        zs.append(z[m].cpu())
    return Features(torch.cat(hs), torch.cat(bl), torch.cat(al), torch.cat(zs))


@torch.no_grad()
def head_logits(head: DeferralHead, feats: Features) -> np.ndarray:
    """The head's deferral logits at every token of ``feats`` (float64), the same numbers as
    ``deferral_logits`` on the examples the features were computed from."""
    dev = head.proj.weight.device
    return torch.cat([head(feats.hidden[i:i + 8192].to(dev)).double().cpu()
                      for i in range(0, len(feats.labels), 8192)]).numpy()


@torch.no_grad()
def features_nll(head: DeferralHead, feats: Features) -> float:
    """Token-mean marginal NLL of the head on cached features (the validation criterion)."""
    d = torch.as_tensor(head_logits(head, feats))
    return marginal_nll(feats.base_logp.double(), feats.asst_logp.double(), d, torch.ones_like(d)).item()


def reference_nll(feats: Features) -> dict:
    """Token-mean NLL of the fixed choices a head is compared with: always the base, always the
    assistant, and the better of the two at every token (the oracle a head cannot beat)."""
    b, a = feats.base_logp.double(), feats.asst_logp.double()
    return {"always base": -b.mean().item(), "always assistant": -a.mean().item(),
            "better per token": -torch.maximum(a, b).mean().item()}


def _l2(module: nn.Module) -> torch.Tensor:
    return sum((p.float() ** 2).sum() for p in module.parameters())


class _BestEpoch:
    """Early stopping: remembers the best validation value and a snapshot of the weights that gave
    it; ``update`` says whether ``patience`` epochs have passed without improvement."""

    def __init__(self, patience: int | None):
        self.patience, self.best, self.best_epoch, self.state, self.bad = patience, math.inf, 0, None, 0

    def update(self, value: float, epoch: int, snapshot) -> bool:
        if value < self.best:
            self.best, self.best_epoch, self.state, self.bad = value, epoch, snapshot(), 0
        else:
            self.bad += 1
        return self.patience is not None and self.bad >= self.patience


def _fit_head(head: DeferralHead, n: int, loss_fn, val_fn, *, epochs: int, lr: float, weight_decay: float,
              batch_size: int, seed: int, patience: int | None) -> dict:
    """Adam on the head over shuffled cached token features, ``loss_fn(head, idx, dev)`` plus the
    L2 penalty ``weight_decay/2·‖θ‖²`` on all head parameters. With ``val_fn`` (the validation
    criterion of a head, no penalty) it is evaluated before training and after every epoch; the
    best epoch's weights are restored at the end (epoch 0: the starting weights) and training
    stops after ``patience`` epochs without improvement. Returns the curves."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    dev = head.proj.weight.device
    snapshot = lambda: {k: v.detach().clone() for k, v in head.state_dict().items()}  # noqa: E731
    track = _BestEpoch(patience)
    hist = {"train": [], "validation": [], "validation_before": None, "best_epoch": None, "epochs_run": 0,
            "lr": lr, "weight_decay": weight_decay, "patience": patience}
    if val_fn is not None:
        hist["validation_before"] = val_fn(head)
        track.update(hist["validation_before"], 0, snapshot)
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n, generator=g)
        total = 0.0
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            loss = loss_fn(head, idx, dev)
            total += loss.item() * len(idx)
            if weight_decay:
                loss = loss + 0.5 * weight_decay * _l2(head)
            opt.zero_grad()
            loss.backward()
            opt.step()
        hist["train"].append(total / n)
        hist["epochs_run"] = epoch
        if val_fn is not None:
            hist["validation"].append(val_fn(head))
            if track.update(hist["validation"][-1], epoch, snapshot):
                break
    if val_fn is not None:
        head.load_state_dict(track.state)
        hist["best_epoch"], hist["validation_best"] = track.best_epoch, track.best
    else:
        hist["best_epoch"] = hist["epochs_run"]
    return hist


def fit_head_weak(head: DeferralHead, feats: Features, *, val: Features | None = None, epochs: int = 40,
                  lr: float = 1e-3, weight_decay: float = 1e-2, patience: int | None = 3, batch_size: int = 1024,
                  seed: int = 0) -> dict:
    """Initialise the head on the weak labels: class-weighted binary cross-entropy (positives
    weighted by the training set's negative/positive ratio), base frozen. With ``val``, early
    stopping on the validation set's weighted BCE (same weights). Returns the curves (see
    ``_fit_head``)."""
    pos = feats.labels.sum().item()
    pos_weight = torch.tensor((len(feats.labels) - pos) / max(pos, 1.0))

    def bce(h, idx, dev):
        return F.binary_cross_entropy_with_logits(h(feats.hidden[idx].to(dev)), feats.labels[idx].to(dev),
                                                  pos_weight=pos_weight.to(dev))

    def val_bce(h):
        with torch.no_grad():
            d = torch.as_tensor(head_logits(h, val))
            return F.binary_cross_entropy_with_logits(d, val.labels.double(), pos_weight=pos_weight.double()).item()

    return _fit_head(head, len(feats.labels), bce, None if val is None else val_bce, epochs=epochs, lr=lr,
                     weight_decay=weight_decay, batch_size=batch_size, seed=seed, patience=patience)


def fit_head_marginal(head: DeferralHead, feats: Features, *, val: Features | None = None, epochs: int = 40,
                      lr: float = 1e-3, weight_decay: float = 1e-2, patience: int | None = 3,
                      batch_size: int = 1024, seed: int = 0) -> dict:
    """Marginal-likelihood training of the head alone on a frozen base (cached features), with
    early stopping on the validation marginal NLL when ``val`` is given.

    Where the assistant is better at almost every token the objective has no finite optimum (σ → 1
    everywhere) and the logits grow as long as training runs; the L2 penalty gives the penalised
    objective a finite optimum (a coupled penalty: Adam's normalised steps would otherwise keep
    pushing a consistently signed gradient, and decoupled AdamW decay only stops each weight at
    ±1/λ), and early stopping keeps the epoch that predicts held-out tokens best."""
    def nll(h, idx, dev):
        return marginal_nll(feats.base_logp[idx].to(dev), feats.asst_logp[idx].to(dev),
                            h(feats.hidden[idx].to(dev)), torch.ones(len(idx), device=dev))

    return _fit_head(head, len(feats.labels), nll, None if val is None else (lambda h: features_nll(h, val)),
                     epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size, seed=seed,
                     patience=patience)


@torch.no_grad()
def examples_nll(model, head: DeferralHead, tok, examples, store, batch_size: int = 8, asst_tok=None) -> float:
    """Token-mean marginal NLL of ``examples`` through ``model`` (e.g. the LoRA-tuned base) and the head."""
    cross = cross_tokenizer(tok, asst_tok)
    total, count = 0.0, 0.0
    for chunk, batch in _batches(examples, batch_size, tok.pad_token_id):
        asst_logp = _aligned(chunk, batch, store, "logp", cross).to(model.device)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        n = batch["mask"].sum().item()
        total += n * marginal_nll(_gather_targets(out.logits[:, :-1], batch["targets"]), asst_logp,
                                  head(out.hidden_states[-1][:, :-1]), batch["mask"]).item()
        count += n
    return total / max(count, 1.0)


def train_joint(base, head: DeferralHead, tok, examples, store, *, val_examples=None, val_store=None,
                epochs: int = 2, lr: float = 1e-3, weight_decay: float = 1e-2, patience: int | None = 3,
                batch_size: int = 4, lora: dict | None = None, seed: int = 0, asst_tok=None):
    """Marginal-likelihood training of the head together with LoRA on the base (AdamW on the LoRA
    weights; the head gets the same L2 penalty as ``fit_head_marginal``). With ``val_examples``
    and ``val_store`` the validation marginal NLL is evaluated before training and after every
    epoch, the best epoch's LoRA and head weights are restored, and training stops after
    ``patience`` epochs without improvement. Returns ``(peft_model, curves)``: ``train_step`` (loss
    per step), ``train`` (mean per epoch), ``validation``, ``validation_before``, ``best_epoch``.
    ``asst_tok``: the assistant's tokenizer, when it may differ from ``tok``."""
    from peft import LoraConfig, get_peft_model

    cross = cross_tokenizer(tok, asst_tok)

    torch.manual_seed(seed)
    lora = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            **(lora or {})}
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **lora))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for _, p in trainable]},
                             {"params": list(head.parameters()), "weight_decay": 0.0}], lr=lr)

    def snapshot():
        return ({n: p.detach().clone() for n, p in trainable},
                {k: v.detach().clone() for k, v in head.state_dict().items()})

    validate = val_examples is not None and val_store is not None
    track = _BestEpoch(patience)
    hist = {"train_step": [], "train": [], "validation": [], "validation_before": None, "best_epoch": None,
            "epochs_run": 0, "lr": lr, "weight_decay": weight_decay, "patience": patience}
    if validate:
        model.eval()
        hist["validation_before"] = examples_nll(model, head, tok, val_examples, val_store, batch_size, asst_tok)
        track.update(hist["validation_before"], 0, snapshot)
    order = list(range(len(examples)))
    rng = np.random.default_rng(seed)
    for epoch in range(1, epochs + 1):
        model.train()
        rng.shuffle(order)
        shuffled = [examples[i] for i in order]
        steps = []
        for chunk, batch in _batches(shuffled, batch_size, tok.pad_token_id):
            asst_logp = _aligned(chunk, batch, store, "logp", cross).to(model.device)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
            loss = marginal_nll(_gather_targets(out.logits[:, :-1], batch["targets"]), asst_logp,
                                head(out.hidden_states[-1][:, :-1]), batch["mask"])
            steps.append(loss.item())
            if weight_decay:
                loss = loss + 0.5 * weight_decay * _l2(head)
            opt.zero_grad()
            loss.backward()
            opt.step()
        hist["train_step"] += steps
        hist["train"].append(float(np.mean(steps)))
        hist["epochs_run"] = epoch
        if validate:
            model.eval()
            hist["validation"].append(examples_nll(model, head, tok, val_examples, val_store, batch_size, asst_tok))
            if track.update(hist["validation"][-1], epoch, snapshot):
                break
    if validate:
        lora_state, head_state = track.state
        with torch.no_grad():
            for n, p in trainable:
                p.copy_(lora_state[n])
        head.load_state_dict(head_state)
        hist["best_epoch"], hist["validation_best"] = track.best_epoch, track.best
    else:
        hist["best_epoch"] = hist["epochs_run"]
    model.eval()
    return model, hist
