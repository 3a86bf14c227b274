"""Hard-token sampling and scoring from one processed distribution (REINFORCE and PPO).

The tokens are drawn from the *processed* next-token distribution (temperature, EOS ban before
`min_new_tokens`, top-k, top-p), so every log-probability that enters a loss, an old-policy ratio
or a KL has to be taken under that same processed distribution. Scoring with the plain softmax of
the raw logits while sampling with top-p/min_new_tokens is what made PPO's KL negative (the users'
bug, docs/background.md sections 2-3). Here one function, `process_logits`, is used by the sampler and
by the scorer, so "the tokens were sampled from exactly this distribution" holds by construction.

We sample with our own token-by-token loop, not `model.generate`: generate's logits processors
(their order, their masking value, their top-p tie rules) could drift from ours.

Legend: B batch, P prompt length (left-padded), T completion length, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .deferred_grads import replaced_forwards
from .few_rows import few_row_output_head
from .masks import completion_mask, masked_mean
from .sharding import all_finished, is_sharded
from .soft_rollout import decode_step, last_positions, position_ids_from_mask, tanh_gelu_in_one_kernel, tanh_gelu_modules, unwrapped


@dataclass
class SamplingSettings:
    """How completions are sampled, and therefore how their log-probs must be scored."""

    temperature: float = 1.0
    top_p: float = 1.0  # 1.0 = off
    top_k: int = 0  # 0 = off
    min_new_tokens: int = 0  # EOS is impossible at steps < min_new_tokens
    max_new_tokens: int = 48

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(
                f"temperature={self.temperature!r}: it must be > 0 (logits are divided by it); "
                "use a small positive value such as 0.1 for near-greedy sampling"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r}: it must satisfy 0 < top_p <= 1; use 1.0 to turn nucleus sampling off")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r}: it must be >= 0; use 0 to turn top-k off")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r}: it must be >= 1; raise it")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens={self.min_new_tokens!r}, max_new_tokens={self.max_new_tokens!r}: need "
                "0 <= min_new_tokens <= max_new_tokens; lower min_new_tokens or raise max_new_tokens"
            )


def _masked_value(dtype: torch.dtype) -> float:
    """The value of an impossible token: large and finite (as in `forbid_eos`), never -inf, so p*log p stays finite."""
    return torch.finfo(dtype).min / 2


def _top_k_keep(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Bool mask (same shape as logits) of the tokens whose logit is >= the k-th largest (ties kept)."""
    k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
    return logits >= kth


def _top_p_keep(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Bool mask of the nucleus: the smallest set of most likely tokens whose probability sums to >= top_p.

    A token is kept when the probability of the tokens sorted before it is still < top_p; the top
    token (nothing before it) is always kept.
    """
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    sorted_probs = sorted_logits.softmax(-1)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs  # exclusive cumulative sum
    keep_sorted = mass_before < top_p
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def process_logits(
    logits: torch.Tensor,
    settings: SamplingSettings,
    steps: torch.Tensor | int,
    eos_token_id: int | None = None,
    truncate: bool = True,
) -> torch.Tensor:
    """The logits of the distribution tokens are sampled from, exactly as the sampler builds them.

    logits: (B, T, V) with steps (T,) the completion step of each position, or (B, V) with an int step.
    In order: divide by temperature; forbid EOS at steps < min_new_tokens; keep the top-k; keep the
    top-p nucleus (computed after top-k, on the renormalised remainder). Removed tokens get the large
    finite negative `finfo.min / 2` (never -inf). `truncate=False` skips top-k/top-p (used for the
    reference, see `token_logprobs`). Computed in at least float32; differentiable w.r.t. the kept
    logits (the selection itself is not).
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logits = logits.to(dtype)
    if settings.temperature != 1.0:  # x / 1.0 is x: no B x T x V copy for nothing
        logits = logits / settings.temperature
    neg = _masked_value(dtype)

    if eos_token_id is not None and settings.min_new_tokens > 0:
        vocab = logits.shape[-1]
        is_eos = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
        is_eos[eos_token_id] = True
        if isinstance(steps, int):
            if steps < settings.min_new_tokens:
                logits = logits.masked_fill(is_eos, neg)
        else:
            banned = (steps.to(logits.device) < settings.min_new_tokens).unsqueeze(-1) & is_eos  # (T, V)
            logits = logits.masked_fill(banned, neg)

    if truncate and settings.top_k > 0:
        keep = _top_k_keep(logits.detach(), settings.top_k)
        logits = logits.masked_fill(~keep, neg)
    if truncate and settings.top_p < 1.0:
        keep = _top_p_keep(logits.detach(), settings.top_p)
        logits = logits.masked_fill(~keep, neg)
    return logits


@dataclass
class SampledBatch:
    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P) 1 for real prompt tokens
    completion_ids: torch.Tensor  # (B, T) right-padded: pad_token_id after the first EOS
    completion_mask: torch.Tensor  # (B, T) float, 1 up to and including the first EOS, 0 after
    logprobs: torch.Tensor  # (B, T) log-prob of each sampled token under the processed distribution; 0 where masked
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    hidden: torch.Tensor | None = None  # (B, T, H) with return_hidden: the last layer's state that predicts each token

    @property
    def sequences(self) -> torch.Tensor:  # (B, P+T)
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:  # (B, P+T) long
        return torch.cat([self.prompt_mask.long(), self.completion_mask.long()], dim=1)

    @property
    def lengths(self) -> torch.Tensor:  # (B,)
        return self.completion_mask.sum(-1)


class NonFiniteLogitsError(RuntimeError):
    """The policy's logits were NaN or inf where a token was to be sampled (diverged weights, an overflowed forward)."""


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    settings: SamplingSettings,
    eos_token_id: int | None,
    pad_token_id: int | None = None,
    return_hidden: bool = False,
) -> SampledBatch:
    """Sample up to `settings.max_new_tokens` tokens per row from `process_logits` of the model's logits.

    Token by token with a KV cache; stops early once every row has emitted EOS. Rows that have
    finished get `pad_token_id` (EOS when None) and a 0 log-prob. Forward calls go through `model`,
    so a DistributedDataParallel wrapper works. Uses the global torch RNG (`torch.multinomial`).
    Dropout must be off (eval mode or dropout 0) for `token_logprobs` to reproduce `logprobs`. The prompt's forward
    computes the logits of its last position only. return_hidden: also keep the last layer's state that predicts
    each token (`SampledBatch.hidden`; PPO's values). GPT-2's `gelu_new` runs as one kernel here, as in GRADE's relaxed
    rollout (`soft_rollout.tanh_gelu_in_one_kernel`: the same function, equal up to rounding), so that both decode
    loops pay the same per-operation costs; for the same reason the LM head's product of each step takes the faster
    layout on CPU (`few_rows.few_row_output_head`).
    """
    with tanh_gelu_in_one_kernel(tanh_gelu_modules(model)), replaced_forwards(few_row_output_head(unwrapped(model))):
        return _sample(model, prompt_ids, prompt_mask, settings, eos_token_id, pad_token_id, return_hidden)


def _sample(model, prompt_ids, prompt_mask, settings: SamplingSettings, eos_token_id, pad_token_id, return_hidden) -> SampledBatch:
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    sharded = is_sharded(model)  # then every process decodes until every process's rows have finished (core/sharding.py)
    batch = prompt_ids.shape[0]
    attention_mask = prompt_mask.long()
    positions = position_ids_from_mask(attention_mask)  # (B, P)
    out = model(input_ids=prompt_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True, logits_to_keep=1, output_hidden_states=return_hidden)
    cache, next_logits = out.cache, out.logits[:, -1]  # (B, V)
    next_position = positions[:, -1:] + 1  # (B, 1)

    step_tokens, step_logprobs, step_hidden = [], [], []
    if return_hidden:
        step_hidden.append(out.hidden_states[-1][:, -1])  # (B, H): the state that predicts the first token
    finished = torch.zeros(batch, dtype=torch.bool, device=prompt_ids.device)
    for step in range(settings.max_new_tokens):
        logp = F.log_softmax(process_logits(next_logits, settings, step, eos_token_id), dim=-1)  # (B, V)
        try:
            token = torch.multinomial(logp.exp(), 1).squeeze(-1)  # (B,)
        except RuntimeError as error:  # read only on failure: no host sync per step
            if not bool(torch.isfinite(next_logits).all()):
                raise NonFiniteLogitsError(f"the policy's logits are not finite at new token {step + 1}") from error
            raise
        token_logp = logp.gather(-1, token.unsqueeze(-1)).squeeze(-1)
        alive = ~finished
        token = torch.where(alive, token, torch.full_like(token, pad))
        step_tokens.append(token)
        step_logprobs.append(torch.where(alive, token_logp, torch.zeros_like(token_logp)))
        if eos_token_id is not None:
            finished = finished | (token == eos_token_id)
        if step == settings.max_new_tokens - 1 or all_finished(finished, sharded):
            break
        # Same mask as SampledBatch.attention_mask: 1 up to and including the first EOS, 0 after.
        attention_mask = torch.cat([attention_mask, alive.long().unsqueeze(1)], dim=1)
        if return_hidden:
            out = model(input_ids=token.unsqueeze(1), attention_mask=attention_mask, position_ids=next_position, cache=cache, use_cache=True, output_hidden_states=True)
            cache, next_logits = out.cache, out.logits[:, -1]
            step_hidden.append(out.hidden_states[-1][:, -1])
        else:
            cache, next_logits = decode_step(model, cache, attention_mask, next_position, input_ids=token.unsqueeze(1))
        next_position = next_position + 1

    tokens = torch.stack(step_tokens, dim=1)  # (B, T)
    mask = completion_mask(tokens, eos_token_id)
    return SampledBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=tokens,
        completion_mask=mask,
        logprobs=torch.stack(step_logprobs, dim=1),
        eos_token_id=eos_token_id,
        pad_token_id=pad,
        hidden=torch.stack(step_hidden[: tokens.shape[1]], dim=1) if return_hidden else None,
    )


def token_logprobs(
    model: torch.nn.Module,
    batch: SampledBatch,
    settings: SamplingSettings,
    with_grad: bool,
    truncate: bool = True,
    return_logits: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the sampled tokens under the processed distribution, from ONE parallel forward.

    Returns (logprobs (B, T), 0 where the completion mask is 0; processed logits (B, T, V), or None with
    return_logits=False). This is what the loss, the old policy (with_grad=False) and the reference use.
    With with_grad=False and return_logits=False (the reference's scoring) the model's logits are processed
    and scored a chunk of positions at a time (`chunked_logprobs`): the same numbers without the float32
    B x T x V copies, which at GSM8K's shape (16 x 512 x 151,936) are 4.6 GiB each.

    The policy is scored with `truncate=True`: exactly the distribution p the tokens came from.
    The reference is scored with `truncate=False`: temperature and the EOS ban only, no top-k/top-p.
    Then q covers every token p can sample (log q finite), and KL(p || q) = E_p[log p - log q] is a
    proper KL, >= 0, estimated without bias by the k1 term on the sampled tokens. Truncating q at its
    own nucleus would give a different support: a token the policy samples may lie outside the
    reference's nucleus and get log q = -inf (here: ~finfo.min/2), exploding the penalty.
    Note that with truncate=True a token outside the *current* nucleus (after a policy update, or
    in rare float ties at the nucleus edge) gets a log-prob of about finfo.min/2: callers taking a
    ratio exp(new - old) should clamp the log-ratio.
    """
    with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
        logits = completion_forward(model, batch).logits[:, :-1]  # (B, T, V): predict each completion token
        if not with_grad and not return_logits:
            return chunked_logprobs(logits, batch, settings, truncate), None
        return logprobs_from_logits(logits, batch.completion_ids, batch.completion_mask, settings, batch.eos_token_id, truncate)


def completion_forward(model: torch.nn.Module, batch: SampledBatch):
    """One forward of `model` on `batch`'s prompt + completion that computes the logits of the positions predicting the
    completion only: the last T + 1 positions (the last of them predicts past the completion). Returns the model's output."""
    attention_mask = batch.attention_mask
    keep = last_positions(batch.completion_ids.shape[1] + 1, attention_mask.shape[1], attention_mask.device)
    return model(input_ids=batch.sequences, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask), logits_to_keep=keep)


CHUNK_ELEMENTS = 2**26  # logits per chunk of the no-grad scorers: 256 MiB in float32


def position_chunks(logits: torch.Tensor | torch.Size | tuple[int, int, int], chunk_elements: int = CHUNK_ELEMENTS) -> list[slice]:
    """Slices of the position axis of logits (B, T, V) (the tensor or its shape), each at most `chunk_elements` logits
    (at least one position)."""
    batch, positions, vocab = logits.shape if isinstance(logits, torch.Tensor) else logits
    step = max(1, chunk_elements // max(1, batch * vocab))
    return [slice(start, min(start + step, positions)) for start in range(0, positions, step)]


@torch.no_grad()
def chunked_logprobs(logits: torch.Tensor, batch: SampledBatch, settings: SamplingSettings, truncate: bool = True,
                     chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """`logprobs_from_logits`' log-probs (B, T) of `batch`'s completion without gradients, a chunk of positions at
    a time: each position's processing and log-softmax read only its own row (and its step, for the EOS ban), so
    the result is the same, and the float32 temporaries are a chunk's, not B x T x V."""
    ids, mask = batch.completion_ids, batch.completion_mask
    out = torch.empty(ids.shape, dtype=torch.promote_types(logits.dtype, torch.float32), device=logits.device)
    for part in position_chunks(logits, chunk_elements):
        out[:, part] = logprobs_from_logits(logits[:, part], ids[:, part], mask[:, part], settings, batch.eos_token_id, truncate, first_step=part.start)[0]
    return out


def logprobs_from_logits(
    logits: torch.Tensor,
    completion_ids: torch.Tensor,
    mask: torch.Tensor,
    settings: SamplingSettings,
    eos_token_id: int | None,
    truncate: bool = True,
    first_step: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scorer behind `token_logprobs`, for callers that already have the logits (PPO's one forward
    gives logits and values together). logits: (B, T, V) predicting each completion token, the first of
    them completion step `first_step` (a chunk's offset, for the EOS ban).

    Returns (log-probs of `completion_ids` under `process_logits` (B, T), 0 where masked; processed logits (B, T, V)).
    """
    steps = torch.arange(first_step, first_step + completion_ids.shape[1], device=logits.device)
    processed = process_logits(logits, settings, steps, eos_token_id, truncate=truncate)
    logp = F.log_softmax(processed, dim=-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return logp.masked_fill(mask == 0, 0.0), processed


def token_entropy(processed_logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy -sum_v p_v log p_v of softmax(processed_logits) (B, T, V) -> (B, T).

    Removed tokens (finite finfo.min/2 logits) have p = 0 and add exactly 0.
    """
    logp = F.log_softmax(processed_logits.to(torch.promote_types(processed_logits.dtype, torch.float32)), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def chunked_token_entropy(processed_logits: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """`token_entropy` (B, T, V) -> (B, T), computed a chunk of positions at a time (`position_chunks`): for detached
    logits (a metric) the temporaries are a chunk's, not three float32 B x T x V tensors; with a gradient it is the
    same graph as the whole tensor's."""
    return torch.cat([token_entropy(processed_logits[:, part]) for part in position_chunks(processed_logits, chunk_elements)], dim=1)


def entropy_from_logits(processed_logits: torch.Tensor, mask: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Masked mean over positions of `chunked_token_entropy`. processed_logits (B, T, V), mask (B, T). Returns a scalar."""
    return masked_mean(chunked_token_entropy(processed_logits, chunk_elements), mask)
