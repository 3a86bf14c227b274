"""The differentiable (relaxed) rollout behind GRADE.

At each step the policy's next-token logits are relaxed into a distribution y over the
vocabulary (Gumbel-softmax, straight-through, ...), and the next input embedding is
y @ E, so the reward's gradient flows back through every generated position into the
policy. The KV cache keeps one step at O(1) new positions.

Legend: B batch, P prompt length (left-padded), T generated positions, V vocabulary, H hidden.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .masks import completion_mask

Relax = Callable[[torch.Tensor, int], torch.Tensor]
"""relax(logits (B, V), step) -> relaxed tokens y (B, V): what is embedded and scored, with its gradient."""


@dataclass
class SoftRollout:
    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P) 1 for real prompt tokens
    logits: torch.Tensor  # (B, T, V) processed policy logits each relaxed token was drawn from
    soft_tokens: torch.Tensor  # (B, T, V) relaxed tokens y_t (carry the gradient)
    tokens: torch.Tensor  # (B, T) hard tokens argmax(y_t): the text the rollout stands for
    mask: torch.Tensor  # (B, T) 1 up to and including the first hard EOS, 0 after

    @property
    def lengths(self) -> torch.Tensor:  # (B,)
        return self.mask.sum(-1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so left padding does not shift the prompt."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def forbid_eos(logits: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """Make EOS impossible (used before `min_new_tokens`). A large finite value, not -inf, keeps p*log p finite."""
    if eos_token_id is None:
        return logits
    logits = logits.clone()
    logits[..., eos_token_id] = torch.finfo(logits.dtype).min / 2
    return logits


def decode_step(model, cache, attention_mask: torch.Tensor, position_ids: torch.Tensor, **inputs) -> tuple:
    """One cached decoding step (one new position per row: `input_ids` or `inputs_embeds`).

    Returns (the updated cache, next-token logits (B, V)).
    """
    out = model(**inputs, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True)
    return out.cache, out.logits[:, -1]


def soft_rollout(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    relax: Relax,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    eos_token_id: int | None = None,
) -> SoftRollout:
    """Generate `max_new_tokens` relaxed tokens (fewer if every row has emitted a hard EOS).

    The prompt goes in as token ids; every generated position goes in as y_t @ E, with
    y_t = relax(logits_t). No weight matrix is copied per step (y_t @ E reads E in place).
    """
    # Forward calls go through `model` (a DDP wrapper syncs gradients); the embedding matrix is read from the
    # wrapped module in place, never copied.
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    embed_matrix = inner.get_input_embeddings().weight  # (V, H)
    attention_mask = prompt_mask.long()
    positions = position_ids_from_mask(attention_mask)  # (B, P)
    out = model(input_ids=prompt_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True)
    cache, next_logits = out.cache, out.logits[:, -1]  # (B, V)
    next_position = positions[:, -1:] + 1  # (B, 1)

    step_logits, step_soft, step_tokens = [], [], []
    finished = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
    for step in range(max_new_tokens):
        if step < min_new_tokens:
            next_logits = forbid_eos(next_logits, eos_token_id)
        y = relax(next_logits, step)  # (B, V)
        token = y.argmax(-1)  # (B,)
        step_logits.append(next_logits)
        step_soft.append(y)
        step_tokens.append(token)
        if eos_token_id is not None:
            finished = finished | (token == eos_token_id)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
        inputs_embeds = (y.to(embed_matrix.dtype) @ embed_matrix).unsqueeze(1)  # (B, 1, H)
        cache, next_logits = decode_step(model, cache, attention_mask, next_position, inputs_embeds=inputs_embeds)
        next_position = next_position + 1

    tokens = torch.stack(step_tokens, dim=1)  # (B, T)
    return SoftRollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        logits=torch.stack(step_logits, dim=1),
        soft_tokens=torch.stack(step_soft, dim=1),
        tokens=tokens,
        mask=completion_mask(tokens, eos_token_id),
    )


def reference_logits(
    ref_model: torch.nn.Module,
    rollout: SoftRollout,
    min_new_tokens: int = 0,
    eos_token_id: int | None = None,
) -> torch.Tensor:
    """The reference's logits at every generated position, on the same soft inputs the policy saw.

    One parallel forward over [prompt ids; y_1 .. y_{T-1}] @ E_ref. The reference's
    parameters are frozen, but the gradient flows into the soft tokens (they are the
    policy's), so the KL's dependence on the generated prefix is part of the objective.
    The same EOS processing as the rollout is applied, so both distributions are comparable.
    Returns (B, T, V).
    """
    embed = ref_model.get_input_embeddings()
    prompt_embeds = embed(rollout.prompt_ids)  # (B, P, H)
    num_generated = rollout.tokens.shape[1]
    soft_embeds = rollout.soft_tokens[:, :-1].to(embed.weight.dtype) @ embed.weight  # (B, T-1, H)
    inputs_embeds = torch.cat([prompt_embeds, soft_embeds], dim=1)  # (B, P+T-1, H)
    # Positions after a hard EOS are masked out of every statistic, but they stay visible here so the
    # reference conditions on exactly the prefix the policy conditioned on (the rollout did not mask them).
    attention_mask = torch.cat([rollout.prompt_mask.long(), rollout.prompt_mask.new_ones(rollout.prompt_mask.shape[0], num_generated - 1).long()], dim=1)
    out = ref_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask))
    logits = out.logits[:, rollout.prompt_ids.shape[1] - 1 :]  # (B, T, V)
    if min_new_tokens > 0:
        logits = torch.cat([forbid_eos(logits[:, :min_new_tokens], eos_token_id), logits[:, min_new_tokens:]], dim=1)
    return logits
