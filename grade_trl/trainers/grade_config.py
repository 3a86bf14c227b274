"""Configuration of GRADE: training through a differentiable relaxation of token sampling."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.soft_rollout import CACHES
from .base_config import RolloutConfig
from .relaxations import RELAXATIONS


@dataclass
class GumbelGRADEConfig(RolloutConfig):
    """`RolloutConfig` plus GRADE's relaxation settings (arXiv:2601.11574).

    `learning_rate` defaults to 1e-4 (the GRADE experiment's) instead of 5e-5. The KL term
    (`kl_coef`) is exact over the vocabulary, summed over the completion and differentiated.
    """

    learning_rate: float = field(default=1e-4, metadata={"help": "Initial AdamW learning rate (GRADE experiment: 1e-4)."})
    kl_coef: float = field(
        default=0.1,
        metadata={"help": "KL coefficient per completion: the objective is R - kl_coef * KL, KL(pi || pi_ref) exact over the vocabulary "
                  "and summed over the completion's tokens (GRADE experiment: 0.1). Not TRL's `beta`, which weighs the per-token KL."},
    )
    estimator: str = field(
        default="ste",
        metadata={"help": "Gradient estimator of sampling (every one samples the token exactly; README: GRADE's estimators): "
                  "`soft` (Gumbel-softmax: the forward is the relaxed mixture; Jang et al. 2017, arXiv:1611.01144), `ste` "
                  "(straight-through Gumbel: one-hot forward, Gumbel-softmax gradient), `reinmax` (one-hot forward, second-order "
                  "accurate gradient 2 J(pi_1) - J(pi_0)/2, no backward noise; Liu et al. 2023, arXiv:2304.08612), `rao` "
                  "(Gumbel-Rao: ST-Gumbel's gradient averaged over `rao_samples` noise draws conditioned on the token, same mean, "
                  "lower variance; Paulus et al. 2021, arXiv:2010.04838) or `gapped` (gapped straight-through: the backward's noise "
                  "replaced by a deterministic move of the logits that makes the token the argmax by `gapped_margin`; Fan et al. "
                  "2022, arXiv:2206.07235)."},
    )
    tau_backward: float = field(
        default=0.0,
        metadata={"help": "Temperature of the gradient, decoupled from the forward's (Shah et al. 2024, arXiv:2410.13331); 0: the "
                  "annealed tau. For `soft` the forward mixture stays at tau; the straight-through estimators' forward is one-hot "
                  "at every temperature, so for them this is the temperature of the backward and the tau schedule has no effect."},
    )
    rao_samples: int = field(
        default=8,
        metadata={"help": "`rao` only: conditional Gumbel draws K, 1 to 1,024, averaged in the gradient (K = 1 is ST-Gumbel). Costs K softmaxes "
                  "of each step's logits in time and saved memory; use relax_top_k with it at full vocabularies."},
    )
    gapped_margin: float = field(
        default=1.0,
        metadata={"help": "`gapped` only: the margin kappa by which the deterministic perturbation puts the sampled token's logit "
                  "above every other (Fan et al. 2022 use 1.0)."},
    )
    tau_start: float = field(default=2.0, metadata={"help": "Relaxation temperature at step 0 (GRADE experiment: 2.0)."})
    tau_end: float = field(default=0.5, metadata={"help": "Relaxation temperature after annealing (GRADE experiment: 0.5)."})
    tau_anneal_steps: int = field(default=1000, metadata={"help": "Optimizer steps of the linear tau_start -> tau_end anneal (GRADE experiment: 1,000)."})
    tau_schedule: str = field(default="linear", metadata={"help": "`linear` (anneal tau_start -> tau_end) or `constant` (tau_start throughout)."})

    # Memory and speed of the relaxed rollout (README: GRADE's cost). The exact ones change no number beyond
    # float round-off; `relax_top_k` changes the estimator, as its help says.
    rollout_cache: str = field(
        default="chunked",
        metadata={"help": "KV cache of the differentiable rollout: `chunked` (default: each step's keys/values kept once, attention "
                  "recomputed over them in backward: memory linear in the new tokens, exact) or `dynamic` (transformers' DynamicCache: "
                  "autograd keeps every step's concatenated copy, memory quadratic in the new tokens). `chunked` needs an sdpa, flash "
                  "or flex attention implementation; other models fall back to `dynamic`."},
    )
    rollout_checkpointing: bool = field(
        default=False,
        metadata={"help": "Activation checkpointing of the rollout that keeps the KV cache: each decode step keeps only its inputs and "
                  "outputs and is recomputed in backward (exact; about one more rollout forward of time). `gradient_checkpointing: "
                  "true` means this for GRADE (transformers' own checkpointing would turn the KV cache off)."},
    )
    recompute_reference_and_reward: bool = field(
        default=True,
        metadata={"help": "Keep only the inputs and outputs of the reference's forward and of each reward's `score_soft` and run them "
                  "again in backward (exact for deterministic rewards: no dropout, no sampling). Saves their activations (about as "
                  "much as the policy's) for one more forward of each. Under FSDP2, where the frozen reference is sharded as the "
                  "policy, its forward is recomputed a transformer block at a time, so that one block is gathered at once."},
    )
    relax_top_k: int = field(
        default=0,
        metadata={"help": "Relax over the k largest logits of each step only (0: the whole vocabulary; the published GRADE code used "
                  "256). It changes the estimator: tokens are sampled from the policy truncated to its top k (top-k sampling), the "
                  "relaxation and its gradient live on those k entries, the next input is a weighted gather of k embedding rows, and the "
                  "KL is that of the truncated policy to the full reference (>= 0). Memory and time of the (B, V) work per step "
                  "become (B, k)."},
    )

    def __post_init__(self):
        # transformers' gradient checkpointing turns the KV cache off, which would make the relaxed rollout re-run the
        # whole prefix at every step; for GRADE the switch means checkpointing the rollout's steps, cache kept.
        self.checkpointing_from = None  # the transformers switch turned into rollout_checkpointing, for its messages
        if self.gradient_checkpointing or self.activation_checkpointing:
            self.checkpointing_from = "gradient_checkpointing (activation_checkpointing)"  # transformers 5's two names of one switch
            self.rollout_checkpointing = True
            self.gradient_checkpointing = self.activation_checkpointing = False
        super().__post_init__()
        if self.estimator not in RELAXATIONS:
            raise ValueError(f"estimator must be one of {sorted(RELAXATIONS)}, got {self.estimator!r}")
        if self.tau_schedule not in ("linear", "constant"):
            raise ValueError(f"tau_schedule must be 'linear' or 'constant', got {self.tau_schedule!r}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.tau_backward < 0:
            raise ValueError(f"tau_backward must be > 0 (or 0: the annealed tau), got {self.tau_backward}")
        if not 1 <= self.rao_samples <= 1024:  # K (B, V) relaxed samples at once: 10**6 asked 262 GB of the allocator
            raise ValueError(f"rao_samples must be an integer from 1 to 1,024, got {self.rao_samples}")
        if self.gapped_margin <= 0:
            raise ValueError(f"gapped_margin must be > 0, got {self.gapped_margin}")
        if self.tau_anneal_steps < 0:
            raise ValueError(f"tau_anneal_steps must be >= 0 (0: tau_start throughout), got {self.tau_anneal_steps}")
        for key in ("tau_start", "tau_end"):  # each by its own name: the message starts with the key that is wrong
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        if self.rollout_cache not in CACHES:
            raise ValueError(f"rollout_cache must be one of {list(CACHES)}, got {self.rollout_cache!r}")
        if self.relax_top_k < 0:
            raise ValueError(f"relax_top_k must be >= 0 (0: the whole vocabulary), got {self.relax_top_k}")
        if self.rollout_checkpointing and self.rollout_cache != "chunked":
            given = f" ({self.checkpointing_from}: true means rollout_checkpointing for GRADE)" if self.checkpointing_from else ""
            raise ValueError(f"rollout_checkpointing needs rollout_cache: chunked (the checkpointed steps keep the cache's chunks){given}")

