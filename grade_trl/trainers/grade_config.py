"""Configuration of GRADE: training through a differentiable relaxation of token sampling."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base_config import RolloutConfig
from .relaxations import RELAXATIONS


@dataclass
class GumbelGRADEConfig(RolloutConfig):
    """`RolloutConfig` plus GRADE's relaxation settings (arXiv:2601.11574).

    `learning_rate` defaults to 1e-4 (the GRADE experiment's) instead of 5e-5. The KL term
    (`kl_coef`) is exact over the vocabulary, summed over the completion and differentiated.
    """

    learning_rate: float = field(default=1e-4, metadata={"help": "Initial AdamW learning rate (GRADE experiment: 1e-4)."})
    kl_coef: float = field(
        default=0.1,
        metadata={"help": "KL coefficient per completion: the objective is R - kl_coef * KL, KL(pi || pi_ref) exact over the vocabulary "
                  "and summed over the completion's tokens (GRADE experiment: 0.1). Not TRL's `beta`, which weighs the per-token KL."},
    )
    estimator: str = field(
        default="ste",
        metadata={"help": "Relaxation of sampling: `soft` (Gumbel-softmax, Jang et al. 2017, arXiv:1611.01144) or `ste` "
                  "(straight-through Gumbel: one-hot forward, Gumbel-softmax backward)."},
    )
    tau_start: float = field(default=2.0, metadata={"help": "Relaxation temperature at step 0 (GRADE experiment: 2.0)."})
    tau_end: float = field(default=0.5, metadata={"help": "Relaxation temperature after annealing (GRADE experiment: 0.5)."})
    tau_anneal_steps: int = field(default=1000, metadata={"help": "Optimizer steps of the linear tau_start -> tau_end anneal (GRADE experiment: 1,000)."})
    tau_schedule: str = field(default="linear", metadata={"help": "`linear` (anneal tau_start -> tau_end) or `constant` (tau_start throughout)."})

    def __post_init__(self):
        super().__post_init__()
        if self.estimator not in RELAXATIONS:
            raise ValueError(f"estimator must be one of {sorted(RELAXATIONS)}, got {self.estimator!r}")
        if self.tau_schedule not in ("linear", "constant"):
            raise ValueError(f"tau_schedule must be 'linear' or 'constant', got {self.tau_schedule!r}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.tau_start <= 0 or self.tau_end <= 0:
            raise ValueError(f"tau_start and tau_end must be > 0, got {self.tau_start} and {self.tau_end}")
