"""Speculative decoding: a drafter proposes tokens, the target checks them in one forward pass.

``decode`` holds the loop (``speculative_generate``) and its statistics; ``drafters`` the drafter
interface, the shared ``Sampling`` settings and the model drafters. Imports flow one way: this
package uses ``helpers.models``; nothing in the ground imports it.
"""
from .decode import (
                     SpecStats,
                     acceptance_rate,
                     eos_ids,
                     expected_tokens_per_call,
                     residual_distribution,
                     speculative_decode,
                     speculative_generate,
)
from .drafters import (
                       Drafter,
                       ModelDrafter,
                       ReducedHead,
                       RowCache,
                       Sampling,
                       draft_vocabulary,
                       restrict_vocabulary,
                       truncated_drafter,
                       truncated_model,
)

__all__ = ["Drafter", "ModelDrafter", "ReducedHead", "RowCache", "Sampling", "SpecStats", "acceptance_rate",
           "draft_vocabulary", "eos_ids", "expected_tokens_per_call", "residual_distribution", "restrict_vocabulary",
           "speculative_decode", "speculative_generate", "truncated_drafter", "truncated_model"]
