"""Configuration of GRADE: training through a differentiable relaxation of token sampling."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .relaxations import RELAXATIONS


@dataclass
class GumbelGRADEConfig(TrainingArguments):
    """`TrainingArguments` plus GRADE's rollout, relaxation and KL settings.

    Defaults follow the GRADE experiment (arXiv:2601.11574 and ../shared/docs/BACKGROUND.md, section 1):
    AdamW lr 1e-4, batch 4 x accumulation 4, clip 1.0, 16-48 new tokens, tau 2.0 -> 0.5 over
    1,000 steps, KL coefficient 0.1. Fields that differ from `TrainingArguments`: `learning_rate`
    (1e-4 instead of 5e-5), `per_device_train_batch_size` (4 instead of 8), `gradient_accumulation_steps`
    (4 instead of 1), `logging_steps` (10 instead of 500), `eval_steps` (100 instead of None: used by the
    reward-evaluation callback), `save_strategy` ("no": the runner saves the final model itself),
    `report_to` ("none").
    """

    # Overridden TrainingArguments defaults
    learning_rate: float = field(default=1e-4, metadata={"help": "Initial AdamW learning rate (GRADE experiment: 1e-4)."})
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

    # Rollout
    max_prompt_length: int = field(default=32, metadata={"help": "Prompts are cut to this many tokens (GRADE experiment: 32)."})
    max_new_tokens: int = field(default=48, metadata={"help": "Relaxed tokens generated per prompt (GRADE experiment: 16 to 48)."})
    min_new_tokens: int = field(default=16, metadata={"help": "EOS is forbidden before this many new tokens, in the rollout and in the KL alike."})

    # Relaxation
    estimator: str = field(
        default="ste",
        metadata={"help": "Relaxation of sampling: `soft` (Gumbel-softmax, Jang et al. 2017, arXiv:1611.01144) or `ste` "
                  "(straight-through Gumbel: one-hot forward, Gumbel-softmax backward)."},
    )
    tau_start: float = field(default=2.0, metadata={"help": "Relaxation temperature at step 0 (GRADE experiment: 2.0)."})
    tau_end: float = field(default=0.5, metadata={"help": "Relaxation temperature after annealing (GRADE experiment: 0.5)."})
    tau_anneal_steps: int = field(default=1000, metadata={"help": "Optimizer steps of the linear tau_start -> tau_end anneal (GRADE experiment: 1,000)."})
    tau_schedule: str = field(default="linear", metadata={"help": "`linear` (anneal tau_start -> tau_end) or `constant` (tau_start throughout)."})

    # Objective
    beta: float = field(
        default=0.1,
        metadata={"help": "KL coefficient: loss = -(reward - beta * KL(pi || pi_ref)), KL exact over the vocabulary, summed "
                  "over the completion and differentiated (GRADE experiment: 0.1)."},
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "Weight of each reward function in the total reward (default: 1 for each)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.estimator not in RELAXATIONS:
            raise ValueError(f"estimator must be one of {sorted(RELAXATIONS)}, got {self.estimator!r}")
        if self.tau_schedule not in ("linear", "constant"):
            raise ValueError(f"tau_schedule must be 'linear' or 'constant', got {self.tau_schedule!r}")
        if self.tau_start <= 0 or self.tau_end <= 0:
            raise ValueError(f"tau_start and tau_end must be > 0, got {self.tau_start} and {self.tau_end}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens or self.max_new_tokens < 1:
            raise ValueError(
                f"need 0 <= min_new_tokens <= max_new_tokens and max_new_tokens >= 1, got {self.min_new_tokens} and {self.max_new_tokens}"
            )
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
