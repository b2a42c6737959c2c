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
- Decoding: at each step the base computes σ_t; if σ_t > η the assistant writes the token.
  Both models keep KV caches; the assistant is only run when some row defers, and then reads
  every token it has not seen yet in one forward pass. Each token records who wrote it.
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

# transformers 5.x renamed the KV-cache argument and output field (past_key_values -> cache)
_CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


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


def check_same_tokenizer(base_tok, asst_tok, base_name: str = "base", asst_name: str = "assistant") -> None:
    from .models import tokenizer_fingerprint

    a, b = tokenizer_fingerprint(base_tok), tokenizer_fingerprint(asst_tok)
    if a != b:
        raise ValueError(f"Co-LLM needs one tokenizer: {base_name!r} uses {a}, {asst_name!r} uses {b}. "
                         "Choose an assistant from the base model's family.")


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
    from .distill import collate

    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        yield chunk, collate(chunk, pad_id)


def _aligned(chunk, batch, store, field: str) -> torch.Tensor:
    """A per-token store field laid out like the collated batch's targets (zeros elsewhere)."""
    out = torch.zeros(batch["targets"].shape, dtype=torch.float32)
    for b, e in enumerate(chunk):
        rec = store.get(e.id)
        n = len(e.input_ids) - e.n_prompt
        if list(rec.token_ids[:n]) != e.input_ids[e.n_prompt:]:
            raise ValueError(f"assistant store {store.path}: tokens of {e.id!r} differ from the training example; "
                             "build it from the same records (mode 'score')")
        values = rec.token_logprobs if field == "logp" else rec.topk_ids[:, 0]
        out[b, e.n_prompt - 1:len(e.input_ids) - 1] = torch.as_tensor(np.asarray(values[:n], np.float32))
    return out


@torch.no_grad()
def frozen_features(base, tok, examples, store, batch_size: int = 8) -> Features:
    """One pass of the frozen, untuned base over the training solutions: hidden states, base and
    assistant log-probs of the targets, and the weak labels."""
    hs, bl, al, zs = [], [], [], []
    for chunk, batch in _batches(examples, batch_size, tok.pad_token_id):
        batch = {k: v.to(base.device) for k, v in batch.items()}
        out = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        logits, hidden = out.logits[:, :-1], out.hidden_states[-1][:, :-1]
        m = batch["mask"].bool()
        asst_logp = _aligned(chunk, batch, store, "logp").to(base.device)
        asst_top1 = _aligned(chunk, batch, store, "top1").to(base.device).long()
        z = weak_labels(logits.argmax(-1), asst_top1, batch["targets"])
        hs.append(hidden[m].float().cpu())
        bl.append(_gather_targets(logits, batch["targets"])[m].cpu())
        al.append(asst_logp[m].cpu())
        zs.append(z[m].cpu())
    return Features(torch.cat(hs), torch.cat(bl), torch.cat(al), torch.cat(zs))


def _fit_head(head: DeferralHead, feats: Features, loss_fn, *, epochs: int, lr: float, batch_size: int,
              seed: int) -> list[float]:
    """Adam on the head over shuffled cached token features; ``loss_fn(head, idx, dev)``; mean loss per epoch."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    dev = head.proj.weight.device
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(feats.labels), generator=g)
        total = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss = loss_fn(head, idx, dev)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(order))
    return losses


def fit_head_weak(head: DeferralHead, feats: Features, *, epochs: int = 50, lr: float = 1e-2,
                  batch_size: int = 1024, seed: int = 0) -> list[float]:
    """Initialise the head on the weak labels: class-weighted binary cross-entropy, base frozen."""
    pos = feats.labels.sum().item()
    pos_weight = torch.tensor((len(feats.labels) - pos) / max(pos, 1.0))

    def bce(h, idx, dev):
        return F.binary_cross_entropy_with_logits(h(feats.hidden[idx].to(dev)), feats.labels[idx].to(dev),
                                                  pos_weight=pos_weight.to(dev))

    return _fit_head(head, feats, bce, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)


def fit_head_marginal(head: DeferralHead, feats: Features, *, epochs: int = 50, lr: float = 1e-2,
                      batch_size: int = 1024, seed: int = 0) -> list[float]:
    """Marginal-likelihood training of the head alone on a frozen base (cached features)."""
    def nll(h, idx, dev):
        return marginal_nll(feats.base_logp[idx].to(dev), feats.asst_logp[idx].to(dev),
                            h(feats.hidden[idx].to(dev)), torch.ones(len(idx), device=dev))

    return _fit_head(head, feats, nll, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)


def train_joint(base, head: DeferralHead, tok, examples, store, *, epochs: int = 2, lr: float = 1e-3,
                batch_size: int = 4, lora: dict | None = None, seed: int = 0):
    """Marginal-likelihood training of the head together with LoRA on the base.
    Returns ``(peft_model, losses per step)``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lora = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            **(lora or {})}
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **lora))
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr)
    order = list(range(len(examples)))
    rng = np.random.default_rng(seed)
    losses = []
    model.train()
    for _ in range(epochs):
        rng.shuffle(order)
        shuffled = [examples[i] for i in order]
        for chunk, batch in _batches(shuffled, batch_size, tok.pad_token_id):
            asst_logp = _aligned(chunk, batch, store, "logp").to(model.device)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
            loss = marginal_nll(_gather_targets(out.logits[:, :-1], batch["targets"]), asst_logp,
                                head(out.hidden_states[-1][:, :-1]), batch["mask"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    model.eval()
    return model, losses


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
    """η per target deferral frequency f: σ at the (1 − f) quantile of the observed deferral
    logits (in float64, so thresholds near 1 stay distinct), with f = 0 above every σ (η > 1)
    and f = 1 below every σ (η < 0)."""
    out = []
    for f in frequencies:
        if f <= 0:
            out.append(1.0 + 1e-6)
        elif f >= 1:
            out.append(-1e-6)
        else:
            out.append(float(1.0 / (1.0 + np.exp(-np.quantile(logits, 1 - f)))))
    return out


def logit_threshold(eta: float) -> float:
    """The deferral-logit cut equivalent to σ > η (±inf outside (0, 1))."""
    if eta >= 1.0:
        return math.inf
    if eta <= 0.0:
        return -math.inf
    return math.log(eta) - math.log1p(-eta)


# --------------------------------------------------------------------------- decoding
@dataclass
class DecodeStats:
    base_calls: int = 0
    asst_calls: int = 0
    asst_tokens_read: int = 0
    seconds: float = 0.0


@torch.no_grad()
def co_generate(base, head, tok, asst, base_prompts: list[str], asst_prompts: list[str], *, eta=0.5,
                random_prob=None, seed: int = 0, max_new_tokens: int = 128, base_cache: bool = True,
                asst_cache: bool = True, stats: DecodeStats | None = None) -> list[dict]:
    """Greedy Co-LLM decoding of a batch. Row b defers token t to the assistant when
    σ_t > eta[b] (learned), or, with ``random_prob``, with probability random_prob[b].

    ``eta`` is one threshold or one per row; σ_t > η is decided on the logit scale.
    The base reads ``base_prompts``, the assistant ``asst_prompts`` (its own strategy prompt, or
    the same), both followed by the tokens written so far. With caches, the assistant runs only
    at steps where some unfinished row defers, and then reads all tokens it has not seen in one
    forward pass. Returns per row: ``token_ids``, ``who`` (1 = assistant), ``sigma``, ``response``,
    ``finished``.
    """
    t0 = time.perf_counter()
    stats = stats if stats is not None else DecodeStats()
    dev = base.device
    B = len(base_prompts)
    from .models import add_special_tokens

    add = add_special_tokens(tok)
    enc_b = tok(base_prompts, return_tensors="pt", padding=True, add_special_tokens=add).to(dev)
    enc_a = tok(asst_prompts, return_tensors="pt", padding=True, add_special_tokens=add).to(asst.device)
    # σ > η is decided as logit > logit(η) in float64: σ itself saturates near 1
    cut = (torch.tensor([logit_threshold(float(e)) for e in np.broadcast_to(np.asarray(eta, dtype=np.float64), (B,))],
                        dtype=torch.float64, device=dev) if random_prob is None else None)
    rprob = None if random_prob is None else torch.as_tensor(random_prob, dtype=torch.float32).expand(B)
    rng = torch.Generator().manual_seed(seed)
    eos = set([tok.eos_token_id] + ([] if base.generation_config.eos_token_id is None else
                                    np.atleast_1d(base.generation_config.eos_token_id).tolist()))
    eos_t = torch.tensor(sorted(eos), device=dev)
    pad = tok.pad_token_id

    gen = torch.empty((B, 0), dtype=torch.long, device=dev)
    who, sig = [], []
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
        if random_prob is None:
            defer = dlogit > cut
        else:
            defer = (torch.rand(B, generator=rng) < rprob).to(dev)
        defer &= ~finished
        token = b_logits.argmax(-1)
        if defer.any():
            token = torch.where(defer, asst_step().argmax(-1), token)
        token = torch.where(finished, torch.full_like(token, pad), token)
        who.append(defer)
        sig.append(torch.sigmoid(dlogit))
        gen = torch.cat([gen, token[:, None]], 1)
        finished |= torch.isin(token, eos_t)
        if finished.all():
            break
        b_logits, dlogit, b_past = base_step(b_past if base_cache else None)

    who_t, sig_t, gen = torch.stack(who, 1).cpu(), torch.stack(sig, 1).cpu(), gen.cpu()
    rows = []
    for b in range(B):
        seq = gen[b].tolist()
        n = next((j + 1 for j, t in enumerate(seq) if t in eos), len(seq))
        rows.append({"token_ids": seq[:n], "who": who_t[b, :n].int().tolist(), "sigma": sig_t[b, :n].tolist(),
                     "finished": seq[n - 1] in eos if n else False,
                     "response": tok.decode(seq[:n], skip_special_tokens=True).strip()})
    stats.seconds += time.perf_counter() - t0
    return rows


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
def prompts_for(tok, records, assistant_strategy: str = "base", templates: dict | None = None):
    """The base sees the plain question; the assistant sees its strategy prompt (``base`` = the same)."""
    from .data import plain_solution
    from .models import prompt_text
    from .prompts import student_messages, teacher_messages

    base = [prompt_text(tok, student_messages(r.question)) for r in records]
    asst = [prompt_text(tok, teacher_messages(assistant_strategy, r.question, plain_solution(r.solution), templates))
            for r in records]
    return base, asst


def decode_grid(base, head, tok, asst, records, settings: list[dict], *, assistant_strategy: str = "base",
                batch_size: int = 16, max_new_tokens: int = 128, seed: int = 0, progress: bool = True,
                stats: DecodeStats | None = None) -> list[list[dict]]:
    """Decode every record under every setting (``{"eta": η}`` or ``{"random_prob": p}``), with the
    grid as a batch dimension: rows are (record, setting) pairs. Returns rows per setting, each
    in record order with an ``id``."""
    from tqdm.auto import tqdm

    bp, ap = prompts_for(tok, records, assistant_strategy)
    jobs = [(s, i) for s in range(len(settings)) for i in range(len(records))]
    kinds = {("random_prob" in s) for s in settings}
    out: list[list[dict | None]] = [[None] * len(records) for _ in settings]
    bar = tqdm(total=len(jobs), desc="co-decoding", unit="row", disable=not progress)
    for kind in kinds:  # learned and random settings go in separate batches
        mine = [j for j in jobs if ("random_prob" in settings[j[0]]) == kind]
        for c in range(0, len(mine), batch_size):
            chunk = mine[c:c + batch_size]
            key = "random_prob" if kind else "eta"
            rows = co_generate(base, head, tok, asst, [bp[i] for _, i in chunk], [ap[i] for _, i in chunk],
                               **{key: [float(settings[s][key]) for s, _ in chunk]}, seed=seed + c,
                               max_new_tokens=max_new_tokens, stats=stats)
            for (s, i), row in zip(chunk, rows):
                out[s][i] = {"id": records[i].id, **row}
            bar.update(len(chunk))
    bar.close()
    return out  # type: ignore[return-value]


def as_responses(rows: list[dict]):
    """Co-LLM rows in the shape ``assess.score`` reads."""
    import pandas as pd

    return pd.DataFrame([{"id": r["id"], "response": r["response"], "n_tokens": len(r["token_ids"]),
                          "finished": r["finished"]} for r in rows])
