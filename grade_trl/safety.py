"""What keeps a run's results when something goes wrong: signals as exceptions, one run per output_dir, and a guard
that stops before a non-finite gradient reaches the weights.

- `Interrupted`: SIGTERM (what a scheduler sends) and SIGINT (Ctrl-C) raise it in the main thread, so the runner's
  one `except` writes results.json with status `interrupted` and the history so far, and the command prints one
  line and exits 128 + the signal's number (143, 130), as a shell reports a process killed by it.
- `output_dir_lock`: an exclusive `fcntl.flock` on `{output_dir}/.grade_trl.lock` for the whole run. The kernel
  drops the lock when its process dies, however it dies, so a stale lock file from a killed run is never obeyed;
  a second live run into the same folder is refused in one line naming the first one's pid.
- `NonFiniteGuard`: a `transformers.TrainerCallback` that checks the gradient after backward and clipping, before
  `optimizer.step()` (Trainer's `on_pre_optimizer_step`), for every method (TRL's GRPO included: it is a
  callback). A NaN or inf loss makes every gradient non-finite, so this one check covers the loss too. It stops the
  run (default) or, with `nonfinite: skip`, skips the update and counts it, up to `nonfinite_max_skips`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
from pathlib import Path
from typing import Iterator

from transformers import TrainerCallback

from .errors import Interrupted, UserError

logger = logging.getLogger(__name__)

LOCK_FILE = ".grade_trl.lock"


@contextlib.contextmanager
def signals_raise(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT), handler=None) -> Iterator[None]:
    """Within the block, each signal in `signums` raises `Interrupted` in the main thread (or calls `handler(signum,
    frame)`, which may raise it later: resume.GracefulStop); the old handlers after."""

    def raise_interrupted(signum, frame):
        raise Interrupted(signum)

    handler = handler or raise_interrupted

    previous = {}
    try:
        for signum in signums:
            previous[signum] = signal.signal(signum, handler)
    except ValueError:  # not the main thread (e.g. a notebook's worker): keep the default behaviour
        pass
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@contextlib.contextmanager
def output_dir_lock(output_dir: str | os.PathLike, enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on `output_dir` for the block (module docstring). `enabled=False` (non-main processes of
    a multi-process run) does nothing. On a UserError inside the block, a folder the lock created is removed again
    if nothing else was written into it, so bad input leaves nothing behind."""
    if not enabled:
        yield
        return
    folder = Path(output_dir)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / LOCK_FILE, "a+")
    except OSError as error:
        raise UserError(f"output_dir: cannot write into {str(folder)!r} ({error.strerror or error}); give a folder you can write to") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise UserError(f"output_dir: {str(folder)!r} is in use by another run (pid {holder}); give another output_dir or wait for it to finish") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        except UserError:
            if created and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
                (folder / LOCK_FILE).unlink(missing_ok=True)
                folder.rmdir()
            raise
    finally:
        handle.close()  # releases the lock


class NonFiniteGradientError(UserError):
    """A non-finite gradient before the optimizer step (a UserError: one line, exit code 2, results.json kept)."""


class NonFiniteGuard(TrainerCallback):
    """Before every optimizer step, check the gradient: a NaN or inf stops the run naming the step and the first such
    parameter (`mode="stop"`), or (`mode="skip"`) the update is skipped: every gradient is set to None, which
    torch's optimizers pass over (no parameter, moment or step-count change; the learning-rate schedule still
    advances), the step is recorded in `skipped_steps` and logged as a warning, and more than `max_skips` skipped
    updates stop the run as `stop` does. Gradients are all-reduced before this point, so every process agrees."""

    def __init__(self, mode: str = "stop", max_skips: int = 10):
        if mode not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be stop or skip, got {mode!r}")
        self.mode, self.max_skips = mode, int(max_skips)
        self.skipped_steps: list[int] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        import torch

        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=2.0))):
            return
        name, grad = next(((n, p.grad) for n, p in model.named_parameters() if p.grad is not None and not bool(torch.isfinite(p.grad).all())), ("?", None))
        kind = "nan" if grad is not None and bool(torch.isnan(grad).any()) else "inf"
        step = state.global_step + 1
        if self.mode == "skip" and len(self.skipped_steps) < self.max_skips:
            self.skipped_steps.append(step)
            for parameter in model.parameters():
                parameter.grad = None
            logger.warning("step %d: the gradient is not finite (%s in %s); update skipped (%d of at most %d, nonfinite_max_skips)", step, kind, name, len(self.skipped_steps), self.max_skips)
            return
        limit = f" after {self.max_skips} skipped updates (nonfinite_max_skips)" if self.mode == "skip" else ""
        raise NonFiniteGradientError(
            f"step {step}: the gradient is not finite ({kind} in {name}){limit}; the update was not applied. "
            "A NaN or inf loss (a reward returning NaN, a KL of a zero probability, a too large learning_rate) causes this"
        )
