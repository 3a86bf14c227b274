"""grade_trl: GRADE, REINFORCE and PPO beside TRL's GRPO/CISPO, on one reward interface."""

from .rewards import LengthReward, SentimentReward, SentimentRewardModel
from .trainers import GumbelGRADEConfig, GumbelGRADETrainer, PPOConfig, PPOTrainer, REINFORCEConfig, REINFORCETrainer

__version__ = "0.1.0"
__all__ = ["GRPOConfig", "GRPOTrainer", "GumbelGRADEConfig", "GumbelGRADETrainer", "LengthReward", "PPOConfig", "PPOTrainer", "REINFORCEConfig", "REINFORCETrainer",
           "SentimentReward", "SentimentRewardModel"]


def __getattr__(name):
    if name in ("GRPOConfig", "GRPOTrainer"):  # TRL's GRPO module loads on first use (grade_trl.trainers.__getattr__)
        from . import trainers

        return getattr(trainers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
