"""PPO for language models: a value head, GAE over KL-shaped per-token rewards, the clipped surrogate.

One rollout, top to bottom (`_generate_rollout`, no gradients):
  1. tokenize the prompts; sample completions from the causal LM with the processed distribution
     (temperature, EOS ban before `min_new_tokens`, top-k, top-p: `core.sampling`);
  2. score the decoded completions with every reward callable (TRL's signature), weighted;
  3. old log-probs: the sampler's own (exactly the behaviour policy's processed distribution); values: the
     value head on the last layer's states the sampler produced; reference log-probs (temperature and EOS ban
     only, `truncate=False`). No second forward of the policy;
  4. per-token reward r_t = -kl_coef * KL_t, plus the sequence score on the last real token
     (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593);
  5. GAE advantages and returns (`core.gae`); advantages whitened over the rollout's real tokens.
Then each Trainer micro-step takes one shuffled mini-batch of the rollout (`compute_loss`):
  6. new log-probs and values from one forward; loss = `ppo_loss` (clipped surrogate + value loss
     - entropy bonus); after the rollout's last mini-batch the KL coefficient is adapted.

How the rollout fits `transformers.Trainer` (as TRL's GRPOTrainer buffers its generations):
  * `RepeatRolloutSampler` yields every *global* batch of prompt indices (`per_device_train_batch_size
    * world size`) `ppo_epochs * num_mini_batches` times in a row. Accelerate shards each repeat the
    same way, so every process receives the same prompts on each of those micro-steps.
  * `_prepare_inputs` generates a rollout at the first micro-step of each block (and after a resume
    that lands inside a block), buffers it, and otherwise ignores the prompts it is handed: it
    returns the next mini-batch of the buffer (rows shuffled once per epoch by a seeded generator).
  * Trainer does the rest: the optimizer steps every `gradient_accumulation_steps` micro-steps, so
    `max_steps` counts mini-batch updates (as in CleanRL), not rollouts.

Legend: B completions in a rollout (per process), M in a mini-batch, P prompt length (left-padded),
T completion length, V vocabulary, H hidden size.
"""

from __future__ import annotations

import json
import logging
import os

import safetensors.torch
import torch
from torch import nn
from torch.utils.data import Sampler
from transformers.trainer import TRAINING_ARGS_NAME

from ..core import (
    AdaptiveKLController,
    FixedKLController,
    completion_scores,
    explained_variance,
    gae,
    masked_mean,
    masked_sum,
    masked_whiten,
    penalty_and_logged_kl,
    ppo_clip_loss,
    logprobs_from_logits,
    sample,
    scores_in_head,
    token_entropy,
    value_loss,
)
from ..core.sampling import SamplingSettings, chunked_token_entropy
from ..core.sharding import gathered
from ..core.soft_rollout import last_positions, position_ids_from_mask
from ..models import resolve_model_path
from ..rewards.base import combine_scores
from .base import RolloutTrainer
from .ppo_config import PPOConfig

logger = logging.getLogger(__name__)

VALUE_HEAD_NAME = "value_head.safetensors"
KL_CONTROLLER_NAME = "kl_controller.json"  # the adapted KL coefficient, restored on resume


# ---------------------------------------------------------------- the loss


def ppo_loss(
    logps: torch.Tensor,
    values: torch.Tensor,
    entropy: torch.Tensor,
    old_logps: torch.Tensor,
    old_values: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange: float,
    cliprange_value: float | None,
    vf_coef: float,
    ent_coef: float,
    logratio_clamp: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO loss on one mini-batch (Schulman et al. 2017, https://arxiv.org/abs/1707.06347, eqs. 7 and 9),
    with the advantages of KL-shaped per-token rewards (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593):

        log rho_t = clamp(log pi(y_t) - log pi_old(y_t), -c, c)                      c = logratio_clamp
        L_clip    = masked_mean(max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)))  eps = cliprange
        L_V       = 0.5 masked_mean((V_t - R_t)^2)                                   cliprange_value None
                  = 0.5 masked_mean(max((V_t - R_t)^2, (V_old + clip(V_t - V_old, -e_v, e_v) - R_t)^2))  otherwise
        H         = masked_mean(entropy_t)
        loss      = L_clip + vf_coef * L_V - ent_coef * H

    The clamp keeps a token that has left the top-p nucleus (log-prob ~ finfo.min/2) from giving an
    infinite ratio; outside [-c, c] the ratio carries no gradient. Token means are taken over all real
    tokens of the mini-batch (masked means, docs/background.md section 2).

    logps, values, entropy: (M, T) from the current model (with grad; entropy of the processed
    distribution at each position). old_logps, old_values, advantages, returns: (M, T) from the
    rollout, treated as constants. mask: (M, T) completion mask. Returns (loss, detached scalar stats).
    """
    # ppo_clip_loss only sees the difference logps - old_logps: give it the clamped log-ratio against 0, which is
    # exact even where old_logps ~ finfo.min/2 (old_logps + clamped difference would round back to old_logps).
    log_ratio = torch.clamp(logps - old_logps.detach(), -logratio_clamp, logratio_clamp)  # (M, T)
    pg_loss, pg_stats = ppo_clip_loss(log_ratio, torch.zeros_like(log_ratio), advantages, mask, clip=cliprange)
    vf_loss, vf_stats = value_loss(values, old_values, returns, mask, clip=cliprange_value)
    mean_entropy = masked_mean(entropy, mask)
    loss = pg_loss + vf_coef * vf_loss - ent_coef * mean_entropy
    stats = {
        "loss/policy": pg_loss.detach(),
        "loss/value": vf_loss.detach(),
        "loss/total": loss.detach(),
        "policy/approxkl": pg_stats["approxkl"],
        "policy/clipfrac": pg_stats["clipfrac"],
        "policy/ratio_mean": pg_stats["ratio_mean"],
        "entropy": mean_entropy.detach(),
        "value/error": vf_stats["value_error"],
        "value/clipfrac": vf_stats["vf_clipfrac"],
        "value/mean": masked_mean(values.detach(), mask),
    }
    return loss, stats


def shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards r_t = -kl_coef * KL_t, plus the sequence score on the last real token (Ziegler et al. 2019).

    scores: (B,); kl, mask: (B, T) with right padding. Returns (B, T), 0 where masked.
    """
    rewards = -kl_coef * kl * mask  # (B, T)
    last = (mask.sum(1).long() - 1).clamp(min=0)  # (B,) index of the last real token
    return rewards.scatter_add(1, last.unsqueeze(1), scores.unsqueeze(1).to(rewards.dtype))


# ---------------------------------------------------------------- the model


class PolicyWithValueHead(nn.Module):
    """The causal LM (`.policy`) plus a scalar value head on its last hidden state.

    `forward` returns (logits (B, L, V), values (B, L)) from ONE call, so a DistributedDataParallel
    wrapper sees a single forward per micro-step. The value head is zero-initialised: every value
    starts at 0, and since its weights are 0 the value loss sends no gradient into the shared body
    before the head has learned something (the head's own gradient, hidden * error, is not 0).
    The head is kept and computed in float32 whatever the policy's dtype.
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.config.hidden_size, 1, dtype=torch.float32)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.value_head.to(next(policy.parameters()).device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, logits_to_keep: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, output_hidden_states=True, use_cache=False, logits_to_keep=logits_to_keep)
        hidden = out.hidden_states[-1]  # (B, L, H) after the final layer norm
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)  # (B, L)
        return out.logits, values

    @property
    def config(self):
        return self.policy.config

    def get_input_embeddings(self) -> nn.Module:
        return self.policy.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        """The LM head. Accelerate's FSDP2 layout needs both ends to see a tie: with the input embedding alone it made
        E a unit of its own while the tied LM head stayed in the root, one parameter in two FSDP groups, which torch
        >= 2.13 refuses at the first forward (found under fsdp2.yaml on 2 CPU processes, tests/test_sharded.py)."""
        return self.policy.get_output_embeddings()

    def generate(self, *args, **kwargs):
        """The causal LM's `generate` (the evaluation callback generates through whatever model the Trainer holds);
        under FSDP2 with this wrapper's own parameters gathered (core/sharding.py: `gathered`)."""
        with gathered(self):
            return self.policy.generate(*args, **kwargs)

    @property
    def _no_split_modules(self):
        """The policy's transformer-block class names, which Accelerate's FSDP2 auto-wrap reads from the model it prepares
        (`fsdp2_prepare_model`). Without them it made the whole body one unit (the root), gathered whole from forward to
        backward; until 2026-12-07 every PPO run under fsdp2.yaml was sharded so (then, with the frozen reference prepared
        first, the block class it set on the shared plugin made PPO's blocks units too, but not with LoRA)."""
        return getattr(self.policy, "_no_split_modules", None)

    @property
    def supports_gradient_checkpointing(self) -> bool:
        return getattr(self.policy, "supports_gradient_checkpointing", False)

    # Read by Trainer when it resumes from a checkpoint (see `PPOTrainer._load_from_checkpoint`).
    @property
    def _keys_to_ignore_on_save(self):
        return getattr(self.policy, "_keys_to_ignore_on_save", None)

    def tie_weights(self):
        self.policy.tie_weights()

    def activation_checkpointing_enable(self, **kwargs):
        """`TrainingArguments.activation_checkpointing` (formerly `gradient_checkpointing`) acts on the causal LM."""
        self.policy.activation_checkpointing_enable(**kwargs)


def completion_forward(model: nn.Module, prompt_ids, prompt_mask, completion_ids, completion_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of a `PolicyWithValueHead` (or its DDP wrapper) on prompt + completion.

    Returns (logits (B, T + 1, V), values (B, T)): the logits of the positions that predict each completion token and
    the one after it (computed for those positions only); the values of the states before each token is chosen.
    """
    attention_mask = torch.cat([prompt_mask.long(), completion_mask.long()], dim=1)  # (B, P+T)
    num_completion = completion_ids.shape[1]
    logits, values = model(
        input_ids=torch.cat([prompt_ids, completion_ids], dim=1), attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=last_positions(num_completion + 1, attention_mask.shape[1], attention_mask.device),
    )
    return logits, values[:, -num_completion - 1 : -1]


def scores_and_values(model: nn.Module, prompt_ids, prompt_mask, completion_ids, mask, settings: SamplingSettings, eos_token_id: int | None,
                      entropy_grad: bool, in_head: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 6's one forward: log-probs (B, T) of the sampled tokens under the policy's processed distribution (the
    sampler's processing, truncate=True; 0 where masked), per-position entropy (B, T) (with its gradient when
    `entropy_grad`: the bonus) and values (B, T). in_head: scored inside the LM head a chunk of positions at a time
    (core/head_scoring.py: `chunked_scoring`) where that applies; else from the whole logits. The same numbers."""
    if in_head:
        scored = scores_in_head(model, completion_ids, mask, settings, eos_token_id, truncate=True, entropy="grad" if entropy_grad else "detached",
                                forward=lambda: completion_forward(model, prompt_ids, prompt_mask, completion_ids, mask))
        if scored is not None:
            (logps, entropy), values = scored
            return logps, entropy, values
    logits, values = completion_forward(model, prompt_ids, prompt_mask, completion_ids, mask)
    logps, processed = logprobs_from_logits(logits[:, :-1], completion_ids, mask, settings, eos_token_id, truncate=True)
    entropy = token_entropy(processed) if entropy_grad else chunked_token_entropy(processed.detach())
    return logps, entropy, values


# ---------------------------------------------------------------- the sampler


class RepeatRolloutSampler(Sampler[int]):
    """Indices of the training prompts, each global batch repeated `repeat_count` times in a row.

    A global batch is `global_batch_size` = `per_device_train_batch_size * world size` indices. The
    Trainer's batch sampler cuts it into world-size per-process batches and Accelerate gives process i
    the i-th, so on every repeat each process receives the same prompts: the repeats are the micro-steps
    that consume one rollout. A last partial global batch is dropped. Shuffling uses its own seeded
    generator (identical on every process), a new permutation per pass over the data (seeded by seed + pass).

        global_batch_size=4, repeat_count=2, no shuffle:  0 1 2 3 0 1 2 3 4 5 6 7 4 5 6 7 ...
    """

    def __init__(self, num_samples: int, global_batch_size: int, repeat_count: int, shuffle: bool = True, seed: int = 0):
        if num_samples < global_batch_size:
            raise ValueError(
                f"the training set has {num_samples} prompts, fewer than one rollout needs (per_device_train_batch_size x "
                f"processes = {global_batch_size}); add prompts or lower per_device_train_batch_size"
            )
        self.num_samples, self.global_batch_size, self.repeat_count, self.shuffle = num_samples, global_batch_size, repeat_count, shuffle
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Trainer calls this before each pass: the permutation depends on (seed, epoch) only, so a resumed run that
        skips the passes already trained sees the same order as a run that was never stopped."""
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist() if self.shuffle else list(range(self.num_samples))
        for start in range(0, len(self) // self.repeat_count, self.global_batch_size):
            batch = order[start : start + self.global_batch_size]
            for _ in range(self.repeat_count):
                yield from batch

    def __len__(self) -> int:
        return (self.num_samples // self.global_batch_size) * self.global_batch_size * self.repeat_count


# ---------------------------------------------------------------- the trainer


class PPOTrainer(RolloutTrainer):
    """PPO trainer. The constructor mirrors `trl.GRPOTrainer`'s (see `RolloutTrainer`); any TRL-style reward
    callable works (non-differentiable ones included).

    `self.model` is a `PolicyWithValueHead`; the reference is the frozen copy of the causal LM made before
    the value head is added (or, with LoRA, the same LM with its adapters disabled). `save_model` writes the
    causal LM (loadable with `AutoModelForCausalLM.from_pretrained`), the tokenizer and `value_head.safetensors`.

    `target_kl` early stopping: once a mini-batch's approximate KL to the rollout policy (averaged over
    processes, so all agree) exceeds `target_kl`, every later mini-batch of that rollout returns
    `0 * loss`: the forward and backward still run (so DDP's gradient all-reduce stays in step on every
    process) but the gradients are 0. The optimizer step of such a micro-step still happens: AdamW
    moves the weights along its momentum for a few steps, and the LR schedule advances.
    """

    _tag_names = ["trl", "ppo", "grade_trl"]
    config_class = PPOConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        a = self.args
        # the folder the policy came from (a path given, or the loaded model's `_name_or_path`: the runner's way), when
        # `save_model` wrote it: its trained value head, as TRL's value-head models load theirs from a saved folder
        model = kwargs.get("model", args[0] if args else None)
        folder = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", None)
        if folder and os.path.isdir(resolve_model_path(folder)):  # a local folder only: a hub id is never read as a relative path
            self.load_saved_value_head(resolve_model_path(folder))
        self.kl_ctl = AdaptiveKLController(a.init_kl_coef, a.kl_target, a.kl_horizon) if a.adaptive_kl else FixedKLController(a.init_kl_coef)
        self._rollout: dict | None = None  # the buffer: the current rollout and its mini-batch schedule
        self._micro_step: int | None = None  # training micro-steps served, counted from the (resumed) global step
        self._shuffle_generator = torch.Generator().manual_seed(a.seed)

    def wrap_model(self, model):
        return PolicyWithValueHead(model)

    def load_saved_value_head(self, folder: str) -> None:
        """The value head saved beside a causal LM (`value_head.safetensors`, `_save`) into this trainer's, when the
        folder has one: a PPO run continued from a saved model starts from its critic, not from zero (a user trial
        found it dropped). A folder without one (any other causal LM) keeps the zero-initialised head."""
        head_file = os.path.join(folder, VALUE_HEAD_NAME)
        if os.path.isfile(head_file):
            self.accelerator.unwrap_model(self.model).value_head.load_state_dict(safetensors.torch.load_file(head_file, device="cpu"))
            logger.info("value head loaded from %s", head_file)

    def train(self, *args, **kwargs):
        self._rollout, self._micro_step = None, None  # a new (or resumed) run re-aligns the buffer with the sampler
        return super().train(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None) -> Sampler:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return RepeatRolloutSampler(
            num_samples=len(dataset),
            global_batch_size=self.args.per_device_train_batch_size * self.accelerator.num_processes,
            repeat_count=self.args.micro_steps_per_rollout,
            shuffle=True,
            seed=self.args.seed,
        )

    # Rollout ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _generate_rollout(self, inputs) -> dict:
        """Sample, score and compute advantages for one batch of prompts (steps 1-5 of the module docstring)."""
        args, tok = self.args, self.processing_class
        settings, eos = args.sampling, tok.eos_token_id
        module = self.accelerator.unwrap_model(self.model)
        was_training = module.training
        module.eval()  # dropout is already 0; eval also keeps gradient checkpointing from turning the KV cache off

        # 1. sample from the causal LM itself (no DDP sync needed under no_grad), keeping the last layer's states
        enc = self.tokenize_prompts(inputs)
        with gathered(module):  # FSDP2: the wrapper's own parameters, which sampling from .policy reads outside its forward
            batch = sample(module.policy, enc["input_ids"], enc["attention_mask"], settings, eos, tok.pad_token_id, return_hidden=True)
        mask = batch.completion_mask  # (B, T)

        # 2. rewards on the decoded text
        scores = self.sampled_text_scores(inputs, batch)  # (B, F)
        score = combine_scores(scores, self.reward_weights)  # (B,) over the functions that apply to each sample

        # 3. old policy and values: the sampler's own log-probs (exactly the behaviour policy's, processed as it sampled)
        # and the value head on the states that predicted each token, so no second forward of the policy; reference
        old_logps = batch.logprobs  # (B, T), 0 where masked
        ref_model, ref_context = self.reference_context(module.policy)
        # FSDP2: the value head, and with LoRA the reference (then `.policy` itself), read the wrapper's own parameters
        with gathered(module):
            values = module.value_head(batch.hidden.to(module.value_head.weight.dtype)).squeeze(-1) * mask  # (B, T)
            with ref_context():
                ref_logps, _ = completion_scores(ref_model, batch, settings, with_grad=False, truncate=False, in_head=args.chunked_scoring)  # (B, T)
        module.train(was_training)

        # 4. KL-shaped per-token rewards. The KL uses the sampler's own log-probs: exactly the distribution the tokens
        # were drawn from, finite for every sampled token (a full forward can differ by float noise at the nucleus edge).
        # The penalty is kl_estimator's, the logged KL (which the adaptive controller follows) k1's (penalty_and_logged_kl).
        kl_penalty, kl_logged = penalty_and_logged_kl(batch.logprobs, ref_logps, args.kl_estimator)  # (B, T) each
        kl_penalty = kl_penalty * mask
        kl_coef = float(self.kl_ctl.value)
        rewards = shaped_rewards(score, kl_penalty, mask, kl_coef)  # (B, T)

        # 5. GAE; whitening over this process's real tokens
        advantages, returns = gae(rewards, values, mask, args.gamma, args.lam)  # (B, T), (B, T)
        raw_advantages = advantages
        if args.whiten_advantages:
            advantages = masked_whiten(advantages, mask)

        b_kl_penalty = masked_sum(kl_penalty, mask, dim=1)  # (B,) per-sequence KL, the penalty's estimate
        b_kl = masked_sum(kl_logged, mask, dim=1)  # (B,) per-sequence KL, logged
        metrics = self._gathered(
            {
                "reward": score,
                "kl": b_kl,
                "objective/entropy": masked_sum(-batch.logprobs, mask, dim=1),  # sampled estimate of the sequence entropy
                "objective/non_score_reward": -kl_coef * b_kl_penalty,  # what the rewards were shaped with
                "objective/rlhf_reward": score - kl_coef * b_kl_penalty,
                "returns/mean": masked_mean(returns, mask),
                "advantages/mean": masked_mean(raw_advantages, mask),  # before whitening (after it, the mean is 0)
                "value/explained_variance": explained_variance(values, returns, mask),
                "completions/mean_length": batch.lengths,
            }
        )
        function_means = self.reward_function_means(scores)  # each over the samples it scored, added with the rollout's metrics
        # the rewards' own log_metric values: into the window of the mode the rollout was asked in, once per rollout,
        # weighted as the rollout's other metrics, which each of its epochs adds
        repeats, window = (args.ppo_epochs, self._metrics["train"]) if was_training else (1, self._metrics["eval"])
        self.log_reward_metrics(self.global_count(score.shape[0]) * repeats, window)
        metrics["reward_std"] = self.gathered_std(score)
        metrics["kl_per_token"] = self.gathered_sum(b_kl) / max(self.gathered_sum(batch.lengths), 1.0)
        metrics["kl_coef"] = kl_coef  # the coefficient that shaped this rollout's rewards
        return {
            "b_prompt_ids": batch.prompt_ids,
            "b_prompt_mask": batch.prompt_mask,
            "b_completion_ids": batch.completion_ids,
            "b_mask": mask,
            "b_logps": old_logps,
            "b_values": values,
            "b_advantages": advantages,
            "b_returns": returns,
            "metrics": metrics,
            "reward_function_means": function_means,
            "mean_kl": metrics["kl"],
            "early_stopped": False,
            "order": None,  # this epoch's row permutation
        }

    def _gathered(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """Mean of each tensor over its elements and over every process, with one all-gather."""
        local = torch.stack([v.detach().float().mean() for v in values.values()])  # (K,)
        means = self.accelerator.gather(local.unsqueeze(0)).mean(0)  # (K,); each process holds the same number of rows
        return dict(zip(values.keys(), means.tolist()))

    # Buffer -------------------------------------------------------------------------------------------------
    def _prepare_inputs(self, inputs):
        """Training: generate at the start of each rollout block, otherwise serve the buffer's next mini-batch."""
        if not self.model.training:
            return inputs  # evaluation: `compute_loss` scores a fresh rollout as one batch
        args = self.args
        if self._micro_step is None:  # first call of this run (or after a resume): align with the sampler's blocks
            self._micro_step = self.state.global_step * args.gradient_accumulation_steps
        position = self._micro_step % args.micro_steps_per_rollout
        if position == 0 or self._rollout is None:
            self._rollout = self._generate_rollout(inputs)
        index = position % args.num_mini_batches  # mini-batch within the current epoch over the rollout
        rollout = self._rollout
        if index == 0 or rollout["order"] is None:  # a new epoch: a new permutation of the rollout's rows
            rollout["order"] = torch.randperm(rollout["b_mask"].shape[0], generator=self._shuffle_generator)
        size = args.mini_batch_size
        rows = rollout["order"][index * size : (index + 1) * size].to(rollout["b_mask"].device)
        self._micro_step += 1
        return {"rollout": rollout, "rows": rows, "last": position == args.micro_steps_per_rollout - 1}

    # Loss ---------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        training = self.model.training
        if isinstance(inputs, list):  # evaluation (prediction_step hands the prompts): one rollout, scored whole
            rollout = self._generate_rollout(inputs)
            inputs = {"rollout": rollout, "rows": torch.arange(rollout["b_mask"].shape[0], device=rollout["b_mask"].device), "last": False}
        rollout = inputs["rollout"]
        loss, stats = self.minibatch_loss(model, rollout, inputs["rows"], args.vf_coef)

        skipped = training and rollout["early_stopped"]
        if skipped:
            loss = 0.0 * loss  # stays connected to the graph: every process still runs backward and the all-reduce
        elif training and args.target_kl is not None and stats["policy/approxkl"] > args.target_kl:
            rollout["early_stopped"] = True  # this update is kept; the rest of the rollout is skipped (CleanRL)

        self.metrics.add(self.global_count(len(inputs["rows"])), **rollout["metrics"], **stats, **{"policy/early_stopped": float(skipped)})
        self.add_reward_function_means(rollout.get("reward_function_means", {}), len(inputs["rows"]) / rollout["b_mask"].shape[0])
        if training and inputs["last"]:  # after the rollout's epochs: adapt the KL coefficient for the next rollout
            self.kl_ctl.update(rollout["mean_kl"], args.per_device_train_batch_size * self.accelerator.num_processes)
        return loss

    def minibatch_loss(self, model, rollout: dict, rows: torch.Tensor, vf_coef: float) -> tuple[torch.Tensor, dict[str, float]]:
        """Step 6 on the rollout's `rows`: one forward for log-probs and values, then `ppo_loss`. Returns (loss, gathered stats)."""
        args = self.args
        mb = {key: value[rows] for key, value in rollout.items() if key.startswith("b_")}  # b_* -> this mini-batch's rows
        mb_mask = mb["b_mask"]  # (M, T)
        mb_logps, mb_entropy, values = scores_and_values(  # (M, T) each; the entropy is in the loss only with an entropy bonus
            model, mb["b_prompt_ids"], mb["b_prompt_mask"], mb["b_completion_ids"], mb_mask, args.sampling, self.processing_class.eos_token_id,
            entropy_grad=args.ent_coef != 0, in_head=args.chunked_scoring,
        )
        loss, stats = ppo_loss(
            mb_logps, values, mb_entropy, mb["b_logps"], mb["b_values"], mb["b_advantages"], mb["b_returns"], mb_mask,
            cliprange=args.cliprange, cliprange_value=args.cliprange_value, vf_coef=vf_coef, ent_coef=args.ent_coef,
            logratio_clamp=args.logratio_clamp,
        )
        return loss, self._gathered(stats)

    # The registry's hooks -----------------------------------------------------------------------------------
    def estimate_loss(self, rows: list[dict], include_value_loss: bool = False) -> torch.Tensor:
        """One draw of PPO's policy-gradient estimate on `rows`: a fresh rollout, then the loss on all of its rows as one
        mini-batch at the rollout's parameters (ratio 1, nothing clipped: the policy gradient with GAE advantages).
        The value loss counts only with `include_value_loss`; the entropy bonus is in."""
        rollout = self._generate_rollout(rows)
        all_rows = torch.arange(rollout["b_mask"].shape[0], device=rollout["b_mask"].device)
        loss, stats = self.minibatch_loss(self.model, rollout, all_rows, self.args.vf_coef if include_value_loss else 0.0)
        self.metrics.add(self.global_count(len(all_rows)), **rollout["metrics"], **stats)
        self.add_reward_function_means(rollout.get("reward_function_means", {}))
        return loss

    def probed_parameters(self, include_value_loss: bool = False) -> list[torch.nn.Parameter]:
        """The causal LM's trainable parameters, plus the value head's with `include_value_loss`."""
        module = self.model if include_value_loss else self.accelerator.unwrap_model(self.model).policy
        return [p for p in module.parameters() if p.requires_grad]

    def training_state(self) -> dict:
        """Besides the base's: the KL controller, the rollout buffer (a checkpoint may fall inside a rollout's block of
        mini-batch steps) and the mini-batch shuffle generator."""
        return {**super().training_state(), "kl_ctl": self.kl_ctl, "_rollout": self._rollout, "_shuffle_generator": self._shuffle_generator}

    # Saving -------------------------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The causal LM (save_pretrained) and the tokenizer, loadable with `AutoModelForCausalLM.from_pretrained`,
        plus the value head as `value_head.safetensors` and the current KL coefficient as `kl_controller.json`."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        module = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        policy_state = head_state = None
        if state_dict is not None:  # handed by DeepSpeed/FSDP: split the wrapper's keys
            policy_state = {k.removeprefix("policy."): v for k, v in state_dict.items() if k.startswith("policy.")}
            head_state = {k.removeprefix("value_head."): v for k, v in state_dict.items() if k.startswith("value_head.")}
        module.policy.save_pretrained(output_dir, state_dict=policy_state)
        head_state = head_state or module.value_head.state_dict()
        safetensors.torch.save_file(
            {k: v.detach().contiguous().cpu() for k, v in head_state.items()}, os.path.join(output_dir, VALUE_HEAD_NAME), metadata={"format": "pt"}
        )
        with open(os.path.join(output_dir, KL_CONTROLLER_NAME), "w") as f:
            json.dump({"kl_coef": float(self.kl_ctl.value)}, f)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Resume: the causal LM through Trainer's loader (full weights or adapters), the value head, the KL coefficient.
        Under FSDP, Trainer's checkpoint (`pytorch_model_fsdp*`) holds the whole wrapper, value head included, under
        the wrapper's keys, and its loader sets them into the wrapper's shards: the wrapper is loaded, not `.policy`
        (whose keys lack the `policy.` prefix: a KeyError, found resuming under fsdp2.yaml on 2 CPU processes)."""
        model = model if model is not None else self.model
        if self.is_fsdp_enabled:
            super()._load_from_checkpoint(resume_from_checkpoint, model=model)  # the wrapper, value head included
        else:
            module = self.accelerator.unwrap_model(model)
            super()._load_from_checkpoint(resume_from_checkpoint, model=module.policy)
            head_file = os.path.join(resume_from_checkpoint, VALUE_HEAD_NAME)
            if os.path.isfile(head_file):
                module.value_head.load_state_dict(safetensors.torch.load_file(head_file, device="cpu"))
            else:
                logger.warning(f"{head_file} not found: the value head starts from zero")
        controller_file = os.path.join(resume_from_checkpoint, KL_CONTROLLER_NAME)
        if os.path.isfile(controller_file):
            with open(controller_file) as f:
                self.kl_ctl.value = json.load(f)["kl_coef"]

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)
