from .base import RolloutTrainer
from .base_config import RolloutConfig
from .grade import GumbelGRADETrainer, grade_loss
from .grade_config import GumbelGRADEConfig
from .ppo import PPOTrainer, ppo_loss
from .ppo_config import PPOConfig
from .reinforce import REINFORCETrainer
from .reinforce_config import REINFORCEConfig
from .relaxations import RELAXATIONS, GappedStraightThrough, GumbelRao, GumbelSoftmax, ReinMax, StraightThroughGumbel, build_relaxation, tau_at

__all__ = [
    "RELAXATIONS",
    "GappedStraightThrough",
    "GumbelRao",
    "ReinMax",
    "build_relaxation",
    "GumbelGRADEConfig",
    "GumbelGRADETrainer",
    "GumbelSoftmax",
    "PPOConfig",
    "PPOTrainer",
    "REINFORCEConfig",
    "REINFORCETrainer",
    "RolloutConfig",
    "RolloutTrainer",
    "StraightThroughGumbel",
    "grade_loss",
    "ppo_loss",
    "tau_at",
    "GRPOConfig",
    "GRPOTrainer",
]


def __getattr__(name):
    """`GRPOTrainer`/`GRPOConfig` (TRL's, with the registry's hooks) on first use: importing TRL's GRPO module costs
    about 0.4 s that a run of another method does not need."""
    if name in ("GRPOConfig", "GRPOTrainer"):
        from . import grpo

        return getattr(grpo, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
