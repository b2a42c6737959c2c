"""Co-LLM: a base model learns, per token, when to let a larger assistant write the next token.

After "Learning to Decode Collaboratively with Multiple Language Models" (Shen et al., 2024).

- A deferral head (a linear map of the base model's last hidden state to one logit) gives
  σ_t = P(Z_t = 1 | x_<t): "token t is written by the assistant".
- Training maximises the marginal likelihood of the solution tokens,
  Σ_t log[(1 − σ_t)·p_base(x_t | x_<t) + σ_t·p_asst(x_t | x_<t)], with the assistant's
  log-probabilities computed once beforehand and stored by example id (only the base model
  is in memory while training). The head alone, or the head with LoRA on the base.
- Initialisation by weak supervision: Z_t = 1 exactly where the target token is the assistant's
  top-1 and not the untuned base model's top-1; the head is first fitted to these labels with
  class-weighted binary cross-entropy (base frozen), then the marginal likelihood takes over.
  Both phases: Adam with a small learning rate and an L2 penalty on the head, evaluated on the
  validation split after every epoch; the best epoch's weights are kept (early stopping). Where
  the assistant is better at nearly every token the marginal likelihood has no finite optimum
  and an unregularised head's logits run away (σ = 1.0 everywhere).
- Decoding: at each step the base computes the deferral logit ℓ_t; if ℓ_t > η_logit the
  assistant writes the token (σ_t > σ(η_logit); thresholds live on the logit scale end to end,
  +inf = never, −inf = always, since σ rounds to 1.0 for a confident head).
  Both models keep KV caches; the assistant is only run when some row defers, and then reads
  every token it has not seen yet in one forward pass. Each token records who wrote it.

Across tokenizers (an assistant from another family) the two sequences of token ids no longer
correspond, so the response is kept as text and the tokenizations are lined up by character
offsets (``helpers.fusion.align``):
- Training: the assistant's stored log-probs of the reference solution (its own tokens) are put
  on the base's tokens piece by piece (``assistant_on_base``): a 1:1 piece carries the assistant's
  log-prob of that token; an n-token piece the chain-rule log-prob of the whole piece, split evenly
  over its base tokens (their product is the piece's probability); the assistant "has the top-1"
  on a piece when its top-1 is each of its tokens there.
- Decoding (``co_generate`` with ``asst_tok``): when the base defers, the assistant continues the
  same text (its tokens for it: its own as written, the base's text as its tokenizer splits it)
  and writes tokens until its text ends a piece of the alignment of both tokenizations (looking
  at the token it would write next, so no word is split), at most ``asst_chunk`` tokens; then the
  base takes its tokens for the new text and decides again. ``max_new_tokens`` counts tokens
  written, each in its writer's tokenizer, so never deferring is the base's greedy output and
  always deferring the assistant's.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from .backends.capture import eos_ids

# transformers 5.x renamed the KV-cache argument and output field (past_key_values -> cache)
_CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
ASST_CHUNK = 8  # across tokenizers: at most this many assistant tokens per deferral (fewer where a piece ends)


def _run(model, past=None, **kw):
    """Forward pass with a KV cache under whichever name this transformers uses; returns (out, cache)."""
    out = model(**kw, **{_CACHE: past})
    return out, getattr(out, _CACHE, None)


class DeferralHead(nn.Module):
    """One logit per position from the base model's last hidden state."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.constant_(self.proj.bias, -2.0)  # start by deferring rarely (σ ≈ 0.12)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.to(self.proj.weight.dtype)).squeeze(-1)


def save_head(head: DeferralHead, path: str | Path, meta: dict | None = None) -> Path:
    from safetensors.torch import save_file

    from .artifacts import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(tmp),
                  metadata={"hidden_size": str(head.proj.in_features), **{k: str(v) for k, v in (meta or {}).items()}})
    return path


def load_head(path: str | Path, device="cpu") -> DeferralHead:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        hidden = int(f.metadata()["hidden_size"])
    head = DeferralHead(hidden)
    head.load_state_dict(load_file(str(path)))
    return head.to(device).eval()


def cross_tokenizer(tok, asst_tok):
    """``(tok, asst_tok)`` when the assistant's token ids mean something else than the base's (the
    cross-tokenizer paths), None when there is one tokenizer (``asst_tok`` None or equal)."""
    from .models import tokenizer_fingerprint

    if asst_tok is None or asst_tok is tok:
        return None
    # vocabularies of different sizes differ, so the hash (a sort of the whole vocabulary) is rarely needed
    if len(asst_tok) == len(tok) and tokenizer_fingerprint(asst_tok) == tokenizer_fingerprint(tok):
        return None
    return tok, asst_tok


def base_forward(model, head, input_ids, attention_mask, position_ids=None, past_key_values=None, use_cache=False):
    """Logits and deferral logits at every input position (one forward pass of the base)."""
    out, cache = _run(model, past_key_values, input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids, use_cache=use_cache, output_hidden_states=True)
    return out.logits, head(out.hidden_states[-1]), cache


# --------------------------------------------------------------------------- training
def marginal_nll(base_logp_target: torch.Tensor, asst_logp_target: torch.Tensor, defer_logit: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
    """−log[(1 − σ)·p_base + σ·p_asst] per target token, mean over counted tokens."""
    mixed = torch.logaddexp(F.logsigmoid(-defer_logit) + base_logp_target, F.logsigmoid(defer_logit) + asst_logp_target)
    mask = mask.to(mixed.dtype)
    return -(mixed * mask).sum() / mask.sum().clamp_min(1.0)


def weak_labels(base_top1: torch.Tensor, asst_top1: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Z = 1 where the target is the assistant's top-1 and not the (untuned) base model's."""
    return ((asst_top1 == targets) & (base_top1 != targets)).float()


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def _gather_targets(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@dataclass
class Features:
    """What the frozen base gives at every solution token of the training data."""
    hidden: torch.Tensor        # [N, H] last hidden state (the head's input)
    base_logp: torch.Tensor     # [N] log p_base(target)
    asst_logp: torch.Tensor     # [N] log p_asst(target), from the store
    labels: torch.Tensor        # [N] weak-supervision Z


def _batches(examples, batch_size, pad_id):
    from .kd.distill import collate

    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        yield chunk, collate(chunk, pad_id)


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
    from .fusion.align import align_offsets, token_offsets

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


@torch.no_grad()
def deferral_logits(base, head, tok, examples, batch_size: int = 8) -> np.ndarray:
    """The deferral logit (σ = sigmoid of it) at every solution token of ``examples`` (teacher
    forcing): the distribution thresholds are cut from. Logits, not σ, because σ saturates at
    1.0 in floating point where a head defers confidently, and equal values cannot be ranked."""
    out = []
    for _, batch in _batches(examples, batch_size, tok.pad_token_id):
        batch = {k: v.to(base.device) for k, v in batch.items()}
        _, d, _ = base_forward(base, head, batch["input_ids"], batch["attention_mask"])
        out.append(d[:, :-1][batch["mask"].bool()].double().cpu())
    return torch.cat(out).numpy()


def thresholds_for(logits: np.ndarray, frequencies) -> list[float]:
    """A deferral-logit threshold per target deferral frequency f ("defer when logit > threshold"),
    cut from the observed logits in float64: +inf for f ≤ 0 (never defer), −inf for f ≥ 1 (always),
    and otherwise the midpoint between the k-th and (k+1)-th largest logit, k = round(f·N) clamped
    to 1…N−1, so exactly k of the N observed logits lie above it (unless logits tie there) and
    thresholds stay finite and distinct however confident the head is (σ = 1.0 in floating point
    above a logit of about 36.7, and equal values cannot be ranked)."""
    s = np.sort(np.asarray(logits, dtype=np.float64).ravel())
    if len(s) == 0:
        raise ValueError("thresholds_for needs at least one observed deferral logit")
    if not np.isfinite(s).all():
        raise ValueError("thresholds_for: the observed deferral logits contain inf or NaN")
    n, out = len(s), []
    for f in frequencies:
        f = float(f)
        if f <= 0:
            out.append(math.inf)
        elif f >= 1:
            out.append(-math.inf)
        elif n == 1:
            out.append(float(s[0]) - 1.0 if f >= 0.5 else float(s[0]))
        else:
            k = min(n - 1, max(1, int(round(f * n))))
            out.append(float(0.5 * (s[n - k - 1] + s[n - k])))
    return out


def logit_threshold(eta: float) -> float:
    """The deferral-logit cut equivalent to σ > η (±inf outside (0, 1))."""
    if eta >= 1.0:
        return math.inf
    if eta <= 0.0:
        return -math.inf
    return math.log(eta) - math.log1p(-eta)


def sigma(logit: float) -> float:
    """σ of a deferral logit in float64 (for display: it rounds to 1.0 above a logit of ~36.7)."""
    logit = float(logit)
    if logit >= 0:
        return 1.0 / (1.0 + math.exp(-logit))
    return math.exp(logit) / (1.0 + math.exp(logit))


def _defer(dlogit: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
    """logit > cut, with cut = +inf never and cut = −inf always deferring, whatever the logit."""
    return torch.where(torch.isinf(cut), cut < 0, dlogit > cut)


# --------------------------------------------------------------------------- calibration
def responsibilities(logits: np.ndarray, feats: Features) -> np.ndarray:
    """Posterior P(Z_t = 1 | x_t, x_<t) = σ·p_asst / ((1 − σ)·p_base + σ·p_asst) of the assistant
    having written each reference token, under the head's own σ (float64)."""
    d = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    b, a = feats.base_logp.double(), feats.asst_logp.double()
    log_num = F.logsigmoid(d) + a
    return torch.exp(log_num - torch.logaddexp(F.logsigmoid(-d) + b, log_num)).numpy()


def calibration_table(logits: np.ndarray, feats: Features, bins: int = 10):
    """Reliability bins of σ (equal width on [0, 1]) on held-out tokens: tokens, mean σ, the mean
    posterior responsibility r of the assistant, and the weak-label rate for reference. Empty bins
    are left out.

    r is the calibration target that fits the marginal-likelihood objective: σ is the prior of the
    latent "the assistant writes this token", the objective's stationary points satisfy
    Σ_t (r_t − σ_t)·∂logit_t = 0, and where the tokens follow the model E[r | σ] = σ exactly. The
    weak label (the assistant's top-1, not the base's) is a different event and need not match
    σ. Since r uses the head's own σ it is pulled towards σ: a gap is understated, never invented."""
    import pandas as pd

    d = np.asarray(logits, dtype=np.float64)
    s = torch.sigmoid(torch.as_tensor(d)).numpy()
    r = responsibilities(d, feats)
    z = feats.labels.double().numpy()
    j = np.minimum((s * bins).astype(int), bins - 1)
    rows = []
    for b in range(bins):
        m = j == b
        if m.any():
            rows.append({"bin low": b / bins, "bin high": (b + 1) / bins, "tokens": int(m.sum()),
                         "mean sigma": float(s[m].mean()), "responsibility": float(r[m].mean()),
                         "weak label rate": float(z[m].mean())})
    return pd.DataFrame(rows)


def expected_calibration_error(table) -> float:
    """Σ_bins (tokens / N)·|mean σ − mean responsibility| of a ``calibration_table``."""
    w = table["tokens"] / table["tokens"].sum()
    return float((w * (table["mean sigma"] - table["responsibility"]).abs()).sum())


QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)


def logit_summary(logits: np.ndarray, quantiles=QUANTILES) -> dict:
    """Quantiles of deferral logits, and the share whose σ rounds to 1.0 in float32 (logit > ~16.6)."""
    d = np.asarray(logits, dtype=np.float64)
    out = {f"q{round(100 * q):02d}": float(np.quantile(d, q)) for q in quantiles}
    out["share sigma=1 (fp32)"] = float((torch.sigmoid(torch.as_tensor(d, dtype=torch.float32)) == 1.0).float().mean())
    return out


# --------------------------------------------------------------------------- decoding
@dataclass
class DecodeStats:
    base_calls: int = 0
    asst_calls: int = 0
    asst_tokens_read: int = 0
    seconds: float = 0.0


@torch.no_grad()
def co_generate(base, head, tok, asst, base_prompts: list[str], asst_prompts: list[str], *, eta_logit=None,
                random_prob=None, eta=None, seed: int = 0, max_new_tokens: int = 128, base_cache: bool = True,
                asst_cache: bool = True, stats: DecodeStats | None = None, asst_tok=None,
                asst_chunk: int = ASST_CHUNK) -> list[dict]:
    """Greedy Co-LLM decoding of a batch. Row b defers token t to the assistant when its deferral
    logit is above ``eta_logit[b]`` (learned; +inf: never, −inf: always, exactly), or, with
    ``random_prob``, with probability random_prob[b]. ``eta`` is the same on the σ scale
    (σ > η), for callers that think in probabilities; it cannot express cuts above σ ≈ 1 − 1e-16.

    Thresholds are one value or one per row. The base reads ``base_prompts``, the assistant
    ``asst_prompts`` (its own strategy prompt, or the same), both followed by the tokens written
    so far. With caches, the assistant runs only at steps where some unfinished row defers, and
    then reads all tokens it has not seen in one forward pass. Returns per row: ``token_ids``,
    ``who`` (1 = assistant), ``logit`` (the deferral logit at each step), ``sigma``, ``response``,
    ``finished``.

    ``asst_tok``: the assistant's tokenizer when it differs from the base's (``asst_prompts`` then
    rendered with it); decoding then goes by text, row by row (see ``_co_generate_text``).
    """
    given = [k for k, v in (("eta_logit", eta_logit), ("eta", eta), ("random_prob", random_prob)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"co_generate needs exactly one of eta_logit, eta, random_prob; got {given or 'none'}")
    if eta is not None:
        eta_logit = [logit_threshold(float(e)) for e in np.atleast_1d(np.asarray(eta, dtype=np.float64))]
    t0 = time.perf_counter()
    stats = stats if stats is not None else DecodeStats()
    dev = base.device
    B = len(base_prompts)
    if cross_tokenizer(tok, asst_tok) is not None:
        cuts = None if eta_logit is None else np.broadcast_to(np.asarray(eta_logit, dtype=np.float64), (B,))
        probs = None if random_prob is None else np.broadcast_to(np.asarray(random_prob, dtype=np.float64), (B,))
        rows = [_co_generate_text(base, head, tok, asst, asst_tok, bp, ap, cut=None if cuts is None else float(cuts[b]),
                                  random_prob=None if probs is None else float(probs[b]), seed=(seed, b),
                                  max_new_tokens=max_new_tokens, base_cache=base_cache, asst_cache=asst_cache,
                                  asst_chunk=asst_chunk, stats=stats)
                for b, (bp, ap) in enumerate(zip(base_prompts, asst_prompts))]
        stats.seconds += time.perf_counter() - t0
        return rows
    from .models import add_special_tokens

    add = add_special_tokens(tok)
    enc_b = tok(base_prompts, return_tensors="pt", padding=True, add_special_tokens=add).to(dev)
    enc_a = tok(asst_prompts, return_tensors="pt", padding=True, add_special_tokens=add).to(asst.device)
    cut = None if eta_logit is None else torch.as_tensor(
        np.broadcast_to(np.asarray(eta_logit, dtype=np.float64), (B,)).copy(), dtype=torch.float64, device=dev)
    rprob = None if random_prob is None else torch.as_tensor(random_prob, dtype=torch.float32).expand(B)
    rng = torch.Generator().manual_seed(seed)
    eos = set([tok.eos_token_id] + ([] if base.generation_config.eos_token_id is None else
                                    np.atleast_1d(base.generation_config.eos_token_id).tolist()))
    eos_t = torch.tensor(sorted(eos), device=dev)
    pad = tok.pad_token_id

    gen = torch.empty((B, 0), dtype=torch.long, device=dev)
    who, lg = [], []
    finished = torch.zeros(B, dtype=torch.bool, device=dev)

    def base_step(past):
        ids = torch.cat([enc_b["input_ids"], gen], 1)
        mask = torch.cat([enc_b["attention_mask"], torch.ones_like(gen)], 1)
        pos = _positions(mask)
        if past is not None:
            ids, pos = ids[:, -1:], pos[:, -1:]
        logits, d, past = base_forward(base, head, ids, mask, pos, past, use_cache=base_cache)
        stats.base_calls += 1
        return logits[:, -1], d[:, -1].double(), (past if base_cache else None)

    a_past, a_seen = None, 0

    def asst_step():
        nonlocal a_past, a_seen
        g = gen.to(asst.device)
        ids = torch.cat([enc_a["input_ids"], g], 1)
        mask = torch.cat([enc_a["attention_mask"], torch.ones_like(g)], 1)
        pos = _positions(mask)
        if a_past is not None:
            ids, pos = ids[:, enc_a["input_ids"].shape[1] + a_seen:], pos[:, enc_a["input_ids"].shape[1] + a_seen:]
        out, cache = _run(asst, a_past, input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=asst_cache)
        stats.asst_calls += 1
        stats.asst_tokens_read += ids.shape[1]
        if asst_cache:
            a_past, a_seen = cache, g.shape[1]
        return out.logits[:, -1].to(dev)

    b_logits, dlogit, b_past = base_step(None)
    for _ in range(max_new_tokens):
        if cut is not None:
            defer = _defer(dlogit, cut)
        else:
            defer = (torch.rand(B, generator=rng) < rprob).to(dev)
        defer &= ~finished
        token = b_logits.argmax(-1)
        if defer.any():
            token = torch.where(defer, asst_step().argmax(-1), token)
        token = torch.where(finished, torch.full_like(token, pad), token)
        who.append(defer)
        lg.append(dlogit)
        gen = torch.cat([gen, token[:, None]], 1)
        finished |= torch.isin(token, eos_t)
        if finished.all():
            break
        b_logits, dlogit, b_past = base_step(b_past if base_cache else None)

    who_t, lg_t, gen = torch.stack(who, 1).cpu(), torch.stack(lg, 1).cpu(), gen.cpu()
    rows = []
    for b in range(B):
        seq = gen[b].tolist()
        n = next((j + 1 for j, t in enumerate(seq) if t in eos), len(seq))
        rows.append({"token_ids": seq[:n], "who": who_t[b, :n].int().tolist(), "logit": lg_t[b, :n].tolist(),
                     "sigma": torch.sigmoid(lg_t[b, :n]).tolist(),
                     "finished": seq[n - 1] in eos if n else False,
                     "response": tok.decode(seq[:n], skip_special_tokens=True).strip()})
    stats.seconds += time.perf_counter() - t0
    return rows


# --------------------------------------------------------------------------- decoding across tokenizers
def _decode(tok, ids) -> str:
    # no clean-up of spaces around punctuation: the text of a token list must only grow as tokens are added
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class _Text:
    """The response of one row as text, and per character who wrote it and at which decision."""

    def __init__(self):
        self.text, self.who, self.step = "", [], []

    def add(self, s: str, who: int, step: int) -> None:
        self.text += s
        self.who += [who] * len(s)
        self.step += [step] * len(s)

    def at(self, i: int) -> tuple[int, int]:
        i = min(max(i, 0), len(self.text) - 1)
        return self.who[i], self.step[i]

    def segments(self) -> list[list]:
        """Runs of characters by writer: [[who, text], ...]."""
        out = []
        for c, w in zip(self.text, self.who):
            if out and out[-1][0] == w:
                out[-1][1] += c
            else:
                out.append([w, c])
        return out


class _Reader:
    """One model's side of a row decoded across tokenizers: its prompt ids, then token ids for the
    response text so far, each with its character span in the text and (who, decision) of its first
    character: the tokens it wrote itself, kept as written, and the other model's text as its own
    tokenizer splits it. A KV cache holds what it has read and is cut back where tokens change."""

    def __init__(self, model, tok, prompt: str, *, head=None, cache: bool = True, stats: DecodeStats):
        from .models import add_special_tokens

        self.model, self.tok, self.head, self.cache, self.stats = model, tok, head, cache, stats
        self.prompt = tok(prompt, add_special_tokens=add_special_tokens(tok)).input_ids
        self.ids, self.spans, self.meta = [], [], []
        self.covered = 0     # characters of the text these tokens stand for
        self.pending = 0     # own tokens whose text is not out yet (a character still missing bytes)
        self.decoded = ""    # the decoded text of ``ids`` at the last whole character
        self.past, self.read, self.out = None, 0, None

    def step(self):
        """(next-token logits, deferral logit or None) after the prompt and the tokens so far,
        reading only what the cache has not."""
        if self.out is None:
            full = self.prompt + self.ids
            start = self.read if self.past is not None else 0
            dev = self.model.device
            ids = torch.tensor([full[start:]], device=dev)
            mask = torch.ones((1, len(full)), dtype=torch.long, device=dev)
            pos = torch.arange(start, len(full), device=dev)[None]
            if self.head is not None:
                logits, d, past = base_forward(self.model, self.head, ids, mask, pos, self.past, use_cache=self.cache)
                d = float(d[0, -1].double())
                self.stats.base_calls += 1
            else:
                out, past = _run(self.model, self.past, input_ids=ids, attention_mask=mask, position_ids=pos,
                                 use_cache=self.cache)
                logits, d = out.logits, None
                self.stats.asst_calls += 1
                self.stats.asst_tokens_read += ids.shape[1]
            if self.cache:
                self.past, self.read = past, len(full)
            self.out = (logits[0, -1], d)
        return self.out

    def write(self, token: int, row: _Text, who: int, step: int) -> None:
        """Append a token this model chose; its text joins the row once it ends on a whole character."""
        self.ids.append(token)
        self.meta.append((who, step))
        self.pending += 1
        self.out = None
        self.settle(row, who, step)

    def settle(self, row: _Text, who: int, step: int, final: bool = False) -> None:
        """Add the text of pending tokens to the row, unless it ends inside a character (``final``: anyway)."""
        if self.pending == 0:
            return
        text = _decode(self.tok, self.ids)
        if text.endswith("\ufffd") and not final:  # bytes of a character still to come
            return
        if not text.startswith(self.decoded):
            raise ValueError(f"decoding with {type(self.tok).__name__} {self.tok.name_or_path!r} rewrote earlier text "
                             f"({self.decoded[-20:]!r} became {text[-20:]!r}): Co-LLM across tokenizers needs "
                             "a decoder whose text only grows as tokens are added")
        start = len(row.text)
        row.add(text[len(self.decoded):], who, step)
        self.spans += [(start, len(row.text))] * self.pending
        self.pending, self.decoded, self.covered = 0, text, len(row.text)

    def ends_piece(self, row: _Text, token: int, other_tok) -> bool:
        """Whether the text so far ends a piece of the alignment of both tokenizations of it followed
        by the text of ``token`` (what this model writes next): a point to hand back at that splits
        no token of either tokenizer."""
        from .fusion.align import align_texts

        nxt = _decode(self.tok, self.ids + [token])
        text = row.text + nxt[len(self.decoded):]
        if len(text) == len(row.text):  # nothing more (end-of-sequence, a special token)
            return True
        return any(p.end == len(row.text) for p in align_texts(other_tok, self.tok, text)[2])

    def sync(self, row: _Text) -> None:
        """Catch up with text the other model wrote: keep this model's tokens up to the last piece
        boundary between them and a re-tokenization of the whole text (a boundary both agree on),
        then the re-tokenization; the KV cache is cut back to the tokens kept."""
        from .fusion.align import align_offsets, token_offsets

        n = len(row.text)
        if self.covered == n:
            return
        ids, spans = token_offsets(self.tok, row.text)
        k = j = 0
        for p in align_offsets(self.spans + [(self.covered, n)], spans, n):  # the new text as one stand-in token
            if p.a_end > len(self.ids):
                break
            k, j = p.a_end, p.b_end
        self.ids = self.ids[:k] + ids[j:]
        self.spans = self.spans[:k] + spans[j:]
        self.meta = self.meta[:k] + [row.at(a) for a, _ in spans[j:]]
        self.decoded, self.covered, self.out = _decode(self.tok, self.ids), n, None
        keep = len(self.prompt) + k
        if self.past is not None and self.read > keep:
            if getattr(self.past, "is_croppable", True):
                self.past.crop(keep - self.read)  # a negative count: remove that many positions
                self.read = keep
            else:
                self.past, self.read = None, 0


def _co_generate_text(base, head, tok, asst, asst_tok, base_prompt: str, asst_prompt: str, *, cut, random_prob,
                      seed, max_new_tokens: int, base_cache: bool, asst_cache: bool, asst_chunk: int,
                      stats: DecodeStats) -> dict:
    """One row of Co-LLM decoding across tokenizers, the response kept as text.

    At each decision the base reads its tokens of the text and gives logits and a deferral logit.
    Not deferring, it writes its greedy token. Deferring, the assistant takes its tokens of the
    text (``_Reader.sync``) and writes greedy tokens until the text ends a piece of the alignment of
    both tokenizations, judged with the token it would write next (``_Reader.ends_piece``), or it
    has written ``asst_chunk`` tokens; then the base syncs and decides again. A model's text
    joins the response only at whole characters (a byte-level token can end inside one), so the
    base hands over only there and the assistant goes on past ``asst_chunk`` until it gets there.

    ``max_new_tokens`` counts tokens written, each in its writer's tokenizer: never deferring
    (cut +inf) is the base's greedy ``generate`` token for token, always deferring (−inf) the
    assistant's greedy text; either model's end-of-sequence ends the row (the base's is put on
    its tokens when the assistant ends it). Provenance is per base token: ``who`` and ``logit`` of
    the decision that wrote its first character (a base token can straddle a point where the base
    handed over, when its tokenizer joins the characters there); ``segments`` has it exactly, per
    run of characters."""
    row, logits = _Text(), []
    b_side = _Reader(base, tok, base_prompt, head=head, cache=base_cache, stats=stats)
    a_side = _Reader(asst, asst_tok, asst_prompt, cache=asst_cache, stats=stats)
    eos_b, eos_a = set(eos_ids(base, tok)), set(eos_ids(asst, asst_tok))
    rng = np.random.default_rng(list(seed))
    budget, finished = max_new_tokens, False
    while budget > 0 and not finished:
        b_logits, d = b_side.step()
        step = len(logits)
        logits.append(d)
        if cut is not None:
            defer = cut < 0 if math.isinf(cut) else d > cut
        else:
            defer = bool(rng.random() < random_prob)
        if not defer or b_side.pending:  # the base cannot hand over inside a character
            t = int(b_logits.argmax())
            b_side.write(t, row, 0, step)
            budget -= 1
            finished = t in eos_b
            continue
        a_side.sync(row)
        written = 0
        while budget > 0:
            t = int(a_side.step()[0].argmax())
            if written and not a_side.pending and (written >= asst_chunk or a_side.ends_piece(row, t, tok)):
                break
            a_side.write(t, row, 1, step)
            written += 1
            budget -= 1
            if t in eos_a:
                finished = True
                break
        b_side.sync(row)
        if finished:
            b_side.ids.append(tok.eos_token_id)
            b_side.spans.append((len(row.text), len(row.text)))
            b_side.meta.append((1, step))
    for side, who in ((a_side, 1), (b_side, 0)):  # the cap can stop either inside a character
        side.settle(row, who, len(logits) - 1, final=True)
    b_side.sync(row)
    lg = torch.tensor([logits[s] for _, s in b_side.meta], dtype=torch.float64)
    return {"token_ids": list(b_side.ids), "who": [w for w, _ in b_side.meta], "logit": lg.tolist(),
            "sigma": torch.sigmoid(lg).tolist(), "finished": finished, "response": row.text.strip(),
            "segments": row.segments()}


def deferral_frequency(rows: list[dict]) -> float:
    """Share of generated tokens written by the assistant."""
    n = sum(len(r["who"]) for r in rows)
    return sum(sum(r["who"]) for r in rows) / max(n, 1)


# --------------------------------------------------------------------------- analysis
TOKEN_KINDS = ("digit", "operator", "word", "punctuation", "space/other")


def token_kind(text: str) -> str:
    s = text.strip()
    if not s:
        return "space/other"
    if any(c.isdigit() for c in s):
        return "digit"
    if all(c in "+-*/=×÷^%<>()" for c in s):
        return "operator"
    if any(c.isalpha() for c in s):
        return "word"
    if all(not c.isalnum() for c in s):
        return "punctuation"
    return "space/other"


def deferral_by_kind(rows: list[dict], tok):
    """Deferral rate and count per kind of token."""
    import pandas as pd

    counts = {k: [0, 0] for k in TOKEN_KINDS}
    for r in rows:
        for t, w in zip(r["token_ids"], r["who"]):
            k = token_kind(tok.decode([t]))
            counts[k][0] += w
            counts[k][1] += 1
    return pd.DataFrame([{"kind": k, "tokens": n, "deferred": d, "deferral rate": d / n if n else float("nan")}
                         for k, (d, n) in counts.items()])


def deferral_by_position(rows: list[dict], bins: int = 10):
    """Deferral rate by relative position in the solution (tenths of its length)."""
    import pandas as pd

    d, n = np.zeros(bins), np.zeros(bins)
    for r in rows:
        L = len(r["who"])
        for i, w in enumerate(r["who"]):
            j = min(bins - 1, int(bins * i / max(L, 1)))
            d[j] += w
            n[j] += 1
    return pd.DataFrame({"position": [f"{i / bins:.1f}–{(i + 1) / bins:.1f}" for i in range(bins)],
                         "tokens": n.astype(int), "deferral rate": np.where(n > 0, d / np.maximum(n, 1), np.nan)})


def provenance_html(row: dict, tok, title: str = "") -> str:
    """One generated solution, each token coloured by the model that wrote it."""
    import html

    spans = []
    for t, w in zip(row["token_ids"], row["who"]):
        piece = html.escape(tok.decode([t])).replace("\n", "<br>")
        style = "background:#f6c28b" if w else "background:#cfe3f7"
        spans.append(f'<span style="{style}">{piece}</span>')
    legend = ('<span style="background:#cfe3f7">base</span> '
              '<span style="background:#f6c28b">assistant</span>')
    return (f"<div style='font-family:monospace;line-height:1.6'><b>{html.escape(title)}</b> {legend}<br>"
            + "".join(spans) + "</div>")


# --------------------------------------------------------------------------- runs over records
def prompts_for(tok, records, assistant_strategy: str = "base", templates: dict | None = None, asst_tok=None):
    """The base sees the plain question; the assistant sees its strategy prompt (``base`` = the same),
    rendered with its own tokenizer's chat template when it has one (``asst_tok``)."""
    from .data import plain_solution
    from .models import prompt_text
    from .prompts import student_messages, teacher_messages

    base = [prompt_text(tok, student_messages(r.question)) for r in records]
    asst = [prompt_text(asst_tok or tok, teacher_messages(assistant_strategy, r.question, plain_solution(r.solution),
                                                          templates)) for r in records]
    return base, asst


def decode_grid(base, head, tok, asst, records, settings: list[dict], *, assistant_strategy: str = "base",
                batch_size: int = 16, max_new_tokens: int = 128, seed: int = 0, progress: bool = True,
                stats: DecodeStats | None = None, asst_tok=None, asst_chunk: int = ASST_CHUNK) -> list[list[dict]]:
    """Decode every record under every setting (``{"eta_logit": threshold}``: defer when the
    deferral logit is above it, ±inf for never / always; or ``{"random_prob": p}``). Returns rows
    per setting, each in record order with an ``id``.

    Each batch holds one setting's rows, records in order, so a setting's generations depend only
    on the setting, the records and ``batch_size``, never on which other settings are in the grid:
    in bf16, batch shape and the assistant's chunked reads change rounding enough to flip greedy
    tokens, and two settings that must agree (a threshold of −inf and the assistant alone) would
    otherwise differ by where their rows fell. ``asst_tok``: the assistant's tokenizer when it
    differs from the base's (decoding by text, see ``co_generate``)."""
    for k, s in enumerate(settings):
        if len(s) != 1 or next(iter(s)) not in ("eta_logit", "random_prob"):
            raise ValueError(f"decode_grid setting {k} is {s!r}; give exactly one of 'eta_logit' (a deferral-logit "
                             "threshold) or 'random_prob'")
    from tqdm.auto import tqdm

    bp, ap = prompts_for(tok, records, assistant_strategy, asst_tok=asst_tok)
    out: list[list[dict]] = [[] for _ in settings]
    bar = tqdm(total=len(settings) * len(records), desc="co-decoding", unit="row", disable=not progress)
    for s, setting in enumerate(settings):
        (key, value), = setting.items()
        for c in range(0, len(records), batch_size):
            rows = co_generate(base, head, tok, asst, bp[c:c + batch_size], ap[c:c + batch_size],
                               **{key: float(value)}, seed=seed + c, max_new_tokens=max_new_tokens, stats=stats,
                               asst_tok=asst_tok, asst_chunk=asst_chunk)
            out[s] += [{"id": r.id, **row} for r, row in zip(records[c:c + batch_size], rows)]
            bar.update(len(rows))
    bar.close()
    return out


def as_responses(rows: list[dict]):
    """Co-LLM rows in the shape ``assess.score`` reads."""
    import pandas as pd

    return pd.DataFrame([{"id": r["id"], "response": r["response"], "n_tokens": len(r["token_ids"]),
                          "finished": r["finished"]} for r in rows])
