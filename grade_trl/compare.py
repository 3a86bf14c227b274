"""Run several recipes x seeds with identical budgets and summarise them in `comparison.json`.

    python -m grade_trl.compare RECIPE [RECIPE ...] --output_dir results/cmp [--seeds 3 | --seed_list 1 2 3]
        [--thresholds 0.6 0.7 0.8] [--launcher "accelerate launch --config_file accelerate_configs/single_gpu.yaml"]
        [--jobs 2] [--force] [--key value ...]

Every `--key value` that is not one of the options above is a recipe override given to every run, so all
methods get the same budget (`--max_steps 50`); a key only some methods read goes to their runs, with a note
(`recipe.shared_overrides`: `--max_new_tokens 8 --max_completion_length 8` beside TRL's GRPO). Each run is its own process,
`python -m grade_trl.run RECIPE --seed S --output_dir {out}/{name}/seed{S} ...`, where `name` is the recipe's
`method` (the recipe file's stem when two recipes share a method); its output goes to `{run_dir}/log.txt`,
its wall time and peak RSS to `{run_dir}/compare_run.json`. A run whose results.json says "completed" with the
same settings is not run again unless `--force`; one that did not complete (a killed comparison) but left a complete
checkpoint (`save_strategy: steps`, or a SIGTERM) resumes from it with `--resume_from_checkpoint` when its command
is the same (its wall time then adds up every launch of it). A failed run is recorded and the others go on; the
exit code is then 1. What comparison.json holds, sample efficiency included: `grade_trl.comparison`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import NoReturn

from .errors import stop_in_one_line_while_importing

if __name__ == "__main__":  # Ctrl-C during the second of imports below: one line, not a traceback
    stop_in_one_line_while_importing()

from .cli import Command, Option, check_writable_folder, exit_process  # noqa: E402
from .comparison import RUN_INFO, build_comparison, from_fewer_runs, run_settings, runs_in_folder
from .errors import UserError, signals_raise
from .recipe import build_recipe, load_recipe_file, recipe_list_keys, shared_overrides
from .results import RESULTS_FILE, read_json, read_results, write_json_atomic

logger = logging.getLogger("grade_trl.compare")

COMMAND = Command(
    prog="grade_trl.compare",
    description="Run recipes x seeds with identical budgets and write {output_dir}/comparison.json. Other --key value pairs are "
    "recipe overrides given to every run (a key only some methods read: to their runs).",
    positional="RECIPE.yaml",
    nargs="+",
    forwards_overrides=True,
    override_list_keys=recipe_list_keys,
    options=(
        Option("output_dir", str, None, "Runs go to {output_dir}/{name}/seed{S}/, the summary to {output_dir}/comparison.json (required)."),
        Option("seeds", int, 3, "Number of seeds: 42, 43, ..."),
        Option("seed_list", list[int] | None, None, "Explicit seeds (overrides --seeds)."),
        Option("thresholds", list[float], [0.6, 0.7, 0.8], "Fractions f of the validation gain r* - r0 for sample efficiency."),
        Option("launcher", str | None, None, 'Prefix of each run instead of `python`, e.g. "accelerate launch --config_file accelerate_configs/single_gpu.yaml".'),
        Option("force", bool, False, "Rerun runs that already completed."),
        Option("jobs", int, 1, "Runs at a time. With N > 1 each run gets OMP_NUM_THREADS = CPU cores / N unless it is set; wall times then measure a share of the machine."),
    ),
)


def overrides_argv(overrides: dict) -> list[str]:
    """{key: value} -> ["--key", "value", ...], values written so that the run's YAML reading gives them back (a float
    with its dot: YAML reads `1e-05`, as JSON writes 1e-5, as a string)."""

    def text(value) -> str:
        if isinstance(value, str):
            return value
        if isinstance(value, float) and math.isfinite(value) and "." not in (written := repr(value)):
            mantissa, _, exponent = written.partition("e")
            return f"{mantissa}.0" + (f"e{exponent}" if exponent else "")
        return json.dumps(value)

    return [item for key, value in overrides.items() for item in (f"--{key}", text(value))]


def run_recipe(path: str, overrides: dict, seed: int, run_dir: str | None = None):
    """The recipe as the run will see it (file + shared overrides + seed); a bad recipe names its file."""
    values = {**load_recipe_file(path), **overrides, "seed": seed}
    if run_dir is not None:
        values["output_dir"] = run_dir
    try:
        return build_recipe(values, bare_keys=getattr(overrides, "bare", ()))
    except UserError as error:
        error.args = (f"{path}: {error}",)  # the same error (its `unknown_key` kept), naming the file
        raise


def runs_in(out: Path) -> dict[str, tuple[str, str | None]]:
    """{folder name: (recipe path, method)} of the runs an earlier comparison left in `out` (from each run's
    compare_run.json command and results.json), so that a later comparison into the same folder names its runs apart."""
    found: dict[str, tuple[str, str | None]] = {}
    for record in runs_in_folder(out):
        if record["recipe"] is not None:
            found.setdefault(record["name"], (record["recipe"], record["method"]))
    return found


def run_names(recipes: dict[str, str], existing: dict[str, tuple[str, str | None]] | None = None) -> dict[str, str]:
    """{recipe path: name}: the method, or the file stem where another recipe of that method is in this comparison or
    has runs in its output folder (`existing`, from `runs_in`): two commands into one folder never share a run folder."""
    existing = existing or {}
    methods = list(recipes.values())
    same = os.path.realpath
    # a recipe that already has runs in the folder keeps their folder (a rerun resumes or skips them, never starts over)
    kept = {path: name for path in recipes for name, (recipe, _) in existing.items() if same(recipe) == same(path)}

    def by_method(path: str, method: str) -> bool:
        others = [recipe for recipe, other in existing.values() if other == method and same(recipe) != same(path)]
        taken = method in existing and same(existing[method][0]) != same(path)
        return methods.count(method) == 1 and not others and not taken

    names = {path: kept.get(path) or (method if by_method(path, method) else Path(path).stem) for path, method in recipes.items()}
    if len(set(names.values())) < len(names):
        raise UserError(f"two recipes would write to the same folder ({sorted(names.values())}); give recipes with distinct methods or file names")
    return names


def same_settings(previous: dict | None, expected: dict) -> bool:
    """Whether a completed run's recipe (file + overrides, as results.json keeps it) is the one this comparison would run;
    the keys that say where and how a launch ran, not what it trained, are left out: output_dir (a moved comparison folder
    still resumes), resume_from_checkpoint and overwrite_output_dir (which compare adds to a resumed or restarted run)."""

    return run_settings(previous) == run_settings(expected)


def launcher_of(command: str | None) -> str | None:
    """What a run's command (compare_run.json's) launched `grade_trl.run` with: the words before `-m grade_trl.run`, a
    plain interpreter as `python` (another virtual environment's is the same launcher); None without a command."""
    if not command:
        return None
    words = shlex.split(command)
    start = next((i for i in range(len(words) - 1) if words[i : i + 2] == ["-m", "grade_trl.run"]), len(words))
    prefix = words[:start]
    return "python" if len(prefix) == 1 and os.path.basename(prefix[0]).startswith("python") else shlex.join(prefix)


def check_launcher(launcher: str) -> None:
    """A one-line UserError naming --launcher for a launcher that would fail every run: a program not on PATH, or an
    `accelerate launch` whose arguments its own parser refuses or whose --config_file is missing or unreadable
    (read by Accelerate's own loader). Other launchers are only checked for their program."""
    try:
        words = shlex.split(launcher)
    except ValueError as error:
        raise UserError(f"--launcher: {launcher!r} cannot be split into words ({error}); check its quotes") from None
    if not words or shutil.which(words[0]) is None:
        raise UserError(f"--launcher: {launcher!r} does not start with a program found on PATH (e.g. 'accelerate launch --num_processes 2')")
    if os.path.basename(words[0]) != "accelerate" or words[1:2] != ["launch"]:
        return
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    parser = launch_command_parser()

    def refuse(message: str) -> NoReturn:
        raise UserError(f"--launcher: accelerate launch refuses {shlex.join(words[2:])!r}: {message}")

    parser.error = refuse  # argparse would print its usage and exit
    args = parser.parse_args([*words[2:], "-m", "grade_trl.run", "RECIPE.yaml"])
    if args.config_file is not None:
        try:
            load_config_from_file(args.config_file)
        except Exception as error:  # noqa: BLE001 - missing file, bad YAML/JSON, unknown keys: Accelerate raises each its own way
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise UserError(f"--launcher: accelerate cannot read its --config_file {args.config_file!r}: {first_line}") from None


def run_command(launcher: str | None, recipe: str, seed: int, run_dir: str, overrides: dict) -> list[str]:
    prefix = shlex.split(launcher) if launcher else [sys.executable]
    return prefix + ["-m", "grade_trl.run", recipe, *overrides_argv(overrides), "--seed", str(seed), "--output_dir", run_dir]


def resumable_checkpoint(run_dir: Path, command: str) -> str | None:
    """The last complete checkpoint of a run that this comparison started with the same command and that did not
    complete (killed, stopped by a signal, failed), or None: the run then starts over."""
    from .resume import resolve_checkpoint

    if (read_json(run_dir / RUN_INFO) or {}).get("command") != command:
        return None
    if (read_results(run_dir) or {}).get("status") == "completed":  # run again for other settings (an edited recipe file): start over
        return None
    try:
        return resolve_checkpoint(True, str(run_dir))
    except UserError:
        return None


_RUNNING: set[subprocess.Popen] = set()  # the runs `execute` is waiting for, which a signal to compare is passed on to
_STOPPING = threading.Event()  # set by `stop_runs`: no run is started after it
_LAUNCH = threading.Lock()  # a run is started and registered, or refused, as one step against `stop_runs`


def execute(command: list[str], log_path: Path, env: dict | None = None, append: bool = False) -> dict:
    """Run `command` with its output in `log_path` (appended to when `append`: a resumed run keeps its first part's
    log); return code, wall seconds and the peak RSS (MiB) from wait4.

    ru_maxrss of a waited-for child covers the child and the descendants it waited for (accelerate's workers):
    it is the largest single process's resident set, not their sum."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log_path, "a" if append else "w") as log:
        with _LAUNCH:
            if _STOPPING.is_set():
                raise RuntimeError("the comparison is stopping: run not started")
            # its own session: a Ctrl-C at the terminal (or a signal to compare's process group) reaches compare alone, which
            # passes it on once (`stop_runs`); a run that got it twice would stop at once, without its checkpoint
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            _RUNNING.add(process)
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            _RUNNING.discard(process)
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
    return {"returncode": process.returncode, "wall_seconds": time.time() - start, "peak_rss_mb": usage.ru_maxrss / 1024.0}


def stop_runs(error: BaseException) -> None:
    """compare is stopping (a signal, Ctrl-C, an error): pass SIGTERM or SIGINT on to every run it started, so each
    finishes its optimizer step, saves a checkpoint and exits (grade_trl.run's graceful stop) before compare does;
    a rerun of the comparison resumes them. Without this, a run would go on alone, holding its output_dir's lock.
    A second signal while waiting is passed on too (the runs then stop at once)."""
    signum = getattr(error, "signum", None) or (signal.SIGINT if isinstance(error, KeyboardInterrupt) else signal.SIGTERM)
    with _LAUNCH:
        _STOPPING.set()
    while _RUNNING:
        for process in list(_RUNNING):
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)
        try:
            while _RUNNING:  # the workers' wait4 reaps them
                time.sleep(0.2)
        except BaseException as again:  # noqa: BLE001 - a second signal: pass it on and keep waiting
            signum = getattr(again, "signum", None) or signal.SIGINT


MAX_SEEDS = 1000  # seeds of one comparison: far past what a paper reports, far below what a run list can hold


def compare(recipes: list[str], options: dict, overrides: dict, argv: list[str]) -> int:
    _STOPPING.clear()  # a comparison stopped earlier in this process (a notebook) does not stop this one
    if not options["output_dir"]:
        raise UserError("--output_dir is required: the folder that receives every run and comparison.json")
    check_writable_folder("--output_dir", options["output_dir"])
    for key in ("seed", "output_dir"):
        if key in overrides:
            raise UserError(f"--{key} is set by compare for every run; use --seed_list / --output_dir of compare instead")
    for key in ("resume_from_checkpoint", "overwrite_output_dir"):
        if key in overrides:
            raise UserError(f"--{key} is set by compare for every run: the same command again resumes each unfinished run from its "
                            "last checkpoint and skips the completed ones; --force runs them all again")
    if options["seed_list"] is None and not 1 <= options["seeds"] <= MAX_SEEDS:  # a run per seed and method: 10**9 was minutes of memory growth, then the OOM killer
        raise UserError(f"--seeds: the number of seeds must be from 1 to {MAX_SEEDS:,}, got {options['seeds']} (or give them: --seed_list 1 2 3)")
    seeds = [42 + i for i in range(options["seeds"])] if options["seed_list"] is None else options["seed_list"]  # [] is no seed, not the default
    if not seeds or len(set(seeds)) != len(seeds) or len(seeds) > MAX_SEEDS:
        raise UserError(f"--seed_list: seeds must be distinct, at least one and at most {MAX_SEEDS:,}, got {seeds if len(seeds) <= 10 else f'{len(seeds)} seeds'}")
    if bad := next((seed for seed in seeds if not 0 <= seed < 2**32), None):  # every seed, before any run (seed 1 trained, then 2**32 was refused)
        raise UserError(f"--seed_list: seed {bad} is not a seed: expected an integer from 0 to 2^32 - 1")
    if options["jobs"] < 1:
        raise UserError(f"--jobs must be >= 1, got {options['jobs']}")
    if not options["thresholds"] or not all(0 < f <= 1 for f in options["thresholds"]):
        raise UserError(f"--thresholds: expected fractions in (0, 1] of the validation gain, at least one, got {options['thresholds']}")
    if options["launcher"]:
        check_launcher(options["launcher"])
    repeated = [path for path in recipes if recipes.count(path) > 1]
    if repeated:
        raise UserError(f"recipe {repeated[0]} is given twice; give each recipe once (--seeds sets the repeats)")
    # Validate every recipe with the shared overrides before anything runs; a typo fails here in one line. A key only some
    # methods read goes to their runs (`--max_new_tokens 8 --max_completion_length 8` with GRPO beside our trainers).
    routed, notes = shared_overrides({path: load_recipe_file(path) for path in recipes}, overrides)
    for note in notes:
        logger.warning(note)
    built = {path: run_recipe(path, routed[path], seeds[0]) for path in recipes}
    methods = {path: recipe.run.method for path, recipe in built.items()}
    out = Path(options["output_dir"])
    names = run_names(methods, runs_in(out))
    thresholds = options["thresholds"]
    command = shlex.join(["python", "-m", "grade_trl.compare", *argv])
    earlier = read_json(out / "comparison.json")
    earlier = earlier if isinstance(earlier, dict) else {}
    # every compare command that wrote into this folder, in order: analysis reads every run in it, whichever command ran it
    commands = [c for c in earlier.get("commands") or [earlier.get("command")] if isinstance(c, str)]
    meta = {
        "command": command,
        "commands": commands + [command] if commands[-1:] != [command] else commands,
        "output_dir": str(out),
        "seeds": seeds,
        "overrides": overrides,
        "launcher": options["launcher"] or "python",
        "jobs": options["jobs"],
    }
    runs = [
        {"name": names[path], "method": methods[path], "recipe": path, "seed": seed, "run_dir": str(out / names[path] / f"seed{seed}"), "status": "pending"}
        for seed in seeds  # seed-major: after the first pass every method has one run to compare
        for path in recipes
    ]
    # the settings this command trains each name with: the folder's runs of the name with others (an earlier command's) are left out
    settings = {names[path]: run_settings(built[path].raw, with_seed=False) for path in recipes}
    # the runs other commands left in the folder: comparison.json sums up every run there, as the analysis does
    this_command = {record["run_dir"] for record in runs}
    other_runs = [record for record in runs_in_folder(out) if record["run_dir"] not in this_command]
    comparison_path = out / "comparison.json"
    pending = []
    for index, record in enumerate(runs, 1):
        run_dir = Path(record["run_dir"])
        previous = read_results(run_dir)
        if previous is not None and previous.get("status") == "completed" and not options["force"]:
            expected = run_recipe(record["recipe"], routed[record["recipe"]], record["seed"], str(run_dir)).raw
            earlier_launcher = launcher_of((read_json(run_dir / RUN_INFO) or {}).get("command"))
            launcher = launcher_of(shlex.join(run_command(options["launcher"], record["recipe"], record["seed"], str(run_dir), routed[record["recipe"]])))
            if earlier_launcher not in (None, launcher):  # other processes: another batch per step (and another run)
                logger.warning("[%d/%d] %s seed %d: the completed run there was launched with %s, not %s; running it again",
                               index, len(runs), record["name"], record["seed"], earlier_launcher, launcher)
            elif same_settings((previous.get("config") or {}).get("recipe"), expected):
                record.update({**(read_json(run_dir / RUN_INFO) or {}), "status": "completed", "skipped": True})  # its info's own status yields
                logger.info("[%d/%d] %s seed %d: completed earlier, skipped (--force reruns it)", index, len(runs), record["name"], record["seed"])
                continue
            else:
                logger.warning("[%d/%d] %s seed %d: the completed run there had other settings; running it again", index, len(runs), record["name"], record["seed"])
        pending.append((index, record))

    env = dict(os.environ)
    # a run under `accelerate launch` with several processes: its launcher kills the workers this long after passing on
    # compare's SIGTERM (torch's default 30 s), which a step and its checkpoint may outlast; the user's own value wins
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")
    if options["jobs"] > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // options["jobs"]))

    def launch(index: int, record: dict) -> tuple[int, dict, dict]:
        if _STOPPING.is_set():  # a worker freed by a stopped run: announce and write nothing for a run that will not start
            raise RuntimeError("the comparison is stopping: run not started")
        command = run_command(options["launcher"], record["recipe"], record["seed"], record["run_dir"], routed[record["recipe"]])
        run_dir = Path(record["run_dir"])
        checkpoint = None if options["force"] else resumable_checkpoint(run_dir, shlex.join(command))
        # a run that starts over deletes what an earlier attempt left in its folder (grade_trl.run refuses otherwise)
        launched = command + (["--resume_from_checkpoint", checkpoint] if checkpoint else ["--overwrite_output_dir", "true"])
        logger.info("[%d/%d] %s seed %d: %s", index, len(runs), record["name"], record["seed"], shlex.join(launched))
        run_dir.mkdir(parents=True, exist_ok=True)
        if not checkpoint:  # a run that starts over: the earlier run's results go now, not at the new run's first write, so a
            (run_dir / RESULTS_FILE).unlink(missing_ok=True)  # launch stopped before it never pairs them with this launch's compare_run.json
        # a resumed run's wall time goes on from its earlier launches' (written below, or by the launch a kill cut short)
        earlier = (read_json(run_dir / RUN_INFO) or {}).get("wall_seconds", 0.0) if checkpoint else 0.0
        write_json_atomic(run_dir / RUN_INFO, {"command": shlex.join(command), "status": "running", "wall_seconds": earlier})  # lets a later compare resume it
        info = {"command": shlex.join(command), **execute(launched, run_dir / "log.txt", env, append=checkpoint is not None)}
        info["wall_seconds"] += earlier
        info |= {"resumed_from": checkpoint} if checkpoint else {}
        write_json_atomic(run_dir / RUN_INFO, info)  # by the worker: a compare stopping by a signal records no more runs itself
        return index, record, info

    pool = ThreadPoolExecutor(max_workers=options["jobs"])
    with signals_raise():  # SIGTERM raises here too (by default it would end compare at once, its runs going on alone)
        try:
            for future in as_completed([pool.submit(launch, index, record) for index, record in pending]):
                index, record, info = future.result()
                run_dir = Path(record["run_dir"])
                results = read_results(run_dir)
                completed = info["returncode"] == 0 and results is not None and results.get("status") == "completed"
                record.update(status="completed" if completed else "failed", skipped=False, **info)
                logger.info(
                    "[%d/%d] %s seed %d: %s in %.1f s (exit %d%s)", index, len(runs), record["name"], record["seed"], record["status"], info["wall_seconds"],
                    info["returncode"], "" if completed else f"; see {run_dir / 'log.txt'}",
                )
                write_json_atomic(comparison_path, build_comparison(runs + other_runs, thresholds, meta, settings))
        except BaseException as error:
            stop_runs(error)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    comparison = build_comparison(runs + other_runs, thresholds, meta, settings)
    write_json_atomic(comparison_path, comparison)
    for name, entry in comparison["methods"].items():
        for run in entry["other_settings"]:
            if run.get("protocol"):  # another task, evaluation or process count than this command's runs
                logger.warning("%s seed %s: left out of comparison.json: %s; compare it into another --output_dir", name, run["seed"], run["differs"])
            else:
                logger.warning("%s seed %s: left out of comparison.json: trained with other settings than this comparison's %s runs (%s); run it "
                               "again with them (--seed_list %s) or compare into another --output_dir", name, run["seed"], name, run["differs"], run["seed"])
    print(summary_lines(comparison))
    print(f"\ncomparison: {comparison_path}\nfigures, tests and tables: python -m grade_trl.analysis {out}")
    return 1 if any(record["status"] == "failed" for record in runs) else 0


def summary_lines(comparison: dict) -> str:
    """A short plain-text table of the comparison (the full one is `python -m grade_trl.analysis`)."""

    def cell(est: dict, seeds: int) -> str:
        if est["mean"] is None:
            return "-"
        return f"{est['mean']:.3f}" + (f" ± {est['ci_high'] - est['mean']:.3f}" if est["ci_high"] is not None else "") + from_fewer_runs(est, seeds)

    columns = ("test", "best_validation", "kl", "wall_seconds")
    lines = [f"{'method':<16}{'seeds':>6}" + "".join(f"{c:>20}" for c in columns) + "    (mean ± 95% CI half-width over seeds)"]
    for name, entry in comparison["methods"].items():
        lines.append(f"{name:<16}{len(entry['seeds']):>6}" + "".join(f"{cell(entry[c], len(entry['seeds'])):>20}" for c in columns))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return COMMAND.main(argv, lambda recipes, options, overrides: compare(recipes, options, overrides, argv))


if __name__ == "__main__":
    exit_process(main)
