"""The run doctor's checks: read a run's history and say what is going wrong, with the evidence and the likely cause.

The history is `trainer.state.log_history` as results.json keeps it (also read: a checkpoint's
trainer_state.json, or a bare JSON list of log rows): training rows (`reward`, `kl`, `loss`,
`grad_norm_mean`, `entropy`, PPO's `policy/clipfrac`, `loss/value`, `value/explained_variance`, TRL
GRPO's `clip_ratio/region_mean`) and evaluation rows (`eval_reward`, `eval_best_of_n_reward`,
`eval_gold_reward`, or GSM8K's `eval_accuracy`); the keys are the metric contract's (`grade_trl.metrics`).
A check whose keys are missing does not apply. Each finding names the check, its severity ("error": the
numbers cannot be trusted; "warning": the run works but is likely going wrong or is mistuned), the steps
and values that show it, the likely cause in one sentence and what to try. Every threshold is a
`DoctorSettings` field.

Live: `doctor_callback.DoctorCallback` runs the same checks on `state.log_history` at every log (evaluation rows
included), warns once per finding and can stop the run. After a run: `python -m grade_trl.doctor RUN_DIR`. This module
imports no transformers, so the command starts in a fraction of a second.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import logging
import math
import statistics
import typing
from dataclasses import dataclass, field

from . import metrics
from .cli import coerce, range_error, unknown_key_hint
from .errors import UserError
from .results import is_number

logger = logging.getLogger(__name__)

KL_KEYS = (metrics.KL,)  # nats per completion, every method
ENTROPY_KEYS = (metrics.ENTROPY,)  # nats per token (PPO's "objective/entropy" is per sequence)
CLIP_KEYS = metrics.CLIP_FRACTION_KEYS  # PPO; TRL GRPO (CISPO's "cispo_clip_ratio" is a different clamp)
GRAD_KEYS = (metrics.GRAD_NORM_MEAN, "grad_norm")  # the window's mean pre-clipping norm; Trainer's last-step norm
VALIDATION_KEYS = (metrics.eval_key("reward"), metrics.eval_key("accuracy"))  # the tasks' primary validation metrics


@dataclass
class DoctorSettings:
    """Thresholds of every check. Defaults were set on the tiny recipes (see the README's run doctor section)."""

    validation_key: str | None = field(default=None, metadata={"help": "Evaluation metric the validation checks read (default: the first of eval_reward, eval_accuracy in the history). Best-of-N and gold keys are derived from it: eval_reward -> eval_best_of_n_reward, eval_gold_reward."})
    baseline_rows: int = field(default=3, metadata={"help": "Training logs at the start that set a run's own baseline for the relative checks (entropy, gradient norm)."})
    sustain_rows: int = field(default=2, metadata={"help": "Consecutive logs a state-like condition must hold (negative explained variance, entropy collapse, high clip fraction, vanishing gradient) before it is flagged, so one noisy window is not."})
    negative_kl_tolerance: float = field(default=0.1, metadata={"help": "KL below -tolerance (nats per completion) is flagged. KL(p||q) >= 0; an unbiased k1 estimate may dip slightly below 0 by noise, the users' mismatched sampling gave -3 to -30."})
    kl_exact: bool = field(default=False, metadata={"help": "The logged KL is exact (GRADE's, summed over the vocabulary), so it has no sampling noise: every log below -negative_kl_tolerance is an error. The CLI and the callback read it from the run's method."})
    negative_kl_z: float = field(default=3.0, metadata={"help": "A negative KL log is an error when the series' mean is below -tolerance (a systematic mismatch), or when it lies more than this many noise scales below -tolerance; the noise scale is the robust spread of the log-to-log differences (1.4826 MAD / sqrt 2), so a k1 estimate over few completions, whose window means swing by a nat (a user trial: -0.86 amid 0 to 4.6 with 4 completions a step), is a warning, not an error that stops a run under doctor: stop."})
    kl_target: float | None = field(default=None, metadata={"help": "Target of an adaptive KL controller, per completion (PPO's kl_target; Ziegler et al. 2019: 6 nats). The CLI and the callback read it from the run's config when adaptive_kl is on."})
    kl_target_factor: float = field(default=3.0, metadata={"help": "With a target: KL above factor x target is 'far above' it (the users' PPO: 20-300 against 0.1)."})
    kl_max: float | None = field(default=10.0, metadata={"help": "Without a target: KL ceiling in nats per completion (None = off). 10 nats: the policy's completions are e^10 ~ 22,000x likelier under it than under the reference; TRL's old PPO targeted 6."})
    value_loss_spike_factor: float = field(default=10.0, metadata={"help": "PPO value loss above factor x the median of all earlier logs is a spike (users: 0.5-3 normally, 3,000+ in spikes)."})
    explained_variance_min: float = field(default=-0.1, metadata={"help": "PPO's value/explained_variance below this for sustain_rows logs is flagged (0 = no better than predicting the mean; a zero-initialised value head starts near 0)."})
    entropy_drop: float = field(default=0.8, metadata={"help": "Entropy collapse: per-token entropy below (1 - entropy_drop) x its starting value (users' PPO: ~11 -> ~0). The tiny length recipes, which should get more certain, drop by ~55%."})
    entropy_floor: float = field(default=0.05, metadata={"help": "Entropy collapse: per-token entropy below this many nats (nearly deterministic), when it started above."})
    clip_fraction_low: float = field(default=0.1, metadata={"help": "Clip fraction below this (median over the run) while the training reward does not rise: updates too small to learn (docs/background.md section 4: healthy 10-40%; users' lr 1e-6 PPO: ~0.01, no learning). All zeros (one on-policy update per batch, ratio 1) is not flagged."})
    clip_fraction_high: float = field(default=0.4, metadata={"help": "Clip fraction above this for sustain_rows logs: updates too large for the trust region (docs/background.md section 4)."})
    regression_evals: int = field(default=2, metadata={"help": "Reward regression: the validation metric fell at this many consecutive evaluations (the users' early-stopping rule: two in a row)."})
    regression_min_drop: float = field(default=0.0, metadata={"help": "Reward regression: each fall must exceed this (metric units; 0 = any fall)."})
    regression_min_z: float = field(default=1.0, metadata={"help": "Reward regression: each fall must also exceed this many standard errors of the difference of two evaluations, sqrt((s_a^2 + s_b^2) / n) with s the metric's std over prompts (`eval_reward_std`; an accuracy's sqrt(p(1 - p))) and n = eval_size, so that a small evaluation's noise is not a regression (0 = off; 1: a fall this large by chance alone is ~16% likely, two in a row ~3%)."})
    eval_size: int | None = field(default=None, metadata={"help": "Prompts (GSM8K: problems) each evaluation scores, for regression_min_z. The CLI reads it from the run's results.json, the live doctor from the task; None: regression_min_z is off."})
    divergence_min_drop: float = field(default=0.05, metadata={"help": "Best-of-N vs mean, learned vs gold reward: the mean (or gold) reward must have fallen this much below its best evaluation (metric units, 0.05 = 5 points of P(positive) or accuracy) while the other kept rising."})
    trend_rows: int = field(default=3, metadata={"help": "Loss/reward trends compare the mean of the first and of the last trend_rows training logs."})
    loss_rise_fraction: float = field(default=0.5, metadata={"help": "Loss rising: the last window's mean loss exceeds the first's by this fraction of its magnitude (users' RLAIF run: 0.198 -> 0.447), and by 2 standard errors."})
    flat_reward_fraction: float = field(default=0.25, metadata={"help": "Training reward is flat when its mean moved less than this fraction of the batch reward std (reward_std) between the first and last window."})
    grad_explosion_factor: float = field(default=100.0, metadata={"help": "Gradient norm above factor x its starting level (the smallest of the first baseline_rows logs) is an explosion. The quickstart's straight-through gradient grows ~20x as tau anneals (expected); the Gumbel-softmax IMDB run's grew ~7,000x."})
    grad_vanishing_factor: float = field(default=100.0, metadata={"help": "Gradient norm below its starting level (the largest of the first baseline_rows logs) / factor (or exactly 0) for sustain_rows logs is vanishing."})


@dataclass
class Finding:
    """One problem: which check, how bad, where (steps), the values, the likely cause (one sentence) and what to try."""

    check: str
    severity: str  # "warning" or "error"
    steps: list[int]
    evidence: str
    cause: str
    advice: str

    def format(self) -> str:
        where = f"step {self.steps[0]}" if len(self.steps) == 1 else f"steps {self.steps[0]}-{self.steps[-1]}"
        return "\n".join([f"[{self.severity}] {self.check} at {where}", f"  evidence: {self.evidence}", f"  cause:    {self.cause}", f"  advice:   {self.advice}"])


# ---- reading the history ----------------------------------------------------------------------


class LogColumns:
    """The log rows as columns, built in one pass: key -> [(step, value)] of its finite numbers, plus the non-finite values.

    `extend` adds rows as they are logged, so the live callback never re-reads the whole history.
    """

    def __init__(self, rows: list[dict] = ()):
        self.columns: dict[str, list[tuple[int, float]]] = {}
        self.nonfinite: list[tuple[int, str, object]] = []  # (step, key, value): NaN/inf, or null as results.json writes them
        self.rows = 0
        self.extend(rows)

    def extend(self, rows: list[dict]) -> None:
        for row in rows:
            step = int(row.get("step", self.rows))
            self.rows += 1
            for key, value in row.items():
                if value is None or (is_number(value) and not math.isfinite(value)):
                    self.nonfinite.append((step, key, value))
                elif is_number(value):
                    self.columns.setdefault(key, []).append((step, float(value)))

    @contextlib.contextmanager
    def provisional(self, row: dict):
        """`row` added for the block only (the live doctor's look at a step before it is logged)."""
        rows, lengths, nonfinite = self.rows, {key: len(points) for key, points in self.columns.items()}, len(self.nonfinite)
        self.extend([row])
        try:
            yield self
        finally:
            self.rows, self.nonfinite[nonfinite:] = rows, []
            for key in list(self.columns):
                if key not in lengths:
                    del self.columns[key]
                else:
                    del self.columns[key][lengths[key]:]

    def series(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of every row that logged `key` as a finite number, in log order."""
        return self.columns.get(key, [])

    def first_key(self, keys) -> str | None:
        return next((k for k in keys if k in self.columns), None)

    def evaluations(self, key: str) -> list[tuple[int, float]]:
        """One point per evaluation step (the last if an evaluation was logged twice at a step)."""
        return sorted(dict(self.series(key)).items())


def _g(value: float) -> str:
    return f"{value:.3g}"


def _points(points, limit: int = 6) -> str:
    shown = ", ".join(f"{_g(v)} (step {s})" for s, v in points[:limit])
    return shown + (f", ... {len(points) - limit} more" if len(points) > limit else "")


def _sustained(points, condition, min_rows: int) -> list[tuple[int, float]]:
    """The points meeting `condition` that belong to a run of at least `min_rows` consecutive ones."""
    kept, run = [], []
    for point in points + [None]:
        if point is not None and condition(point[1]):
            run.append(point)
            continue
        if len(run) >= min_rows:
            kept += run
        run = []
    return kept


def _reward_scale(history: LogColumns, rewards: list[float]) -> float:
    """The batch reward std when logged (the noise a mean change is measured against), else the spread over logs."""
    stds = [v for _, v in history.series(metrics.REWARD_STD)]
    return statistics.fmean(stds) if stds else (statistics.pstdev(rewards) if len(rewards) > 1 else 0.0)


def _reward_not_rising(history: LogColumns, settings: DoctorSettings) -> tuple[bool, str] | None:
    """Whether the training reward's last window is not above its first by flat_reward_fraction x batch std; None without data."""
    rewards = [v for _, v in history.series(metrics.REWARD)]
    k = settings.trend_rows
    if len(rewards) < 2 * k:
        return None
    first, last = statistics.fmean(rewards[:k]), statistics.fmean(rewards[-k:])
    tolerance = settings.flat_reward_fraction * _reward_scale(history, rewards)
    return last - first < tolerance, f"training reward {_g(first)} -> {_g(last)} (first/last {k} logs; flat within {_g(tolerance)})"


# ---- the checks: (LogColumns, settings) -> list of findings, or None when the history lacks their keys


def check_nonfinite(history, settings):
    bad = history.nonfinite
    if not bad:
        return []
    shown = ", ".join(f"{k}={'null' if v is None else v} (step {s})" for s, k, v in bad[:6])
    return [Finding(
        "nonfinite", "error", sorted({s for s, _, _ in bad}),
        f"{len(bad)} non-finite values: {shown}{', ...' if len(bad) > 6 else ''} (results.json writes NaN/inf as null)",
        "A computation overflowed or divided by zero (an exploding gradient, the log of a zero probability, or a reward function returning NaN), so every update after it is unreliable.",
        "Look at the first flagged step's gradient norm, KL and reward; resume from an earlier checkpoint with a lower learning_rate or max_grad_norm.",
    )]


def check_negative_kl(history, settings):
    key = history.first_key(KL_KEYS)
    if key is None:
        return None
    points = history.series(key)
    tolerance = settings.negative_kl_tolerance
    negative = [(s, v) for s, v in points if v < -tolerance]
    if not negative:
        return []
    mean = sum(v for _, v in points) / len(points)
    noise = _log_to_log_noise([v for _, v in points])
    systematic = settings.kl_exact or mean < -tolerance  # an exact KL below 0 is never noise
    beyond = negative if systematic else [(s, v) for s, v in negative if v < -tolerance - settings.negative_kl_z * noise]
    low = min(beyond or negative, key=lambda p: p[1])
    evidence = (f"{key} < -{_g(tolerance)} in {len(negative)} of {len(points)} logs: {_points(negative)}; lowest {_g(low[1])} (step {low[0]}); "
                f"the series' mean {_g(mean)}, its log-to-log noise {_g(noise)}")
    if not beyond:
        return [Finding(
            "negative_kl", "warning", [s for s, _ in negative], evidence,
            f"Each negative log lies within {_g(settings.negative_kl_z)} noise scales of 0 and the series' mean is not negative: most likely the k1 "
            "estimate's noise over the few completions of a logging window (unbiased, so its window means dip below 0 where the true KL is small).",
            "Nothing, if it stays rare and small; more completions per step (or logging_steps) make the logged KL steadier. A mismatch of sampling "
            "and scoring would make the series negative throughout (docs/background.md section 3).",
        )]
    return [Finding(
        "negative_kl", "error", [s for s, _ in beyond], evidence,
        "KL(p || q) is never negative, so the sampled tokens' log-probs were scored under a different distribution than the one that sampled them: sampling with top-p/top-k/min_new_tokens (EOS ban) but scoring without them (docs/background.md section 3), or a per-token k1 estimate over too few samples.",
        "Score the policy with the same processed distribution that sampled (temperature, top-k, top-p, EOS ban) and the reference with temperature only, as grade_trl's samplers do; do not pass min_new_tokens through generation_kwargs to TRL; keep the k1 estimate (it shows such a mismatch; k3, >= 0 per token, would hide it, and as a reward penalty hardly regularises: Tang & Munos 2025, arXiv:2506.09477).",
    )]


def _log_to_log_noise(values: list[float]) -> float:
    """The noise scale of a logged series: 1.4826 x the median absolute deviation of its successive differences, over
    sqrt(2) (each difference carries two logs' noise), which a trend (the KL growing over training) and a lone outlier
    hardly move; 0 with fewer than 4 logs (too few to tell)."""
    if len(values) < 4:
        return 0.0
    diffs = [b - a for a, b in zip(values, values[1:])]
    centre = statistics.median(diffs)
    return 1.4826 * statistics.median(abs(d - centre) for d in diffs) / math.sqrt(2)


def check_kl_high(history, settings):
    key = history.first_key(KL_KEYS)
    if key is None:
        return None
    if settings.kl_target is not None:
        ceiling, what = settings.kl_target * settings.kl_target_factor, f"{_g(settings.kl_target_factor)} x the adaptive controller's target {_g(settings.kl_target)}"
    elif settings.kl_max is not None:
        ceiling, what = settings.kl_max, "kl_max"
    else:
        return None
    points = history.series(key)
    high = [(s, v) for s, v in points if v > ceiling]
    if not high:
        return []
    peak = max(high, key=lambda p: p[1])
    unit = "nats per completion"
    if settings.kl_target is not None:
        cause = "The policy moves away from the reference faster than the adaptive controller raises its coefficient (a change of at most 20% x batch / kl_horizon per rollout), so the learning rate is too high, or init_kl_coef too low, for this target."
        advice = "Lower learning_rate, raise init_kl_coef or shorten kl_horizon, or set target_kl to stop a rollout's updates early."
    else:
        cause = "The KL penalty is too weak for this learning rate, so the policy drifts far from the reference, where the learned reward is least reliable and reward hacking grows (Gao et al. 2023)."
        advice = "Raise the KL coefficient (kl_coef for GRADE, beta for REINFORCE and GRPO, init_kl_coef for PPO) or lower learning_rate, compare the gold judge's reward and the samples, keep the best validation checkpoint; raise kl_max if this drift is intended."
    return [Finding(
        "kl_high", "warning", [s for s, _ in high],
        f"{key} above {what} = {_g(ceiling)} {unit} in {len(high)} of {len(points)} logs: {_points(high)}; peak {_g(peak[1])} (step {peak[0]})",
        cause, advice,
    )]


def check_value_loss_spike(history, settings):
    points = history.series(metrics.VALUE_LOSS)
    if not points:
        return None
    spikes, earlier = [], []  # earlier: the values before point i, kept sorted for the running median
    for i, (step, value) in enumerate(points):
        if i >= settings.baseline_rows:
            n = len(earlier)
            typical = earlier[n // 2] if n % 2 else (earlier[n // 2 - 1] + earlier[n // 2]) / 2
            if value > settings.value_loss_spike_factor * typical:
                spikes.append((step, value, typical))
        bisect.insort(earlier, value)
    if not spikes:
        return []
    shown = ", ".join(f"{_g(v)} (step {s}, {_g(v / m) if m > 0 else 'inf'}x the median {_g(m)} before it)" for s, v, m in spikes[:6])
    return [Finding(
        "value_loss_spike", "warning", [s for s, _, _ in spikes],
        f"loss/value above {_g(settings.value_loss_spike_factor)} x the median of the earlier logs: {shown}",
        "The value head's targets jumped faster than it can fit them, typically after a reward or KL-penalty outlier (users' PPO: value loss 3,000+ while the KL spiked to 20-300) or with a learning rate too high for the value head.",
        "Lower learning_rate or vf_coef, set cliprange_value, scale or whiten the rewards, and check the KL at the same steps.",
    )]


def check_negative_explained_variance(history, settings):
    points = history.series(metrics.EXPLAINED_VARIANCE)
    if not points:
        return None
    low = _sustained(points, lambda v: v < settings.explained_variance_min, settings.sustain_rows)
    if not low:
        return []
    return [Finding(
        "negative_explained_variance", "warning", [s for s, _ in low],
        f"{metrics.EXPLAINED_VARIANCE} below {_g(settings.explained_variance_min)} for {settings.sustain_rows}+ consecutive logs: {_points(low)}",
        "The value head predicts the returns worse than their mean would, so the GAE advantages carry its errors as noise (a value head that does not learn, or returns that change faster than it fits).",
        "Check loss/value for spikes, lower learning_rate, raise vf_coef if the value loss is flat, or scale the rewards to about unit size.",
    )]


def check_entropy_collapse(history, settings):
    key = history.first_key(ENTROPY_KEYS)
    points = history.series(key) if key else []
    if len(points) <= settings.baseline_rows:
        return None
    start = max(v for _, v in points[: settings.baseline_rows])  # the highest: a collapse inside the first logs still counts
    threshold = (1 - settings.entropy_drop) * start
    collapsed = _sustained(points, lambda v: v < threshold or (v < settings.entropy_floor < start), settings.sustain_rows)
    if not collapsed:
        return []
    return [Finding(
        "entropy_collapse", "warning", [s for s, _ in collapsed],
        f"{key} fell from {_g(start)} (the highest of the first {settings.baseline_rows} logs) below {_g(threshold)} ({_g(100 * settings.entropy_drop)}% drop) "
        f"or the floor {_g(settings.entropy_floor)} nats/token: {_points(collapsed)}",
        "The policy became nearly deterministic and stopped exploring, which usually follows a learning rate too high for the reward's scale or a KL penalty too weak to hold it near the reference.",
        "Lower learning_rate, raise the KL coefficient or add an entropy bonus (ent_coef), and look at the samples for one repeated completion.",
    )]


def check_clip_fraction(history, settings):
    key = history.first_key(CLIP_KEYS)
    points = history.series(key) if key else []
    if not points:
        return None
    findings = []
    high = _sustained(points, lambda v: v > settings.clip_fraction_high, settings.sustain_rows)
    if high:
        findings.append(Finding(
            "clip_fraction_high", "warning", [s for s, _ in high],
            f"{key} above {_g(settings.clip_fraction_high)} for {settings.sustain_rows}+ consecutive logs: {_points(high)}",
            "Each update moves the policy so far from the one that sampled the batch that most tokens hit the clip, so the surrogate's gradient comes from few tokens (learning rate too high, or too many epochs or mini-batches per batch).",
            "Lower learning_rate or ppo_epochs / num_iterations, or use more samples per update (healthy: 10-40%, docs/background.md section 4).",
        ))
    median = statistics.median(v for _, v in points)
    flat = _reward_not_rising(history, settings)
    if median < settings.clip_fraction_low and any(v > 0 for _, v in points) and flat is not None and flat[0]:
        findings.append(Finding(
            "clip_fraction_low", "warning", [s for s, _ in points],
            f"median {key} {_g(median)} < {_g(settings.clip_fraction_low)} over {len(points)} logs while the {flat[1]}",
            "The updates barely move the policy within a batch, so with a flat reward the learning rate is most likely too low to learn (users' PPO at lr 1e-6: clip fraction ~0.01 and no learning).",
            "Raise learning_rate (users: 1e-5 learned where 1e-6 did not) and watch that the clip fraction settles within 10-40% (docs/background.md section 4).",
        ))
    return findings


def validation_key_of(history, settings) -> str | None:
    return settings.validation_key or history.first_key(VALIDATION_KEYS)


def _related_key(key: str, kind: str) -> str:
    """eval_reward -> eval_best_of_n_reward / eval_gold_reward (the evaluation's `{prefix}_{kind}_{primary}` names)."""
    prefix, _, primary = key.partition("_")
    return f"{prefix}_{kind}_{primary}"


def _standard_error(history, key: str, eval_size: int | None):
    """step -> the standard error of the evaluation's mean `key`: `{key}_std` / sqrt(n), or an accuracy's binomial
    sqrt(p (1 - p) / n); {} when the size or the spread is unknown."""
    if not eval_size:
        return {}
    spread = dict(history.evaluations(f"{key}_std"))
    if not spread and key.endswith("accuracy"):  # a fraction of problems solved: its std over problems is binomial
        spread = {s: math.sqrt(max(v * (1 - v), 0.0)) for s, v in history.evaluations(key)}
    return {s: v / math.sqrt(eval_size) for s, v in spread.items()}


def check_reward_regression(history, settings):
    key = validation_key_of(history, settings)
    points = history.evaluations(key) if key else []
    if len(points) < 2:
        return None
    error = _standard_error(history, key, settings.eval_size) if settings.regression_min_z > 0 else {}

    def fell(before, after) -> bool:
        """`after` lies below `before` by more than regression_min_drop and regression_min_z standard errors."""
        noise = math.hypot(error[before[0]], error[after[0]]) if before[0] in error and after[0] in error else 0.0
        return after[1] < before[1] - max(settings.regression_min_drop, settings.regression_min_z * noise)

    findings, run = [], [points[0]]
    for point in points[1:] + [None]:
        if point is not None and fell(run[-1], point):
            run.append(point)
            continue
        if len(run) - 1 >= settings.regression_evals:
            z = settings.regression_min_z
            noise = f" (each fall beyond {_g(z)} standard error{'' if z == 1 else 's'} of {settings.eval_size}-prompt evaluations)" if error else ""
            findings.append(Finding(
                "reward_regression", "warning", [s for s, _ in run],
                f"{key} fell at {len(run) - 1} consecutive evaluations{noise}: " + " -> ".join(f"{_g(v)} (step {s})" for s, v in run),
                "The policy is moving past its best point, most often by over-optimising the training reward (learning rate too high or KL penalty too weak) or by drifting away from the prompts it is validated on.",
                "Keep the best validation checkpoint, lower learning_rate or raise the KL coefficient, or stop early on this rule (early_stopping_patience).",
            ))
        run = [point] if point is not None else []
    return findings


def _diverging(points_a, points_b, min_drop):
    """Group, by b's best evaluation p so far, the later evaluations j where b(j) < b(p) - min_drop while a(j) > a(p)."""
    a, b = dict(points_a), dict(points_b)
    steps = [s for s, _ in points_b if s in a]
    groups: dict[int, list[int]] = {}
    best = None
    for s in steps:
        if best is None or b[s] > b[best]:
            best = s
        elif b[s] < b[best] - min_drop and a[s] > a[best]:
            groups.setdefault(best, []).append(s)
    return a, b, groups


def _divergence_findings(history, settings, related: str, rising_is_related: bool, check: str, cause: str, advice: str):
    """Findings where one validation series fell from its best while the other rose past its value there.

    rising_is_related: the related series (best-of-N) rose while the validation metric fell; otherwise the
    validation metric (the learned reward) rose while the related one (the gold judge) fell.
    """
    key = validation_key_of(history, settings)
    other = _related_key(key, related) if key else None
    if not key or not history.series(other):
        return None
    rising, falling = (other, key) if rising_is_related else (key, other)
    up, down, groups = _diverging(history.evaluations(rising), history.evaluations(falling), settings.divergence_min_drop)
    return [Finding(
        check, "warning", [peak] + later,
        f"{falling} fell {_g(down[peak])} -> {_g(down[later[-1]])} (steps {peak} -> {later[-1]}) while {rising} rose {_g(up[peak])} -> {_g(up[later[-1]])}",
        cause, advice,
    ) for peak, later in groups.items()]


def check_best_of_n_divergence(history, settings):
    return _divergence_findings(
        history, settings, "best_of_n", True, "best_of_n_divergence",
        "The policy still reaches high-reward completions but samples them less reliably: its distribution spread out or moved towards a few modes the reward likes (docs/background.md section 5: average reward regressed in epoch 4 while best-of-N kept improving).",
        "Lower learning_rate or raise the KL coefficient, filter or train on the best of N samples, and keep the best validation checkpoint.",
    )


def check_reward_hacking(history, settings):
    return _divergence_findings(
        history, settings, "gold", False, "reward_hacking",
        "The policy is exploiting errors of the learned reward model: its score keeps rising while an independent judge of the same completions says they got worse.",
        "Keep the checkpoint where the gold reward peaked, raise the KL coefficient, and read the samples for the pattern the reward model over-rates.",
    )


def check_loss_rising(history, settings):
    losses, k = history.series(metrics.LOSS), settings.trend_rows
    flat = _reward_not_rising(history, settings)
    if len(losses) < 2 * k or flat is None:
        return None
    first, last = [v for _, v in losses[:k]], [v for _, v in losses[-k:]]
    rise = statistics.fmean(last) - statistics.fmean(first)
    standard_error = math.sqrt((statistics.variance(first) + statistics.variance(last)) / k) if k > 1 else 0.0
    if not (flat[0] and rise > settings.loss_rise_fraction * abs(statistics.fmean(first)) and rise > 2 * standard_error):
        return []
    return [Finding(
        "loss_rising_reward_flat", "warning", [s for s, _ in losses[:k] + losses[-k:]],
        f"loss {_g(statistics.fmean(first))} -> {_g(statistics.fmean(last))} (first/last {k} logs, +{_g(rise)}, > {_g(100 * settings.loss_rise_fraction)}% and 2 standard errors) while the {flat[1]}",
        "The optimiser is no longer improving the objective it is given, which usually means the learning rate is too high for this stage (or no longer decays) or the KL term is growing faster than the reward.",
        "Lower learning_rate or use a decaying schedule with a longer warm-up, tighten max_grad_norm, and check the KL term (docs/background.md section 5).",
    )]


def check_grad_norm(history, settings):
    key = history.first_key(GRAD_KEYS)
    points = history.series(key) if key else []
    if len(points) <= settings.baseline_rows:
        return None
    start = min(v for _, v in points[: settings.baseline_rows])
    findings = []
    exploded = [(s, v) for s, v in points if start > 0 and v > settings.grad_explosion_factor * start]
    if exploded:
        peak = max(exploded, key=lambda p: p[1])
        findings.append(Finding(
            "grad_norm_explosion", "error", [s for s, _ in exploded],
            f"{key} above {_g(settings.grad_explosion_factor)} x its starting level {_g(start)}: {_points(exploded)}; peak {_g(peak[1])} (step {peak[0]}, {_g(peak[1] / start)}x)",
            "The loss surface got much steeper than at the start (a relaxation temperature annealed too low, a learning rate too high, or near-deterministic token probabilities), so clipping now decides every update's size.",
            "Lower learning_rate, stop annealing tau so low (GRADE), keep max_grad_norm at 1.0, and resume from a checkpoint before the first flagged step.",
        ))
    high = max(v for _, v in points[: settings.baseline_rows])  # vanishing is judged against the highest: a fall inside the first logs counts
    vanished = _sustained(points, lambda v: v == 0 or v < high / settings.grad_vanishing_factor, settings.sustain_rows)
    if vanished:
        findings.append(Finding(
            "grad_norm_vanishing", "warning", [s for s, _ in vanished],
            f"{key} below its starting level {_g(high)} (the highest of the first {settings.baseline_rows} logs) / {_g(settings.grad_vanishing_factor)} (or 0) for {settings.sustain_rows}+ consecutive logs: {_points(vanished)}",
            "The objective no longer gives a learning signal: every sample in a group gets the same reward (zero advantages), the policy has collapsed onto one completion, or the loss is cut off from the parameters.",
            "Check frac_reward_zero_std / reward_std and the entropy, raise the sampling temperature or the number of generations, and check that the trained parameters require grad.",
        ))
    return findings


CHECKS = (
    check_nonfinite,
    check_negative_kl,
    check_kl_high,
    check_value_loss_spike,
    check_negative_explained_variance,
    check_entropy_collapse,
    check_clip_fraction,
    check_reward_regression,
    check_loss_rising,
    check_grad_norm,
    check_best_of_n_divergence,
    check_reward_hacking,
)


CHECK_IDS = (
    "nonfinite", "negative_kl", "kl_high", "value_loss_spike", "negative_explained_variance", "entropy_collapse", "clip_fraction_high",
    "clip_fraction_low", "reward_regression", "loss_rising_reward_flat", "grad_norm_explosion", "grad_norm_vanishing", "best_of_n_divergence",
    "reward_hacking",
)  # what Finding.check can be, for stop_on


def run_checks(history: list[dict] | LogColumns, settings: DoctorSettings | None = None) -> tuple[list[Finding], list[str]]:
    """(findings, names of the checks the history had no data for)."""
    settings = settings or DoctorSettings()
    history = history if isinstance(history, LogColumns) else LogColumns(history)
    findings, not_applicable = [], []
    for check in CHECKS:
        result = check(history, settings)
        if result is None:
            not_applicable.append(check.__name__.removeprefix("check_"))
        else:
            findings += result
    return findings, not_applicable


def diagnose(history: list[dict] | LogColumns, settings: DoctorSettings | None = None) -> list[Finding]:
    """Every finding of every check on `history` (trainer log rows, each with "step"); [] for a healthy run."""
    return run_checks(history, settings)[0]


def check_stop_on(stop_on: typing.Iterable[str]) -> set[str]:
    """The set of `stop_on` names (severities and check ids) a run doctor stops on; ValueError naming an unknown one."""
    names = set(stop_on)
    unknown = sorted(names - {"error", "warning", *CHECK_IDS})
    if unknown:
        raise ValueError(f"stop_on: unknown {unknown[0]!r}; give a severity (error, warning) or a check id ({', '.join(CHECK_IDS)})")
    return names


# ---- settings from a run and from overrides ---------------------------------------------------------


def settings_from_config(config: dict) -> dict:
    """Settings a run's results.json config implies: the adaptive KL target, the validation metric, and the run's own
    `doctor_settings` (so that the command checks a run as its live doctor did; the command's options win)."""
    trainer = config.get("trainer") or {}
    values = {}
    if trainer.get("adaptive_kl") and trainer.get("kl_target"):
        values["kl_target"] = float(trainer["kl_target"])
    if method_logs_exact_kl((config.get("run") or {}).get("method")):
        values["kl_exact"] = True
    if isinstance((config.get("final") or {}).get("validation_metric"), str):
        values["validation_key"] = config["final"]["validation_metric"]
    if eval_size := evaluation_size_of(config):
        values["eval_size"] = eval_size
    own = (config.get("run") or {}).get("doctor_settings")
    if isinstance(own, dict):  # checked when the run started (recipe.check_doctor_settings)
        names = {f.name for f in dataclasses.fields(DoctorSettings)}
        values |= {key: value for key, value in own.items() if key in names}
    return values


def method_logs_exact_kl(method) -> bool:
    """Whether the registry's `method` (its name, or a config of its config class) logs an exact KL (GRADE's); False
    for an unknown name or config."""
    from .methods import METHODS  # the registry imports no trainer until one is asked for

    if isinstance(method, str):
        return bool(method in METHODS and METHODS[method].exact_kl)
    return method is not None and any(entry.exact_kl and isinstance(method, entry.config_class) for entry in METHODS.values())


def evaluation_size_of(config: dict) -> int | None:
    """The prompts (GSM8K: problems) each evaluation of a run scored: the recipe's eval_num_prompts (eval_num_problems),
    or the validation split's size when it had fewer; None when the config does not say."""
    run, task = config.get("run") or {}, (config.get("final") or {}).get("task") or {}
    asked = run.get("eval_num_problems" if run.get("task") == "gsm8k" else "eval_num_prompts")
    available = (task.get("split_sizes") or {}).get("validation")
    sizes = [n for n in (asked, available) if is_number(n) and n >= 1]
    return int(min(sizes)) if sizes and is_number(asked) else None  # an IMDB split's size alone is not what was scored


_AT_LEAST_1 = (lambda v: v >= 1, "an integer >= 1")
_POSITIVE = (lambda v: v > 0, "a number > 0")
_NON_NEGATIVE = (lambda v: v >= 0, "a number >= 0")
SETTING_RANGES = {  # setting -> (is the value right?, what is right); a value out of range would crash a check or make it meaningless
    "baseline_rows": _AT_LEAST_1, "sustain_rows": _AT_LEAST_1, "trend_rows": _AT_LEAST_1, "regression_evals": _AT_LEAST_1,
    "negative_kl_tolerance": _NON_NEGATIVE, "negative_kl_z": _NON_NEGATIVE, "kl_target": _POSITIVE, "kl_target_factor": (lambda v: v >= 1, "a number >= 1"), "kl_max": _POSITIVE,
    "value_loss_spike_factor": (lambda v: v > 1, "a number > 1"), "entropy_drop": (lambda v: 0 < v < 1, "a fraction in (0, 1)"),
    "entropy_floor": _NON_NEGATIVE, "clip_fraction_low": (lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    "clip_fraction_high": (lambda v: 0 < v <= 1, "a fraction in (0, 1]"), "regression_min_drop": _NON_NEGATIVE, "regression_min_z": _NON_NEGATIVE, "eval_size": _AT_LEAST_1, "divergence_min_drop": _NON_NEGATIVE,
    "loss_rise_fraction": _POSITIVE, "flat_reward_fraction": _POSITIVE, "grad_explosion_factor": (lambda v: v > 1, "a number > 1"),
    "grad_vanishing_factor": (lambda v: v > 1, "a number > 1"),
}


def build_settings(overrides: dict, implied: dict | None = None) -> DoctorSettings:
    """DoctorSettings from the run's implied values and `--key value` overrides (overrides win); unknown keys and values
    out of SETTING_RANGES are one-line errors naming the setting."""
    names = [f.name for f in dataclasses.fields(DoctorSettings)]
    for key in overrides:
        if key not in names:
            raise UserError(f"unknown doctor setting {key!r}{unknown_key_hint(key, names, 'grade_trl.doctor')}")
    hints = typing.get_type_hints(DoctorSettings)
    values = {k: coerce(k, v, hints[k]) for k, v in overrides.items()}
    for key, value in values.items():
        if problem := range_error(key, value, SETTING_RANGES):
            raise UserError(problem)
    implied = {k: coerce(k, v, hints[k]) for k, v in (implied or {}).items()}  # read from a results.json
    return DoctorSettings(**{**implied, **values})
