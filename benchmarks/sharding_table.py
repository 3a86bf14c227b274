"""Which launch config a model size and method need: the memory per GPU of one training step, by the memory models.

Two tables. The IMDB one: each GPT-2 shape and method at the per-GPU batch and length given, float32, from the fitted
coefficients in `docs/results/memory_model.json` (benchmarks/memory_model.py, checked against an H200 to 4-10% in
float32). The GSM8K one: Qwen2.5-0.5B to 7B with grade_trl's REINFORCE and PPO at the GSM8K recipes' shape, bf16
autocast with float32 master weights, from `docs/results/memory_model_qwen2.json` (benchmarks/memory_model_qwen2.py,
a CPU fit checked on a larger unseen Qwen2; not yet on a GPU; TRL's GRPO/CISPO are not in it: that script says why):
the fit with `chunked_scoring` (the default) for every config (`qwen2_entry`).
How each config places the parts:

                      policy weights       gradients   AdamW state   reference                 reward backbone    activations
    one GPU / DDP     4 N                  4 N         8 N           4 N (replicated)          4 N_r (replicated) S + X
    zero2.yaml        4 N                  4 N / G     8 N / G       4 N                       4 N_r              S + X
    fsdp2.yaml        4 N / G + gathered   4 N / G     8 N / G       4 N / G + gathered (*)    4 N_r              S + X
    zero3.yaml        4 N / G + gathered   4 N / G     8 N / G       4 N                       4 N_r              S + X

(*) REINFORCE, PPO and GRADE, whose reference FSDP2 shards as the policy (grade_trl.trainers.base
`prepared_reference`, since 2026-12-07; GRADE's since 2026-12-08, its forward on the soft tokens recomputed in backward
a block at a time, `GumbelGRADETrainer.reference_recompute`: GRADE's activations here are the fit's, made with the
whole recomputation, whose transient is the reference's whole activations at once, against one block's and each
block's input, 4 B L H (T - 1) bytes, block by block: an upper bound); TRL's GRPO shards its own as one unit
(`prepare_fsdp`: the whole reference gathered while it runs), counted whole here (an upper bound by up to 4 N (1 - 1/G)).

with N the policy's parameters, N_r the reward backbone's (GPT-2 rows: the IMDB recipes' sentiment model over a body
of the policy's size; the GSM8K rows have none: their rewards are rules on the text), G the number of GPUs, S + X the
step's saved and transient activation bytes (the memory models' features), and "gathered" the full weights FSDP2 holds
at once besides the shards: the root unit (the embeddings and LM head, V H tied or 2 V H untied, plus GPT-2's position
table), which FSDP2 keeps gathered from the forward to the backward (`fully_shard`'s root is not resharded after
forward), and two transformer blocks (the one computing and the one prefetched). GRADE's rollout reads the input
embeddings, the root's. ZeRO-3 releases the embeddings between their uses (up to 4 V H less). The gradient branch of
the step peak, max(S + X, 4 N + 8 B T V), keeps its 4 N / G under sharding. Allocator bytes: a CUDA process adds
0.5-1 GB of context.

    python benchmarks/sharding_table.py                    # both tables; 8 GPUs for the sharded configs, an 80 GB card
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHAPES = {"gpt2-medium": (24, 1024), "gpt2-large": (36, 1280), "gpt2-xl": (48, 1600)}  # (layers, hidden)
VOCAB, PROMPT, POSITIONS = 50257, 32, 1024
METHODS = ("grade_ste", "reinforce", "ppo", "grpo")
QWEN2_METHODS = ("reinforce", "ppo")  # grade_trl's GSM8K methods the Qwen2 fit covers
CONFIGS = ("one GPU", "zero2.yaml", "fsdp2.yaml", "zero3.yaml")
GIB = 2**30


def parameters(layers: int, hidden: int) -> int:
    """GPT-2 with a tied LM head (the reward backbone is the same body: the same count)."""
    return layers * (12 * hidden**2 + 13 * hidden) + 2 * hidden + VOCAB * hidden + POSITIONS * hidden


def activations(coefficients: dict, layers: int, hidden: int, batch: int, new_tokens: int) -> float:
    """S or X in bytes: the memory model's c1 B L H (P+T) + c2 B T V + c3 B H (P+T) + c4 B V + c5 N + c0 (a fit without N: c5 = 0)."""
    tokens = PROMPT + new_tokens
    values = {"B L H (P+T)": batch * layers * hidden * tokens, "B T V": batch * new_tokens * VOCAB, "B H (P+T)": batch * hidden * tokens,
              "B V": batch * VOCAB, "N": parameters(layers, hidden), "1": 1.0}
    return sum(coefficients.get(name, 0.0) * value for name, value in values.items())


def reference_sharded(method: str, config: str) -> bool:
    """Whether `config` shards `method`'s frozen reference as it does the policy (the module docstring's (*))."""
    return config == "fsdp2.yaml" and method in ("grade_ste", "reinforce", "ppo")


def placed(config: str, method: str, n: int, replicated: float, gathered: float, gpus: int) -> tuple[float, float]:
    """(resident bytes: weights, AdamW state, `method`'s frozen reference (a copy of the policy) and the `replicated`
    bytes of other frozen models; the gradients' bytes) of a policy of n parameters under `config`, the table of the
    module docstring."""
    if config == "one GPU":
        weights, gradients, adam = 4 * n, 4 * n, 8 * n
    elif config == "zero2.yaml":
        weights, gradients, adam = 4 * n, 4 * n / gpus, 8 * n / gpus
    else:
        weights, gradients, adam = 4 * n / gpus + gathered, 4 * n / gpus, 8 * n / gpus
    reference = 4 * n / gpus + gathered if reference_sharded(method, config) else 4 * n
    return weights + adam + reference + replicated, gradients


def per_gpu_gib(model: dict, method: str, config: str, layers: int, hidden: int, batch: int, new_tokens: int, gpus: int) -> float:
    entry = model["methods"][f"{method}/float32"]
    n = parameters(layers, hidden)
    step = activations(entry["saved_coefficients"], layers, hidden, batch, new_tokens) + activations(entry["transient_coefficients"], layers, hidden, batch, new_tokens)
    gathered = 4 * (VOCAB + POSITIONS) * hidden + 2 * 4 * (12 * hidden**2 + 13 * hidden)  # the root unit, two blocks
    resident, gradients = placed(config, method, n, 4 * n, gathered, gpus)  # the reward backbone, the policy's size, replicated
    return (resident + max(step, gradients + 8 * batch * new_tokens * VOCAB)) / GIB


def qwen2_per_gpu_gib(qwen2, method: str, entry: dict, shape: dict, config: str, batch: int, prompt: int, new_tokens: int, gpus: int) -> float:
    """A GSM8K row: the Qwen2 fit's S + X (memory_model_qwen2.step_peak), placed as `per_gpu_gib` places GPT-2's; the
    frozen part is the reference alone."""
    step = qwen2.step_peak(entry, shape, batch, prompt, new_tokens)
    n, vocab, hidden = step["parameters"], shape["vocab"], shape["hidden"]
    block = (n - vocab * hidden * (1 if shape["tied"] else 2) - hidden) / shape["layers"]
    gathered = 4 * vocab * hidden * (1 if shape["tied"] else 2) + 2 * 4 * block
    resident, gradients = placed(config, method, n, 0.0, gathered, gpus)
    held_logits = qwen2.scored_logits(batch, new_tokens, vocab, qwen2.prediction_chunk(entry))  # a chunk's with chunked_scoring
    return (resident + max(step["saved"] + step["transient"], step["chunk_moment"], gradients + 8 * held_logits)) / GIB


def qwen2_entry(model: dict, method: str, config: str) -> dict:
    """The Qwen2 fit of the scoring `config` runs: chunked_scoring (`model["methods"]`, the default) under every config
    (grade_trl.core.head_scoring applies on one GPU, DDP, ZeRO and FSDP2 since 2026-12-07); `model["whole_logits"]` is the
    fit of `chunked_scoring: false`."""
    return model["methods"][f"{method}/bf16"]


def cells(values: list[float], card_gib: float) -> str:
    first_fit = next((i for i, v in enumerate(values) if v + 1.0 <= card_gib * 1e9 / GIB), None)  # 1 GB of CUDA context
    return " | ".join(f"**{v:.1f}**" if i == first_fit else f"{v:.1f}" for i, v in enumerate(values))


def table(batch: int, new_tokens: int, gpus: int, card_gib: float) -> str:
    model = json.loads((REPO / "docs" / "results" / "memory_model.json").read_text())
    lines = [f"Peak GiB per GPU of a float32 step, batch {batch} per GPU, {PROMPT}-token prompts, {new_tokens} new tokens, "
             f"{gpus} GPUs for the sharded configs (the memory model: `python benchmarks/sharding_table.py`); "
             f"**bold**: the smallest config that fits a {card_gib:.0f} GB card", "",
             "| model | parameters | method | " + " | ".join(CONFIGS) + " |", "|---|---:|---|" + "---:|" * len(CONFIGS)]
    for name, (layers, hidden) in SHAPES.items():
        for method in METHODS:
            values = [per_gpu_gib(model, method, config, layers, hidden, batch, new_tokens, gpus) for config in CONFIGS]
            lines.append(f"| {name} | {parameters(layers, hidden) / 1e6:.0f}M | {method} | {cells(values, card_gib)} |")
    return "\n".join(lines)


def qwen2_table(batch: int, prompt: int, new_tokens: int, gpus: int, card_gib: float) -> str:
    import importlib.util

    spec = importlib.util.spec_from_file_location("memory_model_qwen2", REPO / "benchmarks" / "memory_model_qwen2.py")
    qwen2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(qwen2)
    model = json.loads((REPO / "docs" / "results" / "memory_model_qwen2.json").read_text())
    lines = [f"PREDICTION: peak GiB per GPU of a bf16-autocast step (float32 master weights), {batch} completions per GPU, {prompt}-token prompts, "
             f"{new_tokens} new tokens, {gpus} GPUs for the sharded configs (the Qwen2 memory model); **bold**: the smallest config that fits a "
             f"{card_gib:.0f} GB card; the last column: the most completions per micro-batch that fit it, by config (0: none)", "",
             "| model | parameters | method | " + " | ".join(CONFIGS) + " | largest batch that fits |", "|---|---:|---|" + "---:|" * (len(CONFIGS) + 1)]
    fits = card_gib * 1e9 / GIB - 1.0  # 1 GB of CUDA context
    for name, shape in qwen2.QWEN25.items():
        shape = {**shape, "vocab": qwen2.QWEN25_VOCAB}
        n = qwen2.parameters(**shape)
        for method in QWEN2_METHODS:
            values = [qwen2_per_gpu_gib(qwen2, method, qwen2_entry(model, method, config), shape, config, batch, prompt, new_tokens, gpus) for config in CONFIGS]
            largest = [max((b for b in range(1, 257)
                            if qwen2_per_gpu_gib(qwen2, method, qwen2_entry(model, method, config), shape, config, b, prompt, new_tokens, gpus) <= fits), default=0)
                       for config in CONFIGS]
            lines.append(f"| {name} | {n / 1e9:.2f}B | {method} | {cells(values, card_gib)} | {' / '.join(map(str, largest))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=16, help="IMDB table: completions per GPU per step")
    parser.add_argument("--new_tokens", type=int, default=48, help="IMDB table: new tokens")
    parser.add_argument("--gsm8k_batch_size", type=int, default=16, help="GSM8K table: completions per GPU per micro-batch (the recipes' 16)")
    parser.add_argument("--gsm8k_prompt_length", type=int, default=256, help="GSM8K table: prompt tokens (the chat-formatted problems: ~100-300)")
    parser.add_argument("--gsm8k_new_tokens", type=int, default=512, help="GSM8K table: new tokens (the recipes' 512)")
    parser.add_argument("--gpus", type=int, default=8, help="processes the sharded configs divide the policy's state over")
    parser.add_argument("--card_gb", type=float, default=80.0, help="the card's memory in GB (80: A100/H100)")
    args = parser.parse_args(argv)
    text = table(args.batch_size, args.new_tokens, args.gpus, args.card_gb) + "\n\n" + qwen2_table(
        args.gsm8k_batch_size, args.gsm8k_prompt_length, args.gsm8k_new_tokens, args.gpus, args.card_gb)
    print(text)
    return text


if __name__ == "__main__":
    main()
