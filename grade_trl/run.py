"""Run a recipe: `python -m grade_trl.run RECIPE.yaml [--key value ...]` (or under `accelerate launch -m`).

recipe -> task (data, prompts, rewards) -> trainer -> evaluation -> results.json, model/.
Bad input exits with code 2 and one line on stderr; a reward function that fails mid-run
stops the run after results.json has been written with everything logged so far.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import sys
import time

from .errors import stop_in_one_line_while_importing

if __name__ == "__main__":  # Ctrl-C during the seconds of imports below: one line, not a traceback
    stop_in_one_line_while_importing()

from transformers import TrainerCallback  # noqa: E402 - after the handling above

from . import metrics  # noqa: E402
from .build import build_callbacks, build_task, build_trainer
from .cli import exit_process, quiet_libraries, run_safely
from .errors import Interrupted, RefusedBeforeTraining, UserError, signals_raise
from .methods import get_method
from .recipe import Recipe, help_for_argv, parse_recipe
from .reporting import TrainEndHeld, continue_trackers, start_trackers, continues_the_run, default_run_name
from .results import RESULTS_FILE, last_training_value, payload, read_results, write_json_atomic
from .resume import GracefulStop, checkpoint_folders, is_complete, resumed_step, saved_tracker_ids
from .safety import DivergedLogitsError, clipping_freezes_adam, diverged_logits_error, diverged_weights_error, out_of_memory_error, output_dir_lock

logger = logging.getLogger("grade_trl")


def peak_memory() -> float:
    """Peak accelerator memory (MB) where there is one, else this process's peak resident set."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def config_record(recipe: Recipe) -> dict:
    return {"recipe": recipe.raw, "run": vars(recipe.run), "trainer": recipe.config.to_dict()}


def run(recipe: Recipe) -> int:
    from accelerate import PartialState
    from transformers import set_seed

    config = recipe.config
    is_main = PartialState(cpu=config.use_cpu).is_main_process  # join the process group now: the set-up is shared
    set_seed(config.seed)
    graceful_stop = GracefulStop()
    with output_dir_lock(config.output_dir, enabled=is_main), signals_raise(handler=graceful_stop.handler):
        return _run_locked(recipe, is_main, graceful_stop)


def _run_locked(recipe: Recipe, is_main: bool, graceful_stop: GracefulStop) -> int:
    """The run itself, under the output_dir lock and with signals handled: every way out of it after the set-up
    has checked the input (an exception, a signal, a failure after training) writes results.json with its status,
    the error and the history so far; bad input found during the set-up writes nothing. The first SIGTERM/SIGINT
    during training finishes the step and saves a checkpoint first (resume.GracefulStop)."""
    import torch

    from .evaluation import evaluate_test
    from .report import summary_table

    run_args, config, resume_from = recipe.run, recipe.config, recipe.resume_from
    results_path = os.path.join(config.output_dir, RESULTS_FILE)
    trainer, final, train_end, callbacks, start = None, {}, None, {}, None
    # a run that does not continue output_dir's own run (a new one, or a fork from another folder's checkpoint)
    continuing = resume_from is not None and continues_the_run(resume_from, config.output_dir)
    earlier = [] if continuing else checkpoint_folders(config.output_dir)
    if earlier and not run_args.overwrite_output_dir:
        raise UserError(
            f"output_dir: {config.output_dir!r} holds an earlier run's {earlier[-1]}" + (f" and {len(earlier) - 1} more" if len(earlier) > 1 else "")
            + "; resume it with --resume_from_checkpoint true, start over with --overwrite_output_dir true (deletes them), or give another output_dir"
        )
    # a resumed run continues its tracker runs; a run started from another run's checkpoint (a fork) gets its own
    saved_trackers = saved_tracker_ids(resume_from) if continuing else {}
    if config.report_to and config.run_name is None:  # the trackers' name for the run: the stopped run's when resuming
        config.run_name = saved_trackers.get("run_name") or default_run_name(config.output_dir)
    try:
        tokenizer, task = build_task(recipe)
        final["task"] = task.info
        callbacks = build_callbacks(recipe, task, resume_from, graceful_stop)
        eval_callback = callbacks["evaluation"]
        # a run that starts over clears the earlier run's folder when training begins, after the trackers have started
        # (the reporters' callbacks come first) and the resume checks, before the first evaluation writes best_model/:
        # a tracker or checkpoint refused then leaves the earlier run as it was
        start_over = StartOver(config.output_dir, earlier) if not continuing and is_main else None
        ordered = [callbacks["resume"], start_over, *(c for name, c in callbacks.items() if name != "resume")]
        trainer = build_trainer(recipe, task, tokenizer, [c for c in ordered if c is not None])
        if is_main:  # last, so that its `final` has the doctor's findings of the row it follows
            trainer.add_callback(ResultsSnapshot(lambda: write_json_atomic(
                results_path, payload("running", config_record(recipe), trainer.state.log_history, {**final, **progress(trainer, callbacks, start)}))))
        if (frozen := clipping_freezes_adam(trainer.model, trainer.args)) and is_main:
            logger.warning(frozen)
        train_end = TrainEndHeld(trainer)  # the trackers' run stays open for the final test: one run, one tracker run
        start_trackers(trainer, vars(run_args))  # one line where a tracker cannot start; the run's settings where it can
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

        start = time.time()
        if resume_from is not None:
            final["resumed_from"] = resume_from
        continue_trackers(trainer, saved_trackers)  # a resumed run continues its tracker runs (reporting)
        trainer.accelerator.wait_for_everyone()
        trainer.train(resume_from_checkpoint=resume_from)
        if graceful_stop.stopping:  # agreed by every process (GracefulStop.agree)
            checkpoint = os.path.join(config.output_dir, f"checkpoint-{trainer.state.global_step}")
            if is_complete(checkpoint):  # none where the signal came after the last step's agreement
                final["checkpoint"] = checkpoint
            raise Interrupted(graceful_stop.signum, f"at step {trainer.state.global_step}")
        final |= progress(trainer, callbacks, start)
        final["peak_memory_mb"] = peak_memory()

        trainer.save_model(os.path.join(config.output_dir, "model"))
        if is_main:
            for folder in ("model", "best_model"):
                portable_adapter_config(os.path.join(config.output_dir, folder), run_args.model_name_or_path)
        policy = trainer.accelerator.unwrap_model(trainer.model)
        test = {"final": evaluate_test(task.evaluator, policy, tokenizer, trainer.accelerator, run_args.eval_seed)}
        if eval_callback.best_parameters is not None and eval_callback.best_step != trainer.state.global_step:
            saved = eval_callback.swap_in_best()
            test["best"] = evaluate_test(task.evaluator, policy, tokenizer, trainer.accelerator, run_args.eval_seed, f"best (step {eval_callback.best_step})")
            eval_callback.restore(saved)
        else:  # the final checkpoint is the best one
            test["best"] = test["final"]
        test_metrics = {f"{metrics.TEST_PREFIX}_{name}": v for name, v in test["final"]["metrics"].items()}
        test_metrics |= {f"{metrics.TEST_BEST_PREFIX}_{name}": v for name, v in test["best"]["metrics"].items()}
        eval_callback.log(trainer.state, test_metrics)  # into the history and to W&B/TensorBoard/trackio, as `test/...`
        train_end.release()
        primary = task.evaluator.primary
        before, after = eval_callback.results[0], eval_callback.results[trainer.state.global_step]
        final |= {
            "stopped_early": eval_callback.stopped_early_at is not None,
            "samples_per_step": config.completions_per_step(trainer.accelerator.num_processes),
            "validation_metric": metrics.eval_key(primary),
            "validation_before": before["metrics"],
            "validation_after": after["metrics"],
            "best_validation": eval_callback.best_value,
            "best_validation_step": eval_callback.best_step,
            "test": test,
            "kl": last_training_value(trainer.state.log_history, metrics.KL),
            "samples": [
                {
                    "prompt": b["prompt"],
                    "before": b["completion"],
                    "before_reward": b.get("reward"),
                    "after": a["completion"],
                    "after_reward": a.get("reward"),
                }
                for b, a in list(zip(before["samples"], after["samples"]))[: run_args.num_samples_to_show]
            ],
            "device": str(trainer.accelerator.device),
            "num_processes": trainer.accelerator.num_processes,
            "torch": torch.__version__,
        }
        if is_main:
            write_json_atomic(results_path, payload("completed", config_record(recipe), trainer.state.log_history, final))
            print(summary_table(final))
            print(f"\nresults: {results_path}\nmodel:   {os.path.join(config.output_dir, 'model')}")
    except BaseException as error:  # keep everything logged so far, whatever stopped the run
        if isinstance(error, UserError) and (trainer is None or isinstance(error, RefusedBeforeTraining)):
            if trainer is not None:  # the trackers that started before another refused: finished, not left open
                with contextlib.suppress(Exception):
                    finish_reporters(config, exit_code=2)
            raise  # bad input found by the set-up, or when training begins: nothing written (the lock removes the folder it made)
        # what a traceback would not say, raised below in one line, exit 2: diverged weights (from the sampler), or out
        # of memory (the allocator's), with the settings that lower the peak
        one_line = None
        if trainer is not None:
            step = trainer.state.global_step + 1
            one_line = (diverged_weights_error(trainer.model, step, error)
                        or out_of_memory_error(error, step, get_method(run_args.method).relaxed, config.new_token_limit_key))
            if isinstance(one_line or error, DivergedLogitsError) and resume_from is not None and step == resumed_step(resume_from) + 1:
                one_line = diverged_logits_error(step, resumed_from=resume_from)  # not the learning rate: no update of this run came before
        error = one_line or error
        interrupted = isinstance(error, (KeyboardInterrupt, Interrupted))
        if train_end is not None:
            with contextlib.suppress(Exception):  # close the tracker runs that training ended; the run's own error wins
                train_end.release()
        if trainer is not None:  # what is known of the run so far, where the completed run's block did not get to it
            final = {**progress(trainer, callbacks, start), **final}
        if is_main:
            history = trainer.state.log_history if trainer is not None else []
            if continuing and not history:  # failed before the checkpoint's history was loaded: keep the stopped run's
                history = (read_results(config.output_dir) or {}).get("history") or []
            try:
                write_json_atomic(results_path, payload("interrupted" if interrupted else "failed", config_record(recipe), history, final, f"{type(error).__name__}: {error}"))
            except OSError as unwritable:  # output_dir gone or replaced by a file: say so, and let the run's own error end it
                logger.error("could not write %s (%s); the run's error follows", results_path, unwritable)
        with contextlib.suppress(Exception):  # W&B records the run's own exit code (under a launcher it would see 0)
            finish_reporters(config, exit_code=getattr(error, "exit_code", 130 if isinstance(error, KeyboardInterrupt) else 2 if isinstance(error, UserError) else 1))
        if interrupted:
            step = trainer.state.global_step if trainer is not None else 0
            resume = f"; resume with the same command and --resume_from_checkpoint {final['checkpoint']}" if "checkpoint" in final else ""
            raise Interrupted(getattr(error, "signum", signal.SIGINT), f"at step {step}; results.json (status interrupted, the history so far): {results_path}{resume}") from None
        if one_line is not None:
            raise one_line from None
        raise
    finish_reporters(config)
    trainer.accelerator.wait_for_everyone()
    return 0


class ResultsSnapshot(TrainerCallback):
    """results.json with status `running` and the history so far, written by rank 0 at a log at most every
    SNAPSHOT_SECONDS and at every checkpoint: what a run ended without a word leaves (SIGKILL: the out-of-memory
    killer, a launcher's or scheduler's kill after its grace period, a rank blocked in a collective with a dead one).
    Every other way out overwrites it with its own status. A failed write is a warning, not the run's end."""

    SNAPSHOT_SECONDS = 60.0  # a write costs the history's JSON and an fsync: milliseconds, once a minute at most

    def __init__(self, write):
        self.write, self.last, self.warned = write, -math.inf, False

    def _write(self) -> None:
        self.last = time.monotonic()
        try:
            self.write()
        except OSError as error:
            if not self.warned:
                logger.warning("could not write the results.json snapshot (%s); the run goes on", error)
            self.warned = True

    def on_log(self, args, state, control, **kwargs):
        if time.monotonic() - self.last >= self.SNAPSHOT_SECONDS:
            self._write()

    def on_save(self, args, state, control, **kwargs):
        self._write()


def progress(trainer, callbacks: dict, start: float | None) -> dict:
    """How far the run got, for results.json's `final` whichever way it ends: steps, training minutes (from `start`,
    when training started), the non-finite guard's skipped steps and the doctor's findings."""
    done = {"steps": trainer.state.global_step}
    if start is not None:
        done["train_minutes"] = (time.time() - start) / 60
    if callbacks.get("nonfinite_guard") is not None:
        done["nonfinite_skipped_steps"] = callbacks["nonfinite_guard"].skipped_steps
    # A run that fails between a step's update and its training log (in that step's validation: a reward that raises)
    # would lose the step's metrics: the logging window so far (its means, not cleared; Trainer's `loss` is not in it)
    unlogged = trainer.pending_logs() if hasattr(trainer, "pending_logs") else {}
    if unlogged:
        logged = max((row["step"] for row in trainer.state.log_history if metrics.LOSS in row), default=0)
        done["unlogged_training_window"] = {"first_step": logged + 1, "last_step": trainer.state.global_step, **unlogged}
    doctor = callbacks.get("doctor")
    done["doctor"] = [dataclasses.asdict(f) for f in doctor.findings] if doctor is not None else None  # None: the doctor was off
    done["doctor_stopped"] = doctor.stopped if doctor is not None else None  # `doctor: stop` ended the run (and skipped that update?)
    return done


class StartOver(TrainerCallback):
    """`clear_earlier_run` when training begins, once (on the main process)."""

    def __init__(self, output_dir: str, checkpoints: list[str]):
        self.output_dir, self.checkpoints, self.done = output_dir, checkpoints, False

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.done:
            self.done = True
            clear_earlier_run(self.output_dir, self.checkpoints)


def clear_earlier_run(output_dir: str, checkpoints: list[str]) -> None:
    """A run that starts over, once its set-up has checked the input: an earlier run's checkpoints (the run was allowed
    to delete them: overwrite_output_dir) and its model/ and best_model/, which this run's results.json no longer
    describes, are deleted; this run writes its own."""
    import shutil

    stale = [*checkpoints, *(name for name in ("model", "best_model") if os.path.isdir(os.path.join(output_dir, name)))]
    for name in stale:
        shutil.rmtree(os.path.join(output_dir, name))
    earlier = (read_results(output_dir) or {}).get("status")
    if earlier is not None:  # a finished run (no checkpoints by default) is replaced as in Trainer, but not without a word
        logger.warning("starting over in %s: this run replaces the earlier run's results.json (status %s)%s (give another output_dir to keep it)",
                       output_dir, earlier, f" and deleted its {', '.join(stale)}" if stale else "")
    elif stale:
        logger.info("starting over in %s: deleted the earlier run's %s", output_dir, ", ".join(stale))


def portable_adapter_config(folder: str, model_name_or_path: str) -> None:
    """A LoRA adapter's `adapter_config.json` and PEFT's model card (`README.md`: `base_model:` and a tag) name the
    base as the recipe did (`embedded`, a hub id, the user's path), not the absolute path PEFT records from the loaded
    model, so the adapter travels to another machine and its card does not show this machine's folders."""
    import json

    path = os.path.join(folder, "adapter_config.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        adapter_config = json.load(f)
    recorded = adapter_config.get("base_model_name_or_path")
    adapter_config["base_model_name_or_path"] = model_name_or_path
    write_json_atomic(path, adapter_config)
    card = os.path.join(folder, "README.md")
    if isinstance(recorded, str) and recorded and recorded != model_name_or_path and os.path.isfile(card):
        with open(card, encoding="utf-8") as f:
            text = f.read()
        with open(card, "w", encoding="utf-8") as f:
            f.write(text.replace(recorded, model_name_or_path))


def finish_reporters(config, exit_code: int = 0) -> None:
    """Close the W&B run so its files are complete when `run` returns (the Trainer leaves it open), with the exit code
    the command will end with: a rank of `accelerate launch` ends by `os._exit` (`cli.exit_process`), which W&B's own
    exit hook never sees, so without it an interrupted or failed run would be recorded as finished with 0."""
    if "wandb" in (config.report_to or []):
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        return run_safely(lambda: print(help_for_argv(argv)) or 0)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if int(os.environ.get("RANK", "0")) != 0:  # under accelerate launch / torchrun: progress lines once, from rank 0
        logging.getLogger("grade_trl").setLevel(logging.WARNING)

    def body() -> int:
        recipe = parse_recipe(argv)
        quiet_libraries()
        return run(recipe)

    return run_safely(body)


if __name__ == "__main__":
    exit_process(main)
