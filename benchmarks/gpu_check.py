"""One command for a GPU machine: what every method costs at the users' size, and whether every full-size recipe runs there.

Five stages, one after the other in this process; the table (printed at the end, and gpu_check.md/.json rewritten
after every row, so a run stopped at its time limit leaves the rows it has):
  1. step cost: `step_cost.py` on the gpt2-medium shape (24 layers, 1024 wide, the GPT-2 vocabulary), batch 16,
     32-token prompts, 48 new tokens, float32 and bf16 autocast, GRADE-STE, GRADE, REINFORCE, PPO and TRL GRPO; beside
     each measured step peak (`torch.cuda.max_memory_allocated` above the step's start) the memory model's prediction
     (`docs/results/memory_model.json`, fitted on CPU) and its error;
  2. fit: batch 64 at the same shape and length, GRADE-STE and REINFORCE, float32 and bf16: the measured step
     peak against the memory model's prediction (does GRADE at batch 64 fit an 80 GB card?);
  3. recipes: every full-size IMDB recipe (`recipes/imdb_*.yaml`, their batch, lengths and switches) for
     `--max_steps` steps on a gpt2-medium-shaped random model, with the embedded IMDB sample, small evaluations and no
     checkpoints: status, seconds per step, the run's peak memory (results.json's `peak_memory_mb`);
  4. GSM8K: every GSM8K recipe (`recipes/gsm8k_*.yaml`: 64 completions of up to 512 tokens per step) for one step on a
     Qwen2.5-0.5B-shaped random Qwen2 model (the GPT-2 vocabulary with ChatML tokens and a chat template), with the
     embedded GSM8K sample;
  5. fsdp: the tiny GRADE-STE, REINFORCE and PPO recipes launched with `accelerate_configs/fsdp2.yaml` on every GPU
     of the machine against `single_gpu.yaml` with the same global batch: the first logged loss of each and whether
     the saved model/ loads back (the end-to-end test of tests/test_sharded.py, as a row instead of an assertion;
     with one GPU it runs the FSDP2 code path on one shard);
  6. zero: the same comparison with `accelerate_configs/zero2.yaml` and `zero3.yaml` (DeepSpeed must be installed),
     the tiny GRPO recipe included.

Random weights: nothing comes from the hub, and the cost of a step does not depend on the weights (a random model
never stops early, so every completion has its maximum length: the worst case). A stage or run that fails is a row
with its error, not the end of the check. `--budget_s` skips (as rows) the parts that would start after that many
seconds, so one call ends inside a lease.

    python benchmarks/gpu_check.py --tokenizer PATH/TO/gpt2 --output_dir docs/results/gpu_check
    python benchmarks/gpu_check.py --smoke --device cpu --tokenizer embedded --output_dir /tmp/gpu_check   # CPU, tiny shapes

`--lanes N` runs the recipe, GSM8K and sharded runs N at a time, each as its own process, after the step cost and
fit have run alone (a full-size recipe takes 160-230 s with its evaluations on an H200, so one after the other the
check takes over half an hour; the second lease ran six such lanes from its call script):

    python benchmarks/gpu_check.py --tokenizer PATH/TO/gpt2 --lanes 6 --budget_s 480

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
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from grade_trl.compare import overrides_argv

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
_spec = importlib.util.spec_from_file_location("step_cost", HERE / "step_cost.py")
step_cost = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_cost)

STAGES = ("step_cost", "fit", "recipes", "gsm8k", "fsdp", "zero")
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
    parser.add_argument("--precisions", nargs="+", default=["float32", "bf16"], choices=["float32", "bf16"], help="step_cost and fit stages: which precisions")
    parser.add_argument("--cost_methods", nargs="+", default=list(COST_METHODS), choices=COST_METHODS, help="step_cost stage: which methods")
    parser.add_argument("--sharded_recipes", nargs="+", default=None, help="tiny recipes of the fsdp and zero stages (default: GRADE-STE, REINFORCE, PPO, GRPO)")
    parser.add_argument("--zero_configs", nargs="+", default=["zero3.yaml", "zero2.yaml"], help="DeepSpeed configs of the zero stage")
    parser.add_argument("--max_steps", type=int, default=2, help="optimizer steps of each IMDB recipe run")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 8 new tokens, one step: checks the script, measures nothing")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads")
    parser.add_argument("--profile", action="store_true", help="step_cost stage: also profile one step of each method (step_cost.py --profile). "
                        "Slow on a GPU: on an H200 the profiled GRADE-STE step had not finished within 2 minutes")
    parser.add_argument("--budget_s", type=float, default=None, help="start no part after this many seconds (it becomes a `skipped` row)")
    parser.add_argument("--lanes", type=int, default=1, help="run the recipe, GSM8K and sharded runs as this many processes at once (each run one "
                        "process, in its own folder under OUTPUT_DIR/lanes/), after the step cost and fit stages have run alone; "
                        "1: every part in this process, one after the other")
    return parser.parse_args(argv)


# Models ------------------------------------------------------------------------------------------------------
def tokenizer_folder(name: str) -> str:
    from grade_trl.models import resolve_model_path

    return resolve_model_path(name)


def random_gpt2(tokenizer_path: str, shape: dict, folder: str) -> str:
    """A gpt2-shaped random model with the GPT-2 tokenizer, saved as a hub model would be."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    tokenizer = GPT2TokenizerFast.from_pretrained(tokenizer_path)  # a bare vocab.json + merges.txt folder has no tokenizer_config for AutoTokenizer
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=1024, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, **shape)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def random_qwen2(tokenizer_path: str, shape: dict, folder: str) -> str:
    """A Qwen2-shaped random instruct model: the GPT-2 vocabulary plus ChatML tokens and a Qwen2.5-style chat template."""
    from transformers import GPT2TokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tokenizer = GPT2TokenizerFast.from_pretrained(tokenizer_path)  # a bare vocab.json + merges.txt folder has no tokenizer_config for AutoTokenizer
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


def stage_step_cost(args, workdir: str, out: Path, report: "Report") -> None:
    shape = SMOKE_GPT2 if args.smoke else GPT2_MEDIUM
    batch, new_tokens = (4, 8) if args.smoke else (16, 48)
    for precision in args.precisions:
        step_cost_part(args, report, shape, batch, new_tokens, precision, args.cost_methods, "step_cost", repeats=1 if args.smoke else 2,
                       json_path=out / f"step_cost_{precision}.json", profile=args.profile, phases=True)


def stage_fit(args, workdir: str, out: Path, report: "Report") -> None:
    """Batch 64 (smoke: 8): the step peak of GRADE-STE and REINFORCE against the memory model's prediction."""
    shape = SMOKE_GPT2 if args.smoke else GPT2_MEDIUM
    batch, new_tokens = (8, 8) if args.smoke else (64, 48)
    for precision in args.precisions:
        step_cost_part(args, report, shape, batch, new_tokens, precision, ("grade_ste", "reinforce"), "fit", repeats=1,
                       json_path=out / f"fit_{precision}.json")


def step_cost_part(args, report: "Report", shape: dict, batch: int, new_tokens: int, precision: str, methods, stage: str,
                   repeats: int, json_path: Path, profile: bool = False, phases: bool = False) -> None:
    argv = ["--model", step_cost.RANDOM_GPT2, "--tokenizer", tokenizer_folder(args.tokenizer), "--device", args.device,
            "--n_layer", str(shape["n_layer"]), "--n_embd", str(shape["n_embd"]), "--n_head", str(shape["n_head"]),
            "--batch_size", str(batch), "--new_tokens", str(new_tokens), "--methods", *methods,
            "--warmup", "0" if args.smoke else "1", "--repeats", str(repeats), "--json", str(json_path)]
    argv += ["--bf16"] if precision == "bf16" else []
    argv += ["--profile"] if profile else []  # how busy the device is: the share of the step spent waiting on launches
    argv += ["--phases"] if phases else []  # one more step timed by phase (sampling, scoring, reward, backward, ...): a few seconds
    argv += ["--threads", str(args.threads)] if args.threads else []
    what = f"gpt2-{'smoke' if args.smoke else 'medium'} B{batch} T{new_tokens} {precision}"
    report.part(what, stage, lambda: cost_rows(step_cost.main(argv), what, precision, batch, new_tokens, stage))
    release(args.device)


def cost_rows(payload: dict, what: str, precision: str, batch: int, new_tokens: int, stage: str = "step_cost") -> list[dict]:
    """One row per method of a step_cost run, with the memory model's prediction beside the measured peak."""
    rows = []
    for r in payload["results"]:
        predicted = predicted_step_peak_mib(r["method"], precision, batch, new_tokens)
        rows.append({"stage": stage, "what": f"{r['method']} {what}", "status": "ok", "seconds_per_step": r["seconds"],
                     "time_vs_reinforce": r["time_vs_reinforce"], "peak_mib": r["peak_mib"], "predicted_peak_mib": predicted, "profile": r.get("profile"),
                     "note": f"{r['time_vs_reinforce']:.2f}x REINFORCE's time" + (f"; memory model {predicted:.0f} MiB ({predicted / r['peak_mib'] - 1:+.0%})" if predicted else "")
                     + (f"; device busy {r['profile']['backward']['device_busy_fraction']:.0%} of the backward" if ((r.get("profile") or {}).get("backward") or {}).get("device_busy_fraction") is not None else "")
                     + phase_note(r.get("phases"))})
    return rows


def phase_note(phases: dict | None) -> str:
    """The phases of a step (step_cost.py --phases) that took at least 5% of it, largest first."""
    if not phases:
        return ""
    total = phases["total"]
    shown = sorted(((k, v) for k, v in phases.items() if k != "total" and v >= 0.05 * total), key=lambda kv: -kv[1])
    return f"; phases of a {total:.2f} s step: " + ", ".join(f"{k} {v:.2f}" for k, v in shown)


# Stages 2 and 3: recipe runs --------------------------------------------------------------------------------------
def recipe_names(pattern: str, chosen: list[str] | None) -> list[str]:
    found = sorted(Path(p).stem for p in glob.glob(str(REPO / "recipes" / pattern)))
    return found if chosen is None else [n for n in chosen if n in found] + [n for n in chosen if n not in found]


def run_recipe(name: str, overrides: dict, out: Path, workdir: str) -> dict:
    """One recipe through grade_trl.run's main, in this process; its results.json is kept, its weights are not."""
    from grade_trl.run import main as run_main

    output_dir = os.path.join(workdir, "runs", name)
    argv = [str(REPO / "recipes" / f"{name}.yaml"), "--output_dir", output_dir, "--save_strategy", "no", "--disable_tqdm", "true"]
    argv += overrides_argv(overrides)
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


def stage_recipes(args, workdir: str, out: Path, report: "Report") -> None:
    model = random_gpt2(tokenizer_folder(args.tokenizer), SMOKE_GPT2 if args.smoke else GPT2_MEDIUM, os.path.join(workdir, "gpt2-medium-random"))
    overrides = {"model_name_or_path": model, "dataset_name": "embedded", "reward_model_path": os.path.join(workdir, "reward_head"),
                 "max_steps": 1 if args.smoke else args.max_steps, "eval_steps": 1 if args.smoke else args.max_steps, "logging_steps": 1,
                 "reward_split_size": 256, "policy_split_size": 256, "validation_split_size": 64, "reward_epochs": 1,
                 "eval_num_prompts": 16, "test_num_prompts": 16, "eval_best_of_n": 2, "save_best_model": "false"}
    for name in recipe_names("imdb_*.yaml", args.recipes):
        lengths = {}
        if args.smoke:
            lengths = {"max_completion_length": 8} if ("grpo" in name or "cispo" in name) else {"max_new_tokens": 8, "min_new_tokens": 2}
            lengths.update(bf16="false", per_device_train_batch_size=4, gradient_accumulation_steps=1)
        report.part(name, "recipes", lambda: [run_recipe(name, {**overrides, **lengths}, out, workdir)])
        release(args.device)


def stage_gsm8k(args, workdir: str, out: Path, report: "Report") -> None:
    model = random_qwen2(tokenizer_folder(args.tokenizer), SMOKE_QWEN2 if args.smoke else QWEN25_05B, os.path.join(workdir, "qwen2-0.5b-random"))
    overrides = {"model_name_or_path": model, "dataset_name": "embedded", "max_steps": 1, "eval_steps": 1, "logging_steps": 1,
                 "eval_num_problems": 8, "test_num_problems": 8, "save_best_model": "false"}
    if args.smoke:
        overrides.update(bf16="false", max_prompt_length=256, per_device_train_batch_size=4, gradient_accumulation_steps=1)
    for name in recipe_names("gsm8k_*.yaml", args.gsm8k_recipes):
        lengths = {}
        if args.smoke:
            lengths = {"max_new_tokens": 8, "min_new_tokens": 1} if "reinforce" in name else {"max_completion_length": 8, "num_generations": 4}
        report.part(name, "gsm8k", lambda: [run_recipe(name, {**overrides, **lengths}, out, workdir)])
        release(args.device)


SHARDED_RECIPES = ("tiny/imdb_grade_ste", "tiny/imdb_reinforce", "tiny/imdb_ppo", "tiny/imdb_grpo")


def stage_fsdp(args, workdir: str, out: Path, report: "Report") -> None:
    """Each tiny recipe under fsdp2.yaml on every GPU against single_gpu.yaml with the same global batch."""
    sharded_stage(args, workdir, out, report, "fsdp", ["fsdp2.yaml"])


def stage_zero(args, workdir: str, out: Path, report: "Report") -> None:
    """Each tiny recipe under DeepSpeed ZeRO-3 and ZeRO-2 on every GPU against single_gpu.yaml, as the fsdp stage."""
    if importlib.util.find_spec("deepspeed") is None:
        report.add([{"stage": "zero", "what": "(all)", "status": "skipped", "error": "DeepSpeed is not installed (pip install deepspeed)"}])
        return
    sharded_stage(args, workdir, out, report, "zero", args.zero_configs)


def sharded_stage(args, workdir: str, out: Path, report: "Report", stage: str, configs: list[str]) -> None:
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    if not gpus:
        report.add([{"stage": stage, "what": "(all)", "status": "skipped", "error": "FSDP and DeepSpeed need CUDA GPUs: Accelerate runs a CPU launch as MULTI_CPU"}])
        return
    for config in configs:
        for name in args.sharded_recipes or SHARDED_RECIPES:
            report.part(f"{name} {config}", stage, lambda: [sharded_against_one_gpu(name, gpus, workdir, out, config, stage)])


def sharded_against_one_gpu(name: str, gpus: int, workdir: str, out: Path, sharded_config: str = "fsdp2.yaml", stage: str = "fsdp") -> dict:
    from transformers import AutoModelForCausalLM

    common = {"max_steps": 2, "logging_steps": 1, "save_strategy": "no", "eval_steps": 100, "eval_num_prompts": max(2, gpus),
              "max_new_tokens": 8, "min_new_tokens": 2, "policy_split_size": 100, "validation_split_size": 60,
              "test_num_prompts": max(2, gpus), "eval_best_of_n": 1, "save_best_model": "false", "disable_tqdm": "true",
              "reward_model_path": os.path.join(workdir, "reward_head_tiny"), "reward_split_size": 256, "reward_epochs": 1}
    if "grpo" in name or "cispo" in name:  # TRL's trainers: their own length key, a group per prompt
        common = {k: v for k, v in common.items() if k not in ("max_new_tokens", "min_new_tokens")} | {"max_completion_length": 8}
    tag = f"{name.replace('/', '_')}_{Path(sharded_config).stem}"
    runs, seconds = {}, {}
    for label, config, processes, batch in (("sharded", sharded_config, gpus, 4), ("single", "single_gpu.yaml", 1, 4 * gpus)):
        output_dir = os.path.join(workdir, "sharded_runs", tag, label)
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_configs" / config),
                   "--num_processes", str(processes), "--main_process_port", "0", "-m", "grade_trl.run", str(REPO / "recipes" / f"{name}.yaml"),
                   "--output_dir", output_dir, "--per_device_train_batch_size", str(batch)]
        command += overrides_argv(common)
        start = time.time()
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=workdir, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])})
        seconds[label] = time.time() - start
        if done.returncode != 0:
            (out / f"{stage}_{tag}_{label}.stderr.txt").write_text(done.stderr)  # the whole story of the failure
            lines = [line for line in done.stderr.splitlines() if line.strip() and "ChildFailedError" not in line]
            cause = next((line for line in lines if line.lower().startswith("error:")), None) or next((line for line in reversed(lines) if "Error" in line), f"exit {done.returncode}")
            return {"stage": stage, "what": f"{name} {sharded_config}", "status": "error", "error": f"{label} ({config}): {cause[:300]}"}
        runs[label] = json.loads((Path(output_dir) / "results.json").read_text())
    first = {label: next(h["loss"] for h in run["history"] if "loss" in h) for label, run in runs.items()}
    model = AutoModelForCausalLM.from_pretrained(os.path.join(workdir, "sharded_runs", tag, "sharded", "model"))
    loaded = sum(p.numel() for p in model.parameters())
    gap = abs(first["sharded"] - first["single"]) / max(abs(first["single"]), 1e-12)
    return {"stage": stage, "what": f"{name} {sharded_config} ({gpus} GPU{'s' if gpus > 1 else ''})", "status": runs["sharded"]["status"],
            "steps": runs["sharded"]["final"].get("steps"), "peak_mib": runs["sharded"]["final"].get("peak_memory_mb"),
            "first_loss_sharded": first["sharded"], "first_loss_single": first["single"], "loaded_parameters": loaded,
            "note": f"first loss {first['sharded']:.5g} vs one GPU {first['single']:.5g} ({gap:.1%}); model/ loads ({loaded:,} parameters); "
                    f"{seconds['sharded']:.0f} s vs {seconds['single']:.0f} s with launch"}


class Report:
    """The rows so far, rewritten to gpu_check.md/.json after each part: a run cut off by its time limit leaves its rows."""

    def __init__(self, out: Path, header: str, budget_s: float | None):
        self.out, self.header, self.rows, self.start, self.budget_s = out, header, [], time.time(), budget_s

    def add(self, rows: list[dict]) -> None:
        self.rows += rows
        self.write()

    def part(self, what: str, stage: str, body) -> None:
        """`body()`'s rows, or one error row naming `what` when it raises (the check goes on), or a `skipped` row
        when the budget is spent."""
        if self.budget_s is not None and time.time() - self.start > self.budget_s:
            self.add([{"stage": stage, "what": what, "status": "skipped", "error": f"time budget of {self.budget_s:.0f} s spent"}])
            return
        try:
            rows = body()
        except Exception as error:
            traceback.print_exc(file=sys.stderr)
            rows = [{"stage": stage, "what": what, "status": "error", "error": one_line(error)}]
        self.add(rows)

    def text(self, command: str) -> str:
        return table(self.rows, self.header) + f"\n\nin all {time.time() - self.start:.0f} s; command: python benchmarks/gpu_check.py {command}"

    def write(self, command: str = "") -> str:
        text = self.text(command)
        (self.out / "gpu_check.md").write_text(text + "\n")
        payload = {"header": self.header, "rows": self.rows, "seconds": time.time() - self.start}
        (self.out / "gpu_check.json").write_text(json.dumps(payload, indent=2, default=str))
        return text


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
    lines += ["", "step_cost, fit: median optimizer step after the warm-up, peak = allocator peak above the step's start (forward + backward); "
              "recipes, gsm8k: training wall-clock / steps (the validations during training included), peak = the run's "
              "`peak_memory_mb` (CUDA: max_memory_allocated over training; CPU: the process's peak RSS); fsdp: the FSDP run's "
              "`peak_memory_mb` (rank 0)"]
    return "\n".join(lines)


def machine(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    return f"CPU, {torch.get_num_threads()} threads"


TIMED_STAGES = ("step_cost", "fit")


def lane_jobs(args, stages: list[str]) -> list[tuple[str, list[str]]]:
    """(name, gpu_check arguments) of one run each: a recipe, a GSM8K recipe, a sharded recipe under one config."""
    jobs = []
    for stage in stages:
        if stage == "recipes":
            jobs += [(f"recipes_{name}", ["--stages", "recipes", "--recipes", name]) for name in recipe_names("imdb_*.yaml", args.recipes)]
        elif stage == "gsm8k":
            jobs += [(f"gsm8k_{name}", ["--stages", "gsm8k", "--gsm8k_recipes", name]) for name in recipe_names("gsm8k_*.yaml", args.gsm8k_recipes)]
        elif stage in ("fsdp", "zero"):
            configs = ["fsdp2.yaml"] if stage == "fsdp" else args.zero_configs
            for config in configs:
                jobs += [(f"{stage}_{Path(config).stem}_{name.replace('/', '_')}", ["--stages", stage, "--sharded_recipes", name, "--zero_configs", config])
                         for name in args.sharded_recipes or SHARDED_RECIPES]
    return jobs


def run_lanes(args, stages: list[str], out: Path, report: "Report") -> None:
    """Each run of `stages` as its own `gpu_check.py` process, `--lanes` at a time, sharing the device; their rows join
    this report in the order of the jobs (each child writes OUTPUT_DIR/lanes/NAME/gpu_check.json as it goes). A
    child that leaves no row becomes an error row; the budget skips jobs that would start after it and stops the
    children still running at it plus 60 s."""
    common = ["--tokenizer", args.tokenizer, "--device", args.device, "--max_steps", str(args.max_steps)]
    common += (["--smoke"] if args.smoke else []) + (["--threads", str(args.threads)] if args.threads else [])
    pending, running, finished, before = list(enumerate(lane_jobs(args, stages))), {}, {}, list(report.rows)

    def record(index: int, rows: list[dict]) -> None:  # rewritten as each job ends: a parent cut off keeps what ended
        finished[index] = rows
        report.rows = before + [row for i in sorted(finished) for row in finished[i]]
        report.write()

    while pending or running:
        while pending and len(running) < args.lanes:
            index, (name, job_args) = pending.pop(0)
            left = None if args.budget_s is None else args.budget_s - (time.time() - report.start)
            if left is not None and left <= 0:
                record(index, [{"stage": job_args[1], "what": name, "status": "skipped", "error": f"time budget of {args.budget_s:.0f} s spent"}])
                continue
            folder = out / "lanes" / name
            folder.mkdir(parents=True, exist_ok=True)
            log = open(folder / "log.txt", "w")
            command = [sys.executable, str(Path(__file__).resolve()), *common, *job_args, "--output_dir", str(folder)]
            running[index] = (name, job_args[1], folder, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=os.getcwd()), log)
            print(f"[gpu_check] lane started: {name}", flush=True)
        time.sleep(1.0)
        overdue = args.budget_s is not None and time.time() - report.start > args.budget_s + 60
        for index, (name, stage, folder, process, log) in list(running.items()):
            if process.poll() is None and not overdue:
                continue
            if process.poll() is None:
                process.kill()
            process.wait()
            log.close()
            rows = json.loads((folder / "gpu_check.json").read_text())["rows"] if (folder / "gpu_check.json").is_file() else []
            record(index, rows or [{"stage": stage, "what": name, "status": "error", "error": f"exit {process.returncode}, no row (see {folder / 'log.txt'})"}])
            del running[index]
            print(f"[gpu_check] lane done: {name}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import transformers
    import trl

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = (f"gpu_check{' --smoke' if args.smoke else ''} on {machine(args.device)} | torch {torch.__version__}, transformers "
              f"{transformers.__version__}, trl {trl.__version__} | {time.strftime('%Y-%m-%d %H:%M')}")
    print(header, flush=True)
    report = Report(out, header, args.budget_s)
    stages = {"step_cost": stage_step_cost, "fit": stage_fit, "recipes": stage_recipes, "gsm8k": stage_gsm8k, "fsdp": stage_fsdp, "zero": stage_zero}
    # timings need the machine to themselves; without GPUs the sharded stages only give their skip row, in-process
    in_process = TIMED_STAGES + (("fsdp", "zero") if not (args.device == "cuda" and torch.cuda.device_count()) else ())
    alone = [stage for stage in args.stages if args.lanes == 1 or stage in in_process]
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as workdir:
        for stage in alone:
            stage_start = time.time()
            report.part("(set-up)", stage, lambda: stages[stage](args, workdir, out, report) or [])  # a model that cannot be built
            print(f"[gpu_check] {stage}: {time.time() - stage_start:.0f} s", flush=True)
    if args.lanes > 1:
        run_lanes(args, [stage for stage in args.stages if stage not in alone], out, report)
    text = report.write(" ".join(argv if argv is not None else sys.argv[1:]))
    print("\n" + text, flush=True)
    return {"header": header, "rows": report.rows, "seconds": time.time() - report.start}


if __name__ == "__main__":
    main()
