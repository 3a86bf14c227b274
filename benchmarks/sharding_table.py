"""Which launch config a model size and method need: the memory per GPU of one training step, by the memory model.

For each GPT-2 shape, method and config, the peak memory per GPU (GiB) of a float32 step at the per-GPU batch and
length given, from the fitted coefficients in `docs/results/memory_model.json` (benchmarks/memory_model.py, checked
against an H200 to 4-10% in float32) and how each config places the parts:

                      policy weights   gradients   AdamW state   reference, reward backbone   activations
    one GPU / DDP     4 N              4 N         8 N           4 N + 4 N_r (replicated)     S + X
    zero2.yaml        4 N              4 N / G     8 N / G       4 N + 4 N_r                  S + X
    fsdp2.yaml/zero3  4 N / G + unit   4 N / G     8 N / G       4 N + 4 N_r                  S + X (+ 4 V H: GRADE's gathered E)

with N the policy's parameters, N_r the reward backbone's (GRPO and REINFORCE/PPO with a learned reward keep it too),
G the number of GPUs, S + X the step's saved and transient activation bytes (the memory model's features), and
"unit" the largest FSDP unit gathered at a time (one transformer block, 12 H^2 weights, twice for prefetch). The
gradient branch of the step peak, max(S + X, 4 N + 8 B T V), keeps its 4 N / G under sharding. Allocator bytes: a
CUDA process adds 0.5-1 GB of context. GPT-2 shapes only: the activation coefficients are fitted on GPT-2 blocks.

    python benchmarks/sharding_table.py                    # gpt2-medium, -large, -xl; batch 16, 48 new tokens, 8 GPUs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHAPES = {"gpt2-medium": (24, 1024), "gpt2-large": (36, 1280), "gpt2-xl": (48, 1600)}  # (layers, hidden)
VOCAB, PROMPT, POSITIONS = 50257, 32, 1024
METHODS = ("grade_ste", "reinforce", "ppo", "grpo")
CONFIGS = ("one GPU", "zero2.yaml", "fsdp2.yaml / zero3.yaml")
GIB = 2**30


def parameters(layers: int, hidden: int) -> int:
    """GPT-2 with a tied LM head (the reward backbone is the same body: the same count)."""
    return layers * (12 * hidden**2 + 13 * hidden) + 2 * hidden + VOCAB * hidden + POSITIONS * hidden


def activations(coefficients: dict, layers: int, hidden: int, batch: int, new_tokens: int) -> float:
    """S or X in bytes: the memory model's c1 B L H (P+T) + c2 B T V + c3 B H (P+T) + c4 B V + c0."""
    tokens = PROMPT + new_tokens
    values = {"B L H (P+T)": batch * layers * hidden * tokens, "B T V": batch * new_tokens * VOCAB, "B H (P+T)": batch * hidden * tokens,
              "B V": batch * VOCAB, "1": 1.0}
    return sum(coefficients[name] * value for name, value in values.items())


def per_gpu_gib(model: dict, method: str, config: str, layers: int, hidden: int, batch: int, new_tokens: int, gpus: int) -> float:
    entry = model["methods"][f"{method}/float32"]
    n = parameters(layers, hidden)
    step = activations(entry["saved_coefficients"], layers, hidden, batch, new_tokens) + activations(entry["transient_coefficients"], layers, hidden, batch, new_tokens)
    frozen = 4 * n + 4 * n  # the replicated reference and the reward backbone
    if config == "one GPU":
        weights, gradients, adam = 4 * n, 4 * n, 8 * n
    elif config == "zero2.yaml":
        weights, gradients, adam = 4 * n, 4 * n / gpus, 8 * n / gpus
    else:
        weights, gradients, adam = 4 * n / gpus + 2 * 4 * 12 * hidden**2, 4 * n / gpus, 8 * n / gpus
        if method.startswith("grade"):
            step += 4 * VOCAB * hidden  # E gathered whole for the rollout
    step_peak = max(step, gradients + 8 * batch * new_tokens * VOCAB)
    resident = weights + adam + frozen
    return (resident + step_peak) / GIB


def table(batch: int, new_tokens: int, gpus: int, card_gib: float) -> str:
    model = json.loads((REPO / "docs" / "results" / "memory_model.json").read_text())
    lines = [f"Peak GiB per GPU of a float32 step, batch {batch} per GPU, {PROMPT}-token prompts, {new_tokens} new tokens, "
             f"{gpus} GPUs for the sharded configs (the memory model: `python benchmarks/sharding_table.py`); "
             f"**bold**: the smallest config that fits a {card_gib:.0f} GB card", "",
             "| model | parameters | method | " + " | ".join(CONFIGS) + " |", "|---|---:|---|" + "---:|" * len(CONFIGS)]
    for name, (layers, hidden) in SHAPES.items():
        for method in METHODS:
            values = [per_gpu_gib(model, method, config, layers, hidden, batch, new_tokens, gpus) for config in CONFIGS]
            first_fit = next((i for i, v in enumerate(values) if v + 1.0 <= card_gib * 1e9 / GIB), None)  # 1 GB of CUDA context
            cells = [f"**{v:.1f}**" if i == first_fit else f"{v:.1f}" for i, v in enumerate(values)]
            lines.append(f"| {name} | {parameters(layers, hidden) / 1e6:.0f}M | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=16, help="completions per GPU per step")
    parser.add_argument("--new_tokens", type=int, default=48)
    parser.add_argument("--gpus", type=int, default=8, help="processes the sharded configs divide the policy's state over")
    parser.add_argument("--card_gb", type=float, default=80.0, help="the card's memory in GB (80: A100/H100)")
    args = parser.parse_args(argv)
    text = table(args.batch_size, args.new_tokens, args.gpus, args.card_gb)
    print(text)
    return text


if __name__ == "__main__":
    main()
