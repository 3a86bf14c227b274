"""grade_trl: GRADE, REINFORCE and PPO beside TRL's GRPO/CISPO, on one reward interface.

The names below load on first use (PEP 562): `import grade_trl.cli` or `grade_trl.errors` then costs a few tenths of a
second instead of the 6-8 s of transformers and TRL, which the rank-ending helpers and `--help` do not need."""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "GRPOConfig": "trainers", "GRPOTrainer": "trainers",
    "GumbelGRADEConfig": "trainers", "GumbelGRADETrainer": "trainers",
    "PPOConfig": "trainers", "PPOTrainer": "trainers",
    "REINFORCEConfig": "trainers", "REINFORCETrainer": "trainers",
    "LengthReward": "rewards", "SentimentReward": "rewards", "SentimentRewardModel": "rewards",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
