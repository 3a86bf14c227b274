"""GSM8K rewards: final-answer extraction, numeric correctness and a small format reward.

Both rewards are plain TRL reward callables, `reward(prompts, completions, completion_ids=None, **kwargs)`;
the gold answer arrives as the dataset column `answer` in `kwargs`, exactly as `trl.GRPOTrainer` (and
grade_trl's REINFORCE/PPO) pass every dataset column except `prompt` to reward functions. The column
may hold the bare number ("72") or the whole GSM8K solution ("... #### 72"), so the raw hub data set
works once a `prompt` column is added.

Extraction (`extract_answer`): the final-answer markers `#### X` and `\\boxed{X}`, the LAST of them wins (a
model that corrects itself is judged by what it marked last; lm-eval's strict-match takes the first). Only a
completion without a marker is read from "answer is X" / "answer: X" / "answer = X" sentences, the last one: a
sentence after a marked answer, restating, checking or even correcting it ("#### 18. The answer is 18 apples, 6 more
than 12"), neither replaces nor cancels it. X may carry `$`, thousands commas, a decimal
part, a sign, a `%` or a unit word after it; `a/b` and `\\frac{a}{b}` are read as fractions. Values
are exact `Fraction`s, so `18.00 == 18` and `0.5 == 1/2` without float tolerance. A completion
without any answer-like expression has no answer and scores 0 (with `fallback_to_last_number`,
the last number in the text is taken instead, like lm-eval's "flexible-extract").
Not differentiable: GRADE cannot use these rewards (the runner refuses GRADE on task gsm8k).
"""

from __future__ import annotations

import re
from fractions import Fraction

from .base import assistant_messages, completion_text, has_response_parser, prompt_text

# One number: optional sign and `$`, digits with optional thousands commas, optional decimals ("-$1,800.50").
_NUMBER = r"(?:[-−]\s?)?(?:\\?\$\s?)?(?:\d{1,3}(?:,\d{3})+(?![\d,])|\d+)(?:\.\d+)?(?![\d])|(?:[-−]\s?)?(?:\\?\$\s?)?\.\d+"
# One value: a number, or a fraction a/b of two numbers ("3/4", "-1/2").
_VALUE = rf"(?:{_NUMBER})(?:\s?/\s?\d+(?:\.\d+)?)?"
VALUE_RE = re.compile(_VALUE)
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{(?P<num>[^{}]+)\}\s*\{(?P<den>[^{}]+)\}")
_UNITS_RE = re.compile(r"\\(?:text|mbox|mathrm)\s*\{[^{}]*\}|\\[,!;: ]|\\?%|\^\s*\{?\\circ\}?|\\left|\\right")
_EXPRESSION_RE = re.compile(r"[+*×÷^]|\d\s*[-−]\s*[\d$]|\d[a-zA-Z]|[a-zA-Z]\s*\d")
_HASH_RE = re.compile(r"####+[ \t]*(?P<line>[^\n]*)")
_BOXED_RE = re.compile(r"\\boxed\s*\{")
# "The answer is 18", "Final answer: $18", "answer = **18**": a number must follow the marker (only spaces, `:`, `=`,
# `*`, `\(` between), and the rest of the sentence must hold one value ("the answer is 3 more than 4" has none).
_ANSWER_IS_RE = re.compile(r"\banswer\s*(?:is|was|:|=)(?P<rest>(?:[\s:=*]|\\\(|\\\[)*[-−$\\.\d][^\n]*?)(?=[.!?](?:\s|$)|\n|$)", re.IGNORECASE)
# What may follow the final answer in a well-formed completion: spaces, `.`, `$`, `**`, `\)`, `\]`.
_TAIL = r"(?:\s|\.|\$|\*|\\\)|\\\])*"
_FINAL_HASH_RE = re.compile(rf"####[ \t]*\**[ \t]*(?P<value>{_VALUE}){_TAIL}\Z")
# A working after a marked answer, "#### 18 (3 * 6)": not part of the answer.
_PARENTHESES_TAIL_RE = re.compile(r"(?<=\S)\s*\([^()\n]*\)[\s.]*\Z")  # not "#### (18)": nothing before it


def to_number(text: str) -> Fraction | None:
    """`"$1,800.00"` -> 1800, `"-3/4"` -> -3/4, `"25%"` -> 25, `"\\frac{1}{2}"` -> 1/2, `"18 apples"` -> 18; else None.

    The text must hold exactly one value once `$`, `%`, `\\text{...}` units and thousands commas are read;
    "3 + 4", "1 1/2" or "3 or 4" are ambiguous and give None.
    """
    text = _UNITS_RE.sub(" ", text.replace("**", " ")).strip().rsplit("=", 1)[-1]  # "3+4=7" -> "7": the right-hand side of the last `=`
    if _EXPRESSION_RE.search(text):
        return None  # "x+1", "2x", "3 - 4": an expression, not a value
    frac = _FRAC_RE.fullmatch(text.strip("$ ").lstrip("-−").strip())
    if frac:
        num, den = to_number(frac["num"]), to_number(frac["den"])
        sign = -1 if text.strip("$ ").startswith(("-", "−")) else 1
        return None if num is None or not den else sign * num / den
    values = VALUE_RE.findall(text)
    if len(values) != 1:
        return None
    num, _, den = values[0].partition("/")
    num = _plain_number(num)
    if not den:
        return num
    den = _plain_number(den)
    return None if den == 0 else num / den


def _plain_number(text: str) -> Fraction:
    return Fraction(re.sub(r"[\s$\\,]", "", text.replace("−", "-")))


def normalize_number(text: str) -> str:
    """Canonical string of a number: `" $1,080.00 "` -> `"1080"`, `"0.50"` -> `"0.5"`, `"-7"` -> `"-7"`.

    Raises ValueError when `text` is not one number (GSM8K gold answers always are).
    """
    value = to_number(text)
    if value is None:
        raise ValueError(f"not a single number: {text!r}")
    if value.denominator == 1:
        return str(value.numerator)
    decimal = f"{float(value):.10f}".rstrip("0").rstrip(".")
    return decimal if Fraction(decimal) == value else f"{value.numerator}/{value.denominator}"


def gold_answer(answer: str) -> str:
    """The gold answer of a GSM8K row: the number after the last `####` of the solution (or the text itself), normalised."""
    return normalize_number(answer.rsplit("####", 1)[-1])


def _boxed(text: str):
    """(start, content or None if the braces never close) of every `\\boxed{...}`, nested braces matched."""
    for match in _BOXED_RE.finditer(text):
        depth, i = 1, match.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        yield match.start(), (text[match.end() : i - 1] if depth == 0 else None)


def answer_candidates(text: str) -> list[tuple[int, Fraction | None, bool]]:
    """Every answer-like expression as (position, value, is a marker), in text order; value None when it cannot be read.

    `#### X` reads the rest of its line ("#### 18 dollars" -> 18, "#### 18 (3 * 6)" -> 18, "#### 1 1/2" -> None),
    `\\boxed{X}` its contents (both markers), "answer is X" the value right after the words.
    """
    found = [(m.start(), to_number(_PARENTHESES_TAIL_RE.sub("", m["line"])), True) for m in _HASH_RE.finditer(text)]
    found += [(start, None if content is None else to_number(content), True) for start, content in _boxed(text)]
    found += [(m.start(), to_number(m["rest"]), False) for m in _ANSWER_IS_RE.finditer(text)]
    return sorted(found, key=lambda c: c[0])


def extract_answer(text: str, fallback_to_last_number: bool = False) -> Fraction | None:
    """The completion's final answer: the value of its LAST marker (`#### X`, `\\boxed{X}`), else of its last "answer is
    X" sentence, else None. A sentence after a marker never counts, even one that corrects it ("#### 12 ... the answer is
    15" reads 12, as lm-eval's strict-match would): a marker is the answer the format asks for.

    A last marker (sentence) that cannot be read (`\\boxed{x+1}`, a `####` cut off by the length limit) gives None: an
    earlier, different answer is not credited. With `fallback_to_last_number`, a text without any answer-like expression is
    judged by its last number.
    """
    candidates = answer_candidates(text)
    markers = [value for _, value, is_marker in candidates if is_marker]
    if markers:
        return markers[-1]
    if candidates:  # "answer is X" sentences only: the last one, as for markers
        return candidates[-1][1]
    if fallback_to_last_number:
        values = VALUE_RE.findall(text)
        return to_number(values[-1]) if values else None
    return None


def has_final_answer_format(text: str) -> bool:
    """True when the text ENDS with a readable final answer, `#### X` or `\\boxed{X}` (X one number), then only `.`, `$`, `**`, `\\)`, spaces."""
    if _FINAL_HASH_RE.search(text):
        return True
    boxes = list(_boxed(text))
    if not boxes or boxes[-1][1] is None or to_number(boxes[-1][1]) is None:
        return False
    start, content = boxes[-1]
    after = text[text.index("{", start) + 1 + len(content) + 1 :]
    return re.fullmatch(_TAIL, after) is not None


def answer_text(completion, prompt=None, tokenizer=None) -> str:
    """The text a completion's answer is read from. A text completion of a thinking model (a tokenizer that carries a
    response template: Qwen3's, ...): the answer after its thinking, as TRL's `parse_response` splits the completion
    with the prompt's ids as prefix (`rewards.base.assistant_messages`), so `#### 3` written inside the thinking is no
    answer, and a completion cut off inside its thinking has none (''). GSM8K prompts are rendered text, so neither
    TRL's GRPOTrainer nor our trainers parse their completions before the rewards do. A chat completion (already
    parsed) or any other tokenizer: the completion's text."""
    text = completion_text(completion)
    if tokenizer is None or not isinstance(completion, str) or not has_response_parser(tokenizer):
        return text
    prefix = tokenizer(prompt_text(prompt, tokenizer), add_special_tokens=False)["input_ids"] if prompt is not None else None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return assistant_messages(tokenizer, [ids], [prefix] if prefix is not None else None)[0][0].get("content") or ""


def before_an_invented_question(text: str, prompt=None) -> str:
    """After a `Question: ...\\nAnswer:` prompt (the base models' form), `text` up to a new `Question:` the completion
    goes on to invent, as lm-eval's GSM8K task stops generating there (the invented problem's answer is not this one's);
    `text` itself after any other prompt. The format reward reads the whole text: going on past the answer is not the
    format asked for."""
    if isinstance(prompt, str) and prompt.rstrip().endswith("Answer:"):
        return text.split("\nQuestion:", 1)[0]
    return text


def final_answer(completion, prompt=None, tokenizer=None, fallback_to_last_number: bool = False) -> Fraction | None:
    """The answer a completion gives to its prompt's problem: `extract_answer` of its `answer_text` up to a question it
    invents (`before_an_invented_question`)."""
    return extract_answer(before_an_invented_question(answer_text(completion, prompt, tokenizer), prompt), fallback_to_last_number)


def _gold_column(reward, kwargs: dict, n: int) -> list[str]:
    if reward.answer_column not in kwargs:
        raise KeyError(
            f"{reward.__name__} needs the gold answers as the dataset column {reward.answer_column!r} (TRL passes every "
            f"column except `prompt` to reward functions as a keyword); got columns {sorted(k for k in kwargs if k != 'completion_ids')}"
        )
    golds = kwargs[reward.answer_column]
    if len(golds) != n:
        raise ValueError(f"{reward.__name__}: {len(golds)} gold answers for {n} completions")
    return golds


class GSM8KCorrectness:
    """1.0 when the completion's final answer equals the gold answer numerically, else 0.0 (binary, as the users' runs).

    `reward(prompts, completions, answer=[...])`; `answer` holds the gold number or the full GSM8K solution.
    `tokenizer`: the policy's; with a thinking model's, the answer is read after the thinking (`answer_text`).
    """

    def __init__(self, answer_column: str = "answer", fallback_to_last_number: bool = False, tokenizer=None):
        self.answer_column, self.fallback_to_last_number, self.tokenizer = answer_column, fallback_to_last_number, tokenizer
        self.__name__ = "gsm8k_correctness"

    def __call__(self, prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        golds = _gold_column(self, kwargs, len(completions))
        scores = []
        for prompt, completion, gold in zip(prompts or [None] * len(completions), completions, golds):
            predicted = final_answer(completion, prompt, self.tokenizer, self.fallback_to_last_number)
            scores.append(float(predicted is not None and predicted == Fraction(gold_answer(str(gold)))))
        return scores


class GSM8KFormat:
    """1.0 when the completion ends with a well-formed final answer (`#### X` or `\\boxed{X}`, X a number), else 0.0.

    Meant as a small shaping term beside `GSM8KCorrectness` (its weight is set by `reward_weights`); its
    mean is the fraction of well-formed completions. It ignores the gold answer.
    """

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer
        self.__name__ = "gsm8k_format"

    def __call__(self, prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        return [float(has_final_answer_format(answer_text(c, p, self.tokenizer))) for p, c in zip(prompts or [None] * len(completions), completions)]
