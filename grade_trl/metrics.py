"""The metric contract: every key a run logs, with its unit and formula, in one table.

The trainers log these keys, the evaluation protocol logs the `eval_*` / `test_*` rows, the probe the
`probe_*` rows; the doctor and the analysis read them by the names defined here, and the README's
metrics table is this table (`tests/test_metrics.py` checks that every key a run of each method logs
is in it, and that the README lists every key of it).

Conventions:
  * one word, one quantity: `kl` is the KL divergence to the reference summed over a completion
    (nats per completion) for every method, TRL's GRPO included; `kl_per_token` is the same KL divided
    by the number of completion tokens, over the whole batch (sum of KL / sum of lengths);
  * `eval_` is the validation prefix of every task, `test_` the final test of the last checkpoint,
    `test_best_ckpt_` the test of the best-validation checkpoint (Trainer's reporters file them under
    `eval/`, `test/` and `train/`);
  * keys TRL already uses keep TRL's names and meaning (`reward`, `entropy`, `completions/mean_length`);
    new ones follow `namespace/quantity[/stat]`.

Legend of the formulas: b a completion of the batch (B of them), t a completion token (|y_b| of them,
up to and including the first EOS), R_b its reward, KL_b = sum_t KL_t.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    key: str  # the key, or a pattern with {name} (a reward function's name) or {k} (an integer)
    unit: str
    meaning: str
    logged_by: str  # methods, or the component that logs it

    @property
    def pattern(self) -> re.Pattern:
        return re.compile("^" + re.escape(self.key).replace(r"\{name\}", r"[^/]+").replace(r"\{k\}", r"\d+") + "$")


EVAL_PREFIX = "eval"  # validation metrics of every task: eval_{name}
TEST_PREFIX = "test"  # the final test of the last checkpoint: test_{name}
TEST_BEST_PREFIX = "test_best_ckpt"  # the final test of the best-validation checkpoint: test_best_ckpt_{name}

KL = "kl"
KL_PER_TOKEN = "kl_per_token"
ENTROPY = "entropy"
REWARD = "reward"
REWARD_STD = "reward_std"
LOSS = "loss"
GRAD_NORM_MEAN = "grad_norm_mean"
CLIP_FRACTION_KEYS = ("policy/clipfrac", "clip_ratio/region_mean")  # PPO's, TRL GRPO's
VALUE_LOSS = "loss/value"
EXPLAINED_VARIANCE = "value/explained_variance"
PROBE_PREFIX = "probe"

ALL = "every method"
TRL_GRPO = "grpo, cispo (TRL)"

METRICS: tuple[Metric, ...] = (
    # ---- training, every method (one value per logging window: the mean over its micro-batches)
    Metric("reward", "reward", "mean_b R_b, the weighted sum of the reward functions (GRADE: of the relaxed samples, through score_soft)", ALL),
    Metric("reward_std", "reward", "std_b R_b over the batch (TRL GRPO: over each group's completions, averaged)", ALL),
    Metric("rewards/{name}/mean", "reward", "mean_b of one reward function's score", ALL),
    Metric("kl", "nats/completion", "mean_b KL_b: KL(pi || pi_ref) summed over the completion; exact over the vocabulary for GRADE, "
           "k1 on the sampled tokens for REINFORCE/PPO (unbiased under top-p too; whichever kl_estimator their penalty uses), TRL's k3 for GRPO (logged only when its beta > 0)", ALL),
    Metric("kl_per_token", "nats/token", "sum_b KL_b / sum_b |y_b|: the same KL per completion token (TRL GRPO's own `kl`; GRPO logs both only when its beta > 0)", ALL),
    Metric("entropy", "nats/token", "mean over the batch's completion tokens of -sum_v p_v log p_v of the policy's (processed) next-token distribution", ALL),
    Metric("completions/mean_length", "tokens", "mean_b |y_b|, tokens up to and including the first EOS", ALL),
    Metric("loss", "loss", "the method's loss, averaged over the window (Trainer)", ALL),
    Metric("grad_norm", "grad norm", "pre-clipping gradient norm of the window's last optimizer step (Trainer)", ALL),
    Metric("grad_norm_mean", "grad norm", "mean of the pre-clipping gradient norms of the window's optimizer steps", ALL),
    Metric("grad_norm_std", "grad norm", "their std over the window's steps (a spread over steps, not an estimator variance)", ALL),
    Metric("grad_norm_max", "grad norm", "their maximum", ALL),
    Metric("learning_rate", "1", "the scheduler's learning rate (Trainer)", ALL),
    Metric("epoch", "epochs", "passes over the training prompts so far (Trainer)", ALL),
    # ---- GRADE
    Metric("tau", "1", "relaxation temperature at this step (tau_start -> tau_end)", "grade*"),
    # ---- REINFORCE
    Metric("advantages/mean", "reward", "REINFORCE: mean_b A_b = shaped reward - baseline; PPO: mean GAE advantage over tokens, before whitening", "reinforce, ppo"),
    Metric("samples/kept_fraction", "fraction", "fraction of the samples trained on (reward_threshold / best_of_n filters)", "reinforce"),
    # ---- PPO (TRL's old PPOTrainer names)
    Metric("kl_coef", "1", "the KL coefficient that shaped this rollout's rewards (adaptive: Ziegler et al. 2019)", "ppo"),
    Metric("objective/entropy", "nats/completion", "mean_b sum_t -log pi(y_t): the sampled estimate of the sequence entropy", "ppo"),
    Metric("objective/non_score_reward", "reward", "mean_b -kl_coef * KL_b, KL_b the penalty's kl_estimator estimate (k1 by default)", "ppo"),
    Metric("objective/rlhf_reward", "reward", "mean_b (R_b - kl_coef * KL_b), KL_b as in objective/non_score_reward", "ppo"),
    Metric("returns/mean", "reward", "mean GAE return over the rollout's tokens", "ppo"),
    Metric("loss/policy", "loss", "clipped surrogate loss of the mini-batch", "ppo"),
    Metric("loss/value", "loss", "value loss 0.5 (V - R)^2 (clipped when cliprange_value is set)", "ppo"),
    Metric("loss/total", "loss", "loss/policy + vf_coef loss/value - ent_coef entropy", "ppo"),
    Metric("policy/approxkl", "nats/token", "0.5 mean_t (log pi - log pi_old)^2 over the mini-batch: distance from the rollout policy", "ppo"),
    Metric("policy/clipfrac", "fraction", "fraction of tokens whose ratio lies outside [1 - cliprange, 1 + cliprange]", "ppo"),
    Metric("policy/ratio_mean", "1", "mean_t pi / pi_old over the mini-batch", "ppo"),
    Metric("policy/early_stopped", "fraction", "fraction of the window's mini-batches skipped by target_kl", "ppo"),
    Metric("value/explained_variance", "1", "1 - Var(R - V) / Var(R) over the rollout's tokens", "ppo"),
    Metric("value/error", "reward^2", "mean_t (V - R)^2 over the mini-batch", "ppo"),
    Metric("value/clipfrac", "fraction", "fraction of tokens whose value prediction was clipped", "ppo"),
    Metric("value/mean", "reward", "mean value prediction over the mini-batch's tokens", "ppo"),
    # ---- TRL's GRPOTrainer, as TRL logs them
    Metric("rewards/{name}/std", "reward", "std of one reward function's score (TRL)", TRL_GRPO),
    Metric("frac_reward_zero_std", "fraction", "fraction of prompt groups whose rewards are all equal (zero advantage) (TRL)", TRL_GRPO),
    Metric("num_tokens", "tokens", "prompt + completion tokens seen so far (TRL)", TRL_GRPO),
    Metric("step_time", "seconds", "wall time of the optimizer step (TRL)", TRL_GRPO),
    Metric("completions/min_length", "tokens", "shortest completion of the batch (TRL)", TRL_GRPO),
    Metric("completions/max_length", "tokens", "longest completion of the batch (TRL)", TRL_GRPO),
    Metric("completions/clipped_ratio", "fraction", "fraction of completions cut at max_completion_length without EOS (TRL)", TRL_GRPO),
    Metric("completions/mean_terminated_length", "tokens", "mean length of the completions that ended with EOS (TRL)", TRL_GRPO),
    Metric("completions/min_terminated_length", "tokens", "their minimum (TRL)", TRL_GRPO),
    Metric("completions/max_terminated_length", "tokens", "their maximum (TRL)", TRL_GRPO),
    Metric("clip_ratio/low_mean", "fraction", "fraction of tokens with ratio < 1 - epsilon and A < 0 (TRL)", "grpo (TRL)"),
    Metric("clip_ratio/low_min", "fraction", "its minimum over completions (TRL)", "grpo (TRL)"),
    Metric("clip_ratio/high_mean", "fraction", "fraction of tokens with ratio > 1 + epsilon_high and A > 0 (TRL)", "grpo (TRL)"),
    Metric("clip_ratio/high_max", "fraction", "its maximum over completions (TRL)", "grpo (TRL)"),
    Metric("clip_ratio/region_mean", "fraction", "clip_ratio/low_mean + clip_ratio/high_mean: tokens whose gradient the clip removed (TRL)", "grpo (TRL)"),
    Metric("cispo_clip_ratio", "fraction", "fraction of tokens whose importance weight CISPO clamped at epsilon_high (TRL)", "cispo (TRL)"),
    # ---- the end of training (Trainer)
    Metric("train_runtime", "seconds", "wall time of trainer.train() (Trainer, last row)", ALL),
    Metric("train_loss", "loss", "mean loss over the run (Trainer, last row; a resumed run's over the steps since it resumed, as Trainer computes it)", ALL),
    Metric("train_samples_per_second", "1/s", "Trainer's throughput figure (last row)", ALL),
    Metric("train_steps_per_second", "1/s", "optimizer steps per second (Trainer, last row)", ALL),
    Metric("total_flos", "flop", "Trainer's floating-point-operation estimate (last row)", ALL),
    # ---- the evaluation protocol: validation rows (step 0, every eval_steps, the end)
    Metric("eval_reward", "reward", "the task's weighted reward of one sampled completion per validation prompt, mean over prompts (the runner's evaluation; a trainer's own `Trainer.evaluate()` logs the mean over the samples it draws: one per eval prompt for GRADE and PPO, `num_samples_per_prompt` for REINFORCE)", "evaluation"),
    Metric("eval_reward_std", "reward", "its std over prompts", "evaluation"),
    Metric("eval_reward_soft", "reward", "GRADE's `Trainer.evaluate()`: its relaxed rollout's weighted score_soft on the eval prompts, the surrogate it trains (its eval_reward is of sampled text)", "grade* (Trainer.evaluate)"),
    Metric("eval_rewards/{name}/mean", "reward", "one reward function's score of the same completions, mean over prompts (tasks with several reward functions)", "evaluation"),
    Metric("eval_gold_reward", "reward", "the independent judge's score of the same completions (IMDB: P(positive); custom: the mean of eval_reward_funcs), mean", "evaluation"),
    Metric("eval_gold_reward_std", "reward", "its std over prompts", "evaluation"),
    Metric("eval_best_of_n_reward", "reward", "the best reward of eval_best_of_n samples per prompt, mean over prompts", "evaluation"),
    Metric("eval_distinct_1", "fraction", "distinct word unigrams / all unigrams of the completions (Li et al. 2016)", "evaluation"),
    Metric("eval_distinct_2", "fraction", "distinct word bigrams / all bigrams", "evaluation"),
    Metric("eval_self_bleu", "1", "mean BLEU-4 of each completion against the others (Zhu et al. 2018); lower = more diverse", "evaluation"),
    Metric("eval_completion_length", "tokens", "mean tokens per completion up to and including the first EOS", "evaluation"),
    Metric("eval_accuracy", "fraction", "GSM8K: the greedy completion's final answer equals the gold answer, mean over problems", "evaluation (gsm8k)"),
    Metric("eval_accuracy_flexible", "fraction", "GSM8K: the same, taking the last number when there is no answer expression", "evaluation (gsm8k)"),
    Metric("eval_format_reward", "fraction", "GSM8K: completions that end with `#### X` or `\\boxed{X}`", "evaluation (gsm8k)"),
    Metric("eval_pass_at_{k}", "fraction", "GSM8K: any of k sampled completions is correct", "evaluation (gsm8k)"),
    Metric("eval_maj_at_{k}", "fraction", "GSM8K: the majority answer of k samples is correct", "evaluation (gsm8k)"),
    Metric("eval_best_{name}", "as eval_{name}", "the best value of the primary validation metric so far (eval_best_reward, eval_best_accuracy)", "evaluation"),
    Metric("eval_{name}", "as {name}", "a trainer's own `Trainer.evaluate()` (its eval_strategy, or called by hand): the training metric {name} of the "
           "method on the eval prompts (eval_loss, eval_kl, eval_entropy, PPO's eval_policy/approxkl, ...); a dict eval_dataset logs "
           "each set's as eval_<set>_{name}", "Trainer.evaluate"),
    Metric("eval_best_step", "steps", "the step of that best evaluation (its checkpoint is best_model/)", "evaluation"),
    Metric("eval_wall_seconds", "seconds", "wall time since training began", "evaluation"),
    Metric("eval_train_seconds", "seconds", "the same without the time spent evaluating", "evaluation"),
    # ---- the final test (one row at the end)
    Metric("test_{name}", "as eval_{name}", "the validation metric {name} on the test prompts, last checkpoint", "evaluation"),
    Metric("test_best_ckpt_{name}", "as eval_{name}", "the same for the best-validation checkpoint", "evaluation"),
    # ---- the gradient-estimator probe (probe_steps)
    Metric("probe_mean_sq_norm", "grad norm^2", "(1/K) sum_k ||g_k||^2 over K estimates on one fixed prompt batch", "probe"),
    Metric("probe_trace_cov", "grad norm^2", "1/(K-1) sum_k ||g_k - g_bar||^2: total variance of the estimator", "probe"),
    Metric("probe_snr", "1", "(||g_bar||^2 - trace_cov/K) / trace_cov", "probe"),
    Metric("probe_snr_plugin", "1", "||g_bar||^2 / trace_cov", "probe"),
    Metric("probe_cosine_to_mean", "1", "mean_k cos(g_k, g_bar)", "probe"),
    Metric("probe_cosine_loo", "1", "mean_k cos(g_k, mean of the other K - 1)", "probe"),
    Metric("probe_mean_norm", "grad norm", "||g_bar||", "probe"),
    Metric("probe_num_estimates", "count", "K", "probe"),
    Metric("probe_seconds", "seconds", "wall time of the probe", "probe"),
)

BOOKKEEPING = ("step",)  # added to every history row by Trainer / the callbacks: not a metric


def lookup(key: str) -> Metric | None:
    """The table's entry for a logged key (exact keys first, then patterns), or None.

    A test key is defined when the validation key it repeats is (`test_best_ckpt_reward` -> `eval_reward`).
    """
    for metric in METRICS:
        if metric.key == key:
            return metric
    for prefix in (TEST_BEST_PREFIX, TEST_PREFIX):
        if key.startswith(prefix + "_"):
            return next((m for m in METRICS if m.key == f"{prefix}_{{name}}"), None) if lookup(eval_key(key[len(prefix) + 1 :])) else None
    general = f"{EVAL_PREFIX}_{{name}}"
    found = next((m for m in METRICS if "{" in m.key and m.key != general and not m.key.startswith(TEST_PREFIX) and m.pattern.match(key)), None)
    if found is None and key.startswith(EVAL_PREFIX + "_"):  # Trainer.evaluate(): eval_{a training key}, or eval_<set>_{it}
        rest = key[len(EVAL_PREFIX) + 1 :]
        names = [rest] + [rest[i + 1 :] for i, c in enumerate(rest) if c == "_"]  # each way to read a set's name off the front
        if any(not name.startswith(EVAL_PREFIX + "_") and (lookup(name) or (name != rest and lookup(eval_key(name)))) for name in names):
            found = next(m for m in METRICS if m.key == general)
    return found


def unknown_keys(keys) -> list[str]:
    """The keys (of logged rows) that the table does not define."""
    return sorted(k for k in set(keys) if k not in BOOKKEEPING and lookup(k) is None)


def eval_key(name: str) -> str:
    return f"{EVAL_PREFIX}_{name}"


def best_eval_key(primary: str) -> str:
    return f"{EVAL_PREFIX}_best_{primary}"


def markdown_table() -> str:
    """The README's metrics table."""
    lines = ["| key | unit | meaning | logged by |", "|---|---|---|---|"]
    escape = str.maketrans({"|": "\\|"})
    lines += [f"| `{m.key}` | {m.unit} | {m.meaning.translate(escape)} | {m.logged_by} |" for m in METRICS]
    return "\n".join(lines)
