"""Run several recipes x seeds with identical budgets and summarise them in `comparison.json`.

    python -m grade_trl.compare RECIPE [RECIPE ...] --output_dir results/cmp [--seeds 3 | --seed_list 1 2 3]
        [--thresholds 0.6 0.7 0.8] [--launcher "accelerate launch --config_file accelerate_configs/single_gpu.yaml"]
        [--force] [--key value ...]

Every `--key value` that is not one of the options above is forwarded to every run, so all
methods get the same budget (`--max_steps 50`). Each run is its own process,
`python -m grade_trl.run RECIPE --seed S --output_dir {out}/{name}/seed{S} ...`, where `name`
is the recipe's `method` (the recipe file's stem when two recipes share a method); its output
goes to `{run_dir}/log.txt`, its wall time and peak RSS to `{run_dir}/compare_run.json`. A run
whose results.json says "completed" is not run again (resume) unless `--force`. A failed run is
recorded and the others go on; the exit code is then 1.

Sample efficiency (thresholds), defined per seed because the seed also draws the validation
split (the runs of one seed, one per method, see the same validation prompts; runs of different
seeds do not). For seed s, with r0_s the initial validation reward (the mean step-0 `val_reward`
of the comparison's runs with seed s: they start from the same policy) and r*_s the best validation
reward reached by any run of the comparison with seed s, the target of fraction f is

    target_s(f) = r0_s + f * (r*_s - r0_s),

and a run of seed s reaches it at its first evaluation (step 0 included) with
`val_reward >= target_s(f)`, None if it never does. Reported per method: steps, samples
(steps x final["samples_per_step"]) and seconds (the evaluation row's "elapsed_seconds"; also
"train_seconds", the same without evaluation time) at that evaluation, as the mean over the seeds
that reached it, and how many did. A seed where no run improves on r0_s has no targets.
(For tasks whose validation metric is not `val_reward`, final["validation_metric"] is used.)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from .recipe import RecipeError, parse_overrides, parse_recipe
from .results import write_json_atomic
from .stats import mean_ci

logger = logging.getLogger("grade_trl.compare")

OWN_OPTIONS = {"--seeds", "--seed_list", "--output_dir", "--thresholds", "--launcher", "--force", "-h", "--help", "--jobs"}
RUN_INFO = "compare_run.json"


# ---------------------------------------------------------------------------------------------
# Reading one run's results.json (shared with grade_trl.analysis)
# ---------------------------------------------------------------------------------------------


def load_json(path) -> dict | None:
    """The parsed file, or None when it does not exist or is not valid JSON (a run still being written)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def validation_key(results: dict) -> str:
    """The validation metric that picks the best checkpoint (final["validation_metric"]; `val_reward` for IMDB/length)."""
    return (results.get("final") or {}).get("validation_metric") or "val_reward"


def test_key(results: dict) -> str:
    """The test metric matching the validation metric: `val_reward` -> `reward`."""
    return validation_key(results).split("_", 1)[-1]


def evaluation_rows(history: list[dict], key: str = "val_reward") -> list[dict]:
    """The validation evaluations (rows with `key`), one per step, in step order."""
    by_step = {row["step"]: row for row in history if row.get(key) is not None}
    return [by_step[step] for step in sorted(by_step)]


def training_rows(history: list[dict]) -> list[dict]:
    """The training logs (rows with the training `reward` or `loss`, not evaluations), in step order."""
    rows = [row for row in history if "elapsed_seconds" not in row and not any(k.startswith("val_") for k in row) and ("reward" in row or "loss" in row)]
    return sorted(rows, key=lambda row: row["step"])


def _test_block(final: dict, checkpoint: str) -> dict | None:
    return ((final.get("test") or {}).get(checkpoint)) or None


def test_metric(final: dict, name: str, checkpoint: str = "final") -> float | None:
    """A test metric of the final or best checkpoint: final["test"][checkpoint]["metrics"][name], falling back
    to the older keys ("test_reward" mean, "test_gold_reward") for the final checkpoint."""
    block = _test_block(final, checkpoint)
    if block is not None and (block.get("metrics") or {}).get(name) is not None:
        return block["metrics"][name]
    if checkpoint != "final":
        return None
    legacy = final.get(f"test_{name}")
    return legacy.get("mean") if isinstance(legacy, dict) else legacy


def test_per_prompt(final: dict, checkpoint: str = "final", name: str = "rewards") -> tuple[list[str] | None, list[float] | None]:
    """(prompts, per-prompt values) of a checkpoint's test; prompts are None when the results do not have them."""
    block = _test_block(final, checkpoint)
    if block is not None and block.get(name) is not None:
        return block.get("prompts"), block[name]
    if checkpoint == "final" and name == "rewards" and final.get("test_reward"):
        return final["test_reward"].get("prompts"), final["test_reward"].get("rewards")
    return None, None


def first_reaching(evaluations: list[dict], target: float, key: str = "val_reward") -> dict | None:
    """The first evaluation row with row[key] >= target, or None."""
    return next((row for row in evaluations if row[key] >= target), None)


def run_summary(results: dict, run_info: dict | None = None) -> dict:
    """The numbers of one completed run that a comparison aggregates (test_reward* hold the test metric that matches
    the validation metric: the reward for IMDB/length)."""
    final, history = results.get("final") or {}, results.get("history") or []
    key, name = validation_key(results), test_key(results)
    evaluations = evaluation_rows(history, key)
    run_info = run_info or {}
    best_val = _first_present(final.get("best_validation"), final.get("best_val_reward"), max((row[key] for row in evaluations), default=None))
    return {
        "test_reward": test_metric(final, name),
        "test_reward_best": test_metric(final, name, "best"),
        "gold_reward": test_metric(final, "gold_reward"),
        "gold_reward_best": test_metric(final, "gold_reward", "best"),
        "kl": final.get("kl"),
        "best_val_reward": best_val,
        "best_val_step": _first_present(final.get("best_validation_step"), final.get("best_val_step")),
        "initial_val_reward": evaluations[0][key] if evaluations and evaluations[0]["step"] == 0 else None,
        "steps": final.get("steps"),
        "samples_per_step": final.get("samples_per_step"),
        "wall_seconds": run_info.get("wall_seconds"),
        # The run's own measurement (device-aware) when it has one, else the child's peak RSS from wait4.
        "peak_memory_mb": final["peak_memory_mb"] if final.get("peak_memory_mb") is not None else run_info.get("peak_rss_mb"),
    }


def _first_present(*values):
    return next((v for v in values if v is not None), None)


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------


def estimate(values: list) -> dict:
    """Mean and 95% t-interval over seeds, with the per-seed values (None where a run lacks the metric)."""
    est = mean_ci(values)
    return {"mean": est.mean, "ci_low": est.low, "ci_high": est.high, "n": est.n, "per_seed": list(values)}


def threshold_targets(summaries: list[dict], thresholds: list[float]) -> dict:
    """For one seed's runs: r0 (mean step-0 validation reward), r* (best validation reward of any run) and
    target(f) = r0 + f (r* - r0) (None when r* <= r0)."""
    initial = [s["initial_val_reward"] for s in summaries if s["initial_val_reward"] is not None]
    best = [s["best_val_reward"] for s in summaries if s["best_val_reward"] is not None]
    r0 = sum(initial) / len(initial) if initial else None
    r_star = max(best) if best else None
    usable = r0 is not None and r_star is not None and r_star > r0
    return {
        "initial_val_reward": r0,
        "best_val_reward": r_star,
        "targets": {str(f): (r0 + f * (r_star - r0) if usable else None) for f in thresholds},
    }


def sample_efficiency(runs: list[tuple[int, dict, dict]], targets: dict[str, dict], thresholds: list[float]) -> dict:
    """Per fraction: steps, samples and seconds to the run's seed's target (mean over the seeds that reached it, per-seed
    values), for `runs` = [(seed, results, summary), ...] of one method and `targets` = {str(seed): threshold_targets(...)}."""
    out = {}
    for fraction in (str(f) for f in thresholds):
        steps, samples, seconds, train_seconds = [], [], [], []
        for seed, results, summary in runs:
            target = targets[str(seed)]["targets"][fraction]
            key = validation_key(results)
            row = first_reaching(evaluation_rows(results.get("history") or [], key), target, key) if target is not None else None
            steps.append(row["step"] if row else None)
            per_step = summary["samples_per_step"]
            samples.append(row["step"] * per_step if row and per_step is not None else None)
            seconds.append(row.get("elapsed_seconds") if row else None)
            train_seconds.append(row.get("train_seconds") if row else None)
        reached = sum(s is not None for s in steps)
        out[fraction] = {
            "reached": reached,
            "of": len(runs),
            **{key: {"mean": _mean(values), "per_seed": values} for key, values in (("steps", steps), ("samples", samples), ("seconds", seconds), ("train_seconds", train_seconds))},
        }
    return out


def _mean(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


METRICS = ("test_reward", "test_reward_best", "gold_reward", "gold_reward_best", "kl", "best_val_reward", "best_val_step", "wall_seconds", "peak_memory_mb")


def build_comparison(runs: list[dict], thresholds: list[float], meta: dict) -> dict:
    """comparison.json from the run records (name, recipe, seed, run_dir, status, ...), reading each completed run's results.json."""
    loaded = []
    for record in runs:
        results = load_json(Path(record["run_dir"]) / "results.json") if record["status"] == "completed" else None
        if results is not None:
            loaded.append((record, results, run_summary(results, load_json(Path(record["run_dir"]) / RUN_INFO))))
    seeds = list(dict.fromkeys(record["seed"] for record, _, _ in loaded))
    targets = {str(seed): threshold_targets([summary for record, _, summary in loaded if record["seed"] == seed], thresholds) for seed in seeds}
    methods = {}
    for name in dict.fromkeys(record["name"] for record in runs):
        mine = [(record, results, summary) for record, results, summary in loaded if record["name"] == name]
        entry = {
            "recipe": next(r["recipe"] for r in runs if r["name"] == name),
            "method": next(r["method"] for r in runs if r["name"] == name),
            "seeds": [record["seed"] for record, _, _ in mine],
            "run_dirs": [record["run_dir"] for record, _, _ in mine],
            "failed_seeds": [r["seed"] for r in runs if r["name"] == name and r["status"] == "failed"],
        }
        entry.update({metric: estimate([summary[metric] for _, _, summary in mine]) for metric in METRICS})
        entry["sample_efficiency"] = sample_efficiency([(record["seed"], results, summary) for record, results, summary in mine], targets, thresholds)
        methods[name] = entry
    return {
        **meta,
        "metric": {"validation": validation_key(loaded[0][1]) if loaded else None, "test": test_key(loaded[0][1]) if loaded else None},
        "thresholds": {"definition": THRESHOLD_DEFINITION, "fractions": list(thresholds), "per_seed": targets},
        "confidence_intervals": "95% Student t-interval over seeds: mean +- t_{0.975, n-1} s / sqrt(n); null with one seed",
        "runs": runs,
        "methods": methods,
    }


THRESHOLD_DEFINITION = (
    "per seed s (the seed draws the validation split): target_s(f) = r0_s + f * (r*_s - r0_s), r0_s = mean step-0 val_reward of the "
    "comparison's runs with seed s, r*_s = best val_reward of any of them; a run reaches it at its first evaluation with "
    "val_reward >= target_s(f) (step 0 included)"
)


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(our options and recipes, the `--key value` overrides forwarded to every run), read like grade_trl.run reads overrides."""
    own, forwarded, i = [], [], 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--") and token != "--" and token.split("=", 1)[0] not in OWN_OPTIONS:
            forwarded.append(token)
            if "=" not in token and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                forwarded.append(argv[i + 1])
                i += 1
        else:
            own.append(token)
        i += 1
    return own, forwarded


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m grade_trl.compare",
        description="Run recipes x seeds with identical budgets and write {output_dir}/comparison.json. Other --key value pairs go to every run.",
    )
    parser.add_argument("recipes", nargs="+", help="Recipe files (.yaml), one per method.")
    parser.add_argument("--output_dir", required=True, help="Runs go to {output_dir}/{name}/seed{S}/, the summary to {output_dir}/comparison.json.")
    parser.add_argument("--seeds", type=int, default=3, help="Number of seeds: 42, 43, ... (default 3).")
    parser.add_argument("--seed_list", type=int, nargs="+", default=None, help="Explicit seeds (overrides --seeds).")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.6, 0.7, 0.8], help="Fractions f of the reward gain r* - r0 for sample efficiency (default 0.6 0.7 0.8).")
    parser.add_argument("--launcher", default=None, help='Prefix of each run instead of `python`, e.g. "accelerate launch --config_file accelerate_configs/single_gpu.yaml".')
    parser.add_argument("--force", action="store_true", help="Rerun runs that already completed.")
    parser.add_argument(
        "--jobs", type=int, default=1,
        help="Runs at a time (default 1). With N > 1 each run gets OMP_NUM_THREADS = CPU cores / N unless it is set; wall times then measure a share of the machine.",
    )
    return parser


def recipe_method(path: str, forwarded: list[str], seed: int) -> str:
    """The recipe's method, after checking that it parses with the shared overrides (errors name the recipe)."""
    try:
        return parse_recipe([path, *forwarded, "--seed", str(seed)]).run.method
    except RecipeError as error:
        raise RecipeError(f"{path}: {error}") from None


def run_names(recipes: dict[str, str]) -> dict[str, str]:
    """{recipe path: name}: the method, or the file stem where two recipes share a method."""
    methods = list(recipes.values())
    names = {path: (method if methods.count(method) == 1 else Path(path).stem) for path, method in recipes.items()}
    if len(set(names.values())) < len(names):
        raise RecipeError(f"two recipes would write to the same folder ({sorted(names.values())}); give recipes with distinct methods or file names")
    return names


def same_settings(previous: dict | None, expected: dict) -> bool:
    """Whether a completed run's recipe (file + overrides, as results.json keeps it) is the one this comparison would run;
    output_dir is left out, so a moved comparison folder still resumes."""

    def normal(raw):
        return json.loads(json.dumps({k: v for k, v in (raw or {}).items() if k != "output_dir"}, default=str))

    return normal(previous) == normal(expected)


def run_command(launcher: str | None, recipe: str, seed: int, run_dir: str, forwarded: list[str]) -> list[str]:
    prefix = shlex.split(launcher) if launcher else [sys.executable]
    return prefix + ["-m", "grade_trl.run", recipe, *forwarded, "--seed", str(seed), "--output_dir", run_dir]


def execute(command: list[str], log_path: Path, env: dict | None = None) -> dict:
    """Run `command` with its output in `log_path`; return code, wall seconds and the peak RSS (MiB) from wait4.

    ru_maxrss of a waited-for child covers the child and the descendants it waited for (accelerate's workers):
    it is the largest single process's resident set, not their sum."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
    return {"returncode": process.returncode, "wall_seconds": time.time() - start, "peak_rss_mb": usage.ru_maxrss / 1024.0}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    own, forwarded = split_argv(argv)
    args = build_parser().parse_args(own)
    try:
        overrides = parse_overrides(forwarded)
        for key in ("seed", "output_dir"):
            if key in overrides:
                raise RecipeError(f"--{key} is set by compare for every run; use --seed_list / --output_dir of compare instead")
        seeds = args.seed_list or [42 + i for i in range(args.seeds)]
        if not seeds or len(set(seeds)) != len(seeds):
            raise RecipeError(f"seeds must be distinct and at least one, got {seeds}")
        repeated = [path for path in args.recipes if args.recipes.count(path) > 1]
        if repeated:
            raise RecipeError(f"recipe {repeated[0]} is given twice; give each recipe once (--seeds sets the repeats)")
        # Validate every recipe with the shared overrides before anything runs; a typo fails here in one line.
        methods = {path: recipe_method(path, forwarded, seeds[0]) for path in args.recipes}
        names = run_names(methods)
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    out = Path(args.output_dir)
    meta = {
        "command": shlex.join(["python", "-m", "grade_trl.compare", *argv]),
        "output_dir": str(out),
        "seeds": seeds,
        "overrides": forwarded,
        "launcher": args.launcher or "python",
        "jobs": args.jobs,
    }
    runs = [
        {"name": names[path], "method": methods[path], "recipe": path, "seed": seed, "run_dir": str(out / names[path] / f"seed{seed}"), "status": "pending"}
        for seed in seeds  # seed-major: after the first pass every method has one run to compare
        for path in args.recipes
    ]
    comparison_path = out / "comparison.json"
    pending = []
    for index, record in enumerate(runs, 1):
        run_dir = Path(record["run_dir"])
        previous = load_json(run_dir / "results.json")
        if previous is not None and previous.get("status") == "completed" and not args.force:
            expected = parse_recipe([record["recipe"], *forwarded, "--seed", str(record["seed"]), "--output_dir", str(run_dir)]).raw
            if same_settings((previous.get("config") or {}).get("recipe"), expected):
                record.update(status="completed", skipped=True, **(load_json(run_dir / RUN_INFO) or {}))
                logger.info("[%d/%d] %s seed %d: completed earlier, skipped (--force reruns it)", index, len(runs), record["name"], record["seed"])
                continue
            logger.warning("[%d/%d] %s seed %d: the completed run there had other settings; running it again", index, len(runs), record["name"], record["seed"])
        pending.append((index, record))

    env = dict(os.environ)
    if args.jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))

    def launch(index: int, record: dict) -> tuple[int, dict, dict]:
        command = run_command(args.launcher, record["recipe"], record["seed"], record["run_dir"], forwarded)
        logger.info("[%d/%d] %s seed %d: %s", index, len(runs), record["name"], record["seed"], shlex.join(command))
        return index, record, {"command": shlex.join(command), **execute(command, Path(record["run_dir"]) / "log.txt", env)}

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for future in as_completed([pool.submit(launch, index, record) for index, record in pending]):
            index, record, info = future.result()
            run_dir = Path(record["run_dir"])
            results = load_json(run_dir / "results.json")
            completed = info["returncode"] == 0 and results is not None and results.get("status") == "completed"
            write_json_atomic(run_dir / RUN_INFO, info)
            record.update(status="completed" if completed else "failed", skipped=False, **info)
            logger.info(
                "[%d/%d] %s seed %d: %s in %.1f s (exit %d%s)", index, len(runs), record["name"], record["seed"], record["status"], info["wall_seconds"],
                info["returncode"], "" if completed else f"; see {run_dir / 'log.txt'}",
            )
            write_json_atomic(comparison_path, build_comparison(runs, args.thresholds, meta))
    comparison = build_comparison(runs, args.thresholds, meta)
    write_json_atomic(comparison_path, comparison)
    print(summary_lines(comparison))
    print(f"\ncomparison: {comparison_path}\nfigures, tests and tables: python -m grade_trl.analysis {out}")
    return 1 if any(record["status"] == "failed" for record in runs) else 0


def summary_lines(comparison: dict) -> str:
    """A short plain-text table of the comparison (the full one is `python -m grade_trl.analysis`)."""

    def cell(est: dict) -> str:
        if est["mean"] is None:
            return "-"
        return f"{est['mean']:.3f}" + (f" ± {est['ci_high'] - est['mean']:.3f}" if est["ci_high"] is not None else "")

    columns = ("test_reward", "best_val_reward", "kl", "wall_seconds")
    lines = [f"{'method':<16}{'seeds':>6}" + "".join(f"{c:>20}" for c in columns) + "    (mean ± 95% CI half-width over seeds)"]
    for name, entry in comparison["methods"].items():
        lines.append(f"{name:<16}{len(entry['seeds']):>6}" + "".join(f"{cell(entry[c]):>20}" for c in columns))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
