"""On-policy distillation (GKD, Agarwal et al. 2024): with probability λ a training batch's
completions are written by the current student, scored by the teacher, and the student learns the
teacher's distributions on the text it actually produces.

``OnPolicy`` is ``distill.train``'s ``prepare_batch`` hook. For each batch it draws one number from
its own generator (seeded by the training seed); below λ it samples a completion for every prompt
of the batch from the student (temperature 1, at most ``max_new_tokens``, as GKD and TRL's
``GKDTrainer``), has the teacher engine (``helpers.backends``: the teacher in memory, or vLLM) score
those tokens after the teacher's own prompt for the example (its strategy prompt, as in the store),
and returns the batch rebuilt on them. Otherwise the batch is returned untouched, so λ = 0 is
exactly off-policy KD; λ = 1 is pure on-policy KD. The divergence is the variant's (GKD's default
is JSD(β)); the cross-entropy part of the loss then falls on the student's own tokens, so on-policy
rows usually set ``alpha: 1``.
"""
from __future__ import annotations

import torch

from .batches import Example, collate


class OnPolicy:
    """``prepare_batch(model, batch) -> batch`` for ``distill.train``; ``engine`` scores (same tokenizer
    as the student), ``k`` top-k entries per token, ``share`` is λ."""

    def __init__(self, engine, tokenizer, share: float, *, k: int, max_new_tokens: int, max_length: int,
                 seed: int = 0):
        from ..models import tokenizer_fingerprint

        if tokenizer_fingerprint(engine.tokenizer) != tokenizer_fingerprint(tokenizer):
            raise ValueError("on-policy KD needs a teacher with the student's tokenizer: the teacher scores the "
                             "student's own tokens")
        self.engine, self.tokenizer, self.share, self.k = engine, tokenizer, share, k
        self.max_new_tokens, self.max_length = max_new_tokens, max_length
        self.generator = torch.Generator().manual_seed(seed)
        self.batches = self.sampled = 0

    def __call__(self, model, batch: dict) -> dict:
        self.batches += 1
        if self.share <= 0 or float(torch.rand((), generator=self.generator)) >= self.share:
            return batch
        self.sampled += 1
        return self.rebuild(model, batch["examples"], batch["input_ids"].device)

    def rebuild(self, model, examples, device) -> dict:
        """The batch of ``examples`` with the student's own sampled completions and the teacher's
        top-k on them, on ``device``."""
        from ..backends.transformers_engine import generate_with_capture

        missing = [e.id for e in examples if e.teacher_prompt is None]
        if missing:
            raise ValueError(f"on-policy KD needs each example's teacher prompt; {missing[:3]} have none")
        prompts = [list(e.input_ids[:e.n_prompt]) for e in examples]
        room = min(self.max_new_tokens, self.max_length - max(map(len, prompts)))
        was_training = model.training
        model.eval()
        try:
            rows = generate_with_capture(model, self.tokenizer, prompts, capture=False, do_sample=True,
                                         temperature=1.0, top_p=1.0, max_new_tokens=max(1, room))
        finally:
            model.train(was_training)
        texts = [r["token_ids"] for r in rows]
        scored = self.engine.score([list(e.teacher_prompt) for e in examples], texts, k=self.k)
        rebuilt = [Example(e.id, p + t, e.n_prompt, s["topk_ids"], s["topk_logprobs"], s["tail_logprobs"],
                           e.teacher_prompt) for e, p, t, s in zip(examples, prompts, texts, scored)]
        out = collate(rebuilt, self.tokenizer.pad_token_id)
        return {key: v.to(device) for key, v in out.items()}
