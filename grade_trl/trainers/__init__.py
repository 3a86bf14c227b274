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
]
