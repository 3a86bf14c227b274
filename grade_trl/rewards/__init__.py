from .base import RewardFunctionError, compute_rewards, is_differentiable, require_differentiable, reward_name
from .sentiment import SentimentReward, SentimentRewardModel, train_sentiment_head

__all__ = [
    "RewardFunctionError",
    "SentimentReward",
    "SentimentRewardModel",
    "compute_rewards",
    "is_differentiable",
    "require_differentiable",
    "reward_name",
    "train_sentiment_head",
]
