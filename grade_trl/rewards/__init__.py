from .base import RewardFunctionError, compute_rewards, is_differentiable, require_differentiable, reward_name
from .gsm8k import GSM8KCorrectness, GSM8KFormat, extract_answer
from .length import LengthReward
from .sentiment import SentimentReward, SentimentRewardModel, train_sentiment_head

__all__ = [
    "GSM8KCorrectness",
    "GSM8KFormat",
    "LengthReward",
    "RewardFunctionError",
    "SentimentReward",
    "SentimentRewardModel",
    "compute_rewards",
    "extract_answer",
    "is_differentiable",
    "require_differentiable",
    "reward_name",
    "train_sentiment_head",
]
