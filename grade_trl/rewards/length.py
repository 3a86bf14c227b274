"""A length reward: shorter completions score higher, `2 - words / 16` (the users' PPO length experiment).

Legend: B batch, T completion positions, V vocabulary.
"""

from __future__ import annotations

import torch

from ..core.precision import at_least_float32
from ..core.soft_tokens import SoftTokens, as_soft_tokens
from .base import completion_text


class LengthReward:
    """TRL-compatible reward `2 - len(completion.split()) / scale`, and a differentiable surrogate for GRADE.

    The soft path scores the EXPECTED number of completion tokens before EOS under the relaxed tokens:
    with e_t = y_t[eos] (the relaxed token's EOS mass), position t holds a text token when no EOS came at or
    before it, with probability prod_{s<=t} (1 - e_s), so E[tokens] = sum_t mask_t * prod_{s<=t} (1 - e_s). On
    one-hot tokens that is the number of tokens before the first EOS, which is what the decoded text holds
    (the EOS itself is not text). It is mapped to the word
    scale with a fixed `words_per_token` (0.75 for GPT-2-style BPE on English prose: an assumption,
    not a measurement of the policy), giving `2 - words_per_token * E[tokens] / scale`. Its gradient
    raises the EOS mass at early positions; it ignores everything else about the tokens.
    """

    differentiable = True
    scores_eos = True  # the soft path needs the relaxed EOS positions in its mask

    def __init__(self, eos_token_id: int, scale: float = 16.0, offset: float = 2.0, words_per_token: float = 0.75):
        self.eos_token_id, self.scale, self.offset, self.words_per_token = eos_token_id, scale, offset, words_per_token
        self.__name__ = "length"

    def __call__(self, prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        return [self.offset - len(completion_text(completion).split()) / self.scale for completion in completions]

    def expected_tokens(self, soft_tokens: SoftTokens, attention_mask: torch.Tensor) -> torch.Tensor:
        eos_mass = at_least_float32(as_soft_tokens(soft_tokens).probability(self.eos_token_id))  # (B, T)
        is_text = torch.cumprod(1.0 - eos_mass, dim=1)  # (B, T): no EOS at or before t
        return (is_text * attention_mask.to(is_text.dtype)).sum(1)  # (B,)

    def score_soft(self, soft_tokens: SoftTokens, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.offset - self.words_per_token * self.expected_tokens(soft_tokens, attention_mask) / self.scale
