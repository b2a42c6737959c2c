"""The deferral head on the base model, the ground of the Co-LLM package (it imports none of its
other modules): ``DeferralHead`` (one logit per position from the base's last hidden state),
``save_head`` / ``load_head``, ``base_forward`` (one forward pass of the base giving next-token
logits and deferral logits, with a KV cache under whichever name this transformers uses),
``cross_tokenizer`` (whether the assistant's token ids mean something else than the base's) and
the batches of examples the base reads in training and threshold search."""
from __future__ import annotations

from pathlib import Path

import torch
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

    from ..artifacts import atomic_path

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
    from ..models import tokenizer_fingerprint

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


def _batches(examples, batch_size, pad_id):
    from ..kd.distill import collate

    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        yield chunk, collate(chunk, pad_id)
