"""Plumbing every command shares: one argument style, one error policy, one teardown.

Every command is `python -m grade_trl.<command> POSITIONAL... [--key value ...]`:
  * options are `--key value`, `--key=value` or a bare `--flag` (true); values are read as YAML scalars
    (`--learning_rate 1e-4`, `--use_peft false`), a list option takes several values (`--thresholds 0.6 0.7`)
    or one comma-separated value;
  * `-h` / `--help` prints the command's options with their help text and defaults, exit code 0;
  * bad input raises `UserError`: printed as one line `error: ...` on stderr, exit code 2, no traceback;
  * the torch process group (if any) is left before the process exits, whatever happened;
  * a process that was one rank of several ends without the interpreter's teardown (`exit_process`).

`Command` declares a command's options; `Command.main` runs its body under that policy.
"""

from __future__ import annotations

import atexit
import contextlib
import difflib
import enum
import logging
import os
import re
import shlex
import sys
import threading
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

import yaml

from .errors import Interrupted, UserError, is_secondary_rank, signals_raise

# ---------------------------------------------------------------- values


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


class _Yaml12BoolLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans: only true/false (any case) are booleans.

    YAML 1.1 (PyYAML's default) also reads yes/no/on/off as booleans, which turns `save_strategy: no`, Trainer's
    "no" strategy, into False and then into the string "False". Boolean keys still take yes/no/on/off (`coerce`).
    """


_Yaml12BoolLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12BoolLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


class QuotedStr(str):
    """A YAML scalar written in quotes (`max_steps: "5"`): a string by the recipe's own words, which `coerce` does not
    turn into a number or a boolean (an unquoted `1e-4`, which PyYAML reads as a string too, it does)."""


def _quoted_or_plain_str(loader, node):
    value = loader.construct_scalar(node)
    return QuotedStr(value) if node.style in ('"', "'") else value


_Yaml12BoolLoader.add_constructor("tag:yaml.org,2002:str", _quoted_or_plain_str)


def _unique_keys_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A mapping whose keys are unique, as YAML requires: PyYAML keeps the last of a repeated key without a word, so
    a recipe with `learning_rate` twice would train at whichever came last."""
    lines: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: merged by PyYAML below; an explicit key overrides a merged one
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            if key in lines:
                where = f"lines {lines[key] + 1} and {key_node.start_mark.line + 1}" if lines[key] != key_node.start_mark.line else f"line {lines[key] + 1}"
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice ({where}); keep one", key_node.start_mark)
            lines[key] = key_node.start_mark.line
        except TypeError:  # an unhashable key: PyYAML's own error follows
            continue
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Yaml12BoolLoader.construct_mapping = _unique_keys_mapping


def load_yaml(text: str) -> Any:
    """`yaml.safe_load` with YAML 1.2 booleans (see `_Yaml12BoolLoader`): every recipe and override goes through it."""
    return yaml.load(text, Loader=_Yaml12BoolLoader)


def coerce(key: str, value: Any, tp) -> Any:
    """Convert a YAML or command-line value to the type `tp`, or raise a one-line UserError naming `key`.

    Numbers must be finite where a float is expected: NaN and inf are refused here, once, for every key.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (str not in args and isinstance(value, str) and value.lower() in ("null", "none"))):
            return None
        mapping = next((a for a in args if (typing.get_origin(a) or a) is dict), None)
        if mapping is not None and isinstance(value, str) and value.lstrip().startswith("{"):
            return coerce(key, value, mapping)  # a mapping written inline (`dict | str` keys): read as one, or its own error
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(key, value, option)
            except UserError as error:
                errors.append((option, error))
        for option, error in errors:  # the value is of this option's kind: its own error says what is wrong inside
            kind = typing.get_origin(option) or option
            if (kind in (list, tuple) and isinstance(value, (list, tuple))) or (kind is dict and isinstance(value, dict)):
                raise error
        if len(errors) == 1:  # `float | None`: the one type's own words ("expected a finite number, got 'nan'")
            raise errors[0][1]
        got = f"the quoted string {str(value)!r}; remove the quotes" if isinstance(value, QuotedStr) else repr(value)
        raise UserError(f"{key}: expected {' or '.join(_type_name(option) for option, _ in errors)}, got {got}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise UserError(f"{key}: expected one of {list(args)}, got {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [coerce(key, v, inner) for v in value]
    if origin is dict or tp is dict:
        if isinstance(value, str):
            try:
                value = load_yaml(value)
            except yaml.YAMLError as error:  # an unbalanced bracket, a key given twice: the text as typed, in one line
                raise UserError(f"{key}: expected a mapping such as {{name: value}}, got {value!r}, which is not valid YAML "
                                f"({getattr(error, 'problem', None) or 'unreadable'})") from None
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is Any:
        return value
    if isinstance(value, QuotedStr) and tp in (bool, int, float):  # quoted in the recipe or on the command line: the user wrote a string
        expected = {bool: "true or false", int: "an integer", float: "a number"}[tp]
        raise UserError(f"{key}: expected {expected}, got the quoted string {str(value)!r}; remove the quotes")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise UserError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise UserError(f"{key}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError, OverflowError):
            raise UserError(f"{key}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise UserError(f"{key}: expected an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value)  # also takes YAML's "1e-4", which PyYAML reads as a string
        except (TypeError, ValueError, OverflowError):
            raise UserError(f"{key}: expected a number, got {value!r}") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise UserError(f"{key}: expected a finite number, got {value!r}")
        return number
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value).value
        except ValueError:
            raise UserError(f"{key}: expected one of {[m.value for m in tp]}, got {value!r}") from None
    if tp is str:
        if value is None:  # `key: null` on a key that takes no null: not the string 'None' ("unknown task 'None'")
            raise UserError(f"{key}: expected a string, got null; remove the key for its default")
        if isinstance(value, (dict, list)):
            raise UserError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def is_list_type(tp) -> bool:
    """Whether `tp` is a list, or a union that admits one (`None | str | list[str]`: `report_to`)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(is_list_type(a) for a in typing.get_args(tp))
    return typing.get_origin(tp) in (list, tuple)


def check_writable_folder(key: str, path: str) -> None:
    """`path` is a folder that can be created or written into (its deepest existing part is a writable folder): a
    one-line UserError naming `key` otherwise, before any work that would end by writing there."""
    existing = Path(path).expanduser().absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{key}: cannot write into {str(path)!r} ({str(existing)!r} is a file); give a folder you can write to")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{key}: cannot write into {str(path)!r} (no write permission on {str(existing)!r}); give a folder you can write to")


class Overrides(dict):
    """`parse_overrides`' {key: value}, with `bare`: the keys given as a bare `--flag` (read as true), which only a
    true/false key may be (`check_bare_flags`): `--output_dir` with its value forgotten would be the folder "True"."""

    def __init__(self, *args, bare=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.bare = set(bare)


def takes_bare_flag(tp) -> bool:
    """Whether a bare `--key` (true) is a value of type `tp`: a bool, optional or not."""
    return bool in (typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,))


def check_bare_flags(bare, types_by_key: dict, allowed: Sequence[str] = (), name=lambda key: f"--{key}") -> None:
    """A one-line UserError for the first key of `bare` whose type takes a value (keys not in `types_by_key` are left
    to the unknown-key check; `allowed`: keys whose own parsing reads true, `resume_from_checkpoint`)."""
    for key in sorted(bare):
        if key in types_by_key and key not in allowed and not takes_bare_flag(types_by_key[key]):
            raise UserError(f"{name(key)}: given without a value; write --{key} VALUE ({_type_name(types_by_key[key])}): only true/false "
                            "options may be given bare")


def parse_overrides(argv: Sequence[str], list_keys: Sequence[str] = ()) -> Overrides:
    """`--key value`, `--key=value` and bare `--flag` (true) -> {key: value}; values are read as YAML scalars.

    A key in `list_keys` takes every value up to the next `--key` (`--thresholds 0.6 0.7 0.8`). The bare keys are
    the result's `bare`.
    """
    overrides, i = Overrides(), 0
    argv = list(argv)
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise UserError(f"unexpected argument {token!r}: options are written --key value")
        key, eq, value = token[2:].partition("=")
        key = key.replace("-", "_")
        if eq:
            overrides[key] = _scalar(value)
        else:
            values = []
            while i + 1 < len(argv) and not argv[i + 1].startswith("--") and (not values or key in list_keys):
                values.append(_scalar(argv[i + 1]))
                i += 1
            if not values:
                overrides[key] = True
                overrides.bare.add(key)
            elif key in list_keys and not (len(values) == 1 and (values[0] is None or isinstance(values[0], (list, str)))):
                overrides[key] = values  # several values, or one number: a list either way (null stays null)
            else:
                overrides[key] = values[0]
        i += 1
    return overrides


def _scalar(text: str) -> Any:
    if text == "":
        return ""
    try:
        return load_yaml(text)
    except yaml.YAMLError:
        return text  # not YAML (an unbalanced bracket, a colon): the string as typed


# ---------------------------------------------------------------- commands


@dataclass(frozen=True)
class Option:
    """One `--name value` option of a command: its type (for coercion), default and help text."""

    name: str
    type: Any
    default: Any
    help: str


@dataclass
class Command:
    """A command's positional arguments and options, parsed in the one argument style (module docstring).

    positionals: the name shown in the usage line (`RECIPE.yaml`), `nargs` "1", "+" (one or more) or "?".
    forwards_overrides: unknown `--key value` pairs are returned as overrides (recipe keys) instead of refused.
    override_list_keys: the forwarded keys that take several values (`--report_to wandb tensorboard`), as a function
        so that the commands' imports stay light until a command line is read.
    """

    prog: str
    description: str
    positional: str = ""
    nargs: str = "1"
    options: tuple[Option, ...] = ()
    forwards_overrides: bool = False
    epilog: str = ""
    override_list_keys: Callable[[], Sequence[str]] = tuple

    @property
    def usage(self) -> str:
        positional = {"1": self.positional, "+": f"{self.positional} [{self.positional} ...]", "?": f"[{self.positional}]"}[self.nargs] if self.positional else ""
        extra = " [--key value ...]" if self.forwards_overrides else ""
        options = " [options]" if self.options else ""
        return f"usage: python -m {self.prog} {positional}{options}{extra}".replace("  ", " ")

    def help(self) -> str:
        lines = [self.usage, "", self.description]
        if self.options:
            lines += ["", "options:"]
            for option in self.options:
                lines.append(f"  --{option.name} ({_type_name(option.type)}, default {option.default!r}): {option.help}")
        if self.epilog:
            lines += ["", self.epilog]
        return "\n".join(lines)

    def parse(self, argv: Sequence[str]) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
        """(positionals, options with their defaults filled in, forwarded overrides)."""
        argv = list(argv)
        positionals = []
        while argv and not argv[0].startswith("--"):
            positionals.append(argv.pop(0))
        wanted = {"1": (1, 1), "+": (1, None), "?": (0, 1)}[self.nargs] if self.positional else (0, 0)
        if len(positionals) < wanted[0]:
            raise UserError(f"{self.positional} missing; {self.usage}")
        if wanted[1] is not None and len(positionals) > wanted[1]:
            extra = " ".join(shlex.quote(p) for p in positionals[wanted[1]:])
            takes = {"1": f"one {self.positional}", "?": f"at most one {self.positional}"}[self.nargs] if self.positional else "no positional argument"
            raise UserError(f"unexpected argument{'s' if len(positionals) - wanted[1] > 1 else ''} {extra} (the command takes {takes}; options are "
                            f"written --key value); {self.usage}")
        known = {option.name: option for option in self.options}
        list_keys = [name for name, option in known.items() if is_list_type(option.type)]
        raw = parse_overrides(argv, list_keys + (list(self.override_list_keys()) if self.forwards_overrides else []))
        check_bare_flags(raw.bare, {name: option.type for name, option in known.items()})
        values, forwarded = {}, Overrides(bare=raw.bare - set(known))
        for key, value in raw.items():
            if key in known:
                values[key] = coerce(f"--{key}", value, known[key].type)
            elif self.forwards_overrides:
                forwarded[key] = value
            else:
                close = difflib.get_close_matches(key, list(known), n=2)
                hint = f"; did you mean {' or '.join('--' + c for c in close)}?" if close else f"; see `python -m {self.prog} --help`"
                raise UserError(f"unknown option --{key}{hint}")
        return positionals, {name: values.get(name, option.default) for name, option in known.items()}, forwarded

    def main(self, argv: Sequence[str] | None, body: Callable[[list[str], dict, dict], int]) -> int:
        """Run `body(positionals, options, overrides)` under the error policy; `-h`/`--help` prints the help. (`grade_trl.run`
        has a main of its own: its options are the recipe's keys, and its help depends on the recipe's method.)"""
        argv = list(sys.argv[1:] if argv is None else argv)
        if any(a in ("-h", "--help") for a in argv):
            return run_safely(lambda: print(self.help()) or 0)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        return run_safely(lambda: self._run(argv, body))

    def _run(self, argv: list[str], body: Callable[[list[str], dict, dict], int]) -> int:
        positionals, options, overrides = self.parse(argv)
        try:
            return body(positionals, options, overrides)
        except UserError as error:
            # a forwarded key that no recipe knows but that resembles one of this command's options: the user's typo of
            # the option (`compare --frce`), which the recipe's own hint (its keys) does not name
            key = getattr(error, "unknown_key", None)
            close = difflib.get_close_matches(key, [option.name for option in self.options], n=2) if key in overrides else []
            if close:
                raise UserError(f"{error} (or {self.prog}'s option {' or '.join('--' + name for name in close)}?)") from None
            raise


def run_safely(body: Callable[[], int]) -> int:
    """`body()`, with a UserError printed as one line and exit code 2, a signal (`Interrupted`, Ctrl-C) as one line
    and exit code 128 + its number (130 for Ctrl-C, 143 for SIGTERM), and the process group left in every case.
    SIGTERM raises from the first line of `body` on (by default it would end the process without a word, during the
    seconds of imports and set-up before a command installs its own handling)."""
    try:
        with signals_raise():
            return body()
    except UserError as error:
        _end_progress_bars()
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Interrupted as error:
        _end_progress_bars()
        if not is_secondary_rank():  # every rank stops at the same step; rank 0 says so, once
            print(f"interrupted by {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        _end_progress_bars()
        if not is_secondary_rank():
            print("interrupted by SIGINT", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise  # another pipe (a worker's, a socket's): an error like any other
        # the reader of stdout left (`... | head`): no traceback, and none at the interpreter's last flush either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command a closed pipe ended
    finally:
        close_process_group()


def _end_progress_bars() -> None:
    """Close the progress bars still open (Trainer's, when a step fails), so that our one line starts a line of its own
    rather than following the bar's `... 1/3 [00:00<00:00, 2.93it/s]` (`grep '^error:'` found nothing)."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        with contextlib.suppress(Exception):
            bar.close()


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end is closed (poll reports an error on its writing end)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no poll here, or stdout is no file
        return False


# ---------------------------------------------------------------- process-wide plumbing


def quiet_libraries() -> None:
    """datasets' and transformers' progress bars and info logs off: the runner reports progress itself. Also off:
    transformers 5's FutureWarnings for the `gradient_checkpointing*` methods TRL's GRPOTrainer calls at every
    generation (6 lines a step that no recipe key can silence; TRL, not the user, must move to the new names)."""
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=r"`(is_gradient_checkpointing|gradient_checkpointing_enable|gradient_checkpointing_disable)` is deprecated",
                            category=FutureWarning)


_left_a_process_group = False  # set by close_process_group: this process belonged to a torch process group


def close_process_group() -> None:
    """Leave the process group before exit: a gloo group torn down by the interpreter aborts the process (SIGABRT)."""
    global _left_a_process_group
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        _left_a_process_group = True


def _in_a_process_group() -> bool:
    """This process was a rank (torchrun and `accelerate launch` set WORLD_SIZE) or left a group, of any size."""
    return _left_a_process_group or int(os.environ.get("WORLD_SIZE", "1")) > 1


def _exit_code(error: BaseException) -> int:
    """The exit code Python gives an exception that ends the program (printing what it would print)."""
    if isinstance(error, SystemExit):
        if error.code is None or isinstance(error.code, int):
            return error.code or 0
        print(error.code, file=sys.stderr)
        return 1
    sys.excepthook(type(error), error, error.__traceback__)
    return 130 if isinstance(error, KeyboardInterrupt) else 1


def exit_process(main: Callable[[], int | None]) -> NoReturn:
    """`sys.exit(main())` for `python -m grade_trl.<command>`; in a process that belonged to a torch process group
    (a rank of torchrun or `accelerate launch`), the end is `os._exit` without the interpreter's finalisation, after
    what finalisation does first: `threading._shutdown` (stops idle executor workers, waits for the threads that are
    not daemons), the atexit handlers (logging's shutdown flushes its handlers; W&B's, trackio's), a flush of
    stdout/stderr. Files that user code leaves open without closing them are not flushed then: close them.

    Why: `destroy_process_group` drops torch's references to the group, but the group lives on while anything else
    holds it, and so do gloo's worker threads. A worker frees a finished collective (and, through a barrier, the
    collectives before it) a moment after the caller has seen it finish; freeing a tensor whose Python object torch
    keeps alive needs the GIL. If that moment falls in the interpreter's finalisation, CPython ends the thread
    (`pthread_exit`), the unwinding meets a C++ frame that may not throw, and the process aborts: "terminate called
    without an active exception", SIGABRT, exit code -6 after a run that completed. A core dump of one such abort
    (1 in 48 two-process CPU quickstart runs; CI once) showed ProcessGroupGloo::runLoop -> ~AsyncBarrierWork ->
    ~AsyncAllgatherWork -> decref_pyobject -> take_gil -> PyThread_exit_thread. Without finalisation no thread is
    ended that way; the workers die with the process. pytorch/pytorch#179291 (closed unmerged) would destroy the
    groups at exit instead, which does not help when the group outlives `destroy_process_group`.
    tests/test_safety.py::test_exit_process_survives_collectives_freed_during_exit reproduces the abort.
    """
    try:
        code = main()
    except BaseException as error:
        if not _in_a_process_group():
            raise  # Python's own ending: the traceback (or SystemExit's code), then finalisation
        code = _exit_code(error)
    if not _in_a_process_group():
        sys.exit(code)
    threading._shutdown()  # CPython's first step of finalisation, as Py_FinalizeEx calls it
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code or 0)


def range_error(key: str, value: Any, ranges: dict[str, tuple[Callable[[Any], bool], str]]) -> str | None:
    """`"<key>: expected <what is right>, got <value>"` when `ranges[key]` (is the value right?, what is right) refuses
    `value`, else None; keys not in `ranges`, None and booleans pass (the recipe's RANGES, the doctor's settings)."""
    if key in ranges and isinstance(value, (int, float)) and not isinstance(value, bool):
        is_right, right = ranges[key]
        if not is_right(value):
            shown = int(value) if isinstance(value, float) and value.is_integer() else value  # `--eval_steps 0` read as a float: "got 0"
            return f"{key}: expected {right}, got {shown!r}"
    return None


def unknown_key_hint(key: str, known: Sequence[str], command: str) -> str:
    """'; did you mean a, b?' or where to find the keys."""
    close = difflib.get_close_matches(key, list(dict.fromkeys(known)), n=3)  # each name once (a config lists a key its parent has too)
    return f"; did you mean {', '.join(close)}?" if close else f"; see `python -m {command} --help` for the keys"
