"""grade_trl: GRADE, REINFORCE and PPO beside TRL's GRPO/CISPO, on one reward interface.

The names below load on first use (PEP 562): `import grade_trl.cli` or `grade_trl.errors` then costs a few tenths of a
second instead of the 6-8 s of transformers and TRL, which the rank-ending helpers, the doctor and `--help` do not need.
A submodule (`grade_trl.trainers`, `grade_trl.rewards`, ...) also loads on first access as an attribute."""

import importlib
import importlib.util
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "GRPOConfig": "trainers", "GRPOTrainer": "trainers",
    "GumbelGRADEConfig": "trainers", "GumbelGRADETrainer": "trainers",
    "PPOConfig": "trainers", "PPOTrainer": "trainers",
    "REINFORCEConfig": "trainers", "REINFORCETrainer": "trainers",
    "LengthReward": "rewards", "SentimentReward": "rewards", "SentimentRewardModel": "rewards",
}
__all__ = ["GRPOConfig", "GRPOTrainer", "GumbelGRADEConfig", "GumbelGRADETrainer", "LengthReward", "PPOConfig", "PPOTrainer", "REINFORCEConfig",
           "REINFORCETrainer", "SentimentReward", "SentimentRewardModel"]  # = sorted(_EXPORTS), written out for linters

if TYPE_CHECKING:  # for type checkers and IDEs, which do not run __getattr__
    from .rewards import LengthReward, SentimentReward, SentimentRewardModel
    from .trainers import GRPOConfig, GRPOTrainer, GumbelGRADEConfig, GumbelGRADETrainer, PPOConfig, PPOTrainer, REINFORCEConfig, REINFORCETrainer


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:  # `grade_trl.trainers` after `import grade_trl`
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
