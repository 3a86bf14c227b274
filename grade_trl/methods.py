"""The method registry: the one place where a training method declares itself.

An entry names the method's config dataclass and trainer class (imported on first use, so
listing the methods does not import TRL), the config values its name implies, and what the
rest of the package needs to know about it. What depends on the method (recipe validation,
`--help`, building the trainer, the probe, the analysis) reads this table and the trainer's public
hooks; the doctor reads only the logs and the recipe's settings:

  config:  `new_token_limits` (max, min) and `new_token_limit_key` (the max's recipe key), `completions_per_prompt`,
           `completions_per_step(processes)`
  trainer: `estimate_loss(rows)`, `probed_parameters()`, `training_state()` / `load_training_state()` (the probe
           and resume), `pending_logs()` (the live doctor's look at a step before its update)

Adding a method = its trainer (and config) file + one `Method` entry below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class Method:
    name: str
    summary: str  # one line: what the gradient is, with its paper
    config_path: str  # "module:Class" of the config dataclass (a transformers.TrainingArguments subclass)
    trainer_path: str  # "module:Class" of the trainer (a transformers.Trainer subclass)
    implied: Mapping[str, Any] = field(default_factory=dict)  # config values the method's name fixes
    relaxed: bool = False  # trains through a relaxation of sampling: needs a differentiable reward; has a tau schedule
    loads_model_from_path: bool = False  # the trainer loads policy and reference from a path itself (TRL)
    kl_coefficient: str = "beta"  # the config key that weighs the KL penalty
    kl_coefficient_meaning: str = "per token"  # what it weighs: the KL "per token" or "per completion"
    batch_counts: str = "prompts"  # what per_device_train_batch_size counts: "prompts" or "completions"
    exact_kl: bool = False  # the logged `kl` is exact (summed over the vocabulary), never below 0 but by rounding: the doctor allows no noise
    misplaced_keys: Mapping[str, str] = field(default_factory=dict)  # a key users bring from another method -> the fix

    @property
    def config_class(self) -> type:
        return _load(self.config_path)

    @property
    def trainer_class(self) -> type:
        return _load(self.trainer_path)


def _load(path: str):
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


_PER_COMPLETION_KL = (
    "{method} weighs the KL summed over the completion, with `{key}`; `beta` is the per-token coefficient of "
    "grpo, cispo and reinforce (at 48 tokens the same value is ~48x weaker); set {key}"
)

_PER_TOKEN_KL = (
    "{method} weighs the per-token KL with `beta`; `kl_coef` is the per-completion coefficient of the grade methods "
    "(ppo: init_kl_coef); set beta"
)

# The same setting under TRL GRPO's name and under our trainers' (TRL's own generation keys are kept for grpo and cispo):
# a recipe moved from one to the other gets the key to use, not a spelling guess.
_OWN_TRAINER_NAMES = {
    "max_completion_length": "{method} limits the completion with `max_new_tokens` (and `min_new_tokens`); "
                             "`max_completion_length` is TRL GRPO's name for it; set max_new_tokens",
    "num_generations": "{method} samples one completion per prompt; `num_generations` is TRL GRPO's group size "
                       "(reinforce's is num_samples_per_prompt); remove it",
}
_TRL_GRPO_NAMES = {
    "max_new_tokens": "TRL's GRPO limits the completion with `max_completion_length`; `max_new_tokens` is the name in "
                      "grade_trl's own trainers (grade*, reinforce, ppo); set max_completion_length",
    "min_new_tokens": "TRL's GRPO has no minimum-length key (its generate would sample with the EOS ban and score without "
                      "it); `min_new_tokens` belongs to grade_trl's own trainers; remove it, and set eval_min_new_tokens to "
                      "evaluate with the other methods' minimum",
    "num_samples_per_prompt": "TRL's GRPO samples `num_generations` completions per prompt; `num_samples_per_prompt` is "
                              "reinforce's name for it; set num_generations",
}


def _own_trainer_names(method: str, **overrides: str) -> dict[str, str]:
    return {**{key: fix.format(method=method) for key, fix in _OWN_TRAINER_NAMES.items()}, **overrides}


def _grade(name: str, estimator: str, description: str) -> Method:
    """A GRADE method: the GRADE trainer with one estimator (trainers/relaxations.py)."""
    return Method(
        name,
        description,
        "grade_trl.trainers.grade_config:GumbelGRADEConfig",
        "grade_trl.trainers.grade:GumbelGRADETrainer",
        implied={"estimator": estimator},
        relaxed=True,
        exact_kl=True,
        kl_coefficient="kl_coef",
        kl_coefficient_meaning="per completion",
        misplaced_keys=_own_trainer_names(name, beta=_PER_COMPLETION_KL.format(method=name, key="kl_coef")),
    )


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        _grade("grade", "soft", "GRADE: Gumbel-softmax relaxation y = softmax((logits + g) / tau), next input y @ E, reward gradient "
               "through the whole generation (Jang et al. 2017, arXiv:1611.01144)"),
        _grade("grade_ste", "ste", "GRADE-STE: straight-through Gumbel, one-hot forward, Gumbel-softmax backward (Jang et al. 2017, "
               "section 2.2)"),
        _grade("grade_reinmax", "reinmax", "GRADE with ReinMax: one-hot forward, second-order accurate straight-through backward "
               "(Liu et al. 2023, arXiv:2304.08612)"),
        _grade("grade_rao", "rao", "GRADE with Gumbel-Rao: one-hot forward, ST-Gumbel backward averaged over `rao_samples` noise draws "
               "conditioned on the token (Paulus et al. 2021, arXiv:2010.04838)"),
        _grade("grade_gapped", "gapped", "GRADE with gapped straight-through: one-hot forward, backward through a deterministic "
               "perturbation of the logits (Fan et al. 2022, arXiv:2206.07235)"),
        Method(
            "reinforce",
            "REINFORCE: score function with a baseline (EMA, batch mean, leave-one-out) and a per-token KL penalty "
            "(Williams 1992; RLOO: arXiv:2402.14740)",
            "grade_trl.trainers.reinforce_config:REINFORCEConfig",
            "grade_trl.trainers.reinforce:REINFORCETrainer",
            misplaced_keys=_own_trainer_names(
                "reinforce", kl_coef=_PER_TOKEN_KL.format(method="reinforce"),
                num_generations="reinforce samples `num_samples_per_prompt` completions per prompt (RLOO: with baseline "
                                "leave_one_out); `num_generations` is TRL GRPO's name for it; set num_samples_per_prompt"),
        ),
        Method(
            "ppo",
            "PPO: clipped surrogate, value head, GAE, adaptive KL-shaped rewards (Schulman et al. 2017; Ziegler et al. 2019)",
            "grade_trl.trainers.ppo_config:PPOConfig",
            "grade_trl.trainers.ppo:PPOTrainer",
            kl_coefficient="init_kl_coef",
            kl_coefficient_meaning="per completion",
            misplaced_keys=_own_trainer_names("ppo", beta=_PER_COMPLETION_KL.format(method="ppo", key="init_kl_coef (and adaptive_kl: false for a fixed one)")),
        ),
        Method(
            "grpo",
            "GRPO: TRL's GRPOTrainer as it is, group-relative advantages (Shao et al. 2024, arXiv:2402.03300)",
            "grade_trl.trainers.grpo:GRPOConfig",
            "grade_trl.trainers.grpo:GRPOTrainer",
            loads_model_from_path=True,
            batch_counts="completions",
            misplaced_keys={"kl_coef": _PER_TOKEN_KL.format(method="TRL's GRPO"), **_TRL_GRPO_NAMES},
        ),
        Method(
            "cispo",
            "CISPO: TRL's GRPOTrainer with loss_type cispo, clipped importance-sampling weights (MiniMax-M1, arXiv:2506.13585)",
            "grade_trl.trainers.grpo:GRPOConfig",
            "grade_trl.trainers.grpo:GRPOTrainer",
            implied={"loss_type": "cispo"},
            loads_model_from_path=True,
            batch_counts="completions",
            misplaced_keys={"kl_coef": _PER_TOKEN_KL.format(method="TRL's GRPO"), **_TRL_GRPO_NAMES},
        ),
    )
}


def get_method(name: str) -> Method:
    """The registry entry; a KeyError names the known methods."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}") from None


def relaxed_methods() -> tuple[str, ...]:
    return tuple(name for name, m in METHODS.items() if m.relaxed)
