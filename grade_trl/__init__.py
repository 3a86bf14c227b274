"""grade_trl: GRADE, REINFORCE and PPO beside TRL's GRPO/CISPO, on one reward interface."""

from .rewards import LengthReward, SentimentReward, SentimentRewardModel
from .trainers import GumbelGRADEConfig, GumbelGRADETrainer, PPOConfig, PPOTrainer, REINFORCEConfig, REINFORCETrainer

__version__ = "0.1.0"
__all__ = ["GumbelGRADEConfig", "GumbelGRADETrainer", "LengthReward", "PPOConfig", "PPOTrainer", "REINFORCEConfig", "REINFORCETrainer", "SentimentReward", "SentimentRewardModel"]
