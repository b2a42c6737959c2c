"""Drafters for speculative decoding, and the two pieces they share with the target's loop.

The drafter interface (``decode.speculative_generate`` drives it; write new drafters against it)::

    class Drafter:
        name: str
        def reset(self, input_ids, attention_mask) -> None
            # a new batch: left-padded prompt ids [B, T] and their mask
        def propose(self, gamma, sampling) -> (tokens [B, g], q [B, g, V] or None)
            # up to gamma (g <= gamma, the same g for every row) proposed tokens per row and the
            # drafter's distribution q at each proposed position, processed by
            # ``sampling.probs`` exactly as the target's p is; None means deterministic proposals
            # (q is one-hot on the proposed token). Greedy (``not sampling.do_sample``): the
            # drafter's argmax, and q may be None. A row with fewer proposals than the others
            # fills its tail with -1 ("no proposal"; never accepted, not counted as drafted).
        def commit(self, new_tokens: list[list[int]]) -> None
            # per row, the tokens appended to the sequence this iteration (accepted drafts, then
            # the target's own token; [] for a row that has finished); the drafter discards
            # anything else it had (rolls its state back)

``Sampling`` holds the decoding settings and the one function (``probs``) that turns logits into
the processed distribution, used identically for the target's p and a drafter's q.
``RowCache`` is a model's KV cache over a batch whose rows keep different numbers of tokens:
nothing is cropped per row; a rolled-back slot is masked out of the attention mask and the next
tokens get explicit position ids (the row's count of valid slots before them), and only the tail
that every row discarded is cropped. ``ModelDrafter`` runs any causal LM with the target's
tokenizer on a ``RowCache``; ``truncated_drafter`` builds one from the target's first layers,
optionally with a ``ReducedHead``: an LM head over the token ids the target actually uses
(``draft_vocabulary``; at full size the head is most of a shallow copy's cost). Its logits are
-inf outside those ids, so the drafter never proposes them and its q is exactly 0 there, which
keeps speculative sampling exact and leaves greedy output the target's own.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers 5.x renamed the KV-cache argument of forward (past_key_values -> cache)
_CACHE_ARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass(frozen=True)
class Sampling:
    """Decoding settings shared by the target and the drafter. ``generator`` draws every random
    number of one run (drafts, acceptance tests, residual and bonus tokens), so a seed fixes it."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    def __post_init__(self):
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits [..., V] -> the processed distribution (fp32): the argmax's point mass when not
        sampling; else softmax(logits / temperature) restricted to the smallest set of most likely
        tokens whose mass reaches top_p (at least one token), renormalised."""
        logits = logits.float()
        if not self.do_sample:
            return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        logits = logits / self.temperature
        if self.top_p < 1:
            values, order = logits.sort(-1, descending=True)
            p = values.softmax(-1)
            drop = p.cumsum(-1) - p >= self.top_p  # the mass before this token already reaches top_p
            logits = torch.empty_like(logits).scatter_(-1, order, values.masked_fill(drop, float("-inf")))
        return logits.softmax(-1)

    def choose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, V] -> (token [B], its processed distribution [B, V], or None when greedy)."""
        if not self.do_sample:
            return logits.argmax(-1), None
        q = self.probs(logits)
        return torch.multinomial(q, 1, generator=self.generator)[:, 0], q


class RowCache:
    """A model's KV cache (transformers ``DynamicCache``) over a batch whose rows keep different
    numbers of tokens. ``mask`` [B, S] marks the valid slots of the S physical ones, ``valid`` [B]
    counts them; a token's position id is its row's count of valid slots before it, so a masked
    slot (left padding, a rolled-back draft) is invisible to attention and to positions."""

    def __init__(self, model, batch_size: int):
        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.mask = torch.zeros(batch_size, 0, dtype=torch.long, device=model.device)
        self.valid = torch.zeros(batch_size, dtype=torch.long, device=model.device)
        self.dense = True  # no slot is masked: the mask need not be passed (transformers' fast path)

    def forward(self, ids: torch.Tensor, slot_mask: torch.Tensor | None = None, logits_to_keep: int = 1):
        """Append ``ids`` [B, n] (``slot_mask`` [B, n]: 0 for a padding slot; None: all real) and
        return the logits of the last ``logits_to_keep`` slots [B, logits_to_keep, V]."""
        if slot_mask is None:
            slot_mask = torch.ones_like(ids)
            positions = self.valid[:, None] + torch.arange(ids.shape[1], device=ids.device)
        else:
            self.dense = self.dense and bool(slot_mask.all())
            positions = self.valid[:, None] + slot_mask.cumsum(1) - slot_mask
        self.mask = torch.cat([self.mask, slot_mask], 1)
        self.valid = self.valid + slot_mask.sum(1)
        out = self.model(input_ids=ids, attention_mask=None if self.dense else self.mask, position_ids=positions,
                         use_cache=True, logits_to_keep=logits_to_keep, **{_CACHE_ARG: self.cache})
        return out.logits

    def keep(self, keep_last: torch.Tensor, width: int) -> None:
        """Roll back: of the last n slots, keep only those where ``keep_last`` [B, n] is true, and crop
        all but the first ``width`` of them (the caller knows no row keeps a slot after those)."""
        n = keep_last.shape[1]
        if n:
            self.mask[:, -n:] *= keep_last.to(self.mask.dtype)
            self.valid = self.mask.sum(1)
            self.crop(n - width)
            self.dense = self.dense and bool(keep_last[:, :width].all())

    def crop(self, n: int) -> None:
        """Remove the last ``n`` physical slots (every row has discarded them)."""
        if n > 0:
            self.cache.crop(-n)
            self.mask = self.mask[:, :-n]

    def length(self) -> int:
        """Physical slots in the KV cache (equals ``mask.shape[1]``)."""
        return self.cache.get_seq_length()


class Drafter:
    """Base of all drafters; see the module docstring for the contract."""

    name: str = "drafter"
    forwards: int = 0  # model forward passes so far (a drafter without a model leaves it at 0)

    def reset(self, input_ids: torch.LongTensor, attention_mask: torch.LongTensor) -> None:
        """Start a new batch: left-padded prompt ids [B, T] and mask."""
        raise NotImplementedError

    def propose(self, gamma: int, sampling: Sampling) -> tuple[torch.LongTensor, torch.FloatTensor | None]:
        """Up to gamma proposed tokens per row [B, gamma] and the drafter's distribution q at each
        proposed position [B, gamma, V] after the same temperature/top-p processing as the target's
        (None: deterministic proposals, i.e. q is one-hot on the proposed token). Greedy: argmax."""
        raise NotImplementedError

    def commit(self, new_tokens: list[list[int]]) -> None:
        """Per row, the tokens appended to the sequence this iteration (accepted drafts then the target's
        own token); the drafter discards anything else it had (rolls its state back)."""
        raise NotImplementedError


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ModelDrafter(Drafter):
    """Any causal LM that shares the target's tokenizer, with its own KV cache and rollback.

    Its cache holds every committed token except the last one or two (``pending``: fed at the
    next ``propose``) plus the drafts it fed itself; ``commit`` keeps the drafts that were
    accepted and masks the rest. ``tokenizer`` (optional) lets ``speculative_generate`` check that
    the drafter's tokenizer is the target's; the vocabulary size is always checked. Keep the model on
    the target's device: one generator (``Sampling.generator``) draws all random numbers of a run."""

    def __init__(self, model, name: str | None = None, tokenizer=None):
        self.model = model
        self.name = name or getattr(model.config, "name_or_path", "") or type(model).__name__
        self.tokenizer = tokenizer
        self.vocab_size = model.config.get_text_config().vocab_size
        self.forwards = 0
        self.state: RowCache | None = None

    def reset(self, input_ids, attention_mask) -> None:
        self.state = RowCache(self.model, input_ids.shape[0])
        self.pending, self.pending_mask = input_ids.to(self.model.device), attention_mask.to(self.model.device)
        self.drafts: torch.Tensor | None = None
        self.fed = 0

    @torch.inference_mode()
    def propose(self, gamma: int, sampling: Sampling):
        # the first forward reads the pending committed tokens; drafts 1..gamma-1 are fed back one
        # at a time; the last draft is only sampled (fed next time if it is accepted)
        logits = self.state.forward(self.pending, self.pending_mask)[:, -1]
        tokens, qs = [], []
        for i in range(gamma):
            if i:
                logits = self.state.forward(tokens[-1][:, None])[:, -1]
            token, q = sampling.choose(logits)
            tokens.append(token)
            qs.append(q)
        self.forwards += gamma
        self.drafts = torch.stack(tokens, 1) if tokens else self.pending.new_zeros(self.pending.shape[0], 0)
        self.fed = max(gamma - 1, 0)
        return self.drafts, (torch.stack(qs, 1) if tokens and sampling.do_sample else None)

    @torch.inference_mode()
    def commit(self, new_tokens: list[list[int]]) -> None:
        fed = self.drafts[:, :self.fed].tolist()
        # drafts already in the cache that the sequence now holds (a prefix of this round's tokens)
        kept = [_common_prefix(new, d) for new, d in zip(new_tokens, fed)]
        dev = self.model.device
        if self.fed:
            self.state.keep(torch.arange(self.fed, device=dev)[None] < torch.tensor(kept, device=dev)[:, None],
                            max(kept))
        rest = [new[k:] for new, k in zip(new_tokens, kept)]
        width = max(1, max(map(len, rest)))  # right-aligned; a finished row feeds one masked slot
        self.pending = torch.tensor([[0] * (width - len(r)) + r for r in rest], dtype=torch.long, device=dev)
        self.pending_mask = (None if all(len(r) == width for r in rest) else  # None: all real
                             torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rest], device=dev))
        self.drafts, self.fed = None, 0

    def cached_tokens(self) -> list[int]:
        """Per row, committed tokens held in the cache (the others are pending, fed next time)."""
        return self.state.valid.tolist()

    def pending_tokens(self) -> list[int]:
        """Per row, committed tokens not yet in the cache."""
        if self.pending_mask is None:
            return [self.pending.shape[1]] * self.pending.shape[0]
        return self.pending_mask.sum(1).tolist()


def _decoder_layers(model) -> torch.nn.ModuleList:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"truncated_drafter: {type(model).__name__} keeps no decoder layer list at "
                         "get_decoder().layers; build the drafter yourself and wrap it in ModelDrafter")
    return layers


class ReducedHead(torch.nn.Module):
    """An LM head over a subset of the vocabulary: ``weight`` [n, H] (and ``bias`` [n]) are the rows
    of a full head for the token ids ``ids`` [n]. ``reduced_logits`` gives the n rows' logits and one
    -inf column standing for every other id; ``rows`` [vocab_size] maps a token id to its column
    (n when outside the head), so the full-vocabulary logits (``forward``) are -inf outside ``ids``:
    a softmax of them (any temperature or top-p) is exactly 0 there, their argmax is one of ``ids``,
    and the losses of ``helpers.kd`` see a distribution with no mass there."""

    def __init__(self, weight: torch.Tensor, ids: torch.Tensor, vocab_size: int, bias: torch.Tensor | None = None):
        super().__init__()
        ids = torch.as_tensor(ids, dtype=torch.long, device=weight.device)
        if ids.ndim != 1 or len(ids) != weight.shape[0] or len(ids.unique()) != len(ids):
            raise ValueError(f"ReducedHead: ids must be {weight.shape[0]} distinct token ids, one per weight row")
        if len(ids) and not 0 <= int(ids.min()) <= int(ids.max()) < vocab_size:
            raise ValueError(f"ReducedHead: token ids must be in 0..{vocab_size - 1}")
        self.weight = torch.nn.Parameter(weight)
        self.bias = None if bias is None else torch.nn.Parameter(bias)
        rows = torch.full((vocab_size,), len(ids), dtype=torch.long, device=weight.device)
        rows[ids] = torch.arange(len(ids), device=weight.device)
        self.register_buffer("ids", ids)
        self.register_buffer("rows", rows, persistent=False)

    def reduced_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., n + 1]: the logits of ``ids``, then -inf for any other token id."""
        sub = torch.nn.functional.linear(hidden, self.weight, self.bias)
        return torch.cat([sub, sub.new_full((*sub.shape[:-1], 1), float("-inf"))], -1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.reduced_logits(hidden).index_select(-1, self.rows)


def draft_vocabulary(examples, size: int, vocab_size: int, keep=()) -> torch.LongTensor:
    """The ``size`` token ids (sorted) the target puts most probability on over its own solutions:
    per id, its probability summed over every stored position of ``examples`` (``kd.distill.Example``
    with the target's top-k log-probs; ties go to the lower id), the ids in ``keep`` (e.g. end of
    sequence) first."""
    keep = sorted({int(t) for t in keep})
    if not len(keep) <= size <= vocab_size:
        raise ValueError(f"draft_vocabulary: size must be in {len(keep)}..{vocab_size} (the kept ids .. the "
                         f"vocabulary), got {size}")
    mass = torch.zeros(vocab_size, dtype=torch.float64)
    for e in examples:
        if e.topk_ids is None:
            raise ValueError(f"draft_vocabulary: example {e.id} has no top-k distributions of the target")
        mass.index_add_(0, torch.as_tensor(e.topk_ids, dtype=torch.long).flatten(),
                        torch.as_tensor(e.topk_logprobs, dtype=torch.float64).exp().flatten())
    mass[keep] = math.inf
    # a stable sort by falling mass keeps equal masses in id order
    return mass.neg().sort(stable=True).indices[:size].sort().values


def restrict_vocabulary(model, ids):
    """Give ``model`` (changed in place and returned) a ``ReducedHead`` over the token ids ``ids``: copies
    of its LM head's rows for them, no longer tied to the input embeddings (which keep every id)."""
    head = model.get_output_embeddings()
    ids = torch.as_tensor(ids, dtype=torch.long, device=head.weight.device)
    bias = None if getattr(head, "bias", None) is None else head.bias.detach()[ids].clone()
    model.config.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):  # transformers 5 keeps the tying it read from the config
        model.all_tied_weights_keys = {}
    model.set_output_embeddings(ReducedHead(head.weight.detach()[ids].clone(), ids,
                                            model.config.get_text_config().vocab_size, bias))
    return model


def truncated_model(target, n_layers: int, vocab_ids=None):
    """A NEW model of the target's class: deep copies of its embeddings, first ``n_layers`` decoder
    layers, final norm and LM head (``config.num_hidden_layers = n_layers``), tied weights tied as in
    the target; with ``vocab_ids``, the head is a ``ReducedHead`` over those token ids. The target's
    own modules are never used, and the target is not changed."""
    total = target.config.get_text_config().num_hidden_layers
    if not 1 <= n_layers <= total:
        raise ValueError(f"truncated_drafter: n_layers must be in 1..{total} (the target's layers), got {n_layers}")
    _decoder_layers(target)
    config = copy.deepcopy(target.config)
    text = config.get_text_config()
    text.num_hidden_layers = n_layers
    if isinstance(getattr(text, "layer_types", None), list):
        text.layer_types = text.layer_types[:n_layers]
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: initialise, then overwrite
        from contextlib import nullcontext as no_init_weights
    with no_init_weights(), torch.device(target.device):
        draft = type(target)(config)
    # every parameter and buffer is replaced by a copy of the target's tensor of the same name; a
    # tensor the target shares between names (tied embeddings) is shared the same way here
    source = dict(target.named_parameters(remove_duplicate=False))
    source.update(target.named_buffers(remove_duplicate=False))
    copies: dict[int, torch.Tensor] = {}
    for named, is_param in ((draft.named_parameters(remove_duplicate=False), True),
                            (draft.named_buffers(remove_duplicate=False), False)):
        for name, old in list(named):
            if name not in source:
                raise ValueError(f"truncated_drafter: the truncated {type(target).__name__} has a tensor "
                                 f"{name!r} that the target lacks")
            src = source[name]
            if id(src) not in copies:
                data = src.detach().clone()
                copies[id(src)] = torch.nn.Parameter(data, requires_grad=old.requires_grad) if is_param else data
            owner, _, attr = name.rpartition(".")
            module = draft.get_submodule(owner)
            if is_param:
                setattr(module, attr, copies[id(src)])
            else:
                module._buffers[attr] = copies[id(src)]
    draft.generation_config = copy.deepcopy(target.generation_config)
    if vocab_ids is not None:
        restrict_vocabulary(draft, vocab_ids)
    return draft.eval()


def truncated_drafter(target, n_layers: int, tokenizer=None, vocab_ids=None) -> ModelDrafter:
    """A ``ModelDrafter`` over ``truncated_model(target, n_layers, vocab_ids)`` (LayerSkip-style early
    exit; with ``vocab_ids``, over a reduced head)."""
    base = getattr(target.config, "name_or_path", "") or type(target).__name__
    head = "" if vocab_ids is None else f", {len(vocab_ids)}-token head"
    return ModelDrafter(truncated_model(target, n_layers, vocab_ids), name=f"{base} first {n_layers} layers{head}",
                        tokenizer=tokenizer)
