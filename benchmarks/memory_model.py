"""A memory model of one training step, fitted on small shapes, validated on a larger one, used to predict big ones.

What it predicts: the peak memory of one optimizer step of each method,

    peak = resident + gradients + activations
    resident    = policy weights (4 N bytes, float32 master) + AdamW state (8 N) + the frozen reference (4 N) + the
                  reward model's backbone (4 N_r)
    gradients   = 4 N (float32; allocated during backward)
    activations = the peak of everything else above the step's start during forward + backward, modelled as
                  c1 B L H (P + T) + c2 B T V + c3 B V + c4 V H + c5 H^2 + c0      (bytes; one fit per method and dtype)

with B completions, L layers, H hidden, V vocabulary, P prompt and T new tokens: the per-token activations
of every layer, the (B, T, V) logits-sized tensors, the per-step (B, V) ones, and the largest weight-sized
temporaries (a deferred weight gradient, an embedding gradient). The coefficients are fitted (non-negative
least squares) to `grade_trl.memory.peak_allocated` measurements of real training steps (`step_cost.py`'s
`memory_step`) on a grid of small random GPT-2 shapes; the fit is then checked against a measurement it has
not seen (`--validate`, default a gpt2-small shape) before it predicts (`--predict`, default gpt2-medium).
These are allocator-level bytes (`torch.cuda.max_memory_allocated`'s sense); a CUDA run adds its context and
the caching allocator's slack (about 0.5-1 GB) on top.

    python benchmarks/memory_model.py --tokenizer ../shared/tokenizers/gpt2 --threads 2 --json docs/results/memory_model.json
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("step_cost", HERE / "step_cost.py")
step_cost = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_cost)

GRID = {"layers": (2, 4), "hidden": (128, 256), "batch": (4, 8), "new_tokens": (8, 24)}  # x the two vocabularies
FEATURES = ("B L H (P+T)", "B T V", "B V", "V H", "H^2", "1")
SHAPES = {  # name: (layers, hidden, heads)
    "gpt2-small": (12, 768, 12),
    "gpt2-medium": (24, 1024, 16),
}


def features(layers: int, hidden: int, vocab: int, batch: int, prompt: int, new_tokens: int) -> list[float]:
    return [batch * layers * hidden * (prompt + new_tokens), batch * new_tokens * vocab, batch * vocab, vocab * hidden, hidden**2, 1.0]


def parameters(layers: int, hidden: int, vocab: int, positions: int = 1024) -> tuple[int, int]:
    """(policy parameters with a tied LM head, the reward backbone's: the same body without the LM head's bias-free copy) of GPT-2."""
    body = layers * (12 * hidden**2 + 13 * hidden) + 2 * hidden
    embeddings = vocab * hidden + positions * hidden
    return body + embeddings, body + embeddings


def measure(method: str, args, layers: int, hidden: int, tokenizer_path: str, batch: int, new_tokens: int, dtype_flags: dict) -> dict:
    """One memory step of `method` on a random GPT-2 of this shape (the benchmark's own trainer and measurement)."""
    argv = ["--model", step_cost.RANDOM_GPT2, "--tokenizer", tokenizer_path, "--n_layer", str(layers), "--n_embd", str(hidden), "--n_head", str(max(1, hidden // 64)),
            "--batch_size", str(batch), "--new_tokens", str(new_tokens), "--prompt_length", str(args.prompt_length), "--device", "cpu",
            "--warmup", "0", "--repeats", "1", "--methods", method] + [f"--{k}" for k, v in dtype_flags.items() if v]
    bench_args = step_cost.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        path = step_cost.prepare_model(bench_args, workdir)
        tokenizer = step_cost.load_tokenizer(path)
        prompts = step_cost.make_prompts(tokenizer, batch * 4, args.prompt_length, 0)
        dataset = step_cost.Dataset.from_dict({"prompt": prompts})
        torch.manual_seed(0)
        reward = step_cost.SentimentReward(step_cost.SentimentRewardModel.from_backbone(path), tokenizer)
        result = step_cost.benchmark(method, bench_args, new_tokens, path, reward, tokenizer, dataset, torch.device("cpu"), workdir)
        vocab = len(tokenizer)
    n_policy, _ = parameters(layers, hidden, vocab)
    return {"layers": layers, "hidden": hidden, "vocab": vocab, "batch": batch, "new_tokens": new_tokens, "peak_mib": result["peak_mib"],
            "saved_mib": result["saved_mib"], "activations_bytes": result["peak_mib"] * 2**20 - 4 * n_policy}


def fit(points: list[dict], prompt: int):
    import numpy as np
    from scipy.optimize import nnls

    X = np.array([features(p["layers"], p["hidden"], p["vocab"], p["batch"], prompt, p["new_tokens"]) for p in points])
    y = np.array([p["activations_bytes"] for p in points])
    scale = X.max(0)
    coefficients, _ = nnls(X / scale, y)
    coefficients = coefficients / scale
    residual = X @ coefficients - y
    return coefficients.tolist(), float(np.abs(residual / y).max())


def predict(coefficients: list[float], layers: int, hidden: int, vocab: int, batch: int, prompt: int, new_tokens: int, resident_bytes_per_param: float = 20.0) -> dict:
    """Bytes: activations (the fit), gradients (4 N), resident (weights 4 N + AdamW 8 N + reference 4 N + reward 4 N_r)."""
    activations = sum(c * f for c, f in zip(coefficients, features(layers, hidden, vocab, batch, prompt, new_tokens)))
    n_policy, n_reward = parameters(layers, hidden, vocab)
    resident = 16 * n_policy + 4 * n_reward
    gradients = 4 * n_policy
    return {"activations_gib": activations / 2**30, "gradients_gib": gradients / 2**30, "resident_gib": resident / 2**30, "peak_gib": (activations + gradients + resident) / 2**30}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default="gpt2", help="the GPT-2 tokenizer (hub id or folder): the V = 50,257 points and the predictions")
    parser.add_argument("--small_tokenizer", default="embedded", help="a second vocabulary for the grid (default: the embedded 8,192-token one)")
    parser.add_argument("--methods", nargs="+", default=["grade_ste", "grade", "reinforce", "ppo", "grpo"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bf16"], choices=["float32", "bf16"], help="float32, and bf16 autocast (float32 master weights)")
    parser.add_argument("--prompt_length", type=int, default=32)
    parser.add_argument("--validate", default="gpt2-small", choices=list(SHAPES), help="a shape the fit has not seen, measured here and compared")
    parser.add_argument("--validate_batch", type=int, default=8)
    parser.add_argument("--validate_tokens", type=int, default=48)
    parser.add_argument("--predict", default="gpt2-medium", choices=list(SHAPES))
    parser.add_argument("--predict_batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--predict_tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    small_tokenizer = str(step_cost.resolve_model_path(args.small_tokenizer))
    out = {"features": FEATURES, "grid": GRID, "prompt_length": args.prompt_length, "methods": {}}
    with step_cost.quiet_and_threads(args.threads):
        for method, dtype in itertools.product(args.methods, args.dtypes):
            flags = {"bf16": dtype == "bf16"}
            points = [measure(method, args, layers, hidden, tok, batch, tokens, flags)
                      for tok in (small_tokenizer, args.tokenizer)
                      for layers, hidden, batch, tokens in itertools.product(GRID["layers"], GRID["hidden"], GRID["batch"], GRID["new_tokens"])]
            coefficients, worst = fit(points, args.prompt_length)
            layers, hidden, _ = SHAPES[args.validate]
            check = measure(method, args, layers, hidden, args.tokenizer, args.validate_batch, args.validate_tokens, flags)
            vocab = check["vocab"]
            predicted_check = predict(coefficients, layers, hidden, vocab, args.validate_batch, args.prompt_length, args.validate_tokens)
            measured_activations = check["activations_bytes"] / 2**30
            layers_p, hidden_p, _ = SHAPES[args.predict]
            predictions = {b: predict(coefficients, layers_p, hidden_p, vocab, b, args.prompt_length, args.predict_tokens) for b in args.predict_batches}
            out["methods"][f"{method}/{dtype}"] = {
                "coefficients": dict(zip(FEATURES, coefficients)), "worst_relative_residual_on_grid": worst, "grid_points": points,
                "validation": {"shape": args.validate, "batch": args.validate_batch, "new_tokens": args.validate_tokens,
                               "measured_activations_gib": measured_activations, "predicted_activations_gib": predicted_check["activations_gib"],
                               "relative_error": predicted_check["activations_gib"] / measured_activations - 1 if measured_activations > 0 else None},
                "prediction": {"shape": args.predict, "new_tokens": args.predict_tokens, "by_batch": predictions},
            }
            v = out["methods"][f"{method}/{dtype}"]["validation"]
            print(f"{method:<10} {dtype:<8} fit worst residual {worst:.1%}; {args.validate} B={args.validate_batch} T={args.validate_tokens}: activations measured "
                  f"{v['measured_activations_gib']:.3f} GiB, predicted {v['predicted_activations_gib']:.3f} GiB ({v['relative_error']:+.1%}); {args.predict} T={args.predict_tokens}: "
                  + ", ".join(f"B={b} peak {p['peak_gib']:.1f} GiB (activations {p['activations_gib']:.1f})" for b, p in predictions.items()), flush=True)
    print("\n" + table(out, args))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return out


def table(out: dict, args) -> str:
    lines = [f"Predicted peak of one step, {args.predict} shape, {args.prompt_length}-token prompts, {args.predict_tokens} new tokens (GiB; activations + "
             "float32 gradients + resident weights, AdamW state, reference and reward backbone):", "",
             "| method | precision | " + " | ".join(f"batch {b}" for b in args.predict_batches) + f" | check: {args.validate} activations measured / predicted |",
             "|---|---|" + "---:|" * (len(args.predict_batches) + 1)]
    for key, entry in out["methods"].items():
        method, dtype = key.split("/")
        v = entry["validation"]
        cells = " | ".join(f"{entry['prediction']['by_batch'][b]['peak_gib']:.1f} ({entry['prediction']['by_batch'][b]['activations_gib']:.1f})" for b in args.predict_batches)
        lines.append(f"| {method} | {dtype} | {cells} | {v['measured_activations_gib']:.2f} / {v['predicted_activations_gib']:.2f} ({v['relative_error']:+.0%}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
