"""Our sampler (`grade_trl.core.sample`) with GPT-2's activation as one kernel against the model's own `gelu_new`,
side by side in one process: aten calls (what a GPU launches or dispatches) and CPU time of one sampling call.

The sampler and GRADE's relaxed rollout run `gelu_new` as torch's `F.gelu(approximate="tanh")` (the same function,
`core/soft_rollout.py`); the old path is the model's own eight-operation `gelu_new`, pinned on the modules (which the
replacement leaves alone). GRADE's side is `attention_grad_buffer.py --compare one_kernel_gelu`. Default shape: the
per-operation-bound proxy of the README (24 layers, 64 wide, batch 4, 32-token prompts, 48 new tokens, one thread).

    python benchmarks/one_kernel_gelu.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.activations import NewGELUActivation

from grade_trl.core import SamplingSettings, sample
from grade_trl.core.soft_rollout import tanh_gelu_modules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n_layer", type=int, default=24)
    parser.add_argument("--n_embd", type=int, default=64)
    parser.add_argument("--n_head", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--prompt_length", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds of (one kernel, gelu_new); the median leaves out the first")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, vocab_size=50257, attn_implementation="sdpa")
    model = GPT2LMHeadModel(config).eval()  # random weights: the cost does not depend on them
    activations = tanh_gelu_modules(model)
    ids = torch.randint(100, 50000, (args.batch_size, args.prompt_length))
    settings = SamplingSettings(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)

    def models_own(on: bool) -> None:
        for module in activations:
            if on:
                module.forward = NewGELUActivation.forward.__get__(module)
            elif "forward" in vars(module):
                del module.forward

    def one_call() -> None:
        sample(model, ids, torch.ones_like(ids), settings, eos_token_id=config.eos_token_id)

    paths = {"one kernel": False, "gelu_new": True}
    calls, seconds = {}, {name: [] for name in paths}
    for name, own in paths.items():
        models_own(own)
        one_call()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            one_call()
        calls[name] = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    for _ in range(args.rounds):
        for name, own in paths.items():
            models_own(own)
            start = time.perf_counter()
            one_call()
            seconds[name].append(time.perf_counter() - start)
    models_own(False)
    medians = {name: statistics.median(values[1:]) for name, values in seconds.items()}
    print(f"sample(), {args.n_layer} layers x {args.n_embd}, batch {args.batch_size}, {args.prompt_length} + {args.new_tokens} tokens, "
          f"{args.threads} threads: " + "; ".join(f"{name}: {calls[name]:,} aten calls, {medians[name]:.3f} s" for name in paths)
          + f"; calls {calls['one kernel'] / calls['gelu_new']:.2f}x, time {medians['one kernel'] / medians['gelu_new']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
