"""The memory model of the GSM8K methods on Qwen2 shapes: fitted on small random Qwen2 models, validated on a larger
unseen one, used to predict Qwen2.5-0.5B to 7B at the GSM8K recipes' shape.

`memory_model.py` fits GPT-2 blocks with a differentiable reward model (the IMDB recipes). The GSM8K users run
REINFORCE, PPO and TRL's GRPO/CISPO on Qwen2 models with a rule-based reward (no reward model), long prompts and
completions and a 151,936-row vocabulary; Qwen2's block (RMSNorm, rotary positions, grouped-query attention, a SwiGLU MLP
of width I, not 4 H) saves other tensors than GPT-2's, so its activations get their own fit, by the same method:

    peak       = resident + step peak
    resident   = policy weights (4 N bytes, float32 master) + AdamW state (8 N) + the frozen reference (4 N)
    step peak  = max(S + X, S + k C, 4 N + 8 C)
    S, X       = c1 B L (P+T) H + c2 B L (P+T) I + c3 C + c4 B (P+T) H + c5 B (P+T)^2 + c6 B V + c7 (N - V H) + c8 V H + c0
                 (bytes; NNLS)

C is the logits the scoring holds at once: B T V with the whole logits (`chunked_scoring` false), one chunk's B V c with REINFORCE's and PPO's default `chunked_scoring` (grade_trl/core/head_scoring.py: c =
2^26 // (B V) positions, 27 at the GSM8K shape). A chunked fit measures each grid point in two chunks (`FIT_CHUNKS`)
and adds the moment S + k C, the first chunk's recompute and gradient at the start of backward with every saved
activation still held, k its bytes per logit measured on `CHUNK_PROBE` (a step whose peak it is); the check runs at
T = 256, two chunks of the default size (`CHECK_CHUNKED`). The parameters enter as the LM head's V H and the rest
(`FEATURES`' docstring says why).

S is what autograd saves for backward and X the transients above it at the peak (`step_cost.py`'s `memory_step`);
B completions per micro-batch, L layers, H hidden, I the MLP's width, V the embedding rows, P prompt and T new tokens,
N parameters. B (P+T)^2 is the padding mask that attention saves once per forward (the flash-style attention of PyTorch's
SDPA saves no attention weights); the keys' and values' grouped heads are H / 7 to H / 8 wide in Qwen2.5 and fold into the
B L (P+T) H term. N - V H and V H are there for the weights' copies that bf16 autocast casts and saves for backward (2 bytes a parameter;
`memory_model.py`'s GPT-2 fit has no such term, which is a likely part of its bf16 predictions' 22-37% shortfall on the
H200) and for the parameter gradients inside the step's peak. The grid: 32 points of {2, 4} layers x {128, 256} hidden x I in {2 H, 6 H} x B in {4, 8} x P in
{16, 64} x T in {8, 32} x V in {8,192, 32,768} (a fixed random half-fraction of the 256 corners), the embedded tokenizer
with the embeddings padded to V (ids past the tokenizer decode to nothing: the cost is a function of the shape only), the
GSM8K format check as the reward, every method of `--methods` in each `--dtypes`. The check: 6 layers, 512 wide, 8 heads
(2 key-value), I 2,816, V 65,536, B 8, P 96, T 64, outside the grid in every dimension.

    python benchmarks/memory_model_qwen2.py --threads 2 --json docs/results/memory_model_qwen2.json                   # chunked_scoring
    python benchmarks/memory_model_qwen2.py --threads 2 --scoring whole --json PATH                                   # the whole logits

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


FEATURES = ("B L (P+T) H", "B L (P+T) I", "B T V", "B (P+T) H", "B (P+T)^2", "B V", "N - V H", "V H", "1")
"""The fitted features. The parameters come in two parts: the LM head's V H (one matrix, tied or not) and the rest. Why:
bf16 autocast saves a 2-byte copy of each weight a product used, and under `chunked_scoring` the head's copy is made
inside the chunks' checkpoint, in the transients, not the saved bytes: on the grid's small models, where V H is most of
N, one N feature could not follow that (the saved bytes fitted to 36%, N's 2 bytes a parameter spread over other terms).
Fits written before 2026-12-07 have one `N` feature instead: `step_peak` reads every fit's coefficients by name."""
GRID = {"layers": (2, 4), "hidden": (128, 256), "mlp_ratio": (2, 6), "batch": (4, 8), "prompt": (16, 64), "new_tokens": (8, 32), "vocab": (8192, 32768)}
GRID_POINTS = 32
CHECK = {"layers": 6, "hidden": 512, "heads": 8, "kv_heads": 2, "intermediate": 2816, "vocab": 65536, "batch": 8, "prompt": 96, "new_tokens": 64}
CHECK_CHUNKED = {**CHECK, "new_tokens": 256}  # 8 x 256 x 65,536 logits: two chunks of chunked_scoring's default, as the GSM8K shapes score in several
# Qwen2.5's published configs (config.json of Qwen/Qwen2.5-{0.5B,1.5B,3B,7B}-Instruct): embeddings tied up to 3B.
QWEN25 = {
    "Qwen2.5-0.5B": {"layers": 24, "hidden": 896, "heads": 14, "kv_heads": 2, "intermediate": 4864, "tied": True},
    "Qwen2.5-1.5B": {"layers": 28, "hidden": 1536, "heads": 12, "kv_heads": 2, "intermediate": 8960, "tied": True},
    "Qwen2.5-3B": {"layers": 36, "hidden": 2048, "heads": 16, "kv_heads": 2, "intermediate": 11008, "tied": True},
    "Qwen2.5-7B": {"layers": 28, "hidden": 3584, "heads": 28, "kv_heads": 4, "intermediate": 18944, "tied": False},
}
QWEN25_VOCAB = 151936
METHODS = ("reinforce", "ppo")  # TRL's GRPO/CISPO: not modelled here (the module docstring says why)


SCORING_CHUNK_ELEMENTS = 2**26
"""grade_trl.core.sampling.CHUNK_ELEMENTS (tests/test_benchmark_smoke.py keeps them equal): the logits per chunk of
`chunked_scoring`, which the predictions of a chunked fit assume."""
FIT_CHUNKS = 2
"""A chunked fit measures each grid point in this many chunks (of T / 2 positions: B V T / 2 logits), the regime of the
GSM8K shapes (16 x 512 x 151,936 logits: 19 chunks of 2^26), with chunks large enough that their temporaries show in
the step's peak (a fixed small chunk left them below the other terms' noise: the check was -31%)."""
SCORINGS = ("chunked", "whole")


def scored_logits(batch: int, new_tokens: int, vocab: int, chunk: int | None) -> int:
    """The logits one scoring holds at once, the feature `B T V`: all of them with the whole logits (chunk None), else a
    chunk's, B V c with c = max(1, chunk // (B V)) positions (`grade_trl.core.sampling.position_chunks`), at most B T V."""
    if chunk is None:
        return batch * new_tokens * vocab
    return batch * vocab * min(new_tokens, max(1, chunk // (batch * vocab)))


def feature_values(shape: dict, batch: int, prompt: int, new_tokens: int, chunk: int | None = None) -> dict[str, float]:
    """Every feature by name: FEATURES' and the older fits' `N`."""
    layers, hidden, intermediate, vocab = shape["layers"], shape["hidden"], shape["intermediate"], shape["vocab"]
    tokens, n = prompt + new_tokens, parameters(**shape_of(shape))
    return {"B L (P+T) H": batch * layers * tokens * hidden, "B L (P+T) I": batch * layers * tokens * intermediate,
            "B T V": scored_logits(batch, new_tokens, vocab, chunk), "B (P+T) H": batch * tokens * hidden, "B (P+T)^2": batch * tokens**2,
            "B V": batch * vocab, "N - V H": n - vocab * hidden, "V H": vocab * hidden, "N": n, "1": 1.0}


def features(shape: dict, batch: int, prompt: int, new_tokens: int, chunk: int | None = None) -> list[float]:
    values = feature_values(shape, batch, prompt, new_tokens, chunk)
    return [values[name] for name in FEATURES]


MARKS = {"floor": "*", "chunk": "^"}  # which moment decides a predicted step peak (`step_peak`)
CHUNK_PROBE = {"layers": 1, "hidden": 64, "heads": 1, "kv_heads": 1, "intermediate": 128, "vocab": 65536, "batch": 8, "prompt": 8, "new_tokens": 64}
"""A step whose peak is the chunk moment: a body too small to matter, 8 x 64 x 65,536 logits in two chunks (64 MiB of
float32 each). Its (peak - saved) / C is k, a chunked fit's bytes per logit of a chunk's recompute and gradient."""


def prediction_chunk(entry: dict) -> int | None:
    """The chunk a fitted entry predicts with: chunked_scoring's default for a chunked fit, None for a whole-logits one (a
    fit written before chunked scoring has no `scoring`: its steps held the whole logits)."""
    return SCORING_CHUNK_ELEMENTS if entry.get("scoring") == "chunked" else None


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


def measure(method: str, shape: dict, batch: int, prompt: int, new_tokens: int, bf16: bool, chunk: int | None = SCORING_CHUNK_ELEMENTS) -> dict:
    """One memory step of `method` on a random Qwen2 of this shape (step_cost's trainer and measurement), scored in chunks
    of `chunk` logits (`chunked_scoring`), or from the whole logits (chunk None)."""
    import torch

    from grade_trl.core import head_scoring

    step_cost = memory_model().step_cost
    argv = ["--model", step_cost.RANDOM_QWEN2, "--tokenizer", "embedded", "--n_layer", str(shape["layers"]), "--n_embd", str(shape["hidden"]),
            "--n_head", str(shape["heads"]), "--n_kv_head", str(shape["kv_heads"]), "--intermediate_size", str(shape["intermediate"]),
            "--vocab_size", str(shape["vocab"]), "--reward", "rule", "--batch_size", str(batch), "--new_tokens", str(new_tokens),
            "--prompt_length", str(prompt), "--device", "cpu", "--warmup", "0", "--repeats", "1", "--methods", method] + (["--bf16"] if bf16 else [])
    bench = step_cost.parse_args(argv + (["--whole_logits"] if chunk is None else []))
    default_chunk = head_scoring.CHUNK_ELEMENTS
    head_scoring.CHUNK_ELEMENTS = chunk or default_chunk  # read at each scoring
    with tempfile.TemporaryDirectory() as workdir:
        path = step_cost.prepare_model(bench, workdir)
        tokenizer = step_cost.load_tokenizer(path)
        dataset = step_cost.Dataset.from_dict({"prompt": step_cost.make_prompts(tokenizer, batch * 4, prompt, 0)})
        reward = step_cost.make_reward(bench, path, tokenizer, torch.device("cpu"))
        try:
            result = step_cost.benchmark(method, bench, new_tokens, path, reward, tokenizer, dataset, torch.device("cpu"), workdir)
        finally:
            head_scoring.CHUNK_ELEMENTS = default_chunk
    return {**shape, "batch": batch, "prompt": prompt, "new_tokens": new_tokens, "chunk_elements": chunk, "peak_mib": result["peak_mib"],
            "saved_mib": result["saved_mib"]}


def shape_of(point: dict) -> dict:
    return {key: point[key] for key in ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab") + (("tied",) if "tied" in point else ())}


def small_shape(point: dict) -> dict:
    heads = point["hidden"] // 64
    return {"layers": point["layers"], "hidden": point["hidden"], "heads": heads, "kv_heads": 1, "intermediate": point["mlp_ratio"] * point["hidden"],
            "vocab": point["vocab"]}


def fit(points: list[dict], target) -> tuple[list[float], float]:
    """Non-negative least squares of target(point) (bytes) on the features of the points (each with the chunk it was
    measured with); (coefficients, worst relative residual)."""
    import numpy as np

    X = np.array([features(shape_of(p), p["batch"], p["prompt"], p["new_tokens"], p.get("chunk_elements")) for p in points])
    return memory_model().nnls_fit(X, np.array([target(p) for p in points]))


def step_peak(entry: dict, shape: dict, batch: int, prompt: int, new_tokens: int) -> dict:
    """Bytes: S, X and the step peak of the fitted `entry` on `shape`, the largest of three moments:
      fit:   S + X
      chunk: S + k C, a chunked fit's: the first chunk's recompute and gradient at the start of backward, every saved
             activation still held, C = `scored_logits` (a chunk's logits) and k its bytes per logit (`chunk_probe`)
      floor: 4 N + 8 C, the end of backward (every float32 gradient and two float32 logits-sized temporaries; C = B T V
             with the whole logits)
    The chunk moment is its own term because S + X, linear in the features, cannot follow a maximum over moments: on the
    grid's small shapes the chunk's temporaries were below other moments' peaks and its coefficient came out near 0."""
    values = feature_values(shape, batch, prompt, new_tokens, prediction_chunk(entry))
    s, x = (sum(coefficient * values[name] for name, coefficient in entry[kind].items()) for kind in ("saved_coefficients", "transient_coefficients"))
    n = values["N"]
    held = values["B T V"]
    moments = {"fit": s + x, "chunk": s + entry.get("chunk_bytes_per_logit", 0.0) * held, "floor": 4 * n + 8 * held}
    decided_by = max(moments, key=moments.get)
    return {"saved": s, "transient": x, "chunk_moment": moments["chunk"], "step_peak": moments[decided_by], "decided_by": decided_by,
            "floor_decides": decided_by == "floor", "parameters": n}


def predict(entry: dict, shape: dict, batch: int, prompt: int, new_tokens: int) -> dict:
    """GiB: the step peak and the resident memory (float32 weights 4 N + AdamW 8 N + the frozen reference 4 N)."""
    step = step_peak(entry, shape, batch, prompt, new_tokens)
    resident = 16 * step["parameters"]
    return {"parameters": step["parameters"], "saved_gib": step["saved"] / 2**30, "step_peak_gib": step["step_peak"] / 2**30,
            "resident_gib": resident / 2**30, "peak_gib": (step["step_peak"] + resident) / 2**30, "floor_decides": step["floor_decides"],
            "decided_by": step["decided_by"]}


def fitted_entries(out: dict) -> dict:
    """Every fit of `out` by key: `methods` (the scoring the fit ran with: chunked_scoring, the default) and, where kept,
    `whole_logits` (chunked_scoring false; the scoring of FSDP2 / ZeRO-3 runs) as `<method>/<dtype>/whole`."""
    return {**out["methods"], **{f"{key}/whole": entry for key, entry in out.get("whole_logits", {}).items()}}


def predictions(out: dict, args) -> dict:
    return {key: {name: predict(entry, {**shape, "vocab": QWEN25_VOCAB}, args.batch, args.prompt_length, args.new_tokens) for name, shape in QWEN25.items()}
            for key, entry in fitted_entries(out).items()}


def table(out: dict, args) -> str:
    by_method = predictions(out, args)
    names = list(QWEN25)
    lines = [f"PREDICTION: peak GiB of one step on one GPU, {args.batch} completions per micro-batch, {args.prompt_length}-token prompts, "
             f"{args.new_tokens} new tokens, V {QWEN25_VOCAB:,}: total (step peak above the float32 weights, AdamW state and reference). "
             "Check: a step on a larger random Qwen2 than the grid's, measured / predicted step peak (MiB).", "",
             "| method | precision | scoring | " + " | ".join(names) + " | check: measured / predicted |", "|---|---|---|" + "---:|" * (len(names) + 1)]
    for key, entry in fitted_entries(out).items():
        method, dtype = key.split("/")[:2]
        scoring = entry.get("scoring", "whole")
        cells = " | ".join(f"{p['peak_gib']:.1f} ({p['step_peak_gib']:.1f}{MARKS.get(p.get('decided_by'), '')})" for p in by_method[key].values())
        v = entry["validation"]
        lines.append(f"| {method} | {dtype} | {scoring} | {cells} | {v['measured_step_peak_mib']:.0f} / {v['predicted_step_peak_mib']:.0f} ({v['relative_error']:+.0%}) |")
    return "\n".join(lines + ["", "*: the step peak is the end of backward's floor, 4 N + 8 C (every float32 gradient and two float32 "
                                "logits-sized temporaries; C the logits held at once), larger than the fit's S + X there; ^: the chunk moment, "
                                "S + k C (chunked_scoring's first chunk in backward)."])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="grade_trl's GSM8K methods to fit")
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "float32"], choices=["float32", "bf16"],
                        help="bf16 autocast with float32 master weights (the GSM8K recipes'), and float32")
    parser.add_argument("--grid_points", type=int, default=GRID_POINTS, help="corners of the grid measured (a fixed random sample)")
    parser.add_argument("--grid", default=None, help="JSON overriding the grid, e.g. '{\"layers\": [1, 2]}' (tests)")
    parser.add_argument("--check", default=None, help="JSON overriding the validation shape (tests)")
    parser.add_argument("--probe", default=None, help="JSON overriding the chunk probe's shape (tests)")
    parser.add_argument("--scoring", default="chunked", choices=SCORINGS, help="chunked: REINFORCE's and PPO's default chunked_scoring (each grid "
                        f"point measured in {FIT_CHUNKS} chunks, the check in chunks of the default {SCORING_CHUNK_ELEMENTS:,} logits); whole: "
                        "chunked_scoring false, the scoring of FSDP2 / ZeRO-3 runs")
    parser.add_argument("--batch", type=int, default=16, help="predictions: completions per micro-batch (per_device_train_batch_size for GRPO/CISPO; "
                        "prompts x num_samples_per_prompt for REINFORCE)")
    parser.add_argument("--prompt_length", type=int, default=256, help="predictions: prompt tokens")
    parser.add_argument("--new_tokens", type=int, default=512, help="predictions: new tokens (max_completion_length / max_new_tokens)")
    parser.add_argument("--from_json", default=None, help="predict from the coefficients a run with --json wrote, without measuring")
    parser.add_argument("--refit", action="store_true", help="with --from_json: fit its measured points again with today's features (no measurement)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.from_json:
        try:
            out = json.loads(Path(args.from_json).read_text())
        except (OSError, ValueError) as error:
            raise SystemExit(f"error: --from_json: cannot read {args.from_json!r} as a model written by --json ({error})") from None
        if args.refit:
            out = refit(out)
    else:
        out = fit_all(args)
    out["predictions"] = {"batch": args.batch, "prompt_length": args.prompt_length, "new_tokens": args.new_tokens, "by_method": predictions(out, args)}
    print("\n" + table(out, args))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


def fitted_entry(key: str, scoring: str, points: list[dict], check: dict, measured: dict, probe: dict | None) -> dict:
    """A fit of FEATURES to the measured grid `points` (their saved bytes and peaks), its chunk moment's k from the
    `probe` (chunked scoring), and its check: the `measured` step at the `check` shape against its prediction."""
    saved, worst_saved = fit(points, lambda p: p["saved_mib"] * 2**20)
    transient, worst_transient = fit(points, lambda p: max(p["peak_mib"] - p["saved_mib"], 0.0) * 2**20)
    entry = {"scoring": scoring, "fit_chunks": FIT_CHUNKS if scoring == "chunked" else None,
             "saved_coefficients": dict(zip(FEATURES, saved)), "transient_coefficients": dict(zip(FEATURES, transient)),
             "worst_relative_residual_on_grid": {"saved": worst_saved, "transient": worst_transient}, "grid_points": points}
    if probe is not None:
        entry["chunk_probe"] = probe
        entry["chunk_bytes_per_logit"] = (probe["peak_mib"] - probe["saved_mib"]) * 2**20 / probe["chunk_elements"]
    check_shape = shape_of(check)
    predicted = step_peak(entry, check_shape, check["batch"], check["prompt"], check["new_tokens"])
    entry["validation"] = {"measured_step_peak_mib": measured["peak_mib"], "predicted_step_peak_mib": predicted["step_peak"] / 2**20,
                           "measured_saved_mib": measured["saved_mib"], "predicted_saved_mib": predicted["saved"] / 2**20,
                           "floor_decides": predicted["floor_decides"], "relative_error": predicted["step_peak"] / 2**20 / measured["peak_mib"] - 1}
    v = entry["validation"]
    chunk_note = f"chunk k {entry['chunk_bytes_per_logit']:.1f} bytes/logit; " if probe is not None else ""
    method, dtype = key.split("/")
    print(f"{method:<10} {dtype:<8} {scoring:<8} grid residual saved {worst_saved:.0%}, transient {worst_transient:.0%}; {chunk_note}check: step peak "
          f"measured {v['measured_step_peak_mib']:.0f} MiB, predicted {v['predicted_step_peak_mib']:.0f} MiB ({v['relative_error']:+.0%}); saved "
          f"{v['measured_saved_mib']:.0f} / {v['predicted_saved_mib']:.0f} MiB", flush=True)
    return entry


def refit(out: dict) -> dict:
    """Every fit of `out` (a file --json wrote) fitted again to its own measured points with today's FEATURES, no step
    measured: its grid points, chunk probe and check's measurement as they were. The whole-logits fits were written before
    the chunked ones, with their check under `whole_logits_check` (CHECK)."""
    out = {**out, "features": FEATURES}
    out["methods"] = {key: fitted_entry(key, entry.get("scoring", "whole"), entry["grid_points"], out["check"], _measured(entry), entry.get("chunk_probe"))
                      for key, entry in out["methods"].items()}
    if "whole_logits" in out:
        check = out.get("whole_logits_check", CHECK)
        out["whole_logits"] = {key: fitted_entry(key, "whole", entry["grid_points"], check, _measured(entry), None) for key, entry in out["whole_logits"].items()}
    return out


def _measured(entry: dict) -> dict:
    v = entry["validation"]
    return {"peak_mib": v["measured_step_peak_mib"], "saved_mib": v["measured_saved_mib"]}


def fit_all(args) -> dict:
    grid = {**GRID, **json.loads(args.grid)} if args.grid else GRID
    chunked = args.scoring == "chunked"
    check = CHECK_CHUNKED if chunked else CHECK
    check = {**check, **json.loads(args.check)} if args.check else check
    check_chunk = SCORING_CHUNK_ELEMENTS if chunked else None

    def fit_chunk(p: dict) -> int | None:
        return p["batch"] * p["vocab"] * max(1, p["new_tokens"] // FIT_CHUNKS) if chunked else None
    chosen = grid_points(grid, args.grid_points)
    out = {"features": FEATURES, "grid": grid, "grid_points_measured": len(chosen), "check": check, "methods": {}}
    check_shape = shape_of(check)
    with memory_model().step_cost.quiet_and_threads(args.threads):
        for method, dtype in itertools.product(args.methods, args.dtypes):
            bf16 = dtype == "bf16"
            points = [measure(method, small_shape(p), p["batch"], p["prompt"], p["new_tokens"], bf16, fit_chunk(p)) for p in chosen]
            probe = None
            if chunked:
                shape = {**CHUNK_PROBE, **json.loads(args.probe)} if args.probe else CHUNK_PROBE
                probe = measure(method, shape_of(shape), shape["batch"], shape["prompt"], shape["new_tokens"], bf16, fit_chunk(shape))
            measured = measure(method, check_shape, check["batch"], check["prompt"], check["new_tokens"], bf16, check_chunk)
            out["methods"][f"{method}/{dtype}"] = fitted_entry(f"{method}/{dtype}", args.scoring, points, check, measured, probe)
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
