"""Reward functions a recipe names: import paths (`package.module.function`) or built-in names (`length`).

Checked when the recipe is parsed (the module imports, the name is callable, the signature is TRL's), built when the
task is. What a name may point to:

- a function or callable object with TRL's signature `reward(prompts, completions, **kwargs) -> list[float]`
  (TRL passes `completion_ids`, `trainer_state`, ... and every extra dataset column as keywords, so `**kwargs` is
  required); a named parameter without a default is a dataset column the reward needs (`keyword` in
  `def keyword_reward(prompts, completions, keyword, **kwargs)`), checked when the data loads;
- a class (a plain one: TRL's GRPOTrainer runs a torch.nn.Module reward as a sequence classifier, so a reward
  holds its modules as attributes) whose instances are such callables, built with its keyword arguments from the recipe
  (`reward_kwargs: {my_rewards.MyReward: {name: value}}`), plus `tokenizer=` (the policy's) and `eos_token_id=` when
  its `__init__` takes them.

A reward with `differentiable = True` and `score_soft(soft_tokens, attention_mask)` (`grade_trl.rewards.base`) can
also train GRADE. Every reward built here goes through the trainers' and the evaluation's checks (an exception,
None, NaN or inf stops the run in one line naming the function), as the built-in ones do.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import USER_CODE_ERRORS, UserError
from .base import NOT_PASSED_COLUMNS

BUILTIN = {"length": "grade_trl.rewards.length.LengthReward"}
"""Built-in names and the import path each one stands for (`length`: `2 - words / 16`, differentiable)."""

NOT_COLUMNS = ("self", "prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric", "environments")
"""Keywords TRL or our trainers pass besides the dataset columns."""

INJECTED = ("tokenizer", "eos_token_id")
"""Constructor arguments a reward class receives from the run when its `__init__` names them."""


@dataclass(frozen=True)
class RewardSpec:
    path: str  # as the recipe names it
    target: Any  # the function, callable object or class it imports
    kwargs: dict = field(default_factory=dict)  # a class's keyword arguments
    columns: tuple[str, ...] = ()  # the dataset columns its signature needs

    @property
    def is_class(self) -> bool:
        return isinstance(self.target, type)

    def lacks_for_grade(self) -> list[str]:
        """What GRADE needs that this reward lacks (empty: it is differentiable)."""
        lacks = []
        if not getattr(self.target, "differentiable", False):
            lacks.append("`differentiable = True`")
        if not callable(getattr(self.target, "score_soft", None)):
            lacks.append("a `score_soft(soft_tokens, attention_mask)` method")
        return lacks

    def build(self, tokenizer, key: str = "reward_funcs"):
        """The reward callable: the target itself, or an instance of the class (its failure: one line naming `key`)."""
        if not self.is_class:
            return self.target
        injected = {"tokenizer": tokenizer, "eos_token_id": tokenizer.eos_token_id}
        try:
            return self.target(**{name: injected[name] for name in _injectable(self.target)}, **self.kwargs)
        except USER_CODE_ERRORS as error:  # noqa: BLE001 - user code failing is reported in one line, before anything is written
            raise UserError(f"{key}: building {self.path}({self.kwargs}) raised {_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def import_target(key: str, path: str):
    """The callable `path` names (a built-in name or `package.module.attribute`); a one-line UserError naming `key` otherwise."""
    path = BUILTIN.get(path, path)
    if "/" in path or "\\" in path or ".py:" in path or path.endswith(".py"):
        # `rewards/my_rewards.py:keyword_reward` read as the module '/.../my_rewards' failed with an import error
        raise UserError(
            f"{key}: {path!r} is a file path, not an import path; put the file in the recipe's folder (or the current directory) and "
            f"name the function by module: my_rewards.keyword_reward for my_rewards.py's keyword_reward"
        )
    module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute:
        raise UserError(
            f"{key}: {path!r} is not an import path; give package.module.function (importable from the current directory, "
            f"the recipe's folder or an installed package) or a built-in reward: {', '.join(BUILTIN)}"
        )
    try:
        module = importlib.import_module(module_name)
    except USER_CODE_ERRORS as error:  # noqa: BLE001 - user code failing at import is reported in one line, as a missing module
        missing = getattr(error, "name", None) if isinstance(error, ModuleNotFoundError) else None
        if missing and (module_name == missing or module_name.startswith(missing + ".")):  # the module itself was not found
            raise UserError(
                f"{key}: cannot import module {module_name!r} of {path!r} ({_first_line(error)}); it must be importable from the "
                "current directory, the recipe's folder or an installed package"
            ) from None
        # found, and its own code failed (or what it imports is missing): where it lies is not the problem
        raise UserError(f"{key}: importing module {module_name!r} of {path!r} raised {_first_line(error)}; fix the module "
                        f"{'(or install what it imports)' if missing else 'where it fails'}") from None
    if not hasattr(module, attribute):
        top, where = module_name.partition(".")[0], os.path.abspath(getattr(module, "__file__", None) or "")
        stdlib = os.path.abspath(sysconfig.get_paths()["stdlib"]) + os.sep
        if top in sys.builtin_module_names or (where.startswith(stdlib) and "site-packages" not in where):  # a test.py behind Python's `test`
            raise UserError(f"{key}: module {module_name!r} is Python's own ({getattr(module, '__file__', None) or 'built in'}) and has no {attribute!r}; "
                            f"if the reward is in a {top}.py of yours, Python's module comes first on the import path: rename yours (and the import path {path!r})")
        names = [n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n))]
        close = difflib.get_close_matches(attribute, names, n=1)
        hint = f"; did you mean {module_name}.{close[0]}?" if close else (f"; it has {', '.join(sorted(names)[:8])}" if names else "")
        raise UserError(f"{key}: module {module_name!r} has no {attribute!r}{hint}")
    target = getattr(module, attribute)
    if not callable(target):
        raise UserError(f"{key}: {path!r} is a {type(target).__name__}, not a function or class; give a reward function reward(prompts, completions, **kwargs)")
    return target


def _call_signature(target) -> inspect.Signature | None:
    """The signature the reward is called with: the function's, the callable object's, or (a class) its instances' `__call__`."""
    if isinstance(target, type):
        call = next((vars(klass)["__call__"] for klass in target.__mro__ if "__call__" in vars(klass)), None)
        if call is None:
            return None
        signature = inspect.signature(call)
        return signature.replace(parameters=list(signature.parameters.values())[1:])  # without self
    try:
        return inspect.signature(target)
    except (TypeError, ValueError):  # a builtin without a signature: called as it is
        return inspect.Signature([inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)])


def _injectable(cls) -> list[str]:
    parameters = inspect.signature(cls).parameters
    return [name for name in INJECTED if name in parameters]


def reward_spec(key: str, path: str, kwargs_key: str, kwargs: dict | None) -> RewardSpec:
    """Import `path` and check that it can be called as a TRL reward (a class: built with `kwargs`); one line naming the key otherwise."""
    target = import_target(key, path)
    signature = _call_signature(target)
    if signature is None:
        raise UserError(f"{key}: class {path!r} has no __call__, so its instances are not reward functions; give it __call__(self, prompts, completions, **kwargs) -> list[float]")
    parameters = list(signature.parameters.values())
    positional_only = [p.name for p in parameters if p.kind is p.POSITIONAL_ONLY and p.default is p.empty]
    if positional_only or not any(p.kind is p.VAR_KEYWORD for p in parameters):
        raise UserError(
            f"{key}: {path}{signature} has the wrong signature: a reward is called as reward(prompts=..., completions=..., "
            "completion_ids=..., **dataset_columns), TRL's convention, so it needs keyword parameters and **kwargs: "
            "def reward(prompts, completions, **kwargs) -> list[float]"
        )
    columns = tuple(p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty and p.name not in NOT_COLUMNS)
    if reserved := [name for name in columns if name in NOT_PASSED_COLUMNS]:
        raise UserError(f"{key}: {path}{signature} takes {reserved[0]!r}, a column name TRL does not pass to reward functions (the prompt "
                        "arrives as prompts, what the policy generated as completions and completion_ids); rename that column of the data "
                        "and the parameter")
    if isinstance(target, type) and issubclass(target, torch.nn.Module) or isinstance(target, torch.nn.Module):
        raise UserError(
            f"{key}: {path!r} is a torch.nn.Module, which TRL's GRPOTrainer would run as a sequence classifier; make the reward a plain "
            "class that holds the module as an attribute (as grade_trl.rewards.sentiment.SentimentReward holds SentimentRewardModel)"
        )
    if not isinstance(target, type):
        if kwargs is not None:
            raise UserError(f"{kwargs_key}: {path!r} is a {type(target).__name__}, not a class; only a reward class is built with keyword arguments")
        return RewardSpec(path, target, {}, columns)
    try:
        inspect.signature(target).bind(**{name: None for name in _injectable(target)}, **(kwargs or {}))
    except TypeError as error:
        raise UserError(f"{kwargs_key}: class {path!r} cannot be built with {kwargs or {}}: {error}; set its arguments in {kwargs_key}") from None
    return RewardSpec(path, target, dict(kwargs or {}), columns)


def reward_specs(key: str, paths: list[str] | None, kwargs_key: str, kwargs: dict | None) -> list[RewardSpec]:
    """Every path of `key`, checked. `kwargs` (the recipe's `kwargs_key`) maps a path of `key` to its class's keyword
    arguments: `{my_rewards.PositiveWords: {words: [great, fun]}}`."""
    paths, kwargs = list(paths or []), dict(kwargs or {})
    for path, arguments in kwargs.items():
        if not isinstance(arguments, dict):
            raise UserError(f"{kwargs_key}: the arguments of {path!r} must be a mapping {{name: value}}, got {arguments!r}")

    def is_class(path: str) -> bool:
        try:
            return inspect.isclass(import_target(key, path))
        except UserError:  # named by its own check below
            return False

    for path in kwargs:  # before any class is built: a misspelt key would read as the class missing its arguments
        if path not in paths:
            close = difflib.get_close_matches(path, paths, n=1)
            if close and not is_class(close[0]):  # only a class is built with arguments
                hint = f"{close[0]!r} is a function, which takes none; "
            else:
                hint = f"did you mean {close[0]!r}? " if close else ""
            raise UserError(f"{kwargs_key}: {path!r} is not one of {key} {paths}; {hint}key {kwargs_key} by the path of a reward class, "
                            "e.g. {my_rewards.MyReward: {name: value}}")
    return [reward_spec(key, path, kwargs_key, kwargs.get(path)) for path in paths]
