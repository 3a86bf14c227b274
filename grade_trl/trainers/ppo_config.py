"""Configuration of PPO with a value head, GAE and an adaptive KL penalty (the method TRL removed in 1.13)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base_config import SampledRolloutConfig


@dataclass
class PPOConfig(SampledRolloutConfig):
    """`RolloutConfig` plus PPO's rollout, loss and KL-controller settings.

    PPO: Schulman et al. 2017, https://arxiv.org/abs/1707.06347; for language models with a KL-shaped
    per-token reward and an adaptive KL coefficient: Ziegler et al. 2019, https://arxiv.org/abs/1909.08593.
    Defaults follow the users' PPO length run with TRL's old PPOTrainer (docs/background.md
    section 3): lr 1e-5, batch 16, mini-batch 4, 1 PPO epoch, cliprange 0.2, cliprange_value 0.2,
    vf_coef 0.1, adaptive KL with init coefficient 1, temperature 0.7, top-p 0.9.

    How steps are counted (as in CleanRL): one rollout = `per_device_train_batch_size` prompts per
    process, generated once, then consumed over `ppo_epochs * num_mini_batches` Trainer micro-steps,
    each one shuffled mini-batch of `per_device_train_batch_size / num_mini_batches` completions.
    An optimizer step happens every `gradient_accumulation_steps` micro-steps (default 1 here), so
    `max_steps` counts mini-batch updates, not rollouts: a run makes
    `max_steps * gradient_accumulation_steps / (ppo_epochs * num_mini_batches)` rollouts.

    Fields that differ from `RolloutConfig`: `learning_rate` (1e-5), `per_device_train_batch_size`
    (16, the users' batch), `gradient_accumulation_steps` (1: one optimizer step per mini-batch).
    PPO's KL coefficient is `init_kl_coef` (per completion: the per-token rewards -kl_coef * KL_t sum to
    -kl_coef * KL), adapted when `adaptive_kl` is set.
    """

    # Overridden defaults
    learning_rate: float = field(default=1e-5, metadata={"help": "Initial AdamW learning rate (users' PPO run: 1e-5; 1e-6 learned nothing)."})
    per_device_train_batch_size: int = field(
        default=16, metadata={"help": "Prompts per process in one rollout (users' PPO run: batch 16). Must be divisible by `num_mini_batches`."}
    )
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={"help": "Mini-batches per optimizer step (default 1: every mini-batch is one update, as in CleanRL). "
                  "Must divide `ppo_epochs * num_mini_batches`, so no update mixes two rollouts."},
    )

    # Sampling (the log-probs of the loss, the old policy and the KL are scored under the same processed distribution)
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (users' PPO run: 0.7); applied identically when scoring log-probs."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling (users' PPO run: 0.9; 1.0 = off); applied identically when scoring the policy's log-probs."})

    # Rollout schedule
    ppo_epochs: int = field(default=1, metadata={"help": "Passes over each rollout, 1 to 1,024 (users' PPO run: 1; CleanRL and the GRADE experiment: 4)."})
    num_mini_batches: int = field(
        default=4, metadata={"help": "Mini-batches each rollout is split into per epoch (users' PPO run: batch 16 / mini-batch 4 = 4)."}
    )

    # Advantages (GAE, Schulman et al. 2016, https://arxiv.org/abs/1506.02438)
    gamma: float = field(default=0.99, metadata={"help": "Discount factor of the per-token rewards (GRADE experiment: 0.99)."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda: bias-variance trade-off of the advantages (GRADE experiment: 0.95)."})
    whiten_advantages: bool = field(
        default=True, metadata={"help": "Whiten the advantages of each rollout over its real tokens (masked mean and std), as TRL's old PPO."}
    )

    # Loss
    cliprange: float = field(default=0.2, metadata={"help": "PPO clip epsilon of the ratio (Schulman et al. 2017: 0.2)."})
    cliprange_value: float | None = field(
        default=0.2,
        metadata={"help": "Clip of the value prediction around the rollout's values (users' PPO run: 0.2); None = plain MSE, "
                  "which the users switched to after value-loss spikes (docs/background.md section 2)."},
    )
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss (users' PPO run: 0.1; CleanRL: 0.5)."})
    ent_coef: float = field(default=0.0, metadata={"help": "Weight of the entropy bonus (0 = off; the GRADE experiment used 0.01)."})
    logratio_clamp: float = field(
        default=2.0,
        metadata={"help": "The log-ratio log pi - log pi_old is clamped to +-this before exp (users tightened it from 20 to 2, "
                  "docs/background.md section 2): a token that leaves the top-p nucleus after an update cannot give an infinite ratio."},
    )
    target_kl: float | None = field(
        default=None,
        metadata={"help": "Early stopping (CleanRL's `target_kl`): once a mini-batch's approximate KL to the rollout policy, "
                  "averaged over processes, exceeds this, the rest of that rollout's mini-batches are skipped (users' PPO "
                  "run: 0.1). None = off. Not the adaptive controller's target: see `kl_target`."},
    )

    # KL penalty in the reward: r_t = -kl_coef * KL_t, plus the score on the last token (Ziegler et al. 2019)
    init_kl_coef: float = field(default=1.0, metadata={"help": "KL coefficient at the start (users' PPO run: adaptive KL with init 1)."})
    adaptive_kl: bool = field(
        default=True,
        metadata={"help": "Adapt the KL coefficient after each rollout towards `kl_target` (Ziegler et al. 2019, Sec. 2.2); "
                  "False keeps `init_kl_coef` fixed."},
    )
    kl_target: float = field(
        default=6.0, metadata={"help": "Per-sequence KL the adaptive controller steers towards (Ziegler et al. 2019: 6 nats)."}
    )
    kl_horizon: float = field(
        default=10000, metadata={"help": "Horizon of the adaptive controller, in samples (Ziegler et al. 2019: 10,000)."}
    )

    def __post_init__(self):
        super().__post_init__()
        # each check names its own key (a recipe's error starts with the key that is wrong: recipe.key_first)
        if not 1 <= self.ppo_epochs <= 1024:  # 10**9 trained every step on the first rollout
            raise ValueError(f"ppo_epochs={self.ppo_epochs}: it must be an integer from 1 to 1,024 (default 1)")
        if self.num_mini_batches < 1:
            raise ValueError(f"num_mini_batches={self.num_mini_batches}: it must be >= 1")
        if self.per_device_train_batch_size % self.num_mini_batches != 0:
            raise ValueError(
                f"per_device_train_batch_size={self.per_device_train_batch_size} is not divisible by num_mini_batches="
                f"{self.num_mini_batches}: each rollout is split into equal mini-batches; choose a batch size that is a multiple of it"
            )
        if self.micro_steps_per_rollout % self.gradient_accumulation_steps != 0:
            raise ValueError(
                f"gradient_accumulation_steps={self.gradient_accumulation_steps} does not divide ppo_epochs * num_mini_batches="
                f"{self.micro_steps_per_rollout}, so an optimizer step would mix two rollouts; use gradient_accumulation_steps: 1"
            )
        for name, default in (("gamma", 0.99), ("lam", 0.95)):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)}: it must lie in [0, 1] (default {default})")
        if self.cliprange <= 0:
            raise ValueError(f"cliprange={self.cliprange}: it must be > 0 (default 0.2)")
        if self.cliprange_value is not None and self.cliprange_value <= 0:
            raise ValueError(f"cliprange_value={self.cliprange_value}: it must be > 0, or None for the plain MSE value loss")
        for name in ("vf_coef", "ent_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: it must be >= 0 (0 turns the term off)")
        if self.logratio_clamp <= 0:
            raise ValueError(f"logratio_clamp={self.logratio_clamp}: it must be > 0 (default 2.0)")
        if self.target_kl is not None and self.target_kl <= 0:
            raise ValueError(f"target_kl={self.target_kl}: it must be > 0, or None to turn early stopping off")
        if self.init_kl_coef < 0:
            raise ValueError(f"init_kl_coef={self.init_kl_coef}: it must be >= 0 (0 turns the KL penalty off)")
        for name in ("kl_target", "kl_horizon"):
            if self.adaptive_kl and getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: it must be > 0 for the adaptive KL controller (or set adaptive_kl: false)")

    def completions_per_step(self, num_processes: int) -> float:
        """A rollout is reused for `ppo_epochs * num_mini_batches` micro-steps: only that fraction of a step's micro-batches is new."""
        return super().completions_per_step(num_processes) / self.micro_steps_per_rollout

    @property
    def micro_steps_per_rollout(self) -> int:
        """Trainer micro-steps that consume one rollout: `ppo_epochs * num_mini_batches`."""
        return self.ppo_epochs * self.num_mini_batches

    @property
    def mini_batch_size(self) -> int:
        """Completions per mini-batch, per process."""
        return self.per_device_train_batch_size // self.num_mini_batches
