"""GSM8K (Cobbe et al. 2021, arXiv:2110.14168): loading, gold answers, prompts.

Sources: the hub id `openai/gsm8k` (config `main`), a local folder with `train`/`test` as `.jsonl`,
`.jsonl.gz` or `.parquet`, or `embedded` (the bundled 1,000 train / 200 test sample); `load_gsm8k` of one
split also takes one such file (pretraining reads the train split alone). Every row has `question` and `answer`
(a worked solution ending `#### <number>`, or the number alone), both text.

Prompts: with a chat template (Qwen2.5-Instruct and the like) the question is the user turn after a
system prompt asking for the final answer as `#### <answer>` or `\\boxed{}`, rendered to text with the
generation prompt; without one, `Question: ...\\nAnswer:`, the form the embedded model was trained on.
The `answer` column of a prompt dataset is the normalised gold number; the rewards receive it as a
keyword, exactly as `trl.GRPOTrainer` passes extra dataset columns.
"""

from __future__ import annotations

import logging

from datasets import Dataset

from ..errors import UserError
from ..models import ASSETS_DIR
from ..rewards.base import render_chat
from ..rewards.gsm8k import gold_answer
from .files import check_not_one_file, load_split

logger = logging.getLogger(__name__)

HUB_CONFIG = "main"
SYSTEM_PROMPT = (
    "You are a careful math tutor. Solve the problem step by step. "
    "End with the final answer, a number only, on its own line as `#### <answer>` (or as \\boxed{<answer>})."
)


def load_gsm8k(source: str = "openai/gsm8k", split: str = "train") -> Dataset:
    """Load one GSM8K split with columns `question`, `answer` from a hub id, a local path, or `embedded`."""
    return load_split(source, split, ASSETS_DIR / "gsm8k_sample", ("question", "answer"), "GSM8K", hub_config=HUB_CONFIG)


def format_prompt(question: str, tokenizer, system_prompt: str = SYSTEM_PROMPT, chat_template_kwargs: dict | None = None) -> str:
    """The prompt text: the chat template with a system prompt when the tokenizer has one (with TRL GRPO's
    `chat_template_kwargs`, e.g. {enable_thinking: false}: the trainers receive this text, not messages), else
    `Question: ...\\nAnswer:`."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]
        return render_chat(tokenizer, messages, chat_template_kwargs)
    return f"Question: {question}\nAnswer:"


def prompt_dataset(rows: Dataset, tokenizer, max_prompt_length: int | None = None, system_prompt: str = SYSTEM_PROMPT, chat_template_kwargs: dict | None = None) -> tuple[Dataset, int]:
    """(dataset with `prompt`, `answer` (normalised gold number) and `question`, number of rows dropped).

    A problem whose prompt is longer than `max_prompt_length` tokens is dropped, not cut: a truncated
    question has no answer, and trainers cut prompts at that length.
    """

    def to_prompt(row):
        prompt = format_prompt(row["question"], tokenizer, system_prompt, chat_template_kwargs)
        return {"prompt": prompt, "answer": gold_answer(row["answer"]), "num_prompt_tokens": len(tokenizer(prompt, add_special_tokens=False)["input_ids"])}

    dataset = rows.map(to_prompt, remove_columns=[c for c in rows.column_names if c != "question"])
    kept = dataset if max_prompt_length is None else dataset.filter(lambda n: n <= max_prompt_length, input_columns="num_prompt_tokens")
    return kept.remove_columns("num_prompt_tokens"), len(dataset) - len(kept)


def disjoint_splits(train: Dataset, test: Dataset) -> tuple[Dataset, Dataset]:
    """(train, test) with every repeat of a test question dropped and every train question that the test has dropped
    from train (the test is the benchmark: it keeps its problems), compared with case and whitespace folded; one
    warning line when anything was dropped."""

    def key(question: str) -> str:
        return " ".join(question.lower().split())

    seen: set[str] = set()
    keep_test = [i for i, q in enumerate(test["question"]) if not (key(q) in seen or seen.add(key(q)))]
    keep_train = [i for i, q in enumerate(train["question"]) if key(q) not in seen]
    repeats, in_test = len(test) - len(keep_test), len(train) - len(keep_train)
    if repeats or in_test:
        logger.warning("GSM8K: dropped %d repeated test problems and %d train problems that the test has (case and whitespace ignored)", repeats, in_test)
        train, test = train.select(keep_train), test.select(keep_test)
    return train, test


def check_rows(rows: Dataset, source: str, split: str) -> None:
    """Every row's `question` and `answer` are text and the answer gives its number (`#### <number>` at the end of a
    solution, or the number alone): a ValueError naming the first row that does not, before a reward or the prompt
    template meets it (an answer stored as a JSON number or null was an AttributeError traceback there)."""
    for number, value in enumerate(rows["question"], 1):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"GSM8K {split} row {number} of {source!r} has question {value!r}; every `question` must be text, as in "
                             "the hub's openai/gsm8k")
    for number, answer in enumerate(rows["answer"], 1):  # the column read once: text first, then its number
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError(f"GSM8K {split} row {number} of {source!r} has answer {answer!r}; every `answer` must be text, as in "
                             "the hub's openai/gsm8k")
        try:
            gold_answer(answer)
        except ValueError:
            raise ValueError(f"GSM8K {split} row {number} of {source!r}: its answer neither ends with `#### <number>` nor is a number "
                             f"(it ends {answer[-60:]!r})") from None


def make_gsm8k_splits(source: str, tokenizer, max_prompt_length: int | None, eval_num_problems: int, test_num_problems: int | None, system_prompt: str = SYSTEM_PROMPT,
                      chat_template_kwargs: dict | None = None) -> tuple[dict[str, Dataset], dict]:
    """Prompt datasets `train` (all of GSM8K train), `validation` (the first `eval_num_problems` test problems,
    as the users evaluated) and `test` (the first `test_num_problems` test problems, or all), plus their sizes.

    Test problems keep the file order, so every method and seed sees the same ones in the same order. A repeated
    test question and a train question the test also has are dropped (`disjoint_splits`; GSM8K itself has none).
    Raises ValueError when a split comes out empty (for instance a `max_prompt_length` that fits no question).
    """
    check_not_one_file(source, "GSM8K")
    rows = {split: load_gsm8k(source, split) for split in ("train", "test")}
    for split, split_rows in rows.items():
        check_rows(split_rows, source, split)
    train, train_dropped = prompt_dataset(rows["train"], tokenizer, max_prompt_length, system_prompt, chat_template_kwargs)
    test, test_dropped = prompt_dataset(rows["test"], tokenizer, max_prompt_length, system_prompt, chat_template_kwargs)
    fitting = len(train)
    train, test = disjoint_splits(train, test)
    if fitting and not len(train):
        raise ValueError(f"every GSM8K train problem of {source!r} is also one of its test problems (the test keeps them); give train and test "
                         "files of different problems")
    splits = {
        "train": train,
        "validation": test.select(range(min(eval_num_problems, len(test)))),
        "test": test if test_num_problems is None else test.select(range(min(test_num_problems, len(test)))),
    }
    for name, split in splits.items():
        if len(split) == 0:
            raise UserError(f"max_prompt_length: {max_prompt_length} tokens fit no GSM8K {name} prompt (GSM8K questions need about 256 tokens "
                            "with a chat template); raise it")
    if train_dropped or test_dropped:
        logger.warning("GSM8K: dropped %d train and %d test problems whose prompt exceeds max_prompt_length %s tokens", train_dropped, test_dropped, max_prompt_length)
    for key, asked in (("eval_num_problems", eval_num_problems), ("test_num_problems", test_num_problems)):
        if asked is not None and asked > len(test):  # the validation and test problems are the first test problems
            logger.warning("GSM8K %s: %d asked, but %s has %d test problems that fit: using %d", key, asked, source, len(test), len(test))
    info = {"split_sizes": {name: len(split) for name, split in splits.items()}, "dropped_long_prompts": {"train": train_dropped, "test": test_dropped}}
    return splits, info
