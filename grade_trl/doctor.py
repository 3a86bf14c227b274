"""`python -m grade_trl.doctor RUN [--key value ...] [--json]`: the run doctor on a finished, crashed or running run.

RUN is a run's output_dir, its results.json, a checkpoint folder (its trainer_state.json) or a JSON list of
log rows. One block per finding: check, severity, the steps and values that are the evidence, the likely
cause and advice. Exit code 0 when healthy, 1 with findings, 2 on bad input. The checks and every threshold
(each `--key value`): `grade_trl.diagnostics`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing

from .errors import stop_in_one_line_while_importing

if __name__ == "__main__":  # Ctrl-C during the imports below (the diagnostics, a fraction of a second): one line, not a traceback
    stop_in_one_line_while_importing()

from .cli import Command, Option, exit_process  # noqa: E402 - after the handling above
from .errors import UserError
from .diagnostics import DoctorSettings, Finding, LogColumns, VALIDATION_KEYS, build_settings, run_checks, settings_from_config, validation_key_of
from .results import evaluation_rows, load_history, training_rows

_HINTS = typing.get_type_hints(DoctorSettings)
COMMAND = Command(
    prog="grade_trl.doctor",
    description=__doc__.split("\n\n")[0],
    positional="RUN",
    options=(Option("json", bool, False, "Print the findings as JSON instead of the report."),)
    + tuple(Option(f.name, _HINTS[f.name], f.default, f.metadata["help"]) for f in dataclasses.fields(DoctorSettings)),
    epilog="exit codes: 0 no findings, 1 findings, 2 bad input",
)


def report(findings: list[Finding], not_applicable: list[str], source: str, history: list[dict], validation_key: str) -> str:
    """The readable report: one block per finding, or 'no problems found'."""
    head = f"run doctor: {source} ({len(training_rows(history))} training logs, {len(evaluation_rows(history, validation_key))} evaluations)"
    skipped = f"not applicable (keys not logged, or too few logs to judge): {', '.join(not_applicable)}" if not_applicable else "every check applied"
    if not findings:
        return "\n".join([head, "no problems found", skipped])
    counts = ", ".join(f"{sum(f.severity == s for f in findings)} {s}(s)" for s in ("error", "warning") if any(f.severity == s for f in findings))
    return "\n\n".join([f"{head}: {counts}"] + [f.format() for f in findings] + [skipped])


def latest_checkpoint(run_dir: str) -> str | None:
    """What `--resume_from_checkpoint true` would resume from in a run's output_dir (`resume.latest_complete_checkpoint`),
    or None. Imported here: the checkpoint rules live with the runner's (torch), read only for a stopped run."""
    from .resume import latest_complete_checkpoint

    return latest_complete_checkpoint(run_dir)


def run_ending(config: dict, history: list[dict], source: str = "") -> list[Finding]:
    """A results.json whose run did not complete: `failed` (an error, with its message) or `interrupted` (a warning),
    whatever the history's checks say about the steps before. The step is the run's own count where results.json
    has it (a run that failed in step 2's evaluation logged no row of step 2), and the advice resumes only from a
    checkpoint that exists (a second signal, or one outside training, saves none)."""
    status, error = config.get("status"), config.get("error")
    if status not in ("failed", "interrupted", "running"):
        return []
    final = config.get("final") or {}
    steps = [row["step"] for row in history if isinstance(row.get("step"), int)] or [0]
    step = final["steps"] if isinstance(final.get("steps"), int) else max(steps)
    checkpoint = final.get("checkpoint") or latest_checkpoint(os.path.dirname(source) or ".")
    if checkpoint:
        resume = f"--resume_from_checkpoint {checkpoint}" + ("" if final.get("checkpoint") else " (the latest complete checkpoint; the steps after it run again)")
    if status == "failed":
        return [Finding("run_failed", "error", [step], f"status failed: {error or 'no error recorded'}",
                        "the run stopped with an error before it completed (its history ends there)",
                        f"fix what the error names, then resume with the same command and {resume}" if checkpoint else
                        "fix what the error names and run the same command again (it saved no checkpoint, so it starts over)")]
    if status == "running":  # the snapshot a running run writes (run.ResultsSnapshot)
        return [Finding("run_running", "warning", [step], f"status running, written {config.get('written_at') or 'at an unknown time'}",
                        "the run is still training, or it was ended without a word (SIGKILL: the out-of-memory killer, a launcher's or "
                        "scheduler's kill after its grace period), which leaves its last snapshot (at most a minute old, and at each checkpoint)",
                        f"if it is not running, resume it with the same command and {resume}" if checkpoint else
                        "if it is not running, run the same command again: it saved no checkpoint, so it starts over")]
    return [Finding("run_interrupted", "warning", [step], f"status interrupted: {error or 'a signal'}",
                    "a signal (SIGTERM, Ctrl-C) stopped the run before it completed",
                    f"resume it with the same command and {resume}" if checkpoint else
                    "it saved no checkpoint (a second signal, or one outside training): run the same command again, which starts over")]


def doctor(runs: list[str], options: dict, overrides: dict) -> int:
    history, config, source = load_history(runs[0])
    given = {f.name: options[f.name] for f in dataclasses.fields(DoctorSettings) if options[f.name] != f.default}
    settings = build_settings(given, settings_from_config(config))
    completed = config.get("status") not in ("failed", "interrupted", "running")  # a run stopped before its first evaluation logged none
    if completed and settings.validation_key is not None and given.get("validation_key") and not evaluation_rows(history, settings.validation_key):
        logged = sorted({key for row in history for key in row if key.startswith("eval_") and isinstance(row[key], (int, float))})
        raise UserError(f"validation_key: no evaluation row of {source} has {settings.validation_key!r}; its evaluation keys: {', '.join(logged) or 'none'}")
    findings, not_applicable = run_checks(history, settings)
    findings = run_ending(config, history, source) + findings
    if options["json"]:
        print(json.dumps({"source": source, "findings": [dataclasses.asdict(f) for f in findings], "not_applicable": not_applicable}, indent=2))
    else:
        key = validation_key_of(LogColumns(history), settings) or VALIDATION_KEYS[0]
        print(report(findings, not_applicable, source, history, key))
    return 1 if findings else 0


def main(argv: list[str] | None = None) -> int:
    return COMMAND.main(argv, doctor)


if __name__ == "__main__":
    exit_process(main)
