"""Scoring a sampled completion inside the policy's LM head, a chunk of positions at a time (REINFORCE, PPO).

Why: the loss of REINFORCE and PPO needs log pi(y_t | y_<t) of each sampled token under the processed distribution
(`sampling.process_logits`) with its gradient. Scored from the model's logits, that holds the LM head's B x T x V
output, its float32 processed copy and the log-softmax that backward reads, from the forward until the end of the
backward. At GSM8K's shape (Qwen2.5-0.5B, 16 x 512 new tokens, V 151,936) those tensors were 21.4 of the 41.5 GiB of
REINFORCE's step peak (benchmarks/memory_model_qwen2.py).

How: within `scored_in_head`, the model's LM head (its output embeddings, a plain `nn.Linear`) is given the last
hidden states as usual, and returns the scores instead of the logits. Each chunk of at most `CHUNK_ELEMENTS` logits
goes LM-head product -> `process_logits` -> log-softmax -> the sampled token's entry (and the entropy, where asked)
inside `torch.utils.checkpoint` (non-reentrant), which keeps the chunk's hidden states only and recomputes the rest in
backward. The call still goes through the model (DDP's and autocast's hooks see one forward) and the head's weight is
read inside its own forward. Without a gradient (the reference) nothing is recomputed: the chunks just never make the
B x T x V logits. A single chunk is computed without a checkpoint (there is nothing to free between chunks; the
small models of the tests and the quickstart take this path and cost what they did).

What this is that TRL's fused head is not: `trl.trainer.utils.add_fused_lm_head` (GRPO's scoring) divides by a
temperature and scores the plain softmax; ours scores the sampler's processed distribution (top-k, top-p, the EOS ban
by step), so that the loss's log-probs are those of the distribution the tokens were drawn from, and PPO's entropy
bonus needs its gradient.

Exact: each position's numbers are the same operations as the whole tensor's (`sampling.logprobs_from_logits`); the
weight's gradient is summed chunk by chunk (float summation order). Cost: one more LM-head product per chunk in
backward, as TRL's.

Applies where the head is a plain `nn.Linear` (FSDP2's `fully_shard` of it included), the model is whole on each
process or sharded by FSDP2 or ZeRO-3, nothing replaced the head's forward, and the config declares no scaling of the
logits after the head. Sharded, the recompute reads the head's weight in backward after the hook on the scores this
forward returned has gathered it again (FSDP2's pre-backward hook of the head's unit, ZeRO-3's of the head module),
and its gradient reaches the reduce-scatter with the rest: tests/sharded_worker.py (FSDP2: tied and untied heads,
Accelerate's layout and a head resharded after forward) and tests/zero3_worker.py (DeepSpeed's ZeRO-3 engine on its CPU
accelerator, every parameter partitioned), equal to one process's whole logits. Tensor parallelism alone (DTensors
without an FSDP2 root) keeps the whole-tensor scoring; FSDP2 on a tensor-parallel mesh is not detected (no such config
ships). A model whose forward still changes what the head returned is caught (the output's logits are not the values the head returned: `HeadScores.read`) and scored
again the whole-tensor way, with a warning; one that changed them in place would not be caught (none of transformers'
causal LMs does). The peak of a chunked step (benchmarks/memory_model_qwen2.py): every saved activation plus about 20
bytes per logit of one chunk (its float32 logits, log-softmax and their gradients, measured on CPU).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.utils.checkpoint import checkpoint

from .deferred_grads import replaced_forwards
from .sampling import (
    CHUNK_ELEMENTS,
    SampledBatch,
    SamplingSettings,
    chunked_token_entropy,
    completion_forward,
    logprobs_from_logits,
    position_chunks,
    token_entropy,
    token_logprobs,
)
from .sharding import all_finished, is_fsdp2, is_sharded, is_zero3
from .soft_rollout import unwrapped

ENTROPY_MODES = ("none", "detached", "grad")
"""What `completion_scores` returns of the per-position entropy: nothing, a metric (no graph), a differentiable bonus."""

LOGIT_SCALING_KEYS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
"""Config keys of models whose forward changes the LM head's output (Gemma 2's softcapping, Cohere's scale, ...): the
keys TRL's fused head reads for the same reason. Such models are scored the whole-tensor way."""


def output_head(model: nn.Module) -> nn.Linear | None:
    """The LM head of `model` (through DDP / DeepSpeed wrappers) where `scored_in_head` applies to it, else None."""
    inner = unwrapped(model)
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if _own_class(head) is not nn.Linear or "forward" in vars(head) or (is_sharded(inner) and not (is_fsdp2(inner) or is_zero3(inner))):
        return None
    config = getattr(inner, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any(getattr(text_config, key, None) not in (None, 1, 1.0) for key in LOGIT_SCALING_KEYS):
        return None
    return head


def _own_class(module: nn.Module) -> type:
    """The class `module` was built as: FSDP2's `fully_shard` swaps a module's class for a subclass that adds its hooks
    only (`FSDPLinear(FSDPModule, Linear)`; Accelerate shards the LM head so, in a unit with the final norm)."""
    if isinstance(module, FSDPModule):
        return next(cls for cls in type(module).__mro__[1:] if not issubclass(cls, FSDPModule))
    return type(module)


@dataclass
class HeadScores:
    """What the head's forward returned in place of the logits: (B, T + 1, 1 or 2), the log-probs of the T completion tokens
    (0 where masked) and, with an entropy, the per-position entropy next to them; the last position's 0."""

    entropy_mode: str = "none"
    returned: torch.Tensor | None = None

    def read(self, output_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(log-probs (B, T), entropy (B, T) or None) read from what the model's forward handed back as its logits, so that
        the loss flows through the forward's output as it would through logits (DDP's output hooks see it); None when the
        forward changed the head's output (a model that scales or caps its logits): then the scores are not these."""
        returned = self.returned
        if returned is None or output_logits.shape != returned.shape:
            return None
        if output_logits is not returned:  # DDP hands back a clone: equal values, NaN included
            same = (output_logits == returned) | (output_logits.isnan() & returned.isnan())
            if not bool(same.all()):
                return None
        logps = output_logits[:, :-1, 0]
        if self.entropy_mode == "none":
            return logps, None
        entropy = output_logits[:, :-1, 1]
        return logps, entropy if self.entropy_mode == "grad" else entropy.detach()


def _chunk_scores(head: nn.Linear, hidden, ids, mask, settings: SamplingSettings, eos_token_id, truncate: bool, entropy: str, first_step: int):
    """The scores of one chunk of positions: hidden (B, c, H) -> log-probs (B, c) of ids, entropy (B, c) or None."""
    logits = F.linear(hidden, head.weight, head.bias)  # (B, c, V)
    logps, processed = logprobs_from_logits(logits, ids, mask, settings, eos_token_id, truncate, first_step=first_step)
    if entropy == "grad":
        return logps, token_entropy(processed)
    if entropy == "detached":
        with torch.no_grad():
            return logps, token_entropy(processed.detach())
    return logps, None


@contextmanager
def scored_in_head(model: nn.Module, head: nn.Linear, completion_ids: torch.Tensor, mask: torch.Tensor, settings: SamplingSettings,
                   eos_token_id: int | None, truncate: bool = True, entropy: str = "none", chunk_elements: int | None = None):
    """Within the block, `head` (`output_head(model)`) scores instead of projecting: called on the hidden states (B, T + 1, H)
    of the positions that predict the T completion tokens and the one after (`logits_to_keep` = T + 1, as `token_logprobs`),
    it returns the scores as (B, T + 1, 1 or 2) "logits" (`HeadScores`), which the model hands back as its output's logits:
    read them with the yielded `HeadScores.read`. chunk_elements:
    logits per chunk (default `CHUNK_ELEMENTS`, read at the call: 256 MiB of float32)."""
    if entropy not in ENTROPY_MODES:
        raise ValueError(f"entropy={entropy!r}: it must be one of {ENTROPY_MODES}")
    scores = HeadScores(entropy_mode=entropy)

    def forward(hidden):  # (B, T + 1, H)
        hidden = hidden[:, :-1]  # the last position predicts past the completion
        parts = position_chunks((hidden.shape[0], hidden.shape[1], head.out_features), chunk_elements or CHUNK_ELEMENTS)
        recompute = len(parts) > 1 and torch.is_grad_enabled()
        chunks = []
        for part in parts:
            args = (head, hidden[:, part], completion_ids[:, part], mask[:, part], settings, eos_token_id, truncate, entropy, part.start)
            chunks.append(checkpoint(_chunk_scores, *args, use_reentrant=False, preserve_rng_state=False) if recompute else _chunk_scores(*args))
        columns = [torch.cat([logps for logps, _ in chunks], dim=1)]  # (B, T)
        if entropy != "none":
            columns.append(torch.cat([ent for _, ent in chunks], dim=1))
        scores.returned = F.pad(torch.stack(columns, dim=-1), (0, 0, 0, 1))  # (B, T + 1, 1 or 2)
        return scores.returned

    with replaced_forwards([(head, forward)]):
        yield scores


def scores_in_head(model: nn.Module, completion_ids: torch.Tensor, mask: torch.Tensor, settings: SamplingSettings, eos_token_id: int | None,
                   truncate: bool, entropy: str, forward):
    """`forward()`, one call of `model` that returns (its output's logits, anything else), run with the head scoring
    (`scored_in_head`): ((log-probs (B, T), entropy (B, T) or None), the anything else). None where it does not apply
    (`output_head`) or where the forward changed what the head returned (then warned once); under sharding every process
    takes that None together, since the caller's whole-logits fallback is one more forward, a collective
    (`read_everywhere`)."""
    head = output_head(model)
    if head is None:
        return None
    with scored_in_head(model, head, completion_ids, mask, settings, eos_token_id, truncate, entropy) as scores:
        output_logits, rest = forward()
    read = read_everywhere(scores, output_logits, model)
    if read is None:
        warn_scored_whole(model)
        return None
    return read, rest


def completion_scores(model: nn.Module, batch: SampledBatch, settings: SamplingSettings, with_grad: bool, truncate: bool = True,
                      entropy: str = "none", in_head: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (B, T) of `batch`'s completion under the processed distribution (0 where masked) and, per `entropy`, the
    per-position entropy (B, T), from one forward of `model`: the policy's loss (with_grad, truncate; REINFORCE's entropy
    metric "detached") and the reference (no grad, truncate=False; see `sampling.token_logprobs` for why).

    in_head: score inside the LM head a chunk at a time (`scores_in_head`) where it applies; else, or off, from the
    whole logits (`sampling.token_logprobs`; no grad: `chunked_logprobs`). The same numbers either way."""
    if in_head:
        with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
            scored = scores_in_head(model, batch.completion_ids, batch.completion_mask, settings, batch.eos_token_id, truncate, entropy,
                                    lambda: (completion_forward(model, batch).logits, None))
        if scored is not None:
            return scored[0]
    if not with_grad and entropy == "none":
        return token_logprobs(model, batch, settings, with_grad=False, truncate=truncate, return_logits=False)
    logps, processed = token_logprobs(model, batch, settings, with_grad=with_grad, truncate=truncate)
    if entropy == "none":
        return logps, None
    return logps, chunked_token_entropy(processed.detach() if entropy == "detached" else processed)


def read_everywhere(scores: HeadScores, output_logits: torch.Tensor, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """`scores.read(output_logits)`, or None on every process when it is None on any: under sharding each forward is a
    collective, so the whole-logits fallback (one more forward) must be taken by every process or by none (a forward
    that changes the head's output could leave one process's values as they were by chance)."""
    read = scores.read(output_logits)
    agreed = all_finished(torch.tensor([read is not None], device=output_logits.device), is_sharded(unwrapped(model)))
    return read if agreed else None


_WARNED: set[type] = set()


def warn_scored_whole(model) -> None:
    """Once per model class: its forward changed what the head returned, so its completions were scored again from the whole logits."""
    kind = type(unwrapped(model))
    if kind not in _WARNED:
        _WARNED.add(kind)
        warnings.warn(f"{kind.__name__}'s forward changes its LM head's output: its completions are scored from the whole logits "
                      "(chunked_scoring saves nothing for this model)", stacklevel=3)

