"""comparison.json: what several runs (methods x seeds) sum up to; written by `compare`, recomputed by `analysis`.

Every run in the folder, whichever compare command ran it. A name's runs are those trained with one set of settings
(`settings`: those of the last command that ran the name, else its newest run's); the others are listed in
`other_settings` and left out. Per method, over its seeds: mean and 95% t-interval of

    test, test_best_ckpt            the test metric matching the validation metric (IMDB/length: the reward;
                                    GSM8K: accuracy) of the last and of the best-validation checkpoint
    test_gold, test_gold_best_ckpt  the independent judge's score of the same test completions (IMDB)
    kl                              the last training window's KL, nats per completion
    best_validation, best_validation_step, peak_memory_mb,
    wall_seconds                    training's wall time to its last evaluation (evaluations included; set-up excluded)

and sample efficiency, defined per seed because the seed also draws the validation split (the runs of
one seed, one per method, see the same validation prompts; runs of different seeds do not). For seed s,
with r0_s the initial validation value (the mean step-0 value of the comparison's runs with seed s: they
start from the same policy) and r*_s the best validation value reached by any run of seed s, the target
of fraction f is

    target_s(f) = r0_s + f * (r*_s - r0_s),

and a run of seed s reaches it at its first evaluation (step 0 included) at or above it. Reported per
method: steps, samples (steps x final["samples_per_step"]) and seconds (the evaluation row's
`eval_wall_seconds`; `eval_train_seconds` without evaluation time) at that evaluation, as the mean
over the seeds that reached it, and how many did. A seed where no run improves on r0_s has no targets.
"""

from __future__ import annotations

import json
import shlex
from datetime import datetime
from pathlib import Path

from . import metrics
from .results import RESULTS_FILE, evaluation_rows, read_json, read_results, test_metric, test_name, validation_key
from .stats import mean_ci

RUN_INFO = "compare_run.json"  # written by `compare` beside each run: command, exit code, wall seconds, peak RSS
SUMMARY_KEYS = ("test", "test_best_ckpt", "test_gold", "test_gold_best_ckpt", "kl", "best_validation", "best_validation_step", "wall_seconds", "peak_memory_mb")
THRESHOLD_DEFINITION = (
    "per seed s (the seed draws the validation split): target_s(f) = r0_s + f * (r*_s - r0_s), r0_s = mean step-0 validation value of "
    "the comparison's runs with seed s, r*_s = best validation value of any of them; a run reaches it at its first evaluation at or "
    "above target_s(f) (step 0 included)"
)


# where and how a launch ran, and what it kept on the way (checkpoints), not what it trained
LAUNCH_KEYS = ("output_dir", "resume_from_checkpoint", "overwrite_output_dir", "save_strategy", "save_steps", "save_total_limit")


def run_settings(recipe: dict | None, with_seed: bool = True) -> dict:
    """What a run trained with: its recipe (file + overrides, as results.json keeps it) as the run read it
    (`recipe.as_trained`: values coerced, defaults left out) through JSON, without LAUNCH_KEYS (a moved comparison
    folder, compare's resume and restart flags) and, unless `with_seed`, its seed."""
    from .recipe import as_trained  # the config classes load with it: compare and analysis only

    left_out = LAUNCH_KEYS + (() if with_seed else ("seed",))
    return json.loads(json.dumps(as_trained({k: v for k, v in (recipe or {}).items() if k not in left_out}), default=str))


def written_at(results: dict, run_dir: str | Path) -> float:
    """When a run's results.json was written (its `written_at`; the file's time for a run of an earlier version)."""
    try:
        return datetime.fromisoformat(results["written_at"]).timestamp()
    except (KeyError, TypeError, ValueError):
        try:
            return (Path(run_dir) / RESULTS_FILE).stat().st_mtime
        except OSError:
            return 0.0


def settings_difference(settings: dict, reference: dict, most: int = 3) -> str:
    """`key value (the comparison's: value)` for the first `most` keys in which a run's settings differ from the reference."""
    keys = [k for k in sorted(set(settings) | set(reference)) if settings.get(k) != reference.get(k)]
    shown = [f"{k} {json.dumps(settings.get(k))} (the comparison's: {json.dumps(reference.get(k))})" for k in keys[:most]]
    return "; ".join(shown) + (f"; {len(keys) - most} more" if len(keys) > most else "")


def with_the_same_settings(runs: list[tuple[dict, str | Path]], reference: dict | None = None) -> tuple[list[int], dict[int, str], dict | None]:
    """Of one run name's completed runs [(results, run_dir)], the indices of those trained with the `reference` settings
    (`run_settings` without the seed: those of the compare command that ran the name last, where it is known), else with
    those of the most recently written run; for each other run, what differs; and the reference used. A seed an earlier
    command ran with another budget (`--max_steps`) would otherwise be averaged in."""
    if not runs:
        return [], {}, reference
    settings = [run_settings((results.get("config") or {}).get("recipe"), with_seed=False) for results, _ in runs]
    if reference is None:
        reference = settings[max(range(len(runs)), key=lambda i: written_at(*runs[i]))]
    kept = [i for i, s in enumerate(settings) if s == reference]
    return kept, {i: settings_difference(s, reference) for i, s in enumerate(settings) if s != reference}, reference


# What every run of one comparison must share, whichever method trained it: the task, its data and reward, the starting
# policy, the evaluation protocol, and the process count (the validation's samples are drawn per process: evaluation.py).
# Runs of another task in the same folder were tabled and t-tested against the others, and their best validation value
# taken as r* of the sentiment runs' targets (a journey audit).
PROTOCOL_KEYS = (
    "task", "model_name_or_path", "dataset_name", "dataset_config", "train_split", "validation_split", "test_split", "prompt_column",
    "reward_split_size", "policy_split_size", "validation_split_size", "test_split_size", "prompt_max_chars", "max_prompt_length",
    "reward_backbone", "reward_input", "reward_max_length", "reward_epochs", "reward_learning_rate", "reward_funcs", "reward_kwargs",
    "eval_reward_funcs", "eval_reward_kwargs", "eval_num_prompts", "test_num_prompts", "eval_num_problems", "test_num_problems",
    "eval_temperature", "eval_top_p", "eval_seed", "eval_best_of_n", "eval_pass_k", "gold_judge",
)  # not eval_min_new_tokens: by default each method's own min_new_tokens, which TRL's GRPO recipes spell out as it


def protocol(results: dict) -> dict:
    """A run's values of PROTOCOL_KEYS (as `run_settings` reads them: a default is absent) and its process count."""
    settings = run_settings((results.get("config") or {}).get("recipe"), with_seed=False)
    return {**{key: settings[key] for key in PROTOCOL_KEYS if key in settings}, "num_processes": (results.get("final") or {}).get("num_processes") or 1}


def with_the_same_protocol(runs: list[dict], reference: dict | None = None, preferred: list[bool] | None = None) -> tuple[dict[int, str], dict]:
    """Of completed runs' results.json (every name's), those whose `protocol` is not the `reference` one: ({index: what
    differs}, the reference). Without a reference, it is the protocol most of the `preferred` runs share (the runs of the
    names the writing compare command ran: an earlier command's runs of another task in the folder do not outvote
    them), else most of all the runs (the first one's where as many share another)."""
    protocols = [protocol(results) for results in runs]
    if reference is None and runs:
        pool = [i for i in range(len(runs)) if preferred and preferred[i]] or list(range(len(runs)))
        counts = {i: sum(protocols[j] == protocols[i] for j in pool) for i in pool}
        reference = protocols[max(pool, key=lambda i: (counts[i], -i))]
    return {i: settings_difference(p, reference) for i, p in enumerate(protocols) if p != reference}, reference or {}


def runs_in_folder(folder: Path) -> list[dict]:
    """The run records of every `{folder}/{name}/seed{k}/` that holds a results.json or compare's compare_run.json, as
    `compare` writes them (name, method, recipe, seed, run_dir, status): what an earlier command left in the folder.
    status: the results.json's ("completed", "interrupted", "failed", "running": still training or killed without a
    word), or "pending" for a launch that wrote none."""
    return [record for record, _ in runs_and_results_in_folder(folder)]


def runs_and_results_in_folder(folder: Path) -> list[tuple[dict, dict | None]]:
    """`runs_in_folder`'s records, each with its results.json as read (None where there is none): the analysis reads
    each file once."""
    records = []
    for run_dir in sorted({p.parent for pattern in (f"*/seed*/{RESULTS_FILE}", f"*/seed*/{RUN_INFO}") for p in folder.glob(pattern)}):
        results, info = read_results(run_dir), read_json(run_dir / RUN_INFO)
        recipe = ((results or {}).get("config") or {}).get("recipe") or {}
        words = shlex.split(info["command"]) if isinstance(info, dict) and isinstance(info.get("command"), str) else []
        seed_text = run_dir.name[len("seed"):]
        records.append(({
            "name": run_dir.parent.name,
            "method": recipe.get("method") if isinstance(recipe, dict) else None,
            "recipe": words[words.index("grade_trl.run") + 1] if "grade_trl.run" in words[:-1] else None,
            "seed": int(seed_text) if seed_text.isdigit() else recipe.get("seed"),
            "run_dir": str(run_dir),
            "status": results["status"] if results is not None else "pending",
        }, results))
    return records


def run_summary(results: dict, run_info: dict | None = None) -> dict:
    """The numbers of one completed run that a comparison aggregates."""
    final, history = results.get("final") or {}, results.get("history") or []
    key, name = validation_key(results), test_name(results)
    evaluations = evaluation_rows(history, key)
    run_info = run_info or {}
    return {
        "test": test_metric(final, name),
        "test_best_ckpt": test_metric(final, name, "best"),
        "test_gold": test_metric(final, "gold_reward"),
        "test_gold_best_ckpt": test_metric(final, "gold_reward", "best"),
        "kl": final.get("kl"),
        "best_validation": final.get("best_validation"),
        "best_validation_step": final.get("best_validation_step"),
        "initial_validation": evaluations[0][key] if evaluations and evaluations[0]["step"] == 0 else None,
        "steps": final.get("steps"),
        "samples_per_step": final.get("samples_per_step"),
        # training's wall time, evaluations included, over every launch of a resumed run (the last evaluation's
        # eval_wall_seconds): not the process's, whose set-up (the reward head the first run of a folder trains for the
        # others, imports) made the first method look slower in a journey audit; the process's where no row has it
        "wall_seconds": next((row[metrics.eval_key("wall_seconds")] for row in reversed(evaluations) if row.get(metrics.eval_key("wall_seconds")) is not None),
                             run_info.get("wall_seconds")),
        # The run's own measurement (device-aware) when it has one, else the child's peak RSS from wait4.
        "peak_memory_mb": final["peak_memory_mb"] if final.get("peak_memory_mb") is not None else run_info.get("peak_rss_mb"),
    }


def generation_settings(results: dict) -> dict:
    """How a run sampled in training (temperature, top-p: the distribution its KL is measured under) and generated in
    evaluation (results.json's final.task.evaluation_generation; None for runs written before it was recorded)."""
    trainer = (results.get("config") or {}).get("trainer") or {}
    return {"training": {key: trainer.get(key) for key in ("temperature", "top_p")},
            "evaluation": ((results.get("final") or {}).get("task") or {}).get("evaluation_generation")}


def estimate(values: list) -> dict:
    """Mean and 95% t-interval over seeds, with the per-seed values (None where a run lacks the metric)."""
    est = mean_ci(values)
    return {"mean": est.mean, "ci_low": est.low, "ci_high": est.high, "n": est.n, "per_seed": list(values)}


def from_fewer_runs(est: dict, runs: int) -> str:
    """`" (n=k)"` where only k of a method's `runs` completed runs have the value of `est` (an `estimate`), else ""."""
    return f" (n={est['n']})" if est.get("n") is not None and est["n"] < runs else ""


def threshold_targets(summaries: list[dict], thresholds: list[float]) -> dict:
    """For one seed's runs: r0 (mean step-0 validation value), r* (best validation value of any run) and
    target(f) = r0 + f (r* - r0) (None when r* <= r0)."""
    initial = [s["initial_validation"] for s in summaries if s["initial_validation"] is not None]
    best = [s["best_validation"] for s in summaries if s["best_validation"] is not None]
    r0 = sum(initial) / len(initial) if initial else None
    r_star = max(best) if best else None
    usable = r0 is not None and r_star is not None and r_star > r0
    return {
        "initial_validation": r0,
        "best_validation": r_star,
        "targets": {str(f): (r0 + f * (r_star - r0) if usable else None) for f in thresholds},
    }


def first_reaching(evaluations: list[dict], target: float, key: str) -> dict | None:
    """The first evaluation row with row[key] >= target, or None."""
    return next((row for row in evaluations if row[key] >= target), None)


def sample_efficiency(runs: list[tuple[int, dict, dict]], targets: dict[str, dict], thresholds: list[float]) -> dict:
    """Per fraction: steps, samples and seconds to the run's seed's target (mean over the seeds that reached it, per-seed
    values), for `runs` = [(seed, results, summary), ...] of one method and `targets` = {str(seed): threshold_targets(...)}."""
    out = {}
    wall, train = metrics.eval_key("wall_seconds"), metrics.eval_key("train_seconds")
    for fraction in (str(f) for f in thresholds):
        steps, samples, seconds, train_seconds = [], [], [], []
        for seed, results, summary in runs:
            target = targets[str(seed)]["targets"][fraction]
            key = validation_key(results)
            row = first_reaching(evaluation_rows(results.get("history") or [], key), target, key) if target is not None else None
            steps.append(row["step"] if row else None)
            per_step = summary["samples_per_step"]
            samples.append(row["step"] * per_step if row and per_step is not None else None)
            seconds.append(row.get(wall) if row else None)
            train_seconds.append(row.get(train) if row else None)
        out[fraction] = {
            "reached": sum(s is not None for s in steps),
            "of": len(runs),
            **{key: {"mean": _mean(values), "per_seed": values} for key, values in (("steps", steps), ("samples", samples), ("seconds", seconds), ("train_seconds", train_seconds))},
        }
    return out


def _mean(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def build_comparison(runs: list[dict], thresholds: list[float], meta: dict, settings: dict[str, dict] | None = None, protocol_reference: dict | None = None) -> dict:
    """comparison.json from the run records (name, method, recipe, seed, run_dir, status, ...), reading each completed
    run's results.json. settings: {name: the settings its runs must have (`run_settings` without the seed)} for the names
    the writing compare command ran; another name's are its newest run's (`with_the_same_settings`). A name's
    failed_seeds are its failed runs of those settings (or of settings unknown: no results.json). protocol_reference:
    the task, evaluation and process count every run must have (`protocol`; the analysis passes comparison.json's), else
    those most of the writing command's runs share (`with_the_same_protocol`)."""
    loaded, other_settings, references = [], {}, {}
    for record in runs:
        results = read_results(record["run_dir"]) if record["status"] == "completed" else None
        if results is not None:
            loaded.append((record, results, run_summary(results, read_json(Path(record["run_dir"]) / RUN_INFO))))
    for name in dict.fromkeys(record["name"] for record, _, _ in loaded):  # a name's runs: those with its newest run's settings
        mine = [(record, results) for record, results, _ in loaded if record["name"] == name]
        _, differing, references[name] = with_the_same_settings([(results, record["run_dir"]) for record, results in mine], (settings or {}).get(name))
        other_settings[name] = [{"seed": mine[i][0]["seed"], "run_dir": mine[i][0]["run_dir"], "differs": why} for i, why in differing.items()]
    left_out = {entry["run_dir"] for entries in other_settings.values() for entry in entries}
    loaded = [entry for entry in loaded if entry[0]["run_dir"] not in left_out]
    # one task, evaluation and process count for every name: the writing command's names' (comparison.json `protocol`)
    other_protocol, reference_protocol = with_the_same_protocol([results for _, results, _ in loaded], protocol_reference,
                                                                [record["name"] in (settings or {}) for record, _, _ in loaded])
    for i, why in other_protocol.items():
        record = loaded[i][0]
        other_settings.setdefault(record["name"], []).append({"seed": record["seed"], "run_dir": record["run_dir"], "protocol": True,
                                                              "differs": f"{why}; every name's runs must share the task, evaluation and process count"})
    loaded = [entry for i, entry in enumerate(loaded) if i not in other_protocol]

    def reference_of(name: str) -> dict | None:  # the settings a name's runs must have (the command's for a name none of whose runs completed)
        return references.get(name, (settings or {}).get(name))

    failed = {}  # a name's failed runs, but not those of another command's settings (a failed run's results.json has its recipe)
    for record in (r for r in runs if r["status"] == "failed"):
        results, reference = read_results(record["run_dir"]), reference_of(record["name"])
        recipe = ((results or {}).get("config") or {}).get("recipe")
        if reference is None or not isinstance(recipe, dict) or run_settings(recipe, with_seed=False) == reference:
            failed.setdefault(record["name"], []).append(record["seed"])
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
            "failed_seeds": failed.get(name, []),
            # the settings its runs share (the analysis keeps to them), and the completed runs left out for other settings
            "settings": reference_of(name),
            "other_settings": other_settings.get(name, []),
        }
        entry.update({key: estimate([summary[key] for _, _, summary in mine]) for key in SUMMARY_KEYS})
        # the budget each seed trained with: optimizer steps and completions per step (methods may differ: the report says so)
        entry["budget"] = {"steps": [summary["steps"] for _, _, summary in mine], "samples_per_step": [summary["samples_per_step"] for _, _, summary in mine]}
        entry["generation"] = generation_settings(mine[0][1]) if mine else None
        entry["sample_efficiency"] = sample_efficiency([(record["seed"], results, summary) for record, results, summary in mine], targets, thresholds)
        methods[name] = entry
    return {
        **meta,
        "metric": {"validation": validation_key(loaded[0][1]) if loaded else None, "test": test_name(loaded[0][1]) if loaded else None},
        "thresholds": {"definition": THRESHOLD_DEFINITION, "fractions": list(thresholds), "per_seed": targets},
        "confidence_intervals": "95% Student t-interval over seeds: mean +- t_{0.975, n-1} s / sqrt(n); null with one seed",
        "protocol": reference_protocol,  # the task, evaluation and process count of every run in the tables
        "runs": runs,
        "methods": methods,
    }
