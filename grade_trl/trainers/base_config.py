"""Settings every grade_trl trainer shares (GRADE, REINFORCE, PPO): a `TrainingArguments` subclass."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

from ..core.kl import KL_ESTIMATORS
from ..core.sampling import SamplingSettings


DDP_FIND_UNUSED_HELP = (
    "DistributedDataParallel's search for parameters without a gradient after each backward. False (Trainer's None "
    "means True unless gradient checkpointing is on): every method's loss reaches every trainable parameter of a dense causal LM (PPO's value head through "
    "vf_coef * value loss, a skipped mini-batch through 0 * loss), so the search only costs a graph traversal and "
    "warns on every multi-process run. Set true for a model some of whose parameters a step may not use (mixture-of-experts)."
)


def check_field_types(config) -> None:
    """Each field a grade_trl config declares beyond `TrainingArguments` holds a value of its annotated type, or a
    one-line ValueError names the field: a library user's `max_new_tokens="32"` failed at the first comparison with
    "'<' not supported between instances of 'str' and 'int'", and `max_new_tokens=4.5` at the first step. (The
    runner converts a recipe's values before they get here, `cli.coerce`; TrainingArguments' own fields are its.)
    An int is a float's value too; a float of integral value is not an int's (TRL's configs take none either)."""
    hints = typing.get_type_hints(type(config))
    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    for f in dataclasses.fields(config):
        if f.name in inherited or not f.init or f.name not in hints:
            continue
        value = getattr(config, f.name)
        if not _of_type(value, hints[f.name]):
            raise ValueError(f"{f.name}: expected {_type_name(hints[f.name])}, got {value!r} ({type(value).__name__})")


def _of_type(value, tp) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_of_type(value, option) for option in args)
    if tp is type(None):
        return value is None
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple) or tp in (list, tuple):
        return isinstance(value, (list, tuple)) and all(_of_type(v, args[0]) for v in value) if args else isinstance(value, (list, tuple))
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return True  # a type this check does not know: its own field's checks apply


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(option) for option in args)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "None", dict: "a mapping"}
    if tp in names:
        return names[tp]
    if origin in (list, tuple):
        return f"a list of {_type_name(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin is typing.Literal:
        return f"one of {list(args)}"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


@dataclass
class RolloutConfig(TrainingArguments):
    """`TrainingArguments` plus what every method that generates from prompts needs.

    Defaults follow the GRADE experiment (arXiv:2601.11574; docs/background.md section 1):
    batch 4 x accumulation 4, clip 1.0, 32-token prompts, 16-48 new tokens.
    Fields that differ from `TrainingArguments`: `per_device_train_batch_size` (4 instead of 8),
    `gradient_accumulation_steps` (4 instead of 1), `logging_steps` (10 instead of 500), `eval_steps`
    (100 instead of None: the reward-evaluation callback's period), `report_to` ("none"), `ddp_find_unused_parameters` (False: see its help), `remove_unused_columns` (False: extra columns such as
    GSM8K's `answer` reach the reward functions, TRL's convention).
    """

    # Overridden TrainingArguments defaults
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Prompts per device per micro-batch (GRADE experiment: 4)."})
    gradient_accumulation_steps: int = field(default=4, metadata={"help": "Micro-batches per optimizer step (GRADE experiment: 4, so 16 prompts per step)."})
    logging_steps: float = field(default=10, metadata={"help": "Optimizer steps between two logged metric windows."})
    eval_steps: float | None = field(default=100, metadata={"help": "Optimizer steps between two validation-reward evaluations (GRADE experiment: 100)."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Trackers to report to (`wandb`, `tensorboard`, `trackio`, `all`, `none`)."})
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={"help": DDP_FIND_UNUSED_HELP})
    remove_unused_columns: bool | None = field(
        default=False, metadata={"help": "Keep every dataset column: besides `prompt`, each reaches the reward functions as a keyword (as TRL's GRPOConfig)."}
    )

    # a JSON object given on the command line (`--model_init_kwargs '{"dtype": "bfloat16"}'`) is decoded, as TRL's configs do
    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["model_init_kwargs", "chat_template_kwargs"]

    # Model
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for `AutoModelForCausalLM.from_pretrained` when `model` is a hub id or path "
                  "(dtype defaults to float32, as in the GRADE experiment); a JSON object string on the command line."},
    )

    # Generation
    max_prompt_length: int = field(
        default=32,
        metadata={"help": "Prompts longer than this many tokens keep their last max_prompt_length tokens, with a warning (cut from the "
                  "left, as TRL's GRPOTrainer cut them while it had this option: the end of a prompt, its question, is what the "
                  "completion continues; GRADE experiment: 32)."},
    )
    max_new_tokens: int = field(default=48, metadata={"help": "Tokens generated per prompt at most (GRADE experiment: 16 to 48)."})
    chat_template_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for the chat template where chat prompts are rendered (TRL GRPOConfig's key, the "
                  "same meaning), e.g. {enable_thinking: false} for a thinking model; a JSON object string on the command line."},
    )
    min_new_tokens: int | None = field(
        default=None,
        metadata={"help": "EOS is forbidden before this many new tokens, in sampling and in every log-prob and KL alike "
                  "(default: 16, or max_new_tokens where that is smaller)."},
    )

    # Objective
    reward_weights: list[float] | None = field(default=None, metadata={"help": "Weight of each reward function in the total reward (default: 1 for each)."})

    def __post_init__(self):
        super().__post_init__()
        check_field_types(self)
        if self.reward_weights is not None and not all(math.isfinite(w) for w in self.reward_weights):
            raise ValueError(f"reward_weights: expected finite numbers, got {self.reward_weights}")
        if self.dataloader_pin_memory and not torch.accelerator.is_available():
            # nothing to pin for: torch's DataLoader warns otherwise, as it then pins nothing (the runner's use_cpu turns it off too)
            self.dataloader_pin_memory = False
        if self.model_init_kwargs is not None and not isinstance(self.model_init_kwargs, dict):
            raise ValueError(f"model_init_kwargs: expected a mapping (or a JSON object string), got {self.model_init_kwargs!r}")
        if self.chat_template_kwargs is not None and not isinstance(self.chat_template_kwargs, dict):
            raise ValueError(f"chat_template_kwargs: expected a mapping (or a JSON object string), got {self.chat_template_kwargs!r}")
        if self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length: expected an integer >= 1, got {self.max_prompt_length}")
        if self.min_new_tokens is None:  # a user who sets only max_new_tokens: 12 means "at most 12", not an error
            self.min_new_tokens = min(16, self.max_new_tokens)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected an integer >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens: expected an integer from 0 to max_new_tokens ({self.max_new_tokens}), got {self.min_new_tokens}")

    # Sizes the runner, the probe and the benchmark read (the method registry's config contract)
    @property
    def new_token_limits(self) -> tuple[int, int]:
        """(max, min) new tokens per completion; the evaluation generates with the same limits."""
        return self.max_new_tokens, self.min_new_tokens

    @property
    def new_token_limit_key(self) -> str:
        """The recipe key of the first of `new_token_limits`, for messages that tell the user what to lower."""
        return "max_new_tokens"

    @property
    def completions_per_prompt(self) -> int:
        """Completions sampled from each training prompt."""
        return 1

    @classmethod
    def exact_length_settings(cls, new_tokens: int) -> dict:
        """Config values that make every completion exactly `new_tokens` long (EOS banned before the last): the benchmark's shape."""
        return {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}

    def completions_per_step(self, num_processes: int) -> float:
        """New completions generated per optimizer step over all processes (the x axis of sample efficiency)."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * num_processes * self.completions_per_prompt


@dataclass
class SampledRolloutConfig(RolloutConfig):
    """`RolloutConfig` plus the sampling of real tokens (REINFORCE, PPO). The log-probs of the loss, the
    old policy and the KL are scored under the same processed distribution (`core.sampling`)."""

    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature; applied identically when scoring log-probs."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling (1.0 = off; GRADE experiment: 0.9); applied identically when scoring the policy's log-probs."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0 = off); applied identically when scoring the policy's log-probs."})
    chunked_scoring: bool = field(
        default=True,
        metadata={"help": "Score the sampled tokens (the policy's loss, the reference's KL) inside the LM head, a chunk of positions "
                  "at a time, recomputing each chunk's logits in backward (torch.utils.checkpoint), as TRL's GRPO does with its fused "
                  "LM head: the B x T x V logits and their float32 copies are never held whole (at GSM8K's Qwen2.5-0.5B shape they "
                  "were half of REINFORCE's step peak). Exact: the same log-probs, entropy and gradient; costs one more LM-head "
                  "product per chunk in backward. Applies to a plain nn.Linear head without logit scaling, on one process, DDP, ZeRO "
                  "and FSDP2; false: always the whole logits (core/head_scoring.py)."},
    )
    kl_estimator: str = field(
        default="k1",
        metadata={"help": "Per-token KL estimator of the KL penalty in the reward (computed under no_grad, so it enters the loss "
                  "through the score function only): `k1` = log p - log q, whose score-function gradient E_p[k1 grad log p] "
                  "is the KL's gradient (the default; TRL's old PPO `kl_penalty='kl'`), or `k3` = (r - 1) - log r, r = q / p, "
                  "whose gradient as a reward is grad KL(p || q) + sum_x q(x) grad log p(x) (for one token without truncation "
                  "grad [KL(p || q) - KL(q || p)]): second order near the reference, so it hardly holds the policy there (Tang "
                  "& Munos 2025, arXiv:2506.09477; kept to reproduce runs that used it). The logged `kl` is k1's estimate "
                  "whichever is chosen: unbiased also under top-p/top-k, which truncate p and not q, where k3's mean falls "
                  "short of the KL by 1 - q(nucleus) per token, http://joschu.net/blog/kl-approx.html."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.sampling  # validates temperature / top-p / top-k / min and max new tokens
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator={self.kl_estimator!r}: it must be one of {sorted(KL_ESTIMATORS)}")

    @property
    def sampling(self) -> SamplingSettings:
        return SamplingSettings(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_new_tokens=self.min_new_tokens, max_new_tokens=self.max_new_tokens
        )
