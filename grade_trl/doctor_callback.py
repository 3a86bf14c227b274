"""The run doctor, live: `DoctorCallback` runs `diagnostics`' checks during training.

Apart from `diagnostics` so that the doctor command, which only reads files, does not import transformers (6-8 s)."""

from __future__ import annotations

import dataclasses
import logging
import typing

from transformers import TrainerCallback

from .diagnostics import DoctorSettings, Finding, LogColumns, check_stop_on, diagnose, method_logs_exact_kl

logger = logging.getLogger(__name__)


class DoctorCallback(TrainerCallback):
    """Runs `diagnose` on `state.log_history` at every log (training and evaluation rows) and warns once per finding.

    A finding is new when its (check, first step) was not seen before; `findings` holds the latest
    version of each. With `stop_on` naming a severity ("error", "warning") or a check id, a new
    matching finding sets `control.should_training_stop`. Every process computes the same findings
    from the same (gathered) history, so they all stop together; only the main process warns.

    With `stop_on` and the trainer attached (`callback.trainer = trainer`), the checks also run before every
    optimizer step on the row the step would log (`trainer.pending_logs()`: the training window so far and this
    step's gradient norm): a finding there to stop on skips that update (every gradient set to None, which the
    optimizer passes over) and stops the run, so the weights saved are those before the update that triggered it.
    Findings on evaluation rows (reward_regression) come after the step's update and stop the run after it.
    """

    def __init__(self, settings: DoctorSettings | None = None, stop_on: typing.Iterable[str] = ()):
        self.settings = settings or DoctorSettings()
        self.stop_on = check_stop_on(stop_on)
        self._findings: dict[tuple[str, int], Finding] = {}
        self._columns = LogColumns()  # state.log_history only grows: read each row once
        self.trainer = None
        self.skipped_update_at: int | None = None  # the step whose update a pre-step finding skipped
        self.stopped: dict | None = None  # what stopped the run: {"check", "step", "update_skipped"} (results.json's final.doctor_stopped)

    @property
    def findings(self) -> list[Finding]:
        return list(self._findings.values())

    def _settings_for(self, args) -> DoctorSettings:
        settings = self.settings
        if settings.kl_target is None and getattr(args, "adaptive_kl", False) and getattr(args, "kl_target", None):
            settings = dataclasses.replace(settings, kl_target=args.kl_target)
        if not settings.kl_exact and method_logs_exact_kl(args):  # GRADE's config: its KL is exact
            settings = dataclasses.replace(settings, kl_exact=True)
        return settings

    def _catch_up(self, state) -> None:
        if len(state.log_history) < self._columns.rows:  # a new state (another train() call): start over
            self._columns = LogColumns()
        self._columns.extend(state.log_history[self._columns.rows :])

    def _report(self, findings, args, state, control, when: str) -> bool:
        """Record and warn about the new findings; True when one of them is to stop on (and the run is told to)."""
        stop = False
        for finding in findings:
            key = (finding.check, finding.steps[0])
            is_new = key not in self._findings
            self._findings[key] = finding
            if not is_new:
                continue
            if state.is_world_process_zero:
                logger.warning("run doctor: %s", finding.format())
            if finding.severity in self.stop_on or finding.check in self.stop_on:
                control.should_training_stop = stop = True
                if self.stopped is None:
                    self.stopped = {"check": finding.check, "step": state.global_step, "update_skipped": False}
                if state.is_world_process_zero:
                    logger.warning("run doctor: stopping the run %s on %s (stop_on: %s)", when, finding.check, ", ".join(sorted(self.stop_on)))
        return stop

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.stop_on or self.trainer is None:
            return control
        self._catch_up(state)
        step = state.global_step + 1
        with self._columns.provisional({**self.trainer.pending_logs(), "step": step}) as columns:
            findings = diagnose(columns, self._settings_for(args))
        if self._report(findings, args, state, control, f"before the update of step {step}"):
            self.skipped_update_at = step
            self.stopped |= {"step": step, "update_skipped": True}
            for parameter in (model if model is not None else self.trainer.model).parameters():
                parameter.grad = None
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._catch_up(state)
        self._report(diagnose(self._columns, self._settings_for(args)), args, state, control, f"at step {state.global_step}")
        return control
