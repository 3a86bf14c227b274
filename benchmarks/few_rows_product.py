"""A decode step's LM-head product on CPU: F.linear(x, W) against (W @ x^T)^T (`grade_trl/core/few_rows.py`).

Prints, for each weight shape and row count, the median time of each layout and their ratio, the two interleaved
call by call so that a busy host slows both alike. The rows up to `few_rows.FEW_ROWS` are what a decode step
multiplies (one new position per completion); the larger counts show where the switch stops paying.

    python benchmarks/few_rows_product.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from grade_trl.core.few_rows import FEW_ROWS

SHAPES = {"gpt2 (50,257 x 768)": (50257, 768), "gpt2-medium (50,257 x 1,024)": (50257, 1024), "embedded (8,192 x 256)": (8192, 256),
          "qwen2.5-0.5b (151,936 x 896)": (151936, 896)}


def median_ms(calls: dict, repeats: int) -> dict:
    times = {name: [] for name in calls}
    for _ in range(repeats + 2):  # the first two rounds warm up
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(values[2:]) for name, values in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--rows", type=int, nargs="+", default=[4, 8, 16, 32, 64, 256], help="rows of x")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES), help="weights to multiply")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each layout (median)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, float32; FEW_ROWS = {FEW_ROWS}\n")
    print("| W (V x H) | rows | F.linear(x, W) ms | (W @ x^T)^T ms | ratio |")
    print("|---|---:|---:|---:|---:|")
    generator = torch.Generator().manual_seed(0)
    for shape in args.shapes:
        weight = torch.randn(*SHAPES[shape], generator=generator)
        for rows in args.rows:
            x = torch.randn(rows, weight.shape[1], generator=generator)
            ms = median_ms({"linear": lambda: F.linear(x, weight), "transposed": lambda: torch.mm(weight, x.t()).t().contiguous()}, args.repeats)
            print(f"| {shape} | {rows} | {ms['linear']:.2f} | {ms['transposed']:.2f} | {ms['linear'] / ms['transposed']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
