"""One command for a GPU machine: what every method costs at the users' size, and whether every full-size recipe runs there.

Three stages, one after the other in this process, then one table (printed, and written as gpu_check.md/.json):
  1. step cost: `step_cost.py` on the gpt2-medium shape (24 layers, 1024 wide, the GPT-2 vocabulary), batch 16,
     32-token prompts, 48 new tokens, float32 and bf16 autocast, GRADE-STE, GRADE, REINFORCE, PPO and TRL GRPO; beside
     each measured step peak (`torch.cuda.max_memory_allocated` above the step's start) the memory model's prediction
     (`docs/results/memory_model.json`, fitted on CPU) and its error;
  2. recipes: every full-size IMDB recipe (`recipes/imdb_*.yaml`, their batch, lengths and switches) for
     `--max_steps` steps on a gpt2-medium-shaped random model, with the embedded IMDB sample, small evaluations and no
     checkpoints: status, seconds per step, the run's peak memory (results.json's `peak_memory_mb`);
  3. GSM8K: every GSM8K recipe (`recipes/gsm8k_*.yaml`: 64 completions of up to 512 tokens per step) for one step on a
     Qwen2.5-0.5B-shaped random Qwen2 model (the GPT-2 vocabulary with ChatML tokens and a chat template), with the
     embedded GSM8K sample.

Random weights: nothing comes from the hub, and the cost of a step does not depend on the weights (a random model
never stops early, so every completion has its maximum length: the worst case). A stage or run that fails is a row
with its error, not the end of the check.

    python benchmarks/gpu_check.py --tokenizer PATH/TO/gpt2 --output_dir docs/results/gpu_check
    python benchmarks/gpu_check.py --smoke --device cpu --tokenizer embedded --output_dir /tmp/gpu_check   # CPU, tiny shapes

`--smoke` runs the same sequence on 2-layer, 64-wide models with 8 new tokens and one step: what the test suite
checks on CPU. `--stages`, `--recipes` and `--gsm8k_recipes` pick parts (e.g. to split the check across two calls).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import glob
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
_spec = importlib.util.spec_from_file_location("step_cost", HERE / "step_cost.py")
step_cost = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_cost)

STAGES = ("step_cost", "recipes", "gsm8k")
COST_METHODS = ("grade_ste", "grade", "reinforce", "ppo", "grpo")  # the methods memory_model.json predicts
GPT2_MEDIUM = {"n_layer": 24, "n_embd": 1024, "n_head": 16}
QWEN25_05B = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2}
SMOKE_GPT2 = {"n_layer": 2, "n_embd": 64, "n_head": 2}
SMOKE_QWEN2 = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default="gpt2", help="the GPT-2 tokenizer: a folder with vocab.json and merges.txt, a hub id, or `embedded` (smoke)")
    parser.add_argument("--output_dir", default="docs/results/gpu_check", help="where the table, the JSON and each stage's raw numbers go")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu (the recipe runs use what Accelerate finds)")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES, help="which stages to run")
    parser.add_argument("--recipes", nargs="+", default=None, help="IMDB recipe names (default: every recipes/imdb_*.yaml)")
    parser.add_argument("--gsm8k_recipes", nargs="+", default=None, help="GSM8K recipe names (default: every recipes/gsm8k_*.yaml)")
    parser.add_argument("--max_steps", type=int, default=2, help="optimizer steps of each IMDB recipe run")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 8 new tokens, one step: checks the script, measures nothing")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads")
    return parser.parse_args(argv)


# Models ------------------------------------------------------------------------------------------------------
def tokenizer_folder(name: str) -> str:
    from grade_trl.models import resolve_model_path

    return resolve_model_path(name)


def random_gpt2(tokenizer_path: str, shape: dict, folder: str) -> str:
    """A gpt2-shaped random model with the GPT-2 tokenizer, saved as a hub model would be."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=1024, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, **shape)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def random_qwen2(tokenizer_path: str, shape: dict, folder: str) -> str:
    """A Qwen2-shaped random instruct model: the GPT-2 vocabulary plus ChatML tokens and a Qwen2.5-style chat template."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", tokenizer.convert_ids_to_tokens(0)
    tokenizer.chat_template = CHAT_TEMPLATE
    config = Qwen2Config(vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def release(device: str) -> None:
    gc.collect()
    if device == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


# Stage 1: step cost with the memory model's prediction ----------------------------------------------------------
def predicted_step_peak_mib(method: str, precision: str, batch: int, new_tokens: int) -> float | None:
    """The memory model's step peak for the gpt2-medium shape (None when the file or that point is absent)."""
    path = REPO / "docs" / "results" / "memory_model.json"
    if not path.is_file():
        return None
    entry = json.loads(path.read_text())["methods"].get(f"{method}/{precision}")
    if not entry or entry["prediction"]["shape"] != "gpt2-medium" or entry["prediction"]["new_tokens"] != new_tokens:
        return None
    point = entry["prediction"]["by_batch"].get(str(batch))
    return point["step_peak_gib"] * 1024 if point else None


def stage_step_cost(args, workdir: str, out: Path) -> list[dict]:
    shape = SMOKE_GPT2 if args.smoke else GPT2_MEDIUM
    batch, new_tokens = (4, 8) if args.smoke else (16, 48)
    rows = []
    for precision in ("float32", "bf16"):
        argv = ["--model", step_cost.RANDOM_GPT2, "--tokenizer", tokenizer_folder(args.tokenizer), "--device", args.device,
                "--n_layer", str(shape["n_layer"]), "--n_embd", str(shape["n_embd"]), "--n_head", str(shape["n_head"]),
                "--batch_size", str(batch), "--new_tokens", str(new_tokens), "--methods", *COST_METHODS,
                "--warmup", "0" if args.smoke else "1", "--repeats", "1" if args.smoke else "2", "--json", str(out / f"step_cost_{precision}.json")]
        argv += ["--bf16"] if precision == "bf16" else []
        argv += ["--threads", str(args.threads)] if args.threads else []
        what = f"gpt2-{'smoke' if args.smoke else 'medium'} B{batch} T{new_tokens} {precision}"
        rows += guarded(what, "step_cost", lambda: cost_rows(step_cost.main(argv), what, precision, batch, new_tokens))
        release(args.device)
    return rows


def cost_rows(payload: dict, what: str, precision: str, batch: int, new_tokens: int) -> list[dict]:
    """One row per method of a step_cost run, with the memory model's prediction beside the measured peak."""
    rows = []
    for r in payload["results"]:
        predicted = predicted_step_peak_mib(r["method"], precision, batch, new_tokens)
        rows.append({"stage": "step_cost", "what": f"{r['method']} {what}", "status": "ok", "seconds_per_step": r["seconds"],
                     "time_vs_reinforce": r["time_vs_reinforce"], "peak_mib": r["peak_mib"], "predicted_peak_mib": predicted,
                     "note": f"{r['time_vs_reinforce']:.2f}x REINFORCE's time" + (f"; memory model {predicted:.0f} MiB ({predicted / r['peak_mib'] - 1:+.0%})" if predicted else "")})
    return rows


# Stages 2 and 3: recipe runs --------------------------------------------------------------------------------------
def recipe_names(pattern: str, chosen: list[str] | None) -> list[str]:
    found = sorted(Path(p).stem for p in glob.glob(str(REPO / "recipes" / pattern)))
    return found if chosen is None else [n for n in chosen if n in found] + [n for n in chosen if n not in found]


def run_recipe(name: str, overrides: dict, out: Path, workdir: str) -> dict:
    """One recipe through grade_trl.run's main, in this process; its results.json is kept, its weights are not."""
    from grade_trl.run import main as run_main

    output_dir = os.path.join(workdir, "runs", name)
    argv = [str(REPO / "recipes" / f"{name}.yaml"), "--output_dir", output_dir, "--save_strategy", "no", "--disable_tqdm", "true"]
    argv += [item for key, value in overrides.items() for item in (f"--{key}", str(value))]
    start, log = time.time(), io.StringIO()
    try:
        with contextlib.redirect_stderr(log):
            code = run_main(argv)
    except SystemExit as exit_:  # the runner returns codes; argparse-style exits are caught all the same
        code = exit_.code
    wall = time.time() - start
    results_path = Path(output_dir) / "results.json"
    row = {"stage": "recipes" if name.startswith("imdb") else "gsm8k", "what": name, "exit_code": code, "wall_seconds": wall}
    if results_path.is_file():
        results = json.loads(results_path.read_text())
        shutil.copy(results_path, out / f"{name}_results.json")
        final = results.get("final") or {}
        steps = final.get("steps")
        row.update(status=results.get("status"), steps=steps, peak_mib=final.get("peak_memory_mb"),
                   seconds_per_step=final["train_minutes"] * 60 / steps if steps and final.get("train_minutes") else None,
                   error=results.get("error"))
        test = (final.get("test") or {}).get("final", {}).get("metrics", {})
        headline = next((f"test {k} {v:.3f}" for k, v in test.items() if isinstance(v, (int, float))), "")
        row["note"] = f"exit {code}, {wall:.0f} s in all" + (f"; {headline}" if headline else "")
    else:
        row.update(status="error", error=log.getvalue().strip().splitlines()[-1] if log.getvalue().strip() else f"exit {code}, no results.json")
    shutil.rmtree(output_dir, ignore_errors=True)  # the weights of a random model are not worth the disk
    return row


def stage_recipes(args, workdir: str, out: Path) -> list[dict]:
    model = random_gpt2(tokenizer_folder(args.tokenizer), SMOKE_GPT2 if args.smoke else GPT2_MEDIUM, os.path.join(workdir, "gpt2-medium-random"))
    overrides = {"model_name_or_path": model, "dataset_name": "embedded", "reward_model_path": os.path.join(workdir, "reward_head"),
                 "max_steps": 1 if args.smoke else args.max_steps, "eval_steps": 1 if args.smoke else args.max_steps, "logging_steps": 1,
                 "reward_split_size": 256, "policy_split_size": 256, "validation_split_size": 64, "reward_epochs": 1,
                 "eval_num_prompts": 16, "test_num_prompts": 16, "eval_best_of_n": 2, "save_best_model": "false"}
    rows = []
    for name in recipe_names("imdb_*.yaml", args.recipes):
        lengths = {}
        if args.smoke:
            lengths = {"max_completion_length": 8} if ("grpo" in name or "cispo" in name) else {"max_new_tokens": 8, "min_new_tokens": 2}
            lengths.update(bf16="false", per_device_train_batch_size=4, gradient_accumulation_steps=1)
        rows += guarded(name, "recipes", lambda: [run_recipe(name, {**overrides, **lengths}, out, workdir)])
        release(args.device)
    return rows


def stage_gsm8k(args, workdir: str, out: Path) -> list[dict]:
    model = random_qwen2(tokenizer_folder(args.tokenizer), SMOKE_QWEN2 if args.smoke else QWEN25_05B, os.path.join(workdir, "qwen2-0.5b-random"))
    overrides = {"model_name_or_path": model, "dataset_name": "embedded", "max_steps": 1, "eval_steps": 1, "logging_steps": 1,
                 "eval_num_problems": 8, "test_num_problems": 8, "save_best_model": "false"}
    if args.smoke:
        overrides.update(bf16="false", max_prompt_length=256, per_device_train_batch_size=4, gradient_accumulation_steps=1)
    rows = []
    for name in recipe_names("gsm8k_*.yaml", args.gsm8k_recipes):
        lengths = {}
        if args.smoke:
            lengths = {"max_new_tokens": 8, "min_new_tokens": 1} if "reinforce" in name else {"max_completion_length": 8, "num_generations": 4}
        rows += guarded(name, "gsm8k", lambda: [run_recipe(name, {**overrides, **lengths}, out, workdir)])
        release(args.device)
    return rows


def guarded(what: str, stage: str, body) -> list[dict]:
    """`body()`'s rows, or, when it raises, one error row naming `what`: a part that fails is a row, the check goes on."""
    try:
        return body()
    except Exception as error:
        traceback.print_exc(file=sys.stderr)
        return [{"stage": stage, "what": what, "status": "error", "error": one_line(error)}]


def one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


# The table ----------------------------------------------------------------------------------------------------------
def table(rows: list[dict], header: str) -> str:
    lines = [header, "", "| stage | what | status | s / step | peak memory (MiB) | note |", "|---|---|---|---:|---:|---|"]
    for r in rows:
        seconds = f"{r['seconds_per_step']:.3f}" if r.get("seconds_per_step") else "–"
        peak = f"{r['peak_mib']:.0f}" if r.get("peak_mib") else "–"
        note = r.get("note", "") if r.get("status") in ("ok", "completed") else (r.get("error") or r.get("note", ""))
        lines.append(f"| {r['stage']} | {r['what']} | {r.get('status')} | {seconds} | {peak} | {note} |")
    lines += ["", "step_cost: median optimizer step after the warm-up, peak = allocator peak above the step's start (forward + backward); "
              "recipes, gsm8k: training wall-clock / steps (the validations during training included), peak = the run's "
              "`peak_memory_mb` (CUDA: max_memory_allocated over training; CPU: the process's peak RSS)"]
    return "\n".join(lines)


def machine(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    return f"CPU, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import transformers
    import trl

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = (f"gpu_check{' --smoke' if args.smoke else ''} on {machine(args.device)} | torch {torch.__version__}, transformers "
              f"{transformers.__version__}, trl {trl.__version__} | {time.strftime('%Y-%m-%d %H:%M')}")
    print(header, flush=True)
    rows, start = [], time.time()
    stages = {"step_cost": stage_step_cost, "recipes": stage_recipes, "gsm8k": stage_gsm8k}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as workdir:
        for stage in args.stages:
            stage_start = time.time()
            rows += guarded("(set-up)", stage, lambda: stages[stage](args, workdir, out))  # a model that cannot be built
            print(f"[gpu_check] {stage}: {time.time() - stage_start:.0f} s", flush=True)
    text = table(rows, header) + f"\n\nin all {time.time() - start:.0f} s; command: python benchmarks/gpu_check.py {' '.join(argv if argv is not None else sys.argv[1:])}"
    print("\n" + text, flush=True)
    (out / "gpu_check.md").write_text(text + "\n")
    payload = {"header": header, "rows": rows, "seconds": time.time() - start}
    (out / "gpu_check.json").write_text(json.dumps(payload, indent=2, default=str))
    return payload


if __name__ == "__main__":
    main()
