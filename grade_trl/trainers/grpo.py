"""TRL's GRPOTrainer (GRPO, Dr. GRPO, CISPO, ...) used as it is, plus the metrics every grade_trl method logs."""

from __future__ import annotations

from trl import GRPOTrainer as _TRLGRPOTrainer

from .metrics import GradNormWindowMixin


class GRPOTrainer(GradNormWindowMixin, _TRLGRPOTrainer):
    """`trl.GRPOTrainer`, unchanged, with grad_norm_mean/std/max over each logging window added to its logs."""
