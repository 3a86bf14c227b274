"""The error types every command reports in one line: `UserError` (bad input, exit code 2) and `Interrupted` (a signal),
`signals_raise`, which turns SIGTERM, SIGINT, SIGHUP and SIGQUIT (`STOP_SIGNALS`) into `Interrupted`, and `loading`, which turns a failure to load an input
into a UserError naming its key."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import stat
import sys
from typing import Iterator


class UserError(Exception):
    """Bad input (a recipe key, an option, a data file, a reward function's output): the message is one line
    that names what is wrong and what would be right. Commands print `error: <message>` and exit with 2."""


# What user code (a reward function, its module, its class) raises when it fails: an Exception, or the SystemExit of a
# `sys.exit()`/`exit()` in it, which would otherwise end the run with that code and no word of why. KeyboardInterrupt
# and `Interrupted` (a signal) are not the user code's failure and pass on.
USER_CODE_ERRORS = (Exception, SystemExit)


def is_out_of_memory(error: BaseException) -> bool:
    """torch's CUDA out-of-memory error, or the CPU allocator's RuntimeError ("... can't allocate memory: you tried to
    allocate N bytes"): the run's memory, wherever it ran out (a reward's forward included), not that code's fault."""
    import torch

    return isinstance(error, torch.OutOfMemoryError) or (isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


class RefusedBeforeTraining(UserError):
    """Bad input found once the trainer is built, when training begins (a checkpoint this run cannot resume from, a
    tracker that cannot start its run): the runner writes nothing, as for any other bad input."""


class Interrupted(BaseException):
    """A signal (SIGTERM, SIGINT, SIGHUP, SIGQUIT: STOP_SIGNALS) asked the run to stop: a BaseException, like KeyboardInterrupt, so no `except Exception`
    swallows it. Commands print `interrupted by SIGTERM <detail>` as one line and exit 128 + the signal's number."""

    def __init__(self, signum: int, detail: str = ""):
        self.signum, self.detail = int(signum), detail
        super().__init__(f"{signal.Signals(signum).name} {detail}".strip())

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
"""The signals that stop a command as SIGTERM does (one line, 128 + the signal's number, results.json kept): a
scheduler's or a user's SIGTERM, Ctrl-C, the terminal or SSH session that closes (SIGHUP) and Ctrl-\\ (SIGQUIT). Both
of the last two ended a run at once without a word, its results.json still `running` (a bad-input trial, 2026-12-07);
torchrun passes each of the four on to its processes."""


def stop_signals() -> tuple[int, ...]:
    """STOP_SIGNALS less a SIGHUP that is ignored: `nohup` asked for the run to outlive its terminal. (torchrun, under
    `accelerate launch`, handles SIGHUP itself even then, and passes it on: TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT
    tells it not to.)"""
    return tuple(s for s in STOP_SIGNALS if not (s == signal.SIGHUP and signal.getsignal(s) == signal.SIG_IGN))


def leave_a_hung_up_terminal(signum: int) -> None:
    """On SIGHUP, point stdout and stderr that are terminals at /dev/null: the terminal is gone, and the next write to it
    (a log row, Trainer's final metrics, the closing line) raised OSError EIO, which ended the stopping run as `failed`
    without its checkpoint (an audit with a pseudo-terminal, 2026-12-07). Files and pipes are left as they are."""
    if signum != signal.SIGHUP:
        return
    for fd in (1, 2):
        try:
            if stat.S_ISCHR(os.fstat(fd).st_mode):  # a terminal (or /dev/null already)
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, fd)
                os.close(devnull)
        except OSError:
            pass


@contextlib.contextmanager
def signals_raise(signums: tuple[int, ...] | None = None, handler=None) -> Iterator[None]:
    """Within the block, each signal in `signums` (default `stop_signals()`) raises `Interrupted` in the main thread (or
    calls `handler(signum, frame)`, which may raise it later: resume.GracefulStop); the old handlers after."""

    def raise_interrupted(signum, frame):
        end_quietly_under_a_launcher(signum, rank_0_too=True)  # the default handler: a command's set-up, nothing to save
        raise Interrupted(signum)

    handler = handler or raise_interrupted

    def on_signal(signum, frame):
        leave_a_hung_up_terminal(signum)
        return handler(signum, frame)

    previous = {}
    try:
        for signum in stop_signals() if signums is None else signums:
            previous[signum] = signal.signal(signum, on_signal)
    except ValueError:  # not the main thread (e.g. a notebook's worker): keep the default behaviour
        pass
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def is_secondary_rank() -> bool:
    """Whether this process is a rank other than 0 of a launcher (`accelerate launch`, torchrun set RANK)."""
    try:
        return int(os.environ.get("RANK", "0") or 0) != 0
    except ValueError:
        return False


def end_quietly_under_a_launcher(signum: int, rank_0_too: bool = False) -> None:
    """A process of a launcher that a signal stops where it has nothing to save ends at once, 128 + the signal's number,
    without a word: a rank other than 0 always (rank 0 reports a stop that every rank gets, and writes results.json);
    rank 0 too with `rank_0_too` (before the run has anything to save: torchrun stops the other ranks with SIGTERM when one
    fails, and reports it; a scheduler's signal reaches torchrun, which says so and passes it on). Their `interrupted by
    SIGTERM` lines followed the failed rank's error as if the run had been stopped, and an `Interrupted` raised inside a
    finaliser printed "Exception ignored in: <function Group.__del__ ...>" with a traceback (a journey audit)."""
    if is_secondary_rank() or (rank_0_too and "TORCHELASTIC_RUN_ID" in os.environ):
        sys.stderr.flush()
        os._exit(128 + signum)


def stop_in_one_line_while_importing() -> None:
    """For a command's module run as `python -m grade_trl.<command>`, called before its imports of torch, transformers
    and TRL (seconds): Ctrl-C or SIGTERM then ends it in one line and 128 + the signal's number, as once the command's
    own handling (cli.run_safely) has replaced this, not in an import traceback. Nothing is written by then."""

    def stop(signum, _frame):
        leave_a_hung_up_terminal(signum)
        end_quietly_under_a_launcher(signum, rank_0_too=True)
        print(f"interrupted by {signal.Signals(signum).name}", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    for signum in stop_signals():
        signal.signal(signum, stop)


@contextlib.contextmanager
def quiet_logger(name: str, level: int = logging.CRITICAL) -> Iterator[None]:
    """The library logger `name` logs only at `level` and above inside the block: not what it would say before a failure
    that our one-line error then names (the hub's retries, datasets' parse errors, dozens of lines or twice over)."""
    library_logger = logging.getLogger(name)
    previous = library_logger.level
    library_logger.setLevel(level)
    try:
        yield
    finally:
        library_logger.setLevel(previous)


@contextlib.contextmanager
def loading(key: str, value: str):
    """Turn a failure to load `value` (unreachable hub id, unreadable file, wrong schema) into a one-line error naming `key`."""
    from safetensors import SafetensorError  # a truncated or corrupt .safetensors file

    from .models import unreachable_hub_id

    if reason := unreachable_hub_id(str(value)):
        raise UserError(f"{key}: cannot load {value!r}: {reason} (give a local path or `embedded`, or download it where the hub is reachable)")
    try:
        with quiet_logger("huggingface_hub", logging.ERROR):  # an unreachable hub: its retries' warnings (dozens of lines) before our one line
            yield
    except (OSError, ValueError, ConnectionError, SafetensorError) as error:
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()] or [type(error).__name__]
        # a first line that ends in ":" says nothing without the rest ("... from one of:"): the message joined into one line
        first_line = " ".join(lines) if lines[0].endswith(":") else lines[0]
        if isinstance(error, SafetensorError):
            first_line += " (a damaged or truncated weights file: copy or download it again)"
        elif isinstance(error, (OSError, ConnectionError)):  # not found, not reachable (a ValueError says what is wrong inside)
            first_line += " (give a local path, `embedded`, or a hub id reachable from here)"
        raise UserError(f"{key}: cannot load {value!r}: {first_line}") from None
