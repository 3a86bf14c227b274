"""Exact resume after a kill, and a clean stop on SIGTERM/SIGINT (and SIGHUP, SIGQUIT: `errors.STOP_SIGNALS`) that leaves a checkpoint to resume from.

`resume_from_checkpoint: true | PATH` resumes a run where its last complete checkpoint left it. Trainer's
`checkpoint-N/` holds the weights, the optimizer, the scheduler, the RNG streams of every process and
`trainer_state.json` (global step, log history); its data sampler is seeded per epoch and skips the batches
already trained. What it does not hold, and `grade_trl_state_rank{R}.pt` adds (one file per process, written after
everything else, so rank 0's file marks a complete checkpoint):

- the trainer's state between steps, by the method registry's hook `training_state()`: the metric and grad-norm
  windows, REINFORCE's EMA baseline, PPO's KL controller, rollout buffer and shuffle generator, TRL GRPO's buffered
  generations and micro-step counter;
- Trainer's loss accumulator since the last log, so the first `loss` logged after a resume averages the same steps;
- the evaluation protocol's state (`EvaluationCallback.state_dict`): every evaluation's result, the best value,
  step and parameters, the patience counter and the time spent so far.

So a resumed run continues one history, and on the CPU with a fixed seed ends with the same weights and metrics
as a run that was never stopped (tests/test_resume.py kills runs of GRADE, REINFORCE, PPO and GRPO with SIGKILL).
Two things are not restored: wall-clock figures (`train_minutes`) count the resumed process only, and TRL GRPO's
prompt sampler draws a new permutation per pass from a generator it does not save, so a GRPO run resumed in its
second pass over the prompts or later sees them in another order (exact within the first).

`GracefulStop` turns the first SIGTERM or SIGINT during training into "finish this optimizer step, save a
checkpoint, stop"; a second signal, or one outside training, stops at once (errors.signals_raise).
"""

from __future__ import annotations

import logging
import math
import os
import re
import signal
from collections import defaultdict

import torch
from transformers import TrainerCallback

from .errors import Interrupted, RefusedBeforeTraining, UserError, end_quietly_under_a_launcher
from .reporting import tracker_ids
from .results import read_json, read_results, write_json_atomic

logger = logging.getLogger(__name__)

STATE_FILE = "grade_trl_state_rank{rank}.pt"
TRACKERS_FILE = "grade_trl_trackers.json"  # rank 0: what names the run in its trackers (reporting.tracker_ids)
SETTINGS_FILE = "grade_trl_settings.json"  # rank 0: the PARAMETER_SETTINGS of the run that saved the checkpoint (the runner's)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def state_path(checkpoint: str, rank: int) -> str:
    return os.path.join(checkpoint, STATE_FILE.format(rank=rank))


def missing_parts(checkpoint: str) -> list[str]:
    """What `checkpoint` lacks of a checkpoint to resume exactly from ([] when nothing). Rank 0's state file is
    written after every other file, so a save that was killed lacks it; the other parts are looked for too, since
    Trainer silently starts afresh without an optimizer or a scheduler file (a checkpoint copied in part, say).
    Their names in each layout: Trainer's (`model.safetensors`, `optimizer.pt`, ...), a LoRA adapter's, FSDP's
    (`pytorch_model_fsdp_0/`, `optimizer_0/`) and DeepSpeed's (`global_stepN/`, which holds weights, optimizer and
    scheduler)."""
    if not os.path.isdir(checkpoint):
        return ["the folder itself"]
    names = set(os.listdir(checkpoint))
    deepspeed = any(name.startswith("global_step") for name in names)
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
               "adapter_model.safetensors", "adapter_model.bin")
    parts = {
        STATE_FILE.format(rank=0): STATE_FILE.format(rank=0) in names,
        "trainer_state.json": "trainer_state.json" in names,
        "the weights (model.safetensors)": deepspeed or any(name in weights or name.startswith("pytorch_model_fsdp") for name in names),
        "the optimizer state (optimizer.pt)": deepspeed or any(name.startswith("optimizer") for name in names),
        "scheduler.pt": deepspeed or "scheduler.pt" in names,
        "the random generators' state (rng_state.pth)": any(name.startswith("rng_state") for name in names),
    }
    missing = [part for part, present in parts.items() if not present]
    if missing and parts["the weights (model.safetensors)"] and not parts["the optimizer state (optimizer.pt)"] and not parts["scheduler.pt"]:
        missing.append("as a run with save_only_model: true saves it")  # weights only: say why
    return missing + [f"an intact {name} ({problem})" for name in sorted(names) if (problem := damage(os.path.join(checkpoint, name)))]


def damage(path: str) -> str | None:
    """What is wrong with one file of a checkpoint that cannot be read back (cut short by a full disk or a copy, or
    overwritten), or None. Cheap at any size: a torch file's zip directory (at its end), a safetensors file's header
    and the bytes it covers, a JSON file parsed (the small ones Trainer writes). Other files and folders (FSDP's and
    DeepSpeed's sharded states) pass. Without this, a resume from such a checkpoint failed inside Trainer with a
    traceback, after the run had overwritten the folder's results.json."""
    import json
    import zipfile

    name = os.path.basename(path)
    if not os.path.isfile(path) or name.startswith("."):  # hidden files: a copy from macOS leaves ._model.safetensors
        return None
    try:
        if name.endswith((".pt", ".pth", ".bin")):
            if not zipfile.is_zipfile(path):
                with open(path, "rb") as handle:
                    if handle.read(1) == b"\x80":  # torch.save's legacy (non-zip) format, a pickle: readable, not checked
                        return None
                return "not a readable torch file: cut short or damaged"
        elif name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt"):  # checks the header and that it covers the file exactly
                pass
        elif name.endswith(".json"):
            with open(path, encoding="utf-8") as handle:
                json.load(handle)
    except Exception as error:  # OSError, JSON's ValueError, safetensors' own SafetensorError
        return f"unreadable: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
    return None


def is_complete(checkpoint: str) -> bool:
    return not missing_parts(checkpoint)


def checkpoint_folders(output_dir: str) -> list[str]:
    """The `checkpoint-N` folders in output_dir, by step (complete or not)."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := _CHECKPOINT.match(name)) and os.path.isdir(os.path.join(output_dir, name))]
    return [name for _, name in sorted(found)]


def latest_complete_checkpoint(output_dir: str, warn: bool = False) -> str | None:
    """The highest-numbered complete `checkpoint-N` folder in output_dir, or None; `warn`: log each incomplete one
    skipped on the way (a run killed while saving it, or a copy in part). What `resume_from_checkpoint: true` resumes
    from, and what the doctor names."""
    for name in reversed(checkpoint_folders(output_dir)):
        folder = os.path.join(output_dir, name)
        if not (missing := missing_parts(folder)):
            return folder
        if warn:
            logger.warning("resume: skipping %s, which is incomplete (missing: %s): a run stopped while saving it, or it was copied in part", folder, ", ".join(missing))
    return None


def resolve_checkpoint(value: bool | str | None, output_dir: str) -> str | None:
    """`resume_from_checkpoint` -> the checkpoint folder to resume from, or None (no resume).

    True: the highest-numbered complete `checkpoint-N` in output_dir (a run killed while saving leaves an
    incomplete one, which is skipped with a warning). A path: that checkpoint folder, which must be complete.
    """
    if value in (None, False, "", "false", "False"):
        return None
    if value is True or value in ("true", "True"):
        folder = latest_complete_checkpoint(output_dir, warn=True)
        if folder is None:
            raise UserError(
                f"resume_from_checkpoint: no complete checkpoint-N folder in output_dir {output_dir!r} to resume from "
                "(checkpoints are saved every save_steps with save_strategy: steps, and when a run is stopped by SIGTERM/SIGINT)"
            )
        check_not_behind_a_completed_run(folder, output_dir)
        return folder
    folder = os.path.expanduser(str(value))
    if not os.path.isdir(folder):
        raise UserError(f"resume_from_checkpoint: no such folder {folder!r} (give a checkpoint-N folder of a run, or true for the last one in output_dir)")
    if missing := missing_parts(folder):
        raise UserError(
            f"resume_from_checkpoint: {folder!r} is not a complete grade_trl checkpoint (missing: {', '.join(missing)}); "
            "give another checkpoint-N folder, or true for the last complete one"
        )
    return folder


def check_not_behind_a_completed_run(checkpoint: str, output_dir: str) -> None:
    """`true` would resume from `checkpoint`, but output_dir's run completed past it without a checkpoint at its end
    (save_strategy no, after a resume from a signal's checkpoint): resuming would train those steps again and replace
    the finished run's history, which a user extending a finished run (a larger max_steps) does not expect. One line;
    the checkpoint's path, given on purpose, still resumes from it."""
    results = read_results(output_dir)
    done = ((results or {}).get("final") or {}).get("steps") if (results or {}).get("status") == "completed" else None
    step = int(_CHECKPOINT.match(os.path.basename(checkpoint)).group(1))
    if isinstance(done, int) and done > step:
        raise UserError(
            f"resume_from_checkpoint: the run in output_dir {output_dir!r} completed at step {done} (results.json), but its latest "
            f"complete checkpoint is {os.path.basename(checkpoint)}: resuming would train steps {step + 1}-{done} again and replace "
            f"that history. To extend a finished run, it must save its last step (save_strategy: steps saves it); to retrain from "
            f"step {step} on purpose, give the path: --resume_from_checkpoint {checkpoint}"
        )


class ResumeRefused(RefusedBeforeTraining):
    """A checkpoint this run cannot resume from, found once the trainer is built: the runner writes nothing (the folder's
    results.json stays as the run that saved the checkpoint left it)."""


class ResumeCallback(TrainerCallback):
    """Saves the state Trainer's checkpoints lack at every save, and restores it when the run resumes.

    Attach the trainer (`callback.trainer = trainer`); `evaluation` is the run's EvaluationCallback (or None).
    Put it before the EvaluationCallback in the callback list, so that it restores before anything evaluates.
    """

    def __init__(self, evaluation=None, resume_from: str | None = None, require_state: bool = True, settings: dict | None = None):
        """require_state: a checkpoint without our state file is refused (the runner, which checks checkpoints whole);
        False (a trainer used on its own) resumes it with a warning: Trainer's part alone, as before that file existed.
        settings: the run's PARAMETER_SETTINGS, written beside each checkpoint (SETTINGS_FILE) for `check_resumed_settings`."""
        self.trainer, self.evaluation, self.resume_from, self.require_state = None, evaluation, resume_from, require_state
        self.settings = settings

    def on_save(self, args, state, control, **kwargs):
        trainer = self.trainer
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if trainer is None or not os.path.isdir(checkpoint):
            return
        data = {
            "global_step": state.global_step,
            "num_processes": trainer.accelerator.num_processes,
            "trainer": {name: picklable(value) for name, value in trainer.training_state().items()},
            "loss_accumulator": {
                "_tr_loss": getattr(trainer, "_tr_loss", None),
                "_total_loss_scalar": getattr(trainer, "_total_loss_scalar", 0.0),
                "_globalstep_last_logged": getattr(trainer, "_globalstep_last_logged", state.global_step),
            },
            "evaluation": self.evaluation.state_dict(state.global_step) if self.evaluation is not None else None,
        }
        rank = trainer.accelerator.process_index
        trainer.accelerator.wait_for_everyone()  # every process's own files are in place before rank 0 marks it complete
        if rank != 0:
            _save_atomic(data, state_path(checkpoint, rank))
        trainer.accelerator.wait_for_everyone()
        if rank == 0:
            # what names the run in its trackers (the main process reports): the resumed run continues those tracker runs
            write_json_atomic(os.path.join(checkpoint, TRACKERS_FILE), tracker_ids(trainer))
            if self.settings is not None:
                write_json_atomic(os.path.join(checkpoint, SETTINGS_FILE), self.settings)
            _save_atomic(data, state_path(checkpoint, 0))

    def on_train_begin(self, args, state, control, **kwargs):
        """Trainer has loaded weights, optimizer and trainer_state.json, and reset its own per-run state: restore ours."""
        if self.resume_from is None or self.trainer is None:
            return
        trainer = self.trainer
        path = state_path(self.resume_from, trainer.accelerator.process_index)
        first = state_path(self.resume_from, 0)  # every checkpoint of ours has rank 0's file
        if not os.path.isfile(first):
            if not self.require_state:
                logger.warning("resume: %s has no %s (saved by an older grade_trl, or by another trainer): resuming Trainer's part only, so the "
                               "baselines, rollout buffer and metric windows start afresh", self.resume_from, os.path.basename(first))
                return
            raise ResumeRefused(
                f"resume_from_checkpoint: {self.resume_from!r} has no {os.path.basename(first)} (the baselines, "
                "rollout buffer and metric windows Trainer does not save): it was not saved by a grade_trl trainer, or only in part"
            )
        if not os.path.isfile(path):
            raise ResumeRefused(
                f"resume_from_checkpoint: {self.resume_from!r} was saved by fewer processes than this run's "
                f"{trainer.accelerator.num_processes}; resume with as many processes as the run that saved it"
            )
        # Our own file, written by this package's previous process: it holds Python objects (metric windows, baselines).
        # torch.load knows "cpu" and "cuda:N" but not "cpu:N", which a process's device can be (Accelerate numbers CPU
        # processes' devices under FSDP)
        device = trainer.accelerator.device
        data = torch.load(path, map_location="cpu" if device.type == "cpu" else device, weights_only=False)
        if data["num_processes"] != trainer.accelerator.num_processes:
            raise ResumeRefused(
                f"resume_from_checkpoint: {self.resume_from!r} was saved by {data['num_processes']} processes, this run has "
                f"{trainer.accelerator.num_processes}; resume with as many processes as the run that saved it"
            )
        current = trainer.training_state()
        trainer.load_training_state({name: merge_into(current.get(name), value) for name, value in data["trainer"].items()})
        for name, value in data["loss_accumulator"].items():
            # not the run's loss total: Trainer divides it by the steps of this launch (train_loss), so a restored total
            # gave the whole run's sum over the resumed steps; train_loss stays Trainer's mean over this launch's steps
            if value is not None and hasattr(trainer, name) and name != "_total_loss_scalar":
                setattr(trainer, name, value)
        if self.evaluation is not None and data["evaluation"] is not None:
            self.evaluation.load_state_dict(data["evaluation"])
        follow_the_new_schedule(trainer, self.resume_from, state.max_steps)
        logger.info("resumed from %s at step %d", self.resume_from, state.global_step)


def follow_the_new_schedule(trainer, checkpoint: str, max_steps: int) -> None:
    """A run resumed with another `max_steps` (a finished run extended) or another `learning_rate` than the run that
    saved `checkpoint`: the learning rate of its next step is the new schedule's at this step.

    Trainer restores the optimizer's learning rate and the scheduler's base rates as the checkpoint left them, and only
    then steps the scheduler, whose lambda already holds the new `max_steps`: the first resumed step trained at the old
    schedule's rate (0 where a linear decay had ended: a run of 2 steps extended to 3 trained its third step at learning
    rate 0) and the next ones jumped to the new schedule's; a new `learning_rate` was not used at all (the restored base
    rate was). Only LambdaLR (every schedule of transformers' `get_scheduler` but the plateau one; under DeepSpeed the
    one Accelerate's wrapper holds) is set, and a new learning_rate only where every parameter group had one base rate
    (Trainer's two groups, decay and no decay; an optimizer of the user's with rates of its own keeps them)."""
    before = read_json(os.path.join(checkpoint, "trainer_state.json")) or {}
    scheduler, optimizer = getattr(trainer.lr_scheduler, "scheduler", trainer.lr_scheduler), trainer.optimizer
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR) or optimizer is None:
        return
    learning_rate, old_rate = trainer.args.learning_rate, scheduler.base_lrs[0]
    new_length = before.get("max_steps") not in (None, max_steps)
    new_rate = len(set(scheduler.base_lrs)) == 1 and not math.isclose(learning_rate, old_rate, rel_tol=1e-9)
    if not (new_length or new_rate):
        return
    if new_rate:
        scheduler.base_lrs = [learning_rate] * len(scheduler.base_lrs)
    rates = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    groups = getattr(optimizer, "optimizer", optimizer).param_groups  # Accelerate's wrapper shares the wrapped optimizer's groups
    changes = ([f"max_steps {max_steps}, where the run that saved {os.path.basename(checkpoint)} had {before['max_steps']}"] if new_length else []) + (
        [f"learning_rate {learning_rate:.3g}, where the run that saved {os.path.basename(checkpoint)} had {old_rate:.3g}"] if new_rate else [])
    logger.warning("resume: %s: the learning-rate schedule is the new one from here on (the next step trains at %.3g, the checkpoint's "
                   "optimizer had %.3g)", "; ".join(changes), rates[0], groups[0]["lr"])
    for group, rate in zip(groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates


# Settings that change which parameters train (and so the optimizer's state, which Trainer loads whole): a resume under
# another value failed in the optimizer's load_state_dict with a traceback on every process.
PARAMETER_SETTINGS = ("method", "use_peft", "lora_r", "lora_target_modules")  # method first: the others are LoRA's


def saved_process_count(checkpoint: str) -> int:
    """How many processes saved `checkpoint`: each writes its own state file (rank 0's last)."""
    count = 0
    while os.path.isfile(state_path(checkpoint, count)):
        count += 1
    return count


def resumed_step(checkpoint: str) -> int:
    """The optimizer step `checkpoint` was saved at (its trainer_state.json), -1 where that cannot be read."""
    step = (read_json(os.path.join(checkpoint, "trainer_state.json")) or {}).get("global_step")
    return step if isinstance(step, int) else -1


def check_resumed_settings(checkpoint: str, max_steps: int, recipe: dict, run: dict | None = None, num_processes: int = 1) -> None:
    """Before a run resumes from `checkpoint`, while its recipe is read (nothing loaded or written yet; the folder's
    results.json stays as the stopped or finished run left it): `max_steps` must leave a step to train (Trainer trained
    one step past a `max_steps` at or below the checkpoint's step, and ended "completed"); the run must have as many
    processes as the one that saved it (`num_processes`: the launcher's WORLD_SIZE), and the same `PARAMETER_SETTINGS`
    (`run`: the resumed run's effective run arguments) as the checkpoint's SETTINGS_FILE records (the LoRA keys where
    either run trains adapters; a checkpoint saved before the file existed is not checked); the other recipe keys that differ from those of the run that
    wrote the checkpoint's folder (its results.json) are named in a warning: the resumed part trains and is evaluated
    with the new values, in one history with the old."""
    step = resumed_step(checkpoint)
    if 0 < max_steps <= step:
        raise UserError(f"max_steps: {max_steps} leaves nothing to train after {os.path.basename(checkpoint)}, which is at step {step}; give "
                        f"max_steps above {step}, or evaluate that checkpoint's model instead")
    saved = saved_process_count(checkpoint)
    if saved and saved != num_processes:
        raise UserError(f"resume_from_checkpoint: {checkpoint!r} was saved by {saved} process{'es' if saved > 1 else ''}, this run has {num_processes}; "
                        "resume with as many processes as the run that saved it")
    saved_settings = read_json(os.path.join(checkpoint, SETTINGS_FILE))  # what the run that saved it trained (absent: an older checkpoint)
    if isinstance(saved_settings, dict) and run is not None:
        if "method" in saved_settings and str(saved_settings["method"]) != str(run.get("method")):
            raise UserError(f"method: {run.get('method')!r}, but {os.path.basename(checkpoint)} continues a {saved_settings['method']!r} run (its weights, "
                            "optimizer and the method's own state: baselines, PPO's value head and rollout buffer); resume with method "
                            f"{saved_settings['method']!r}, or start a new run from its weights (model_name_or_path: {checkpoint}) in another output_dir")
        adapters = saved_settings.get("use_peft") or run.get("use_peft")  # the LoRA keys matter only where a run trains adapters
        for key in PARAMETER_SETTINGS[1:] if adapters else ():
            if key in saved_settings and str(saved_settings[key]) != str(run.get(key)):
                raise UserError(f"{key}: {run.get(key)!r}, but {os.path.basename(checkpoint)} was saved by a run with {key} {saved_settings[key]!r}, which "
                                f"trains other parameters (its optimizer state does not fit); resume with {key} {saved_settings[key]!r}, or start a "
                                "new run in another output_dir")
    earlier = ((read_results(os.path.dirname(os.path.abspath(checkpoint))) or {}).get("config") or {}).get("recipe")
    if not isinstance(earlier, dict):
        return
    not_settings = {"resume_from_checkpoint", "overwrite_output_dir", "output_dir", "max_steps"}  # where and how long, not what
    changed = sorted(key for key in (earlier.keys() | recipe.keys()) - not_settings if str(earlier.get(key)) != str(recipe.get(key)))
    if changed:
        logger.warning("resume: %s differ%s from the run that saved %s (%s): the resumed steps and evaluations use the new value%s, in one "
                       "history with the earlier ones", ", ".join(changed), "s" if len(changed) == 1 else "", os.path.basename(checkpoint),
                       "; ".join(f"{key} {earlier.get(key)!r} -> {recipe.get(key)!r}" for key in changed), "" if len(changed) == 1 else "s")


def saved_tracker_ids(checkpoint: str) -> dict:
    """The tracker ids (`reporting.tracker_ids`) the run saved with `checkpoint` ({} for a checkpoint saved before
    they were recorded, or by a run without trackers)."""
    import json

    path = os.path.join(checkpoint, TRACKERS_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def picklable(value):
    """`value` with every defaultdict as a plain dict: TRL keeps some logs in defaultdicts whose factory is a lambda,
    which pickle cannot save. `merge_into` puts them back into the trainer's own defaultdicts."""
    if isinstance(value, dict):
        return {key: picklable(item) for key, item in value.items()}
    return value


def merge_into(current, saved):
    """The saved value, re-using `current`'s defaultdicts (and so their factories) wherever `picklable` flattened one."""
    if isinstance(current, defaultdict) and isinstance(saved, dict):
        current.clear()
        current.update({key: merge_into(None, item) for key, item in saved.items()})
        return current
    if isinstance(current, dict) and isinstance(saved, dict):
        return {key: merge_into(current.get(key), item) for key, item in saved.items()}
    return saved


def _save_atomic(data: dict, path: str) -> None:
    temporary = f"{path}.tmp"
    torch.save(data, temporary)
    os.replace(temporary, path)


class GracefulStop(TrainerCallback):
    """The first SIGTERM/SIGINT during training: finish the current optimizer step, save a checkpoint, stop training
    (the runner then writes results.json with status `interrupted` and exits 128 + the signal's number). A second
    signal, or a signal outside training (set-up, final test), raises `Interrupted` at once.

    Use `handler` as the signal handler (`errors.signals_raise(handler=...)`). Under several processes every process
    stops at the same step: the flag is all-reduced at each step end (one scalar), and again after an evaluation
    (`agree`), so a signal that arrives while the validation set is generated stops the run at that step.

    Launchers and schedulers kill what has not stopped soon after their signal (torchrun and `accelerate launch`
    with several processes: TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s by default; Slurm: KillWait, 30 s by default), so
    the stop is kept short: the evaluation that falls on the stopping step is left to the resumed run
    (`EvaluationCallback`), and the warning names the launcher's limit where there is one."""

    def __init__(self):
        self.trainer = None
        self.signum: int | None = None
        self.training = False
        self.stopping = False  # every process agreed to stop at this step

    def handler(self, signum, frame):
        if self.training and self.signum is None:
            self.signum = signum
            limit = os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30") if "TORCHELASTIC_RUN_ID" in os.environ else None
            logger.warning(
                "%s: finishing this step, then saving a checkpoint and stopping (send it again to stop at once)%s", signal.Signals(signum).name,
                f"; the launcher kills this process {limit} s after its signal (TORCH_ELASTIC_SHUTDOWN_TIMEOUT)" if limit else "",
            )
            return
        end_quietly_under_a_launcher(signum)  # rank 0 raises: it writes results.json
        raise Interrupted(signum)

    def on_train_begin(self, args, state, control, **kwargs):
        self.training = True

    def agree(self) -> bool:
        """Whether the run stops at this step: a signal reached any process (all-reduced: one scalar; every process
        calls this at the same points)."""
        stop = self.signum is not None
        trainer = self.trainer
        if trainer is not None and trainer.accelerator.num_processes > 1:
            flag = torch.tensor([float(self.signum or 0)], device=trainer.accelerator.device)
            signum = int(trainer.accelerator.reduce(flag, reduction="max").item())
            stop, self.signum = signum > 0, self.signum or (signum or None)
        self.stopping = self.stopping or stop
        return self.stopping

    def on_step_end(self, args, state, control, **kwargs):
        if self.agree():
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        # every process gets here: agree once more, so that a signal that reached some processes after the last step's
        # agreement stops all of them (the final evaluation and test are collectives)
        self.agree()
        self.training = False
