"""The memory model of the GSM8K methods on Qwen2 shapes: fitted on small random Qwen2 models, validated on a larger
unseen one, used to predict Qwen2.5-0.5B to 7B at the GSM8K recipes' shape.

`memory_model.py` fits GPT-2 blocks with a differentiable reward model (the IMDB recipes). The GSM8K users run
REINFORCE, PPO and TRL's GRPO/CISPO on Qwen2 models with a rule-based reward (no reward model), long prompts and
completions and a 151,936-row vocabulary; Qwen2's block (RMSNorm, rotary positions, grouped-query attention, a SwiGLU MLP
of width I, not 4 H) saves other tensors than GPT-2's, so its activations get their own fit, by the same method:

    peak       = resident + step peak
    resident   = policy weights (4 N bytes, float32 master) + AdamW state (8 N) + the frozen reference (4 N)
    step peak  = max(S + X, 4 N + 8 B T V)
    S, X       = c1 B L (P+T) H + c2 B L (P+T) I + c3 B T V + c4 B (P+T) H + c5 B (P+T)^2 + c6 B V + c7 N + c0   (bytes; NNLS)

with S what autograd saves for backward and X the transients above it at the peak (`step_cost.py`'s `memory_step`),
B completions per micro-batch, L layers, H hidden, I the MLP's width, V the embedding rows, P prompt and T new tokens,
N parameters. B (P+T)^2 is the padding mask that attention saves once per forward (the flash-style attention of PyTorch's
SDPA saves no attention weights); the keys' and values' grouped heads are H / 7 to H / 8 wide in Qwen2.5 and fold into the
B L (P+T) H term. N is there for the weights' copies that bf16 autocast casts and saves for backward (2 bytes a parameter;
`memory_model.py`'s GPT-2 fit has no such term, which is a likely part of its bf16 predictions' 22-37% shortfall on the
H200) and for the parameter gradients inside the step's peak. The grid: 32 points of {2, 4} layers x {128, 256} hidden x I in {2 H, 6 H} x B in {4, 8} x P in
{16, 64} x T in {8, 32} x V in {8,192, 32,768} (a fixed random half-fraction of the 256 corners), the embedded tokenizer
with the embeddings padded to V (ids past the tokenizer decode to nothing: the cost is a function of the shape only), the
GSM8K format check as the reward, every method of `--methods` in each `--dtypes`. The check: 6 layers, 512 wide, 8 heads
(2 key-value), I 2,816, V 65,536, B 8, P 96, T 64, outside the grid in every dimension.

    python benchmarks/memory_model_qwen2.py --threads 2 --json docs/results/memory_model_qwen2.json

REINFORCE and PPO only. TRL's GRPO/CISPO score through TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`), whose
memory depends on the device: on CUDA it scores the completion's positions only, in tiles of at most 4,096 tokens x
32,768 vocabulary rows folded in place by Triton kernels (no B x T x V tensor), while on CPU it scores every position
and its torch fallback keeps about eight float32 temporaries of the tile (measured here: 8.4 x 4 bytes per position and
vocabulary row in backward, against REINFORCE's whole float32 logits). A CPU fit would model the fallback, not the GPU:
GRPO's memory at this shape is left to the GPU check's GSM8K stage (`benchmarks/gpu_check.py`).

Predictions from the committed fit, no measurement (`--from_json`); `--batch`, `--prompt_length`, `--new_tokens` (the
recipes': 16 completions per micro-batch, up to 512 new tokens; 256 prompt tokens stand for the chat-formatted problems,
~100-300):

    python benchmarks/memory_model_qwen2.py --from_json docs/results/memory_model_qwen2.json --batch 16 --new_tokens 512
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import itertools
import json
import random
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


@functools.cache
def memory_model():
    """benchmarks/memory_model.py, and through it step_cost.py (torch, transformers, TRL), loaded on first use: the
    measurement and the fit need them; the predictions, and `sharding_table.py` which imports this file, do not."""
    spec = importlib.util.spec_from_file_location("memory_model", HERE / "memory_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FEATURES = ("B L (P+T) H", "B L (P+T) I", "B T V", "B (P+T) H", "B (P+T)^2", "B V", "N", "1")
GRID = {"layers": (2, 4), "hidden": (128, 256), "mlp_ratio": (2, 6), "batch": (4, 8), "prompt": (16, 64), "new_tokens": (8, 32), "vocab": (8192, 32768)}
GRID_POINTS = 32
CHECK = {"layers": 6, "hidden": 512, "heads": 8, "kv_heads": 2, "intermediate": 2816, "vocab": 65536, "batch": 8, "prompt": 96, "new_tokens": 64}
# Qwen2.5's published configs (config.json of Qwen/Qwen2.5-{0.5B,1.5B,3B,7B}-Instruct): embeddings tied up to 3B.
QWEN25 = {
    "Qwen2.5-0.5B": {"layers": 24, "hidden": 896, "heads": 14, "kv_heads": 2, "intermediate": 4864, "tied": True},
    "Qwen2.5-1.5B": {"layers": 28, "hidden": 1536, "heads": 12, "kv_heads": 2, "intermediate": 8960, "tied": True},
    "Qwen2.5-3B": {"layers": 36, "hidden": 2048, "heads": 16, "kv_heads": 2, "intermediate": 11008, "tied": True},
    "Qwen2.5-7B": {"layers": 28, "hidden": 3584, "heads": 28, "kv_heads": 4, "intermediate": 18944, "tied": False},
}
QWEN25_VOCAB = 151936
METHODS = ("reinforce", "ppo")  # TRL's GRPO/CISPO: not modelled here (the module docstring says why)


def features(shape: dict, batch: int, prompt: int, new_tokens: int) -> list[float]:
    layers, hidden, intermediate, vocab = shape["layers"], shape["hidden"], shape["intermediate"], shape["vocab"]
    tokens = prompt + new_tokens
    return [batch * layers * tokens * hidden, batch * layers * tokens * intermediate, batch * new_tokens * vocab, batch * tokens * hidden,
            batch * tokens**2, batch * vocab, parameters(**shape_of(shape)), 1.0]


def parameters(layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int, vocab: int, tied: bool = True) -> int:
    """Qwen2ForCausalLM's parameter count: per layer q and o (H x H, q with a bias), k and v (H x H kv_heads / heads, with
    biases), the SwiGLU MLP (3 H I) and two RMSNorms; the embeddings (V H, twice when untied) and the final norm.
    Qwen2.5-0.5B: 494,032,768 (its model card: 0.49B)."""
    kv = hidden * kv_heads // heads
    per_layer = 2 * hidden * hidden + hidden + 2 * (hidden * kv + kv) + 3 * hidden * intermediate + 2 * hidden
    return layers * per_layer + vocab * hidden * (1 if tied else 2) + hidden


def grid_points(grid: dict, count: int) -> list[dict]:
    corners = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    return random.Random(0).sample(corners, min(count, len(corners)))


def measure(method: str, shape: dict, batch: int, prompt: int, new_tokens: int, bf16: bool) -> dict:
    """One memory step of `method` on a random Qwen2 of this shape (step_cost's trainer and measurement)."""
    import torch

    step_cost = memory_model().step_cost
    argv = ["--model", step_cost.RANDOM_QWEN2, "--tokenizer", "embedded", "--n_layer", str(shape["layers"]), "--n_embd", str(shape["hidden"]),
            "--n_head", str(shape["heads"]), "--n_kv_head", str(shape["kv_heads"]), "--intermediate_size", str(shape["intermediate"]),
            "--vocab_size", str(shape["vocab"]), "--reward", "rule", "--batch_size", str(batch), "--new_tokens", str(new_tokens),
            "--prompt_length", str(prompt), "--device", "cpu", "--warmup", "0", "--repeats", "1", "--methods", method] + (["--bf16"] if bf16 else [])
    bench = step_cost.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        path = step_cost.prepare_model(bench, workdir)
        tokenizer = step_cost.load_tokenizer(path)
        dataset = step_cost.Dataset.from_dict({"prompt": step_cost.make_prompts(tokenizer, batch * 4, prompt, 0)})
        reward = step_cost.make_reward(bench, path, tokenizer, torch.device("cpu"))
        result = step_cost.benchmark(method, bench, new_tokens, path, reward, tokenizer, dataset, torch.device("cpu"), workdir)
    return {**shape, "batch": batch, "prompt": prompt, "new_tokens": new_tokens, "peak_mib": result["peak_mib"], "saved_mib": result["saved_mib"]}


def shape_of(point: dict) -> dict:
    return {key: point[key] for key in ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab") + (("tied",) if "tied" in point else ())}


def small_shape(point: dict) -> dict:
    heads = point["hidden"] // 64
    return {"layers": point["layers"], "hidden": point["hidden"], "heads": heads, "kv_heads": 1, "intermediate": point["mlp_ratio"] * point["hidden"],
            "vocab": point["vocab"]}


def fit(points: list[dict], target) -> tuple[list[float], float]:
    """Non-negative least squares of target(point) (bytes) on the features; (coefficients, worst relative residual)."""
    import numpy as np

    X = np.array([features(shape_of(p), p["batch"], p["prompt"], p["new_tokens"]) for p in points])
    return memory_model().nnls_fit(X, np.array([target(p) for p in points]))


def step_peak(entry: dict, shape: dict, batch: int, prompt: int, new_tokens: int) -> dict:
    """Bytes: S, X and the step peak max(S + X, 4 N + 8 B T V) of the fitted `entry` on `shape`."""
    f = features(shape, batch, prompt, new_tokens)
    s, x = (sum(entry[kind][name] * value for name, value in zip(FEATURES, f)) for kind in ("saved_coefficients", "transient_coefficients"))
    n = parameters(**shape_of(shape))
    floor = 4 * n + 8 * batch * new_tokens * shape["vocab"]
    return {"saved": s, "transient": x, "step_peak": max(s + x, floor), "floor_decides": floor > s + x, "parameters": n}


def predict(entry: dict, shape: dict, batch: int, prompt: int, new_tokens: int) -> dict:
    """GiB: the step peak and the resident memory (float32 weights 4 N + AdamW 8 N + the frozen reference 4 N)."""
    step = step_peak(entry, shape, batch, prompt, new_tokens)
    resident = 16 * step["parameters"]
    return {"parameters": step["parameters"], "saved_gib": step["saved"] / 2**30, "step_peak_gib": step["step_peak"] / 2**30,
            "resident_gib": resident / 2**30, "peak_gib": (step["step_peak"] + resident) / 2**30, "floor_decides": step["floor_decides"]}


def predictions(out: dict, args) -> dict:
    return {key: {name: predict(entry, {**shape, "vocab": QWEN25_VOCAB}, args.batch, args.prompt_length, args.new_tokens) for name, shape in QWEN25.items()}
            for key, entry in out["methods"].items()}


def table(out: dict, args) -> str:
    by_method = predictions(out, args)
    names = list(QWEN25)
    lines = [f"PREDICTION: peak GiB of one step on one GPU, {args.batch} completions per micro-batch, {args.prompt_length}-token prompts, "
             f"{args.new_tokens} new tokens, V {QWEN25_VOCAB:,}: total (step peak above the float32 weights, AdamW state and reference). "
             "Check: a step on a larger random Qwen2 than the grid's, measured / predicted step peak (MiB).", "",
             "| method | precision | " + " | ".join(names) + " | check: measured / predicted |", "|---|---|" + "---:|" * (len(names) + 1)]
    for key, entry in out["methods"].items():
        method, dtype = key.split("/")
        cells = " | ".join(f"{p['peak_gib']:.1f} ({p['step_peak_gib']:.1f}{'*' if p['floor_decides'] else ''})" for p in by_method[key].values())
        v = entry["validation"]
        lines.append(f"| {method} | {dtype} | {cells} | {v['measured_step_peak_mib']:.0f} / {v['predicted_step_peak_mib']:.0f} ({v['relative_error']:+.0%}) |")
    return "\n".join(lines + ["", "*: the step peak is the end of backward's floor, 4 N + 8 B T V (every float32 gradient and two float32 "
                                "logits-sized temporaries), larger than the fit's S + X there."])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="grade_trl's GSM8K methods to fit")
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "float32"], choices=["float32", "bf16"],
                        help="bf16 autocast with float32 master weights (the GSM8K recipes'), and float32")
    parser.add_argument("--grid_points", type=int, default=GRID_POINTS, help="corners of the grid measured (a fixed random sample)")
    parser.add_argument("--grid", default=None, help="JSON overriding the grid, e.g. '{\"layers\": [1, 2]}' (tests)")
    parser.add_argument("--check", default=None, help="JSON overriding the validation shape (tests)")
    parser.add_argument("--batch", type=int, default=16, help="predictions: completions per micro-batch (per_device_train_batch_size for GRPO/CISPO; "
                        "prompts x num_samples_per_prompt for REINFORCE)")
    parser.add_argument("--prompt_length", type=int, default=256, help="predictions: prompt tokens")
    parser.add_argument("--new_tokens", type=int, default=512, help="predictions: new tokens (max_completion_length / max_new_tokens)")
    parser.add_argument("--from_json", default=None, help="predict from the coefficients a run with --json wrote, without measuring")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.from_json:
        try:
            out = json.loads(Path(args.from_json).read_text())
        except (OSError, ValueError) as error:
            raise SystemExit(f"error: --from_json: cannot read {args.from_json!r} as a model written by --json ({error})") from None
    else:
        out = fit_all(args)
    out["predictions"] = {"batch": args.batch, "prompt_length": args.prompt_length, "new_tokens": args.new_tokens, "by_method": predictions(out, args)}
    print("\n" + table(out, args))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


def fit_all(args) -> dict:
    grid = {**GRID, **json.loads(args.grid)} if args.grid else GRID
    check = {**CHECK, **json.loads(args.check)} if args.check else CHECK
    chosen = grid_points(grid, args.grid_points)
    out = {"features": FEATURES, "grid": grid, "grid_points_measured": len(chosen), "check": check, "methods": {}}
    check_shape = shape_of(check)
    with memory_model().step_cost.quiet_and_threads(args.threads):
        for method, dtype in itertools.product(args.methods, args.dtypes):
            bf16 = dtype == "bf16"
            points = [measure(method, small_shape(p), p["batch"], p["prompt"], p["new_tokens"], bf16) for p in chosen]
            saved, worst_saved = fit(points, lambda p: p["saved_mib"] * 2**20)
            transient, worst_transient = fit(points, lambda p: max(p["peak_mib"] - p["saved_mib"], 0.0) * 2**20)
            entry = {"saved_coefficients": dict(zip(FEATURES, saved)), "transient_coefficients": dict(zip(FEATURES, transient)),
                     "worst_relative_residual_on_grid": {"saved": worst_saved, "transient": worst_transient}, "grid_points": points}
            measured = measure(method, check_shape, check["batch"], check["prompt"], check["new_tokens"], bf16)
            predicted = step_peak(entry, check_shape, check["batch"], check["prompt"], check["new_tokens"])
            entry["validation"] = {"measured_step_peak_mib": measured["peak_mib"], "predicted_step_peak_mib": predicted["step_peak"] / 2**20,
                                   "measured_saved_mib": measured["saved_mib"], "predicted_saved_mib": predicted["saved"] / 2**20,
                                   "floor_decides": predicted["floor_decides"], "relative_error": predicted["step_peak"] / 2**20 / measured["peak_mib"] - 1}
            out["methods"][f"{method}/{dtype}"] = entry
            v = entry["validation"]
            print(f"{method:<10} {dtype:<8} grid residual saved {worst_saved:.0%}, transient {worst_transient:.0%}; check: step peak measured "
                  f"{v['measured_step_peak_mib']:.0f} MiB, predicted {v['predicted_step_peak_mib']:.0f} MiB ({v['relative_error']:+.0%}); saved "
                  f"{v['measured_saved_mib']:.0f} / {v['predicted_saved_mib']:.0f} MiB", flush=True)
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
