"""results.json: the schema of one run's results, its atomic writer and its readers.

    {
      "status":  "completed" | "interrupted" | "failed" | "running" (rank 0's snapshot during training, at most once a
                 minute and at each checkpoint: a run killed without a word, SIGKILL, leaves it so),
      "error":   "ExceptionType: message"                        (when not completed)
      "written_at": ISO 8601 UTC time of the write (a comparison keeps a run name's runs with its newest run's settings)
      "config":  {"recipe": the mapping as written, "run": RunArguments, "trainer": the method's config},
      "history": trainer.state.log_history: training rows, evaluation rows (eval_*), probe rows (probe_*),
                 the final test row (test_*, test_best_ckpt_*); every row has "step"; keys: grade_trl.metrics
      "final":   {
        "task", "steps", "stopped_early", "train_minutes", "samples_per_step" (completions per optimizer step),
        "peak_memory_mb", "validation_metric" (e.g. "eval_reward"), "validation_before", "validation_after"
        (evaluator metrics at step 0 and at the end), "best_validation", "best_validation_step",
        "test": {"final": T, "best": T} with T = {"metrics", "prompts", "completions", and per-prompt lists such as
        "rewards", "gold_rewards", "corrects", "extracted_answers" and "gold_answers" (GSM8K)}, "kl" (the last training window's, nats per completion), "doctor" (its
        findings; None with the doctor off), "doctor_stopped" ({"check", "step", "update_skipped"} when `doctor: stop`
        ended the run, else None), "nonfinite_skipped_steps", "samples", "device", "num_processes", "torch";
        "unlogged_training_window" (a run that ended between an update and its training log, e.g. in that step's
        validation: {"first_step", "last_step", and the logging window's means so far, Trainer's `loss` not among them});
        "resumed_from" (a resumed run: its checkpoint folder), "checkpoint" (a run stopped by a signal: the
        checkpoint it saved)
      }
    }

Written atomically (a temporary file in the same folder, fsync, rename), so a reader never sees half a
file. `compare`, `doctor` and `analysis` read runs only through the functions below.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import UserError
from .metrics import EVAL_PREFIX, KL, LOSS, REWARD

RESULTS_FILE = "results.json"
STATUSES = ("completed", "interrupted", "failed", "running")

# ---------------------------------------------------------------- writing


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; readers get null
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return _jsonable(value.item())
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path` (mode 0644, not mkstemp's 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_jsonable(data), f, indent=2)
            f.flush()
            os.fchmod(f.fileno(), 0o644)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def payload(status: str, config: dict, history: list[dict], final: dict, error: str | None = None) -> dict:
    """One run's results.json content (module docstring)."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    data = {"status": status, "written_at": datetime.now(timezone.utc).isoformat(), "config": config, "history": list(history), "final": final}
    if error:
        data["error"] = error
    return data


# ---------------------------------------------------------------- reading


def read_json(path: str | os.PathLike) -> Any | None:
    """The parsed file, or None when it does not exist or is not valid JSON (a run still being written)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def results_path(run: str | os.PathLike) -> Path:
    """A run's output_dir or its results.json -> the results.json path."""
    run = Path(run)
    return run / RESULTS_FILE if run.is_dir() else run


# The parts of results.json (module docstring) its readers step into, with the type each must have where present and
# not null: a file edited by hand with a list or a string there was a traceback in doctor, compare and analysis.
_NUMBER = (int, float)
# the metric objects: each value a number (or null: NaN, which JSON writes as null)
METRIC_OBJECTS = (("final", "validation_before"), ("final", "validation_after"), ("final", "test", "final", "metrics"), ("final", "test", "best", "metrics"))
SHAPE: dict[tuple[str, ...], tuple[type, ...]] = {
    ("config",): (dict,), ("config", "recipe"): (dict,), ("config", "run"): (dict,), ("config", "trainer"): (dict,),
    ("final",): (dict,), ("final", "task"): (dict,), ("final", "task", "split_sizes"): (dict,),
    ("final", "task", "evaluation_generation"): (dict,), ("final", "test"): (dict,),
    ("final", "test", "final"): (dict,), ("final", "test", "best"): (dict,),
    **{path: (dict,) for path in METRIC_OBJECTS},
    ("final", "validation_metric"): (str,),
    ("final", "samples"): (list,), ("final", "doctor"): (list,), ("final", "nonfinite_skipped_steps"): (list,),
    ("final", "steps"): (int,), ("final", "best_validation_step"): (int,), ("final", "samples_per_step"): _NUMBER,  # PPO: a fraction (a rollout serves several steps)
    ("final", "num_processes"): (int,), ("final", "kl"): _NUMBER, ("final", "best_validation"): _NUMBER,
    ("final", "train_minutes"): _NUMBER, ("final", "peak_memory_mb"): _NUMBER, ("written_at",): (str,), ("error",): (str,),
}
_TYPE_WORDS = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number", bool: "true/false"}


def _part(data: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        data = data.get(key) if isinstance(data, dict) else None
    return data


def is_number(value: Any) -> bool:
    """An int or float, not a bool (JSON's true/false are Python's bools, which are ints)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_word(value: Any) -> str:
    return _TYPE_WORDS.get(type(value), type(value).__name__)


def shape_problem(data: Any) -> str | None:
    """What keeps parsed JSON from having the results.json shape, in words ("'final.task' is a list, expected an
    object"), or None: an object with a known status, a 'history' list of row objects, a 'final' object (which a
    completed run always has; a run that failed early may lack it), and each part of SHAPE of its type."""
    if not isinstance(data, dict):
        return f"expected a JSON object, got {_type_word(data)}"
    if data.get("status") not in STATUSES:
        return f"'status' is {data.get('status')!r}, expected one of {', '.join(STATUSES)}"
    if not isinstance(data.get("history"), list) or not all(isinstance(row, dict) for row in data["history"]):
        return "'history' is not a list of log rows (objects)"
    for index, row in enumerate(data["history"]):  # the readers order rows by step and compute with their values
        step = row.get("step")
        if not is_number(step) or not isinstance(step, int) or step < 0:
            return f"'history' row {index} has no step (an integer >= 0), got {step!r}"
        for key, value in row.items():
            if value is not None and not is_number(value):
                return f"'history' row {index}'s {key!r} is {_type_word(value)}, expected a number (or null)"
    if data.get("final") is None and data["status"] == "completed":
        return "a completed run's 'final' is missing"
    for path, types in SHAPE.items():
        value = _part(data, path)
        if value is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            expected = " or ".join(dict.fromkeys(_TYPE_WORDS[t] for t in types))
            return f"'{'.'.join(path)}' is {_type_word(value)}, expected {expected}"
    for path in METRIC_OBJECTS:
        for name, value in (_part(data, path) or {}).items():
            if value is not None and not is_number(value):
                return f"'{'.'.join(path)}.{name}' is {_type_word(value)}, expected a number (or null)"
    return None


def is_results(data: Any) -> bool:
    """Whether parsed JSON has the results.json shape (`shape_problem`)."""
    return shape_problem(data) is None


def read_results(run: str | os.PathLike) -> dict | None:
    """One run's results.json (from its output_dir or the file), or None while there is none (a run not started, still
    being written, or a file of another shape): the tolerant reader of compare, comparison and analysis."""
    data = read_json(results_path(run))
    return data if is_results(data) else None


def load_results(run: str | os.PathLike) -> dict:
    """One run's results.json (from its output_dir or the file), or a one-line UserError: the strict reader."""
    path = results_path(run)
    if not path.is_file():
        raise UserError(f"{path} is {'a folder, not a file' if path.is_dir() else 'not there'} (give a run's output_dir or its results.json)")
    data = read_json(path)
    if data is None:
        raise UserError(f"cannot read {path} as JSON (a copy cut short?); give a results.json written by grade_trl.run")
    if problem := shape_problem(data):
        raise UserError(f"{path} is not a results.json written by grade_trl.run: {problem}")
    return data


def load_history(source: str | os.PathLike) -> tuple[list[dict], dict, str]:
    """(history, config with "final", the file read) from a run's output_dir, a results.json, a checkpoint folder or
    its trainer_state.json (Trainer's `log_history`), or a bare JSON list of log rows."""
    path = Path(source)
    if path.is_dir():
        path = next((path / name for name in (RESULTS_FILE, "trainer_state.json") if (path / name).is_file()), path / RESULTS_FILE)
    if not path.is_file():
        raise UserError(f"{path} is {'a folder, not a file' if path.is_dir() else 'not there'} (give a run's output_dir, its results.json, or a checkpoint folder)")
    data = read_json(path)
    if data is None:
        raise UserError(f"cannot read {path} as JSON (give a results.json written by grade_trl.run or a trainer_state.json)")
    if isinstance(data, dict):
        # another shape is refused below, once the history is known to be there (shape_problem)
        history, config = data.get("history", data.get("log_history")), dict(data["config"]) if isinstance(data.get("config"), dict) else {}
        config["final"] = data.get("final") or {}
        config["status"], config["error"], config["written_at"] = data.get("status"), data.get("error"), data.get("written_at")  # a results.json's (None elsewhere)
    else:
        history, config = data, {}
    if not isinstance(history, list) or not all(isinstance(row, dict) for row in history):
        raise UserError(f"{path} has no history (expected a results.json with a 'history' list of log rows, a trainer_state.json, or a JSON list of rows)")
    for index, row in enumerate(history):  # the readers order and place rows by their optimizer step
        if not isinstance(row.get("step"), int) or isinstance(row.get("step"), bool) or row["step"] < 0:
            raise UserError(f"{path}: log row {index} has no step (every row needs \"step\": its optimizer step, an integer >= 0), got {row.get('step')!r}")
    if isinstance(data, dict) and "status" in data and (problem := shape_problem(data)):  # a results.json (a trainer_state.json has no status)
        raise UserError(f"{path} is not a results.json written by grade_trl.run: {problem}")
    return history, config, str(path)


def validation_key(results: dict) -> str:
    """The validation metric that picks the best checkpoint, e.g. `eval_reward` (IMDB, length) or `eval_accuracy` (GSM8K)."""
    return (results.get("final") or {}).get("validation_metric") or f"{EVAL_PREFIX}_reward"


def test_name(results: dict) -> str:
    """The test metric matching the validation metric: `eval_reward` -> `reward`."""
    return validation_key(results).removeprefix(f"{EVAL_PREFIX}_")


def is_evaluation_row(row: dict) -> bool:
    return any(key.startswith(f"{EVAL_PREFIX}_") for key in row)


def evaluation_rows(history: list[dict], key: str) -> list[dict]:
    """The validation evaluations (rows with a value for `key`), one per step (the last if logged twice), in step order."""
    by_step = {row["step"]: row for row in history if row.get(key) is not None}
    return [by_step[step] for step in sorted(by_step)]


def training_rows(history: list[dict]) -> list[dict]:
    """The training logs (rows with the training `reward` or `loss`, not evaluation, probe or test rows), in step order."""
    rows = [row for row in history if (REWARD in row or LOSS in row) and not is_evaluation_row(row)]
    return sorted(rows, key=lambda row: row["step"])


def last_training_value(history: list[dict], key: str = KL, step: int | None = None) -> float | None:
    """The value of `key` in the last training log (at or before `step`), or None."""
    rows = [row for row in training_rows(history) if row.get(key) is not None and (step is None or row["step"] <= step)]
    return rows[-1][key] if rows else None


def test_block(final: dict, checkpoint: str = "final") -> dict | None:
    """final["test"]["final" | "best"]: the test of the last or of the best-validation checkpoint."""
    return ((final.get("test") or {}).get(checkpoint)) or None


def test_metric(final: dict, name: str, checkpoint: str = "final") -> float | None:
    """A test metric (`reward`, `gold_reward`, `accuracy`, ...) of the final or the best checkpoint, or None."""
    block = test_block(final, checkpoint)
    return (block.get("metrics") or {}).get(name) if block else None


def per_prompt_name(metric: str) -> str:
    """The per-prompt list of a test metric in final["test"][checkpoint]: reward -> rewards, accuracy -> corrects."""
    return {"accuracy": "corrects"}.get(metric, f"{metric}s")


def test_per_prompt(final: dict, metric: str, checkpoint: str = "final") -> tuple[list[str] | None, list[float] | None]:
    """(prompts, per-prompt values of `metric`) of a checkpoint's test; (None, None) when the results lack them."""
    block = test_block(final, checkpoint)
    values = block.get(per_prompt_name(metric)) if block else None
    return (block.get("prompts"), values) if values is not None else (None, None)
