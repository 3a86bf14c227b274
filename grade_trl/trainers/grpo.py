"""TRL's GRPOTrainer (GRPO, Dr. GRPO, CISPO, ...) used as it is, plus what every grade_trl method provides:
the grad-norm window, the metric contract's `kl` (per completion; TRL's own per-token `kl` is logged as
`kl_per_token`) and the public hooks of the method registry (`grade_trl.methods`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from trl import GRPOConfig as _TRLGRPOConfig
from trl import GRPOTrainer as _TRLGRPOTrainer

from ..metrics import KL, KL_PER_TOKEN
from ..models import resolve_model_path
from ..rewards.base import AsyncCheckedReward, CheckedReward
from .base import ReadableSavesMixin, TiedWeightsLoadMixin
from .base_config import DDP_FIND_UNUSED_HELP
from .metrics import GradNormWindowMixin

logger = logging.getLogger(__name__)


@dataclass
class GRPOConfig(_TRLGRPOConfig):
    """`trl.GRPOConfig`, every field and default unchanged, plus the sizes the registry's config contract reads.

    `beta` keeps TRL's meaning: the coefficient of the per-token KL in the per-token loss. One default differs:
    `ddp_find_unused_parameters` is False (Trainer's: True), as for every grade_trl method (see its help).
    """

    ddp_find_unused_parameters: bool | None = field(default=False, metadata={"help": DDP_FIND_UNUSED_HELP})

    def __post_init__(self):
        # two settings TRL accepts without a word that undo what the user meant (for recipes and library use alike)
        if isinstance(self.generation_kwargs, dict) and "min_new_tokens" in self.generation_kwargs:
            logger.warning(
                "generation_kwargs.min_new_tokens: TRL samples with the EOS ban but scores log-probs without it, so a policy "
                "that wants to stop early gets huge KL and importance ratios (the users' negative/exploding KL); "
                "use eval_min_new_tokens to equalise evaluation lengths instead"
            )
        if self.loss_type == "cispo" and self.epsilon_high is None:
            logger.warning(
                "loss_type cispo without epsilon_high: TRL then clamps the importance ratio at epsilon (%s), which clips "
                "every on-policy ratio; set epsilon_high explicitly (TRL's CISPO clamps the ratio at epsilon_high itself, "
                "recommended 5.0)", self.epsilon
            )
        super().__post_init__()

    @property
    def new_token_limits(self) -> tuple[int, int]:
        return self.max_completion_length, 0  # TRL samples with no minimum length

    @property
    def new_token_limit_key(self) -> str:
        return "max_completion_length"

    @property
    def completions_per_prompt(self) -> int:
        return self.num_generations

    @classmethod
    def exact_length_settings(cls, new_tokens: int) -> dict:
        """Every completion exactly `new_tokens` long. Only for cost measurements: TRL samples with generation_kwargs'
        EOS ban but scores log-probs without it (see the warning in `grade_trl.recipe`)."""
        return {"max_completion_length": new_tokens, "generation_kwargs": {"min_new_tokens": new_tokens}}

    def completions_per_step(self, num_processes: int) -> float:
        """TRL's batch counts completions; each generation batch is reused for `num_iterations` optimizer passes."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * num_processes / self.num_iterations


def checked(func):
    """A plain reward callable with our checks: `CheckedReward`, or `AsyncCheckedReward` for one TRL would await
    (its `is_async_callable`: a coroutine function, a partial of one, an object with an async `__call__`). TRL's own
    forms (a hub id, a model) and a reward already wrapped are left as they are."""
    from trl.trainer.utils import is_async_callable

    if not callable(func) or isinstance(func, (str, torch.nn.Module, CheckedReward)):
        return func
    return AsyncCheckedReward(func) if is_async_callable(func) else CheckedReward(func)


class GRPOTrainer(ReadableSavesMixin, TiedWeightsLoadMixin, GradNormWindowMixin, _TRLGRPOTrainer):
    """`trl.GRPOTrainer`, unchanged in what it optimises, with grad_norm_mean/std/max over each logging window,
    `kl` in nats per completion, and the registry's hooks (`estimate_loss`, `probed_parameters`, training state)."""

    def __init__(self, model, reward_funcs, *args, **kwargs):
        if model == "embedded":  # the bundled tiny model, as our trainers take it (TRL would look it up on the hub)
            model = resolve_model_path(model)
        # Our reward checks (exceptions, None, NaN, inf -> one line naming the function and sample) on every plain
        # callable; TRL's own model-id / model rewards are left to TRL.
        if reward_funcs is not None:
            funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
            reward_funcs = [checked(f) for f in funcs]
        super().__init__(model, reward_funcs, *args, **kwargs)

    # -- the metric contract: kl per completion -----------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        """TRL's loss; afterwards its per-token `kl` of this micro-batch (sum of KL / number of tokens over every
        process) is turned into nats per completion exactly: times the micro-batch's tokens / completions."""
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]  # a defaultdict(list): reading a key that TRL never fills would log it as None
        before = len(metrics[KL]) if KL in metrics else 0
        loss = super()._compute_loss(model, inputs)
        if KL in metrics and len(metrics[KL]) > before:  # TRL logs kl only when beta != 0
            kl_logs = metrics[KL]
            mask = inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]  # TRL's mask
            tokens, completions = self.accelerator.reduce(torch.stack([mask.sum().float(), torch.tensor(float(mask.shape[0]), device=mask.device)]), reduction="sum").tolist()
            self._metrics[mode][KL_PER_TOKEN].append(kl_logs[-1])
            kl_logs[-1] = kl_logs[-1] * tokens / max(completions, 1.0)
        return loss

    # -- the registry's hooks -----------------------------------------------------------------------------------
    def estimate_loss(self, rows: list[dict], include_value_loss: bool = False) -> torch.Tensor:
        """One draw of GRPO's gradient estimate on `rows`: `num_generations` fresh completions per prompt, scored
        and turned into group advantages by TRL, then TRL's loss at the sampling parameters (ratio 1), as one
        micro-batch holding the whole batch (the caller sets `current_gradient_accumulation_steps = 1`)."""
        batch = self._generate_and_score_completions([dict(row) for row in rows for _ in range(self.num_generations)])
        return self.compute_loss(self.model, batch)

    def probed_parameters(self, include_value_loss: bool = False) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def training_state(self) -> dict:
        """What a loss call may change besides the parameters: TRL's metric windows and completion logs, our grad-norm
        window, and TRL's buffered generations with the micro-step counter that indexes them (for a resume)."""
        return {
            "_metrics": self._metrics,
            "_logs": self._logs,
            "_pending_extra_logs": self._pending_extra_logs,
            "_step": self._step,
            "_buffered_inputs": self._buffered_inputs,
            **GradNormWindowMixin.training_state(self),
        }

    def load_training_state(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value)
