"""Metric windows shared by every trainer: per-step values averaged at each log, grad-norm statistics."""

from __future__ import annotations

import math
from collections import defaultdict

from transformers import TrainerCallback


class MetricWindow:
    """Values collected between two logs (`add`), averaged and cleared by `flush`: each key's mean weighted by how many
    samples each value is the mean of (`weight`), so that the window's `reward` is the mean over the samples behind it
    whatever the batches' sizes (an evaluation's last batch of 1 prompt counts once, not as much as a batch of 2). TRL
    averages its batches' means unweighted, the same where every batch is full."""

    def __init__(self):
        self.values: dict[str, list[float]] = defaultdict(list)
        self.weights: dict[str, list[float]] = defaultdict(list)

    def add(self, weight: float = 1.0, /, **metrics: float) -> None:
        """metrics: each a mean over `weight` samples (every process's; 1 for a value that is not such a mean). The
        weight is positional only, so that a metric may be named `weight` (a reward's `log_metric("weight", ...)`)."""
        weights = self.__dict__.setdefault("weights", defaultdict(list))  # absent from a window pickled before it existed
        for key, value in metrics.items():
            self.values[key].append(float(value))
            weights[key].append(float(weight))

    def means(self) -> dict[str, float]:
        """Each key's weighted mean so far (the window kept)."""
        weights = self.__dict__.get("weights") or {}
        logs = {}
        for key, values in self.values.items():
            if values:
                given = weights.get(key, [])
                # values restored from a window saved before the weights existed count as the first weighted value
                w = [given[0] if given else 1.0] * (len(values) - len(given)) + given
                logs[key] = sum(v * x for v, x in zip(values, w)) / sum(w)
        return logs

    def flush(self) -> dict[str, float]:
        logs = self.means()
        self.values.clear()
        self.__dict__.get("weights", {}).clear()
        return logs


def grad_norm_stats(norms: list[float]) -> dict[str, float]:
    """Mean, std and max of the pre-clipping norms of a window's optimizer steps (a spread over steps,
    not over parameters, and not an estimator variance)."""
    mean = sum(norms) / len(norms)
    std = math.sqrt(sum((g - mean) ** 2 for g in norms) / len(norms))
    return {"grad_norm_mean": mean, "grad_norm_std": std, "grad_norm_max": max(norms)}


class GradNormWindowMixin:
    """For any `transformers.Trainer` subclass (TRL's included): log grad_norm_mean/std/max per logging window.

    Trainer computes the pre-clipping norm of every optimizer step but logs only the window's last one.
    """

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if grad_norm is not None:
            self.__dict__.setdefault("_grad_norm_window", []).append(float(grad_norm))
        return grad_norm

    def training_state(self) -> dict:
        """The window's norms so far (see `methods`: the state a probe or a resume must restore)."""
        return {"_grad_norm_window": self.__dict__.setdefault("_grad_norm_window", [])}

    def pending_logs(self) -> dict[str, float]:
        """What the next training log would report if it were written now (the window's means so far, not cleared),
        with this step's `grad_norm`: the live doctor checks it before the optimizer step (doctor_callback.DoctorCallback).
        Reads `self._metrics["train"]`: our MetricWindow or TRL's dict of lists."""
        window = self._metrics["train"]
        if isinstance(window, MetricWindow):
            logs = window.means()
        else:
            logs = {key: sum(v) / len(v) for key, v in window.items() if v and all(isinstance(x, (int, float)) for x in v)}
        norms = self.__dict__.get("_grad_norm_window")
        if norms:
            logs |= {"grad_norm": norms[-1], **grad_norm_stats(norms)}
        return logs

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        window = self.__dict__.get("_grad_norm_window")
        if "loss" in logs and window:
            logs.update(grad_norm_stats(window))
            window.clear()
        super().log(logs, start_time)


class LogTheLastWindow(TrainerCallback):
    """At the run's last step (`max_steps`), log the steps since the last log when `logging_steps` does not divide
    `max_steps`: Trainer logs only every `logging_steps`, so a run of 5 steps at `logging_steps: 10` (a quick trial)
    logged no training row at all (no reward, KL or loss in its history; the summary's KL was "-") and a run of 437 at
    10 left its last 7 steps out. The row averages those steps as any window does (Trainer's loss included)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step < state.max_steps or args.logging_strategy != "steps":  # "no": the user asked for no training rows
            return control
        logged = max((row["step"] for row in state.log_history if "loss" in row), default=0)
        if state.global_step > logged:
            control.should_log = True
        return control
