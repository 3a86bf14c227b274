"""x @ W^T for a decode step's few rows and a wide W (the LM head), computed as (W @ x^T)^T on CPU.

Why: a decode step multiplies B rows (one new position per completion) by the (V, H) LM head, in the forward of every
decode loop (our sampler, GRADE's relaxed rollout), and GRADE's straight-through embedding multiplies B rows of
gradient by E^T in its backward (`soft_tokens._OneHotEmbedding`). Each of those products streams the whole matrix for
little arithmetic. torch's CPU build hands `x @ W^T` (`F.linear`) to MKL's sgemm, which runs that shape far below the
memory bandwidth it reaches for the same numbers laid out as `W @ x^T`; which layout the kernel gets is the only
difference. Measured on the 2-core AMD EPYC (AVX2) development host, torch 2.13.0 (MKL 2024.2), float32, the median
of 7 calls of each layout, interleaved (`python benchmarks/few_rows_product.py --threads 2 --repeats 7`, 2026-12-07):

    W (V x H)               rows   F.linear(x, W)   (W @ x^T)^T, made contiguous
    50,257 x 768 (GPT-2)       8       36.6 ms          14.0 ms
    50,257 x 768              32       54.9 ms          29.2 ms
    50,257 x 1,024 (medium)    8       56.3 ms          19.9 ms
    8,192 x 256 (embedded)     8        2.3 ms           0.8 ms

With one thread the gap is smaller (GPT-2's head, 8 rows: 31.3 against 25.2 ms; the embedded one's: 1.46 against
1.31 ms): F.linear's kernel gains little from the second thread at this shape. Only a decode step's rows take the
transposed layout (at most `FEW_ROWS`): with more rows (a teacher-forced forward's B x T) the gain shrinks, and for the
embedded model's small head it went either way from run to run (0.85x-1.5x at 64-512 rows), so those products are left
as they were. On a GPU it was not measured, and there each extra operation counts (the decode loop is bound by their
number): the product stays `F.linear`.

The values are the same products up to float summation order (tests/test_few_rows.py compares them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FEW_ROWS = 32
"""At most this many rows (of the input, flattened to 2-D) take the transposed layout: a decode step's batch."""


def uses_transposed_layout(x: torch.Tensor) -> bool:
    """Whether `times_transposed` computes x's product as (W @ x^T)^T: on CPU, with at most FEW_ROWS rows."""
    return x.device.type == "cpu" and x.numel() <= FEW_ROWS * x.shape[-1]


def times_transposed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias): x (..., in), weight (out, in), bias (out,) or None -> (..., out), contiguous.

    On CPU with few rows (`uses_transposed_layout`) as (weight @ x^T)^T (module docstring); otherwise F.linear. Autograd
    and autocast see torch.mm (torch.addmm with a bias), a transpose and a copy, each differentiable; under autocast the
    output has F.linear's dtype, and operands of different dtypes outside it raise as F.linear's do."""
    if not uses_transposed_layout(x):
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, x.shape[-1])  # (N, in)
    # (out, N), the bias added in the product (one rounding, and autocast casts it with the other operands, as F.linear's)
    product = torch.mm(weight, flat.t()) if bias is None else torch.addmm(bias.unsqueeze(1), weight, flat.t())
    return product.t().contiguous().view(*x.shape[:-1], weight.shape[0])  # laid out by rows, as F.linear's


def _linear_forward(module: nn.Linear):
    def forward(input):  # noqa: A002 - nn.Linear.forward's own argument name
        return times_transposed(input, module.weight, module.bias)
    return forward


def few_row_output_head(model: nn.Module) -> list[tuple[nn.Module, object]]:
    """[(the output head, its forward by `times_transposed`)] for `deferred_grads.replaced_forwards`, when `model`'s
    output head (`get_output_embeddings()`: the LM head) is a plain `nn.Linear` on CPU; [] otherwise: a subclass (a
    quantised or LoRA head), a sharded weight (a DTensor), a model without one. A head whose forward something else
    replaced (deferred weight gradients, Accelerate's hooks) is left alone by `replaced_forwards` itself."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    plain = type(head) is nn.Linear and head.weight.device.type == "cpu" and type(head.weight) in (torch.Tensor, nn.Parameter)
    return [(head, _linear_forward(head))] if plain else []
