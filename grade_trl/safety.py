"""What keeps a run's results when something goes wrong: signals as exceptions, one run per output_dir, and a guard
that stops before a non-finite gradient reaches the weights.

- `Interrupted` (`errors.signals_raise`): SIGTERM (what a scheduler sends) and SIGINT (Ctrl-C) raise it in the main thread, so the runner's
  one `except` writes results.json with status `interrupted` and the history so far, and the command prints one
  line and exits 128 + the signal's number (143, 130), as a shell reports a process killed by it.
- `output_dir_lock`: an exclusive `fcntl.flock` on `{output_dir}/.grade_trl.lock` for the whole run. The kernel
  drops the lock when its process dies, however it dies, so a stale lock file from a killed run is never obeyed;
  a second live run into the same folder is refused in one line naming the first one's pid.
- `NonFiniteGuard`: a `transformers.TrainerCallback` that checks the gradient after backward and clipping, before
  `optimizer.step()` (Trainer's `on_pre_optimizer_step`), for every method (TRL's GRPO included: it is a
  callback). A NaN or inf loss makes every gradient non-finite, so this one check covers the loss too. It stops the
  run (default) or, with `nonfinite: skip`, skips the update and counts it, up to `nonfinite_max_skips`. Under
  DeepSpeed the engine has already stepped by then (inside `accelerator.backward`), so the guard reads what ZeRO
  did: its global gradient norm and whether it discarded the step. Under fp16 loss scaling an overflow is the
  scaler's signal to lower its scale, and the scaler skips that step itself; the guard steps in after 16 in a row.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import math
import os
import sys
from pathlib import Path
from typing import Iterator

from transformers import TrainerCallback

from .errors import Interrupted, UserError, is_out_of_memory

logger = logging.getLogger(__name__)

LOCK_FILE = ".grade_trl.lock"


@contextlib.contextmanager
def output_dir_lock(output_dir: str | os.PathLike, enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on `output_dir` for the block (module docstring). `enabled=False` (non-main processes of
    a multi-process run) does nothing. On a UserError inside the block, a folder the lock created is removed again
    if nothing else was written into it, so bad input leaves nothing behind."""
    if not enabled:
        yield
        return
    folder = Path(output_dir)
    created = [parent for parent in (folder, *folder.parents) if not parent.exists()]  # innermost first: removed in this order
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / LOCK_FILE, "a+")
    except OSError as error:
        _remove_empty(created)  # the parents mkdir made before the part of the path it could not make
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
                _remove_empty(created)
            raise
    finally:
        handle.close()  # releases the lock


def _remove_empty(created: list[Path]) -> None:
    """Remove the folders in `created` (innermost first: the output folder, then each parent made for it) while they
    exist and are empty."""
    for made in created:
        try:
            made.rmdir()
        except OSError as error:
            if error.errno in (errno.ENOENT, errno.ENAMETOOLONG):  # mkdir failed at or below it: the next one up may exist
                continue
            break  # not empty (another run's files), or not ours to remove


class NonFiniteGradientError(UserError):
    """A non-finite gradient before the optimizer step (a UserError: one line, exit code 2, results.json kept)."""


class DivergedLogitsError(NonFiniteGradientError):
    """The policy's logits are not finite where it samples (`diverged_logits_error`)."""


def diverged_weights_error(model, step: int, error: BaseException) -> NonFiniteGradientError | None:
    """For an error that ended training (`error`): a one-line NonFiniteGradientError when it came from a policy whose
    logits or weights are not finite, else None. An update whose gradient was finite (a too large learning rate, say)
    passes the guard and can still leave weights whose logits overflow; the next step then fails where it samples:
    our sampler's `core.sampling.NonFiniteLogitsError`, or torch's own "probability tensor contains either inf, nan or
    element < 0" inside `model.generate` (TRL's GRPO), with a traceback that does not say why. Checked only once
    training has failed: no cost per step."""
    import torch

    from .core.sampling import NonFiniteLogitsError

    if isinstance(error, (UserError, KeyboardInterrupt, Interrupted)):  # said in one line already; a signal is not a failure
        return None
    sampler = isinstance(error, NonFiniteLogitsError) or (isinstance(error, RuntimeError) and "probability tensor contains either" in str(error))
    if not sampler:
        try:
            sampler = model is not None and not all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.numel())
        except Exception:  # a parameter that cannot be read here (freed, on a device that failed): say nothing more
            return None
    if not sampler:
        return None
    return diverged_logits_error(step)


class OutOfMemory(UserError):
    """The run ran out of accelerator or host memory once training had started: one line naming the settings that
    lower the peak (exit code 2, results.json kept), not the allocator's traceback."""


def out_of_memory_error(error: BaseException, step: int, relaxed: bool, length_key: str = "max_new_tokens") -> OutOfMemory | None:
    """For an error that ended training: an OutOfMemory for an out-of-memory error (`errors.is_out_of_memory`), else
    None. `relaxed`: GRADE, whose memory grows with the completion length and has switches of its own (README,
    "GRADE's cost"); `length_key`: the method's completion length key (TRL GRPO's max_completion_length)."""
    if not is_out_of_memory(error):
        return None
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    what = first[first.index("CUDA out of memory"):] if "CUDA out of memory" in first else first[first.index("can't allocate"):] if "can't allocate" in first else first
    lower = f"per_device_train_batch_size (raise gradient_accumulation_steps to keep the batch) or {length_key}"
    if relaxed:
        lower += ", or turn on GRADE's memory switches: rollout_checkpointing: true, relax_top_k: 256, bf16: true (README, \"GRADE's cost\")"
    return OutOfMemory(f"step {step}: out of memory ({what.split('. Error code')[0].rstrip('.')}); lower {lower}")


def diverged_logits_error(step: int, resumed_from: str | None = None) -> DivergedLogitsError:
    """The one line for a policy whose logits are not finite at `step`, wherever it is found (the sampler, GRADE's
    relaxed rollout through its reward). `resumed_from`: the checkpoint the run resumed from, when `step` is the first
    after it, whose weights no update of this run has touched: a damaged file (overwritten in place keeps its size
    and header, which the resume's checks read) or a checkpoint saved not finite, not the learning rate."""
    if resumed_from is not None:
        return DivergedLogitsError(
            f"step {step}: the policy's logits are not finite at the first step after resuming from {resumed_from}, before any "
            "update of this run: its weights file is damaged or was saved not finite; resume from an earlier checkpoint"
        )
    return DivergedLogitsError(
        f"step {step}: the policy's logits are not finite (its weights diverged in an earlier update, whose gradient was "
        "finite, so the guard let it through; or a half-precision forward overflowed); lower learning_rate"
    )


# Dynamic loss scaling (fp16) halves its scale at each overflow and skips that step; from the default initial scale of
# 2^16, 16 overflows in a row bring it to 1, past which an overflow is not the scale's doing (a NaN loss, say).
LOSS_SCALE_OVERFLOWS_IN_A_ROW = 16


class NonFiniteGuard(TrainerCallback):
    """Before every optimizer step, check the gradient: a NaN or inf stops the run naming the step and the first such
    parameter (`mode="stop"`), or (`mode="skip"`) the update is skipped: every gradient is set to None, which
    torch's optimizers pass over (no parameter, moment or step-count change; the learning-rate schedule still
    advances), the step is recorded in `skipped_steps` and logged as a warning, and more than `max_skips` skipped
    updates stop the run as `stop` does. Gradients are all-reduced before this point, so every process agrees.

    fp16 loss scaling (Accelerate's GradScaler, DeepSpeed's fp16): an overflow is how the scaler finds its scale too
    high; it skips that step and lowers the scale itself, so the guard lets up to LOSS_SCALE_OVERFLOWS_IN_A_ROW of
    them pass in a row, and treats the next as above.

    DeepSpeed: the engine steps inside `accelerator.backward`, before this callback, and ZeRO keeps the gradients in
    its own partitions (every `.grad` is None). ZeRO discards a step whose global gradient norm is not finite (its
    `overflow` flag; ZeRO-3 always, ZeRO-1/2 in float32, and in bf16 with `check_grad_overflow`, DeepSpeed's default;
    the learning-rate schedule then holds too), so the guard reads that: `stop` raises with the update not applied,
    `skip` counts it. A non-finite norm on a step ZeRO applied (bf16 with `check_grad_overflow: false`), or non-finite
    weights after a step of DeepSpeed without ZeRO in float32 (a plain optimizer, no check of its own), cannot be
    undone and stop the run in both modes."""

    def __init__(self, mode: str = "stop", max_skips: int = 10):
        if mode not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be stop or skip, got {mode!r}")
        self.mode, self.max_skips = mode, int(max_skips)
        self.skipped_steps: list[int] = []
        self.overflows_in_a_row = 0  # fp16 loss-scale overflows since the last finite step

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        import torch

        step = state.global_step + 1
        zero = _deepspeed_optimizer(optimizer)
        if zero is not None:
            self._check_deepspeed_step(zero, model, step)
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=2.0))):
            self.overflows_in_a_row = 0
            return
        scaler = getattr(optimizer, "scaler", None)  # Accelerate's GradScaler under fp16
        if scaler is not None and scaler.is_enabled() and self._loss_scale_overflow():
            return
        name, grad = next(((n, p.grad) for n, p in model.named_parameters() if p.grad is not None and not bool(torch.isfinite(p.grad).all())), ("?", None))
        kind = "nan" if grad is not None and bool(torch.isnan(grad).any()) else "inf"
        if self._skip(step, f"{kind} in {name}"):
            for parameter in model.parameters():
                parameter.grad = None

    def _loss_scale_overflow(self) -> bool:
        """One more fp16 overflow in a row: True while it is the loss scaler's to handle (it skips the step)."""
        self.overflows_in_a_row += 1
        return self.overflows_in_a_row <= LOSS_SCALE_OVERFLOWS_IN_A_ROW

    def _check_deepspeed_step(self, zero, model, step: int) -> None:
        """After DeepSpeed's step: `zero` is its optimizer. A ZeRO (or fp16/bf16) optimizer's `overflow` says it discarded
        the step and its `_global_grad_norm` (None when ZeRO-1/2 computes no norm) is set to inf when it did; DeepSpeed
        without ZeRO in float32 hands the step to the plain optimizer, which has neither, so the weights are read."""
        import torch

        if not hasattr(zero, "overflow"):
            if bool(torch.isfinite(torch.nn.utils.get_total_norm([p.detach() for p in model.parameters()], norm_type=2.0))):
                return
            raise NonFiniteGradientError(
                f"step {step}: the weights are not finite after DeepSpeed applied the update (DeepSpeed without ZeRO in float32 "
                "does not check the gradient); use accelerate_configs/zero2.yaml, whose optimizer discards such a step"
            )
        norm = getattr(zero, "_global_grad_norm", None)
        norm = None if norm is None else float(norm)
        discarded = bool(zero.overflow)
        if not discarded and (norm is None or math.isfinite(norm)):
            self.overflows_in_a_row = 0
            return
        dtype = getattr(zero, "dtype", None) or getattr(zero, "low_precision_dtype", None)  # ZeRO's / DeepSpeed fp16 optimizer's
        if discarded and dtype == torch.float16 and self._loss_scale_overflow():
            return  # DeepSpeed's fp16 loss scaler skipped the step and lowered its scale
        where = f"global gradient norm {norm}" if norm is not None else "DeepSpeed's overflow check"
        if not discarded:
            raise NonFiniteGradientError(
                f"step {step}: the gradient is not finite ({where}) and DeepSpeed applied the update; enable its check "
                "(deepspeed config bf16.check_grad_overflow: true) so such a step is discarded"
            )
        self._skip(step, where)  # the optimizer discarded the update already: nothing to undo

    def _skip(self, step: int, where: str) -> bool:
        """A non-finite gradient at `step`: True if the update is to be skipped (`skip`, under the limit), else raise."""
        if self.mode == "skip" and len(self.skipped_steps) < self.max_skips:
            self.skipped_steps.append(step)
            logger.warning("step %d: the gradient is not finite (%s); update skipped (%d of at most %d, nonfinite_max_skips)", step, where, len(self.skipped_steps), self.max_skips)
            return True
        limit = f" after {self.max_skips} skipped updates (nonfinite_max_skips)" if self.mode == "skip" else ""
        raise NonFiniteGradientError(
            f"step {step}: the gradient is not finite ({where}){limit}; the update was not applied. "
            "A NaN or inf loss (a reward returning NaN, a KL of a zero probability, a too large learning_rate) causes this"
        )


def _deepspeed_optimizer(optimizer):
    """The ZeRO optimizer inside Accelerate's DeepSpeed optimizer wrapper, or None (no DeepSpeed; never imports it)."""
    wrapper = getattr(sys.modules.get("accelerate.utils.deepspeed"), "DeepSpeedOptimizerWrapper", None)
    return optimizer.optimizer if wrapper is not None and isinstance(optimizer, wrapper) else None


def clipping_freezes_adam(model, args) -> str | None:
    """A warning when `max_grad_norm` is so small that AdamW can hardly move the policy, else None.

    Adam divides each parameter's gradient by the root of its running second moment plus `adam_epsilon`. Clipping the
    global norm of the gradient of n parameters to `max_grad_norm` bounds their root-mean-square to max_grad_norm /
    sqrt(n); a tenth of `adam_epsilon` or less, the denominator is mostly epsilon, and an update is about lr * RMS / epsilon
    instead of lr: training runs, every metric is logged, and the policy stays where it started (found by a journey audit:
    `max_grad_norm: 1e-9` gave no sign of it)."""
    optim = getattr(args, "optim", "")
    norm, optim = getattr(args, "max_grad_norm", 0) or 0, str(getattr(optim, "value", optim))  # Trainer's OptimizerNames enum
    if not norm > 0 or "adam" not in optim.lower():
        return None
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not count:
        return None
    rms, epsilon = norm / math.sqrt(count), float(args.adam_epsilon)
    if rms >= epsilon / 10:  # an update of lr * rms / (rms + epsilon): under a tenth of lr from here on
        return None
    return (
        f"max_grad_norm: {norm:g} clips the gradient of {count:,} trainable parameters to a root-mean-square of at most {rms:.1e} "
        f"per parameter, under a tenth of adam_epsilon {epsilon:g}: {optim}'s updates shrink to about {rms / epsilon:.1e} x learning_rate "
        f"and the policy will hardly move; use max_grad_norm 1.0 (TRL's default) or 0 (no clipping), or a smaller adam_epsilon"
    )
