"""Floating-point widths: computations that must not run below float32, and must not narrow a wider run."""

from __future__ import annotations

import torch


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in float32 if it is narrower (bf16, fp16, integer, bool), unchanged if float32 or float64.

    Instead of `.float()`, which would also narrow a float64 run (gradient checks) to float32."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))
