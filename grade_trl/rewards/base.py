"""The reward interface every method shares.

A reward is a plain callable with TRL's signature,
`reward(prompts, completions, completion_ids=None, **kwargs) -> list[float | None]`,
so the same object can be passed unchanged to `trl.GRPOTrainer(reward_funcs=[...])`.
A differentiable reward (usable by GRADE) also has `differentiable = True` and
`score_soft(soft_tokens, attention_mask (B, T)) -> Tensor (B,)`, where `soft_tokens` is a
`grade_trl.core.SoftTokens`: relaxed distributions over the policy's vocabulary, read through
`soft_tokens.embed(E)` (B, T, H), `soft_tokens.probability(token_id)` (B, T) or `soft_tokens.dense()`
(B, T, V, materialised), all differentiable; `grade_trl.core.soft_tokens.as_soft_tokens` also accepts a
(B, T, V) tensor of distributions, so a reward can be called on one-hot tensors in tests.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections import Counter
from typing import Callable, Sequence

import torch

from ..core.precision import at_least_float32
from ..errors import USER_CODE_ERRORS, UserError, is_out_of_memory

RewardFunc = Callable[..., list]


NOT_PASSED_COLUMNS = ("prompt", "completion", "completion_ids")
"""Data set columns that do not reach the reward functions as keywords, in training (TRL's GRPOTrainer drops the
same) and in evaluation alike: `prompt` arrives as `prompts`; `completion` and `completion_ids` are TRL's names for
what the policy generated."""


def completion_text(completion) -> str:
    """A completion as text: a string as it is, or the content of a conversational completion's last message (TRL hands
    a chat prompt's completions as `[{"role": "assistant", "content": ...}]`). Every built-in reward reads this."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def has_response_parser(tokenizer) -> bool:
    """Whether TRL's GRPOTrainer would parse this tokenizer's chat completions with `parse_response` rather than decode
    them: a tokenizer that carries a response template (`response_template`, or the older `response_schema`)."""
    return getattr(tokenizer, "response_template", None) is not None or getattr(tokenizer, "response_schema", None) is not None


def assistant_messages(tokenizer, completion_ids: list[list[int]], prompt_ids: list[list[int]] | None = None) -> list[list[dict]]:
    """Chat completions as TRL's GRPOTrainer hands them to the rewards: one assistant message each. A tokenizer with a
    response template (`has_response_parser`: Qwen3's, gpt-oss', ...) has each completion parsed by TRL's own
    `parse_response`, with the rendered prompt's ids as the prefix it reads, so thinking lands in `reasoning_content`
    and the answer alone in `content`; it falls back to the decoded text where a completion does not parse. Any other
    tokenizer: the decoded text, special tokens skipped. Used by every trainer of ours and every evaluation, so a
    reward reads the same message under them as under TRL's GRPO/CISPO."""
    if not has_response_parser(tokenizer):
        return [[{"role": "assistant", "content": text}] for text in tokenizer.batch_decode(completion_ids, skip_special_tokens=True)]
    from trl.chat_template_utils import parse_response  # TRL's, so the two paths cannot drift; imported here to keep this module light

    prefixes = prompt_ids if prompt_ids is not None else [None] * len(completion_ids)
    return [[parse_response(tokenizer, list(ids), prefix=list(prefix) if prefix is not None else None)] for ids, prefix in zip(completion_ids, prefixes)]


def render_chat(tokenizer, messages: list[dict], chat_template_kwargs: dict | None = None) -> str:
    """Chat messages as the policy reads them: the tokenizer's chat template with the generation prompt, and TRL GRPO's
    `chat_template_kwargs` where a recipe sets them, as TRL's GRPOTrainer renders a conversational prompt. The one
    rendering of the trainers, the evaluations, the data's length filters and the rewards."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **(chat_template_kwargs or {}))


def is_conversational(value) -> bool:
    """Whether a prompt is chat messages ([{role, content}, ...]) rather than text."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def bad_prompts(values: list) -> str | None:
    """What is wrong with a column of prompts, counted (`"2 null, 1 empty"`, values of another kind than the first
    present one's: `"3 not text"`, or values that are neither text nor chat messages: an int, a list of strings, messages
    without `content`), or None when every prompt is non-empty text, or every one chat messages. Neither is refused
    outright: a list of strings reached the policy as their concatenation and the reward as the list (a user trial)."""
    first = next((value for value in values if value is not None), None)
    if first is None:
        return f"{len(values)} null" if values else None
    kind = list if is_conversational(first) else str if isinstance(first, str) else None
    other = f"not {'chat messages' if kind is list else 'text'}"
    neither = "neither text nor chat messages ([{role, content}, ...])"

    def problem(value) -> str | None:
        if value is None:
            return "null"
        if isinstance(value, (str, list)) and len(value) == 0:
            return "empty"
        if not (isinstance(value, str) or is_conversational(value)):
            return neither
        return None if isinstance(value, kind) else other

    counts = Counter(problem(value) for value in values)
    return ", ".join(f"{counts[name]} {name}" for name in ("null", "empty", other, neither) if counts[name]) or None


def bad_prompt_column(dataset, column: str = "prompt") -> str | None:
    """`bad_prompts` of a data set's `column` (the trainers' `prompt`, the runner's `prompt_column`); for a
    `datasets.Dataset`, counted by Arrow (an Arrow column has one type: text, or lists of messages), 0.04 s for 200,000
    rows where the Python list took 5 s."""
    from datasets import Dataset

    if isinstance(dataset, Dataset):
        import pyarrow as pa
        import pyarrow.compute as pc

        values = dataset.with_format("arrow")[column]
        messages = pa.types.is_list(values.type) and pa.types.is_struct(values.type.value_type)
        if messages and not {"role", "content"} <= {values.type.value_type.field(i).name for i in range(values.type.value_type.num_fields)}:
            return f"{len(values)} neither text nor chat messages ([{{role, content}}, ...]; these have {values.type.value_type})"
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type) or messages:
            length = pc.list_value_length(values) if pa.types.is_list(values.type) else pc.utf8_length(values)
            counts = {"null": values.null_count, "empty": pc.sum(pc.equal(length, 0)).as_py() or 0}
            return ", ".join(f"{n} {kind}" for kind, n in counts.items() if n) or None
    return bad_prompts(list(dataset[column]))


def prompt_text(prompt, tokenizer=None) -> str:
    """A prompt as text: a string as it is, or chat messages as the policy read them (`render_chat`), or their contents
    one per line without a tokenizer that has a chat template."""
    if isinstance(prompt, str):
        return prompt
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return render_chat(tokenizer, prompt)
    return "\n".join(str(message.get("content", "")) for message in prompt)


class RewardFunctionError(UserError):
    """A reward function raised or returned a value that is not a finite number."""


def reward_name(reward_func) -> str:
    return getattr(reward_func, "__name__", None) or type(reward_func).__name__


def is_differentiable(reward_func) -> bool:
    return bool(getattr(reward_func, "differentiable", False)) and callable(getattr(reward_func, "score_soft", None))


def require_differentiable(reward_funcs: Sequence[RewardFunc]) -> None:
    """GRADE backpropagates through the reward: refuse, at start-up, a reward it cannot differentiate."""
    for func in reward_funcs:
        if not is_differentiable(func):
            raise ValueError(
                f"reward function '{reward_name(func)}' is not differentiable: GRADE needs a reward with "
                "`differentiable = True` and `score_soft(soft_tokens, attention_mask)`; use it with "
                "reinforce, ppo or grpo instead"
            )


def not_kept(*args, **kwargs) -> None:
    """TRL's `log_extra` for a reward function, where grade_trl keeps no such record: TRL adds `log_extra` columns to its
    completions table, which these trainers do not keep. Accepted so that TRL rewards run unchanged."""


class RewardMetricLog:
    """TRL's `log_metric(name, value)` keyword for reward functions: scalars a reward reports for its batch, pending
    until `flush`, which averages each name over every call on every process since the last flush (the sum over the
    processes' values divided by their count, as TRL's GRPOTrainer does). The trainers flush after each step's reward
    call into their logging window; the runner's evaluations flush after each evaluation into its `eval_` metrics."""

    def __init__(self):
        self.pending: dict[str, list[float]] = {}

    def __call__(self, name: str, value: float) -> None:
        self.pending.setdefault(str(name), []).append(float(value))

    def flush(self, accelerator=None) -> dict[str, float]:
        """{name: mean}. A collective when `accelerator` has several processes: every process calls it at the same
        point, whether or not its rewards logged anything (a name logged on one process only is averaged over that
        process's values)."""
        pending, self.pending = self.pending, {}
        if accelerator is None or accelerator.num_processes == 1:
            return {name: sum(values) / len(values) for name, values in sorted(pending.items())}
        from accelerate.utils import gather_object

        names = sorted(set(gather_object(list(pending))))  # the same order on every process
        if not names:
            return {}
        local = torch.tensor([[sum(pending.get(n, [])), len(pending.get(n, []))] for n in names], dtype=torch.float64, device=accelerator.device)
        totals = accelerator.gather(local).reshape(-1, len(names), 2).sum(0)  # (N, 2): sum and count over processes
        return {name: total / count for name, (total, count) in zip(names, totals.tolist())}


def _first_bad_value(values) -> int | None:
    for index, value in enumerate(values):
        # numbers.Real: Python's int, float and bool, and numpy's scalars (a reward returning an array of float32).
        # None is not bad: the function does not apply to that sample (TRL's multi-task convention).
        if value is not None and (not isinstance(value, numbers.Real) or not _finite(value)):
            return index
    return None


FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # rewards are held in float32 (as in TRL): 1e308 would be inf there


def _finite(value: numbers.Real, bound: float = FLOAT32_MAX) -> bool:
    """A finite value with |value| <= bound: False for NaN, inf, and an int past float's range (10**400)."""
    try:
        number = float(value)
    except OverflowError:
        return False
    return math.isfinite(number) and abs(number) <= bound


def _as_values(values, name: str, count: int) -> list:
    """A reward function's return value as a list, or a RewardFunctionError saying what it returned instead of one
    number per completion (None: a function that forgot its `return`; a single number; a string; a 2-D array)."""
    if isinstance(values, torch.Tensor) or hasattr(values, "ndim"):  # a tensor or a numpy array: one dimension
        if getattr(values, "ndim", None) == 1:
            return values.tolist()
    elif values is not None and not isinstance(values, (str, bytes, dict)) and hasattr(values, "__iter__"):
        return list(values)  # a list, a tuple, a generator or a map, as TRL iterates over it
    what = "None (a missing return?)" if values is None else f"{type(values).__name__} {_short(values)}"
    raise RewardFunctionError(f"reward function '{name}' returned {what}; it must return a list of {count} numbers, one per completion")


def _short(value) -> str:
    text = " ".join(repr(value).split())  # one line, whatever the value's repr
    return text if len(text) <= 60 else text[:57] + "..."


def compute_rewards(
    reward_funcs: Sequence[RewardFunc],
    prompts: list[str],
    completions: list[str],
    completion_ids: list[list[int]] | None = None,
    **kwargs,
) -> torch.Tensor:
    """Call every reward function on the batch and return a (B, F) float tensor, NaN where a function returned None.

    None means, as in TRL's GRPOTrainer, that the function does not apply to that sample (multi-task rewards); the
    methods sum the weighted scores over the functions that apply (`combine_scores`, TRL's nansum). A function that
    raises or returns NaN, inf or a non-number, and a sample for which every function returned None, stop the run with
    a `RewardFunctionError` naming the function and the first offending sample index (found by re-calling it per
    sample). (TRL warns about an all-None sample and gives it advantage 0; here that is a bug to name.) An `async def`
    reward (an LLM judge, a sandbox) is awaited, and several of them run concurrently, as in TRL (`_call_rewards`).
    """
    outcomes = _call_rewards(reward_funcs, dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs))
    scores = torch.stack([_column(func, outcome, prompts, completions, completion_ids, kwargs) for func, outcome in zip(reward_funcs, outcomes)], dim=1)
    unscored = torch.isnan(scores).all(dim=1).nonzero()
    if len(unscored):
        names = ", ".join(reward_name(func) for func in reward_funcs)
        raise RewardFunctionError(f"no reward function scored sample {int(unscored[0, 0])}: {names} all returned None (None says a function does not "
                                  "apply to a sample; at least one must score each completion)")
    return scores


def reward_column(func, prompts, completions, completion_ids, kwargs: dict) -> torch.Tensor:
    """One function's rewards on the batch, (B,), NaN where it returned None; its errors as in `compute_rewards`."""
    (outcome,) = _call_rewards([func], dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs))
    return _column(func, outcome, prompts, completions, completion_ids, kwargs)


def _column(func, outcome: tuple, prompts, completions, completion_ids, kwargs: dict) -> torch.Tensor:
    """`reward_column` of a call's (values, error) outcome."""
    name = reward_name(func)
    values, error = outcome
    if error is not None:  # any failure of user code is reported the same way
        if isinstance(error, TypeError) and (mismatch := _signature_mismatch(func, dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs))):
            raise RewardFunctionError(f"reward function '{name}' cannot be called with the keywords a reward receives ({mismatch}); it takes "
                                      "`prompts, completions, **kwargs` as TRL's rewards do, and a dataset column as a keyword of its name "
                                      f"(given: {', '.join(sorted(k for k in kwargs if k not in NOT_A_COLUMN))})") from error
        index = _first_raising_sample(func, prompts, completions, completion_ids, kwargs)
        where = f"on sample {index}" if index is not None else "on the batch"
        # a column the data left empty for that sample is the likeliest cause (a user trial: a null `keyword` read as the reward's fault)
        nulls = [] if index is None else [key for key, values in kwargs.items() if isinstance(values, list) and index < len(values) and values[index] is None]
        hint = f" (that sample's {', '.join(nulls)} {'is' if len(nulls) == 1 else 'are'} null in the data)" if nulls else ""
        raise RewardFunctionError(f"reward function '{name}' raised {where}{hint}: {type(error).__name__}: {error}") from error
    values = _as_values(values, name, len(completions))
    if len(values) != len(completions):
        raise RewardFunctionError(f"reward function '{name}' returned {len(values)} values for {len(completions)} completions")
    bad = _first_bad_value(values)
    if bad is not None:
        past = " of float32's range, |r| <= 3.4e38, which rewards are held in" if isinstance(values[bad], numbers.Real) and _finite(values[bad], bound=math.inf) else ""
        raise RewardFunctionError(f"reward function '{name}' returned {values[bad]!r} for sample {bad}; rewards must be finite numbers{past} (or None where it does not apply)")
    return torch.tensor([math.nan if value is None else float(value) for value in values], dtype=torch.float32)


NOT_A_COLUMN = ("trainer_state", "log_metric", "log_extra")  # TRL's keywords besides the data set's columns


def _signature_mismatch(func, call: dict) -> str | None:
    """Why `func` cannot take the keywords `call` (a parameter missing from them, one they lack, `completion` for
    `completions`: Python's binding error), or None where it can, or its signature cannot be read. The call itself
    raised then, not any one sample, so "raised on sample 0" would mislead (a user trial, 2026-12-08)."""
    try:
        inspect.signature(func).bind(**call)
    except TypeError as error:
        return str(error)
    except ValueError:  # a builtin or C callable without a signature
        return None
    return None


def _call_rewards(reward_funcs: Sequence[RewardFunc], call: dict) -> list[tuple]:
    """Each function called with the keywords `call`: (what it returned, None), or (None, the Exception it raised). What
    an `async def` function (or any callable returning an awaitable) returns is awaited, all of them concurrently on
    one event loop in a daemon thread: the one TRL's GRPOTrainer starts for its async rewards (its
    `start_event_loop_in_daemon`), so that a caller's own running loop (a notebook's) is not in the way."""
    outcomes: list = []
    pending: dict[int, object] = {}
    for i, func in enumerate(reward_funcs):
        try:
            value = func(**call)
        except USER_CODE_ERRORS as error:  # noqa: BLE001 - reported by the caller with the first sample that raises
            if is_out_of_memory(error):
                raise  # the run's memory, not the reward's failure: the runner names what lowers the peak
            outcomes.append((None, error))
            continue
        if inspect.isawaitable(value):
            pending[i] = value
        outcomes.append((value, None))
    if pending:
        for i, result in zip(pending, _gather_in_daemon_loop(list(pending.values()))):
            if isinstance(result, BaseException) and (not isinstance(result, USER_CODE_ERRORS) or is_out_of_memory(result)):
                raise result  # a KeyboardInterrupt (Ctrl-C) while the judge ran, or out of memory: not the reward's error to report
            outcomes[i] = (None, result) if isinstance(result, USER_CODE_ERRORS) else (result, None)
    return outcomes


_ASYNC_LOOP = None


def _gather_in_daemon_loop(awaitables: list) -> list:
    """The results (or exceptions) of `awaitables`, run concurrently on the daemon event loop (started on first use)."""
    global _ASYNC_LOOP
    import asyncio

    if _ASYNC_LOOP is None:
        import atexit

        from trl.trainer.utils import shutdown_event_loop_in_daemon, start_event_loop_in_daemon

        thread, loop, ready = start_event_loop_in_daemon(name="grade_trl-async-rewards")
        ready.wait()
        atexit.register(shutdown_event_loop_in_daemon, thread, loop)
        _ASYNC_LOOP = loop

    async def gather():
        return await asyncio.gather(*awaitables, return_exceptions=True)

    return asyncio.run_coroutine_threadsafe(gather(), _ASYNC_LOOP).result()


def combine_scores(scores: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_f weight_f * score_f over the functions that scored each sample: (B, F) with NaN for None -> (B,).
    TRL's GRPOTrainer combines its reward functions the same way (`nansum` of the weighted scores). A sum past
    float32's range, of finite scores, is a RewardFunctionError naming reward_weights (it was inf rewards, then a
    traceback in the evaluation's statistics)."""
    combined = torch.nan_to_num(scores, nan=0.0) @ weights.to(scores.device, scores.dtype)
    if not torch.isfinite(combined).all() and torch.isfinite(torch.nan_to_num(scores, nan=0.0)).all():
        sample = int((~torch.isfinite(combined)).nonzero()[0])
        raise RewardFunctionError(f"reward_weights: the weighted sum of the rewards is {combined[sample].item()} for sample {sample} (each reward finite, "
                                  f"their sum past float32's range, |r| <= 3.4e38); scale the rewards or reward_weights {weights.tolist()} down")
    return combined


def _first_raising_sample(func, prompts, completions, completion_ids, kwargs) -> int | None:
    for i in range(len(completions)):
        sample_kwargs = {k: v[i : i + 1] if isinstance(v, list) and len(v) == len(completions) else v for k, v in kwargs.items()}
        call = dict(prompts=prompts[i : i + 1], completions=completions[i : i + 1], completion_ids=None if completion_ids is None else completion_ids[i : i + 1])
        (_, error), = _call_rewards([func], {**call, **sample_kwargs})
        if error is not None:
            return i
    return None


def soft_scores(reward_func, call, *args) -> torch.Tensor:
    """`call(*args)`, the forward of `reward_func.score_soft` (directly or under a checkpoint); an exception in it stops
    the run as a RewardFunctionError naming the function (one line, exit code 2, results.json kept), as the text
    path's does."""
    try:
        return call(*args)
    except USER_CODE_ERRORS as error:  # noqa: BLE001 - any failure of user code is reported the same way
        if is_out_of_memory(error):
            raise  # the run's memory (GRADE's graph through the reward), not the reward's failure
        raise RewardFunctionError(f"reward function '{reward_name(reward_func)}' raised in score_soft: {type(error).__name__}: {error}") from error


class CheckedReward:
    """A reward function with `reward_column`'s checks (an exception, NaN, inf or a non-number -> a RewardFunctionError
    naming the function and the sample), for TRL's GRPOTrainer, which would only warn about NaN and let an exception
    through as a traceback. Same name, same values, None included (TRL's "does not apply here", which TRL handles);
    the text path only (TRL never calls score_soft)."""

    def __init__(self, func: RewardFunc):
        self.func = func
        self.__name__ = reward_name(func)

    def __call__(self, prompts, completions, completion_ids=None, **kwargs) -> list[float | None]:
        values = reward_column(self.func, prompts, completions, completion_ids, kwargs).tolist()
        return [None if math.isnan(value) else value for value in values]  # None passes on: TRL skips that function there


class AsyncCheckedReward(CheckedReward):
    """`CheckedReward` of an `async def` reward (or an object with an async `__call__`): itself async, so TRL's
    GRPOTrainer awaits it on its event loop, concurrently with its other async rewards, and checks it as
    `CheckedReward` does (an exception is traced to its sample by calling the function again per sample)."""

    async def __call__(self, prompts, completions, completion_ids=None, **kwargs) -> list[float | None]:
        try:
            outcome = (await self.func(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs), None)
        except USER_CODE_ERRORS as error:  # noqa: BLE001 - reported by _column with the first sample that raises
            outcome = (None, error)
        values = _column(self.func, outcome, prompts, completions, completion_ids, kwargs).tolist()
        return [None if math.isnan(value) else value for value in values]


def check_finite_scores(reward_func, scores: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """`score_soft`'s output in at least float32, or a RewardFunctionError naming the function: if it is not a
    floating tensor of shape (batch_size,) (one score per completion), or the first sample whose score is not finite."""
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point() or (batch_size is not None and tuple(scores.shape) != (batch_size,)):
        what = f"a {scores.dtype} tensor of shape {tuple(scores.shape)}" if isinstance(scores, torch.Tensor) else f"{type(scores).__name__} {_short(scores)}"
        raise RewardFunctionError(f"reward function '{reward_name(reward_func)}' returned {what} from score_soft; it must return a "
                                  f"floating tensor of shape ({batch_size if batch_size is not None else 'B'},), one differentiable score per completion")
    scores = at_least_float32(scores)
    bad = (~torch.isfinite(scores)).nonzero()
    if len(bad):
        index = int(bad[0, 0])
        raise RewardFunctionError(
            f"reward function '{reward_name(reward_func)}' returned {scores[index].item()} from score_soft "
            f"for sample {index}; rewards must be finite numbers"
        )
    return scores


class MeanReward:
    """The unweighted mean of several reward functions, with `compute_rewards`' checks: a held-out judge built from a
    recipe's `eval_reward_funcs`, scored as `gold_reward` beside the training reward."""

    __name__ = "eval_reward_funcs"

    def __init__(self, reward_funcs: Sequence[RewardFunc]):
        self.reward_funcs = list(reward_funcs)

    def __call__(self, prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        try:
            scores = compute_rewards(self.reward_funcs, prompts, completions, completion_ids, **kwargs)
        except RewardFunctionError as error:  # say which list the function is in: the held-out judge's, not the training reward's
            raise RewardFunctionError(f"eval_reward_funcs: {error}") from error
        return scores.nanmean(1).tolist()  # the mean of those that apply
