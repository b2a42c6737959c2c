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

The package, one module per step; imports flow one way, ``head`` <- ``train`` <- ``threshold`` <-
``decode`` (``report`` stands alone), and every public name is re-exported here (``collm.X``):

- ``head``: the deferral head, its saving and loading, the base's forward pass with it;
- ``train``: weak labels, the marginal likelihood, features, fitting the head (alone or with LoRA);
- ``threshold``: deferral logits under teacher forcing, thresholds per deferral frequency,
  calibration of σ;
- ``decode``: Co-LLM decoding (one tokenizer or across tokenizers) and the runs over records;
- ``report``: deferral by kind of token and by position, provenance as HTML.
"""
from .decode import ASST_CHUNK, DecodeStats, as_responses, co_generate, decode_grid, deferral_frequency, prompts_for
from .head import DeferralHead, base_forward, cross_tokenizer, load_head, save_head
from .report import TOKEN_KINDS, deferral_by_kind, deferral_by_position, provenance_html, token_kind
from .threshold import (
    QUANTILES, calibration_table, deferral_logits, expected_calibration_error, logit_summary, logit_threshold,
    responsibilities, sigma, thresholds_for
)
from .train import (
    Features, alignment_summary, assistant_on_base, examples_nll, features_nll, fit_head_marginal, fit_head_weak,
    frozen_features, head_logits, marginal_nll, reference_nll, train_joint, weak_labels
)

__all__ = ["ASST_CHUNK", "DecodeStats", "DeferralHead", "Features", "QUANTILES", "TOKEN_KINDS", "alignment_summary",
           "as_responses", "assistant_on_base", "base_forward", "calibration_table", "co_generate",
           "cross_tokenizer", "decode_grid", "deferral_by_kind", "deferral_by_position", "deferral_frequency",
           "deferral_logits", "examples_nll", "expected_calibration_error", "features_nll", "fit_head_marginal",
           "fit_head_weak", "frozen_features", "head_logits", "load_head", "logit_summary", "logit_threshold",
           "marginal_nll", "prompts_for", "provenance_html", "reference_nll", "responsibilities", "save_head",
           "sigma", "thresholds_for", "token_kind", "train_joint", "weak_labels"]
