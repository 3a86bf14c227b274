"""A memory model of one training step, fitted on small shapes, validated on a larger one, used to predict big ones.

What it predicts: the peak memory of one optimizer step of each method,

    peak       = resident + step peak
    resident   = policy weights (4 N bytes, float32 master) + AdamW state (8 N) + the frozen reference (4 N) + the
                 reward model's backbone (4 N_r)
    step peak  = max(S + X, 4 N + 8 B T V)

where S is what autograd saves for backward (`grade_trl.memory.SavedTensorAccount`) and X the transients on
top of it at the busiest moment of backward (for GRADE: the reference's or the reward's forward recomputed
there while the rollout's saved tensors still wait; the logits-sized gradients of the KL), both modelled as

    S, X = c1 B L H (P + T) + c2 B T V + c3 B H (P + T) + c4 B V + c5 N + c0        (bytes; non-negative least squares)

with B completions, L layers, H hidden, V vocabulary, P prompt and T new tokens, N parameters (c5 N: the weights' copies
that bf16 autocast casts and saves for backward, 2 bytes a parameter, and the parameter gradients inside the peak;
added on 2026-12-07, after the Qwen2 fit of `memory_model_qwen2.py` found it: a fit written before reads c5 as 0). The second
branch is the end of backward, when every float32 gradient (4 N) exists and the last logits-sized temporaries
(about two float32 B x T x V tensors) do. S and the peak are measured on real training steps (`step_cost.py`'s
`memory_step`: saved bytes over the forward, `grade_trl.memory.peak_allocated` over forward + backward) on a
grid of small random GPT-2 shapes; the fit is checked against a shape it has not seen (`--validate`, default
gpt2-small) before it predicts (`--predict`, default gpt2-medium). Allocator-level bytes
(`torch.cuda.max_memory_allocated`'s sense); a CUDA process adds its context and allocator slack (0.5-1 GB).

    python benchmarks/memory_model.py --tokenizer gpt2 --threads 2 --json docs/results/memory_model.json

Another GPT-2-like shape from the committed fit, in a second (no measurement): `--from_json` reads the coefficients,
`--predict` takes a name or LAYERS,HIDDEN, `--predict_vocab` the vocabulary, B counts completions per micro-batch
(`per_device_train_batch_size` x completions per prompt), not the optimizer batch:

    python benchmarks/memory_model.py --from_json docs/results/memory_model.json --predict 36,1280 --predict_batches 8 16
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
FEATURES = ("B L H (P+T)", "B T V", "B H (P+T)", "B V", "N", "1")  # a fit without N (before 2026-12-07) reads it as 0
SHAPES = {  # name: (layers, hidden, heads)
    "gpt2-small": (12, 768, 12),
    "gpt2-medium": (24, 1024, 16),
}


def features(layers: int, hidden: int, vocab: int, batch: int, prompt: int, new_tokens: int) -> list[float]:
    tokens = prompt + new_tokens
    return [batch * layers * hidden * tokens, batch * new_tokens * vocab, batch * hidden * tokens, batch * vocab, parameters(layers, hidden, vocab)[0], 1.0]


def bytes_of(coefficients: dict, values: list[float]) -> float:
    """sum of coefficient x feature, by the features' names: a fit written before a feature existed counts it as 0."""
    return sum(coefficients.get(name, 0.0) * value for name, value in zip(FEATURES, values))


def parameters(layers: int, hidden: int, vocab: int, positions: int = 1024) -> tuple[int, int]:
    """(policy parameters with a tied LM head, the reward backbone's: the same body without the LM head's bias-free copy) of GPT-2."""
    body = layers * (12 * hidden**2 + 13 * hidden) + 2 * hidden
    embeddings = vocab * hidden + positions * hidden
    return body + embeddings, body + embeddings


SWITCHES = ["--rollout_checkpointing", "--relax_top_k", "256"]  # `METHOD+switches`: GRADE's memory switches on (plus bf16 as a dtype)


def measure(variant: str, args, layers: int, hidden: int, tokenizer_path: str, batch: int, new_tokens: int, dtype_flags: dict) -> dict:
    """One memory step of `variant` (a method, or `METHOD+switches`) on a random GPT-2 of this shape (the benchmark's own
    trainer and measurement)."""
    method, _, switched = variant.partition("+")
    argv = ["--model", step_cost.RANDOM_GPT2, "--tokenizer", tokenizer_path, "--n_layer", str(layers), "--n_embd", str(hidden), "--n_head", str(max(1, hidden // 64)),
            "--batch_size", str(batch), "--new_tokens", str(new_tokens), "--prompt_length", str(args.prompt_length), "--device", "cpu",
            "--warmup", "0", "--repeats", "1", "--methods", method] + [f"--{k}" for k, v in dtype_flags.items() if v] + (SWITCHES if switched else [])
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
    return {"layers": layers, "hidden": hidden, "vocab": vocab, "batch": batch, "new_tokens": new_tokens, "peak_mib": result["peak_mib"],
            "saved_mib": result["saved_mib"]}


def fit(points: list[dict], prompt: int, target) -> tuple[list[float], float]:
    """Non-negative least squares of target(point) (bytes) on the features; returns (coefficients, worst relative residual)."""
    import numpy as np

    X = np.array([features(p["layers"], p["hidden"], p["vocab"], p["batch"], prompt, p["new_tokens"]) for p in points])
    return nnls_fit(X, np.array([target(p) for p in points]))


def nnls_fit(X, y) -> tuple[list[float], float]:
    """scipy's non-negative least squares of y on the columns of X, each scaled to a maximum of 1 first (the features
    span 10 orders of magnitude); (coefficients, worst relative residual)."""
    import numpy as np
    from scipy.optimize import nnls

    scale = X.max(0)
    coefficients, _ = nnls(X / scale, y)
    coefficients = coefficients / scale
    return coefficients.tolist(), float(np.abs((X @ coefficients - y) / np.maximum(y, 1.0)).max())


def step_peak(saved: dict, transient: dict, layers: int, hidden: int, vocab: int, batch: int, prompt: int, new_tokens: int) -> dict:
    """Bytes: S, X (coefficients by feature name) and the step peak max(S + X, 4 N + 8 B T V)."""
    f = features(layers, hidden, vocab, batch, prompt, new_tokens)
    s, x = bytes_of(saved, f), bytes_of(transient, f)
    n_policy, _ = parameters(layers, hidden, vocab)
    floor = 4 * n_policy + 8 * batch * new_tokens * vocab
    return {"saved": s, "transient": x, "step_peak": max(s + x, floor), "floor_decides": floor > s + x}


def predict(saved: dict, transient: dict, layers: int, hidden: int, vocab: int, batch: int, prompt: int, new_tokens: int) -> dict:
    """GiB: the step peak and the resident memory (weights 4 N + AdamW 8 N + reference 4 N + reward backbone 4 N_r)."""
    step = step_peak(saved, transient, layers, hidden, vocab, batch, prompt, new_tokens)
    n_policy, n_reward = parameters(layers, hidden, vocab)
    resident = 16 * n_policy + 4 * n_reward
    return {"saved_gib": step["saved"] / 2**30, "step_peak_gib": step["step_peak"] / 2**30, "resident_gib": resident / 2**30,
            "peak_gib": (step["step_peak"] + resident) / 2**30, "floor_decides": step["floor_decides"]}


def shape(text: str) -> tuple[int, int, int]:
    """A name of SHAPES, or LAYERS,HIDDEN (heads: HIDDEN / 64) -> (layers, hidden, heads)."""
    if text in SHAPES:
        return SHAPES[text]
    try:
        layers, hidden = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give {' or '.join(SHAPES)}, or LAYERS,HIDDEN such as 36,1280") from None
    return layers, hidden, max(1, hidden // 64)


def from_json(args) -> dict:
    """Predictions for --predict from a fit written by --json: no measurement."""
    try:
        out = json.loads(Path(args.from_json).read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: --from_json: cannot read {args.from_json!r} as a memory model written by --json ({error})") from None
    layers, hidden, _ = shape(args.predict)
    for key, entry in out["methods"].items():
        saved, transient = entry["saved_coefficients"], entry["transient_coefficients"]
        entry["prediction"] = {"shape": args.predict, "new_tokens": args.predict_tokens, "vocab": args.predict_vocab,
                               "by_batch": {b: predict(saved, transient, layers, hidden, args.predict_vocab, b, out["prompt_length"], args.predict_tokens)
                                            for b in args.predict_batches}}
    args.prompt_length = out["prompt_length"]
    print(table(out, args))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default="gpt2", help="the GPT-2 tokenizer (hub id or folder): the V = 50,257 points and the predictions")
    parser.add_argument("--small_tokenizer", default="embedded", help="a second vocabulary for the grid (default: the embedded 8,192-token one)")
    parser.add_argument("--methods", nargs="+", default=["grade_ste", "grade", "reinforce", "ppo", "grpo", "grade_ste+switches"],
                        help="registry methods, or METHOD+switches for GRADE with rollout_checkpointing and relax_top_k 256")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bf16"], choices=["float32", "bf16"], help="float32, and bf16 autocast (float32 master weights)")
    parser.add_argument("--prompt_length", type=int, default=32)
    parser.add_argument("--validate", default="gpt2-small", choices=list(SHAPES), help="a shape the fit has not seen, measured here and compared")
    parser.add_argument("--validate_batch", type=int, default=8)
    parser.add_argument("--validate_tokens", type=int, default=48)
    parser.add_argument("--predict", default="gpt2-medium", type=str, help=f"{', '.join(SHAPES)}, or LAYERS,HIDDEN of another GPT-2-like model")
    parser.add_argument("--predict_vocab", type=int, default=50257, help="with --from_json: the vocabulary of the predicted model (a fit reads its tokenizer's)")
    parser.add_argument("--from_json", default=None, help="predict from the coefficients a run with --json wrote, without measuring")
    parser.add_argument("--predict_batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--predict_tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--grid", default=None, help="JSON overriding the grid, e.g. '{\"layers\": [1, 2]}' (tests)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    try:
        shape(args.predict)
    except argparse.ArgumentTypeError as error:
        parser.error(f"--predict: {error}")
    if args.from_json:
        return from_json(args)
    if [m for m in args.methods if "+" in m] and "bf16" not in args.dtypes:  # it wrote an empty model over --json's
        parser.error("--methods: METHOD+switches is fitted with all three switches, bf16 included: add bf16 to --dtypes")
    small_tokenizer = str(step_cost.resolve_model_path(args.small_tokenizer))
    grid = {**GRID, **json.loads(args.grid)} if args.grid else GRID
    out = {"features": FEATURES, "grid": grid, "prompt_length": args.prompt_length, "methods": {}}
    with step_cost.quiet_and_threads(args.threads):
        for method, dtype in [(m, d) for m in args.methods for d in args.dtypes if d == "bf16" or "+" not in m]:  # switches: with bf16
            flags = {"bf16": dtype == "bf16"}
            points = [measure(method, args, layers, hidden, tok, batch, tokens, flags)
                      for tok in (small_tokenizer, args.tokenizer)
                      for layers, hidden, batch, tokens in itertools.product(grid["layers"], grid["hidden"], grid["batch"], grid["new_tokens"])]
            saved, worst_saved = fit(points, args.prompt_length, lambda p: p["saved_mib"] * 2**20)
            transient, worst_transient = fit(points, args.prompt_length, lambda p: max(p["peak_mib"] - p["saved_mib"], 0.0) * 2**20)
            saved, transient = dict(zip(FEATURES, saved)), dict(zip(FEATURES, transient))
            layers, hidden, _ = SHAPES[args.validate]
            check = measure(method, args, layers, hidden, args.tokenizer, args.validate_batch, args.validate_tokens, flags)
            vocab = check["vocab"]
            predicted = step_peak(saved, transient, layers, hidden, vocab, args.validate_batch, args.prompt_length, args.validate_tokens)
            layers_p, hidden_p, _ = shape(args.predict)
            predictions = {b: predict(saved, transient, layers_p, hidden_p, vocab, b, args.prompt_length, args.predict_tokens) for b in args.predict_batches}
            out["methods"][f"{method}/{dtype}"] = entry = {
                "saved_coefficients": saved, "transient_coefficients": transient,
                "worst_relative_residual_on_grid": {"saved": worst_saved, "transient": worst_transient}, "grid_points": points,
                "validation": {"shape": args.validate, "batch": args.validate_batch, "new_tokens": args.validate_tokens,
                               "measured_step_peak_mib": check["peak_mib"], "predicted_step_peak_mib": predicted["step_peak"] / 2**20,
                               "measured_saved_mib": check["saved_mib"], "predicted_saved_mib": predicted["saved"] / 2**20,
                               "relative_error": predicted["step_peak"] / 2**20 / check["peak_mib"] - 1},
                "prediction": {"shape": args.predict, "new_tokens": args.predict_tokens, "by_batch": predictions},
            }
            v = entry["validation"]
            print(f"{method:<18} {dtype:<8} grid residual saved {worst_saved:.0%}, transient {worst_transient:.0%}; {args.validate} B={args.validate_batch} "
                  f"T={args.validate_tokens}: step peak measured {v['measured_step_peak_mib']:.0f} MiB, predicted {v['predicted_step_peak_mib']:.0f} MiB "
                  f"({v['relative_error']:+.0%}); saved {v['measured_saved_mib']:.0f} / {v['predicted_saved_mib']:.0f} MiB; {args.predict} T={args.predict_tokens}: "
                  + ", ".join(f"B={b} peak {p['peak_gib']:.1f} GiB (step {p['step_peak_gib']:.1f})" for b, p in predictions.items()), flush=True)
    print("\n" + table(out, args))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return out


def table(out: dict, args) -> str:
    lines = [f"Predicted peak of one step, {args.predict} shape, {args.prompt_length}-token prompts, {args.predict_tokens} new tokens, GiB: total (step peak "
             "above the resident weights, AdamW state, reference and reward backbone):", "",
             "| method | precision | " + " | ".join(f"batch {b}" for b in args.predict_batches) + f" | check on {args.validate} B={args.validate_batch} "
             f"T={args.validate_tokens}: step peak measured / predicted (MiB) |",
             "|---|---|" + "---:|" * (len(args.predict_batches) + 1)]
    for key, entry in out["methods"].items():
        method, dtype = key.split("/")
        v = entry["validation"]
        predicted = [entry["prediction"]["by_batch"].get(b, entry["prediction"]["by_batch"].get(str(b))) for b in args.predict_batches]
        cells = " | ".join(f"{p['peak_gib']:.1f} ({p['step_peak_gib']:.1f}{'*' if p.get('floor_decides') else ''})" for p in predicted)
        layers, hidden, _ = SHAPES.get(v["shape"], (0, 0, 0))
        vocab = max((point["vocab"] for point in entry.get("grid_points") or []), default=50257)  # the check's tokenizer is the grid's larger one
        checked = step_peak(entry["saved_coefficients"], entry["transient_coefficients"], layers, hidden, vocab,
                            v["batch"], out["prompt_length"], v["new_tokens"])["floor_decides"] if layers else False
        lines.append(f"| {method} | {dtype} | {cells} | {v['measured_step_peak_mib']:.0f} / {v['predicted_step_peak_mib']:.0f}{'*' if checked else ''} "
                     f"({v['relative_error']:+.0%}) |")
    return "\n".join(lines + ["", "*: the step peak is the end of backward's floor, 4 N + 8 B T V (every float32 gradient and two logits-sized "
                                "temporaries), which is larger than the fit's S + X there: the switches and bf16 do not lower it."])


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
