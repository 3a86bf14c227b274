"""Trackers (`report_to`): refused up front when not installed, and one run = one tracker run.

transformers' reporters (W&B, TensorBoard, trackio, ...) file `eval_*` under `eval/`, `test_*` under `test/` and
every other key under `train/` (`transformers.integrations.integration_utils.rewrite_logs`). The runner logs the
final test after `trainer.train()` has returned, that is after the reporters' `on_train_end`, where TensorBoard
closes its writer and trackio finishes its run: logging then would open a second event file or a second trackio run.
`TrainEndHeld` holds their `on_train_end` back until the test is logged.

A run stopped and resumed (`resume_from_checkpoint`) is one run too: each checkpoint records what names the run in
its trackers (`tracker_ids`: the run name, W&B's run id, TensorBoard's folder) and the resumed run continues them
(`continue_trackers`): W&B resumes the same run id, TensorBoard writes into the same folder (one run in its UI),
trackio continues the run of that name. A run without a `run_name` gets one that is unique to it (`default_run_name`),
so that trackio, which continues any run of the same name, never merges two runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time

# reporter -> (modules of which one must be importable, the command that installs it)
REPORTERS: dict[str, tuple[tuple[str, ...], str]] = {
    "wandb": (("wandb",), "pip install -e '.[wandb]'"),
    "tensorboard": (("tensorboard", "tensorboardX"), "pip install -e '.[tensorboard]'"),
    "trackio": (("trackio",), "pip install -e '.[trackio]'"),
    "comet_ml": (("comet_ml",), "pip install comet-ml"),
    "mlflow": (("mlflow",), "pip install mlflow"),
    "neptune": (("neptune",), "pip install neptune"),
    "clearml": (("clearml",), "pip install clearml"),
    "codecarbon": (("codecarbon",), "pip install codecarbon"),
    "dagshub": (("dagshub",), "pip install dagshub"),
    "dvclive": (("dvclive",), "pip install dvclive"),
    "swanlab": (("swanlab",), "pip install swanlab"),
    "azure_ml": (("azureml",), "pip install azureml-core"),
    "flyte": (("flytekit",), "pip install flytekit"),
    "kubeflow": (("kubeflow",), "pip install kubeflow"),
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module without a spec
        return False


def missing_reporter(report_to) -> str | None:
    """The one-line problem with `report_to` (a reporter not known to transformers, or not installed), or None."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        if name in ("none", "all"):
            continue
        if name not in REPORTERS:
            return f"report_to: unknown reporter {name!r}; known: {', '.join(REPORTERS)} (or none)"
        modules, install = REPORTERS[name]
        if not any(_installed(m) for m in modules):
            return f"report_to: {name} is not installed; run `{install}` or remove {name} from report_to"
    return None


# What makes each tracker start where it failed to: the hint of the one-line error.
TRACKER_SETUP_HINTS = {
    "wandb": "log in with `wandb login` or WANDB_API_KEY, or run offline with WANDB_MODE=offline",
    "mlflow": "set MLFLOW_TRACKING_URI to a tracking server or database (mlflow 3 keeps a file: store only with MLFLOW_ALLOW_FILE_STORE=true)",
    "comet_ml": "set COMET_API_KEY, or COMET_START_ONLINE=false to log offline",
}


def start_trackers(trainer, settings: dict) -> None:
    """When training begins: each tracker's run starts (`refuse_trackers_that_fail_to_start`), then gets the runner's
    `settings` (RunArguments: method, task, data, rewards, evaluation) beside the trainer config transformers sends it,
    under `grade_trl/` (W&B, trackio: config; mlflow, comet: parameters; TensorBoard: a text), so runs can be told
    apart and grouped by method in the tracker's UI. A tracker that refuses them costs a warning, not the run."""
    refuse_trackers_that_fail_to_start(trainer, lambda name, callback: record_settings(name, callback, settings))


def record_settings(name: str, callback, settings: dict) -> None:
    import json
    import logging

    flat = {f"grade_trl/{key}": value if isinstance(value, (int, float, str, bool)) or value is None else json.dumps(value, default=str)
            for key, value in settings.items()}
    try:
        if name == "wandb":
            import wandb

            if wandb.run is not None:
                wandb.run.config.update(flat, allow_val_change=True)
        elif name == "trackio":
            import trackio

            trackio.config.update(flat, allow_val_change=True)
        elif name == "mlflow":
            import mlflow

            if mlflow.active_run() is not None:
                mlflow.log_params({key: str(value)[:6000] for key, value in flat.items()})
        elif name == "comet_ml":
            import comet_ml

            if (experiment := comet_ml.get_running_experiment()) is not None:
                experiment.log_parameters(flat)
        elif name == "tensorboard" and getattr(callback, "tb_writer", None) is not None:
            callback.tb_writer.add_text("grade_trl/settings", "```\n" + json.dumps(settings, indent=2, default=str) + "\n```")
    except Exception as error:  # noqa: BLE001 - the run's settings are a convenience of the tracker's, not the run's
        logging.getLogger(__name__).warning("report_to: could not record the run's settings in %s (%s: %s)", name, type(error).__name__, error)


def refuse_trackers_that_fail_to_start(trainer, started=None) -> None:
    """A tracker (transformers' reporter callback) whose run fails to start when training begins (W&B without a login,
    mlflow 3's refused file store) raises a one-line `errors.RefusedBeforeTraining` naming report_to, so the runner writes
    nothing; it was a traceback, exit 1 and a `failed` results.json. Which setups start is the tracker's own business
    (credentials in the environment, a netrc, a settings file), so the check is its own start, not ours. `started(name,
    callback)`: called once a tracker's run has started."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK

    names = {callback: name for name, callback in INTEGRATION_TO_CALLBACK.items()}  # exact types: DagsHub's subclasses mlflow's
    for callback in trainer.callback_handler.callbacks:
        name = names.get(type(callback))
        if name is None:
            continue

        def on_train_begin(*args, _start=callback.on_train_begin, _name=name, _callback=callback, **kwargs):
            with tracker_start(_name):
                result = _start(*args, **kwargs)
            if started is not None:
                started(_name, _callback)
            return result

        callback.on_train_begin = on_train_begin  # the instance attribute shadows the method


@contextlib.contextmanager
def tracker_start(name: str):
    """What a tracker raises while it starts its run (transformers' callback at the beginning of training, or the
    resumed run's W&B start in `continue_trackers`) as a one-line `errors.RefusedBeforeTraining` naming report_to."""
    from .errors import RefusedBeforeTraining

    try:
        yield
    except Exception as error:  # noqa: BLE001 - whatever the tracker raises when its run cannot start
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        hint = TRACKER_SETUP_HINTS.get(name, "see its documentation")
        raise RefusedBeforeTraining(f"report_to: {name} could not start its run ({type(error).__name__}: {reason}); {hint}, "
                                    f"or remove {name} from report_to") from None


class TrainEndHeld:
    """Holds back the reporters' `on_train_end` (transformers.integrations' callbacks) until `release()`, so values
    logged after `trainer.train()` (the final test) reach the same tracker run as the training."""

    def __init__(self, trainer):
        from transformers.integrations import INTEGRATION_TO_CALLBACK

        reporters = tuple(INTEGRATION_TO_CALLBACK.values())
        self.held: list[tuple] = []
        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, reporters):
                callback.on_train_end = self._holder(callback.on_train_end)  # the instance attribute shadows the method

    def _holder(self, on_train_end):
        def hold(*args, **kwargs):
            self.held.append((on_train_end, args, kwargs))

        return hold

    def release(self) -> None:
        """Run the held `on_train_end`s (close TensorBoard's writer, finish the trackio run); once."""
        held, self.held = self.held, []
        for on_train_end, args, kwargs in held:
            on_train_end(*args, **kwargs)


def default_run_name(output_dir: str) -> str:
    """`<parent>-<folder>-<date>-<time>` of the run's output_dir (`grade_ste-seed42-20261205-221502`): what the
    trackers show instead of a random name, and unique to this run (the date and time of its first start)."""
    parts = [p for p in os.path.abspath(output_dir).split(os.sep) if p][-2:]
    return "-".join(parts + [time.strftime("%Y%m%d-%H%M%S")])


def _reporter_callbacks(trainer, name: str) -> list:
    from transformers.integrations import INTEGRATION_TO_CALLBACK

    kind = INTEGRATION_TO_CALLBACK.get(name)
    return [c for c in trainer.callback_handler.callbacks if kind is not None and isinstance(c, kind)]


def tracker_ids(trainer) -> dict:
    """What names this run in its trackers, saved with every checkpoint (resume.ResumeCallback): the run name, W&B's
    run id, project and entity, and TensorBoard's folder relative to output_dir (the run may be moved)."""
    ids = {"run_name": trainer.args.run_name}
    report_to = trainer.args.report_to or []
    if "wandb" in report_to:
        import wandb

        if wandb.run is not None:
            ids |= {"wandb_run_id": wandb.run.id, "wandb_project": wandb.run.project, "wandb_entity": wandb.run.entity}
    if "tensorboard" in report_to:
        folders = [c.logging_dir for c in _reporter_callbacks(trainer, "tensorboard") if getattr(c, "logging_dir", None)]
        if folders:
            ids["tensorboard_dir"] = os.path.relpath(os.path.abspath(folders[0]), os.path.abspath(trainer.args.output_dir))
    return ids


def continues_the_run(checkpoint: str, output_dir: str) -> bool:
    """Whether resuming from `checkpoint` continues the run of `output_dir` (the checkpoint is one of its own), as
    opposed to starting a new run from another run's checkpoint (a fork: its own tracker runs)."""
    return os.path.realpath(os.path.dirname(os.path.normpath(checkpoint))) == os.path.realpath(output_dir)


def continue_trackers(trainer, saved: dict | None) -> None:
    """Before `trainer.train()` of a resumed run: the trackers continue the run `saved` (the checkpoint's
    `tracker_ids`; pass {} for a fork, `continues_the_run`) instead of starting another, unless the user chose
    otherwise (WANDB_RUN_ID, TENSORBOARD_LOGGING_DIR; a run_name of their own is passed as it is). W&B's run is started
    here with the saved id, project and entity and `resume="allow"`, as transformers' callback would start it (with the
    run name), which then uses it: W&B reads WANDB_RUN_ID once per process, so the environment would not reach a
    second run in one process."""
    saved = saved or {}
    report_to = trainer.args.report_to or []
    if saved.get("wandb_run_id") and "wandb" in report_to and "WANDB_RUN_ID" not in os.environ and trainer.is_world_process_zero():
        import wandb

        if wandb.run is None:
            with tracker_start("wandb"):
                wandb.init(project=os.getenv("WANDB_PROJECT") or saved.get("wandb_project") or "huggingface", entity=os.getenv("WANDB_ENTITY") or saved.get("wandb_entity"),
                           id=saved["wandb_run_id"], resume="allow", name=trainer.args.run_name)
    if saved.get("tensorboard_dir") and "TENSORBOARD_LOGGING_DIR" not in os.environ:
        folder = os.path.join(trainer.args.output_dir, saved["tensorboard_dir"])
        for callback in _reporter_callbacks(trainer, "tensorboard"):
            if callback.logging_dir is None:  # TensorBoard's own default: a new dated folder per start
                callback.logging_dir = folder
