"""Trackers (`report_to`): refused up front when not installed, and one run = one tracker run.

transformers' reporters (W&B, TensorBoard, trackio, ...) file `eval_*` under `eval/`, `test_*` under `test/` and
every other key under `train/` (`transformers.integrations.integration_utils.rewrite_logs`). The runner logs the
final test after `trainer.train()` has returned, that is after the reporters' `on_train_end`, where TensorBoard
closes its writer and trackio finishes its run: logging then would open a second event file or a second trackio run.
`TrainEndHeld` holds their `on_train_end` back until the test is logged.
"""

from __future__ import annotations

import importlib.util

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
