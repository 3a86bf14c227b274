"""Settings every grade_trl trainer shares (GRADE, REINFORCE, PPO): a `TrainingArguments` subclass."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments


@dataclass
class RolloutConfig(TrainingArguments):
    """`TrainingArguments` plus what every method that generates from prompts needs.

    Defaults follow the GRADE experiment (arXiv:2601.11574; ../shared/docs/BACKGROUND.md section 1):
    batch 4 x accumulation 4, clip 1.0, 32-token prompts, 16-48 new tokens, KL coefficient 0.1.
    Fields that differ from `TrainingArguments`: `per_device_train_batch_size` (4 instead of 8),
    `gradient_accumulation_steps` (4 instead of 1), `logging_steps` (10 instead of 500), `eval_steps`
    (100 instead of None: the reward-evaluation callback's period), `save_strategy` ("no": the runner
    saves the final model itself), `report_to` ("none").
    """

    # Overridden TrainingArguments defaults
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Prompts per device per micro-batch (GRADE experiment: 4)."})
    gradient_accumulation_steps: int = field(default=4, metadata={"help": "Micro-batches per optimizer step (GRADE experiment: 4, so 16 prompts per step)."})
    logging_steps: float = field(default=10, metadata={"help": "Optimizer steps between two logged metric windows."})
    eval_steps: float | None = field(default=100, metadata={"help": "Optimizer steps between two validation-reward evaluations (GRADE experiment: 100)."})
    save_strategy: str = field(default="no", metadata={"help": "Checkpoint saving strategy; the runner writes the final model to {output_dir}/model."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Trackers to report to (`wandb`, `tensorboard`, `trackio`, `all`, `none`)."})

    # Model
    model_init_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Keyword arguments for `AutoModelForCausalLM.from_pretrained` when `model` is a hub id or path "
                  "(dtype defaults to float32, as in the GRADE experiment)."},
    )

    # Generation
    max_prompt_length: int = field(default=32, metadata={"help": "Prompts are cut to this many tokens (GRADE experiment: 32)."})
    max_new_tokens: int = field(default=48, metadata={"help": "Tokens generated per prompt at most (GRADE experiment: 16 to 48)."})
    min_new_tokens: int = field(default=16, metadata={"help": "EOS is forbidden before this many new tokens, in sampling and in every log-prob and KL alike."})

    # Objective
    beta: float = field(default=0.1, metadata={"help": "KL coefficient: the reward is penalised by beta * KL(pi || pi_ref) (GRADE experiment: 0.1)."})
    reward_weights: list[float] | None = field(default=None, metadata={"help": "Weight of each reward function in the total reward (default: 1 for each)."})

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.min_new_tokens <= self.max_new_tokens or self.max_new_tokens < 1:
            raise ValueError(
                f"need 0 <= min_new_tokens <= max_new_tokens and max_new_tokens >= 1, got {self.min_new_tokens} and {self.max_new_tokens}"
            )
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
