"""Metric windows shared by every trainer: per-step values averaged at each log, grad-norm statistics."""

from __future__ import annotations

import math
from collections import defaultdict


class MetricWindow:
    """Values collected between two logs (`add`), averaged and cleared by `flush`."""

    def __init__(self):
        self.values: dict[str, list[float]] = defaultdict(list)
        self.grad_norms: list[float] = []

    def add(self, **metrics: float) -> None:
        for key, value in metrics.items():
            self.values[key].append(float(value))

    def add_grad_norm(self, value: float) -> None:
        self.grad_norms.append(float(value))

    def flush(self) -> dict[str, float]:
        logs = {key: sum(vals) / len(vals) for key, vals in self.values.items() if vals}
        if self.grad_norms:
            mean = sum(self.grad_norms) / len(self.grad_norms)
            var = sum((g - mean) ** 2 for g in self.grad_norms) / len(self.grad_norms)
            # Pre-clipping norms of the optimizer steps in this window; the spread over steps, not over parameters.
            logs.update(grad_norm_mean=mean, grad_norm_std=math.sqrt(var), grad_norm_max=max(self.grad_norms))
        self.values.clear()
        self.grad_norms.clear()
        return logs
