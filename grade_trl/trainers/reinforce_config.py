"""Configuration of REINFORCE with a KL penalty and a baseline."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base_config import SampledRolloutConfig

BASELINES = ("ema", "batch_mean", "leave_one_out", "none")


@dataclass
class REINFORCEConfig(SampledRolloutConfig):
    """`SampledRolloutConfig` plus REINFORCE's sampling, baseline and KL-estimator settings.

    Loss = -mean_i A_i * log pi(y_i | x_i), with A_i = (R_i - beta * KL_i / |y_i|) - b_i
    (Williams 1992, https://doi.org/10.1007/BF00992696). `learning_rate` defaults to 1e-5 instead of 5e-5.
    """

    learning_rate: float = field(default=1e-5, metadata={"help": "Initial AdamW learning rate."})
    beta: float = field(
        default=0.1,
        metadata={"help": "KL coefficient per token, TRL's GRPO meaning: the shaped reward is R - beta * KL / |y|, the KL estimate "
                  "summed over the completion and divided by its length (GRADE experiment: 0.1)."},
    )
    baseline: str = field(
        default="ema",
        metadata={"help": "`ema` (moving average of past batch means, momentum `ema_momentum`), `batch_mean`, `leave_one_out` "
                  "(RLOO over the `num_samples_per_prompt` samples of a prompt, arXiv:2402.14740) or `none`."},
    )
    ema_momentum: float = field(default=0.9, metadata={"help": "Momentum of the EMA baseline (GRADE experiment: 0.9)."})
    normalize_advantages: bool = field(
        default=False,
        metadata={"help": "Divide advantages by their batch std WITHOUT re-centring, so the baseline keeps its effect "
                  "(the published GRADE code re-centred after subtracting the EMA, which cancels it)."},
    )
    num_samples_per_prompt: int = field(default=1, metadata={"help": "Completions sampled per prompt (>= 2 for `leave_one_out` and `best_of_n`)."})
    logprob_reduction: str = field(
        default="mean",
        metadata={"help": "Sequence log-prob = `mean` over completion tokens (default: the users' choice, docs/background.md section 2) or `sum` "
                  "(the exact score function grad log pi(y), REINFORCE's unbiased estimator, whose size grows with the length). `mean` weights "
                  "each token by 1/|y|, a length bias of its own: shorter correct and longer wrong completions get the larger per-token steps "
                  "(Liu et al. 2025, Dr. GRPO, https://arxiv.org/abs/2503.20783)."},
    )
    reward_threshold: float | None = field(default=None, metadata={"help": "Train only on samples whose reward is above this value (None = all samples)."})
    best_of_n: bool = field(default=False, metadata={"help": "Train only on the best of the `num_samples_per_prompt` samples of each prompt."})

    def __post_init__(self):
        super().__post_init__()
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {list(BASELINES)}, got {self.baseline!r}")
        if self.num_samples_per_prompt < 1:
            raise ValueError(f"num_samples_per_prompt must be >= 1, got {self.num_samples_per_prompt}")
        if not 0 <= self.ema_momentum < 1:
            raise ValueError(f"ema_momentum must be in [0, 1), got {self.ema_momentum}")
        if self.logprob_reduction not in ("mean", "sum"):
            raise ValueError(f"logprob_reduction must be 'mean' or 'sum', got {self.logprob_reduction!r}")
        if (self.baseline == "leave_one_out" or self.best_of_n) and self.num_samples_per_prompt < 2:
            needs = "baseline leave_one_out (each sample's baseline is the others of its prompt)" if self.baseline == "leave_one_out" else "best_of_n"
            raise ValueError(f"num_samples_per_prompt: {needs} needs num_samples_per_prompt >= 2, got {self.num_samples_per_prompt}; set num_samples_per_prompt: 4")

    @property
    def completions_per_prompt(self) -> int:
        return self.num_samples_per_prompt
