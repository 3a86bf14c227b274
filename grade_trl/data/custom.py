"""A user's prompt data set (task `custom`): load its splits, hold out validation/test rows, render the prompts.

Sources, as `datasets.load_dataset` reads them: a hub id (with a configuration name), a local folder (its
`train.jsonl`, `validation.csv`, ... or a data set saved in hub layout), or one `.jsonl`/`.json`/`.csv`/`.parquet`
file, whose one split is `train`. Split names take datasets' slicing (`train[:90%]`).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from datasets import Dataset, load_dataset

from ..errors import UserError, quiet_logger
from ..rewards.base import bad_prompt_column, is_conversational, render_chat
from .files import _root_cause, first_bad_json_line

logger = logging.getLogger(__name__)

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".gz": "json", ".csv": "csv", ".parquet": "parquet"}
HOLD_OUT_SEED = 0  # held-out rows are drawn once with this seed: the same validation/test prompts for every method and seed


def load_custom_split(source: str, config: str | None, split: str, split_key: str) -> Dataset:
    """One split of `source`; an unknown split is a one-line UserError naming `split_key`, any other failure a ValueError."""
    path = Path(os.path.expanduser(source))
    files = [path] if path.is_file() else sorted(f for f in path.iterdir() if f.is_file() and f.suffix in FILE_BUILDERS) if path.is_dir() else []
    for file in files:
        if os.path.getsize(file) == 0:  # datasets' own error for it is a bare StopIteration
            raise ValueError(f"{file} is empty")
    try:
        with quiet_logger("datasets"):  # it logs a file it cannot parse twice (its handler, the root's) before raising
            if path.is_file():
                if path.suffix not in FILE_BUILDERS:
                    raise ValueError(f"{path} is not a {', '.join(FILE_BUILDERS)} file")
                dataset = load_dataset(FILE_BUILDERS[path.suffix], data_files=str(path), split=split)
            else:
                dataset = load_dataset(str(path) if path.is_dir() else source, config, split=split)
    except Exception as error:  # datasets wraps a parse error in DatasetGenerationError: name the cause
        cause = _root_cause(error)
        if "Unknown split" in cause or "Bad split" in cause:
            raise UserError(f"{split_key}: {source!r} has no split {split!r} ({cause.split(': ', 1)[-1]})") from None
        # a JSON-lines file's first bad line, as GSM8K's files are named (datasets names a byte position)
        bad_line = next((f"{file}: {why}" for file in files if (why := first_bad_json_line(str(file)))), None)
        if bad_line is None and "corresponds to no data" in cause:  # a csv with its header alone, as datasets words it
            raise ValueError(f"split {split!r} has no rows") from None
        raise ValueError(f"cannot read split {split!r}: {bad_line or cause}") from None
    if len(dataset) == 0:
        raise ValueError(f"split {split!r} has no rows")
    return dataset


def unused_splits(run) -> list[tuple[str, str]]:
    """(key, split) of a local folder's `validation` / `test` split (its `test.jsonl`, ...) that the recipe leaves unused
    (validation_split / test_split null: held out of train_split instead), for a warning: a folder of split files with a
    test file silently trained on part of its test prompts' split and tested on train rows (a journey audit)."""
    from datasets import get_dataset_split_names

    path = Path(os.path.expanduser(run.dataset_name))
    if not path.is_dir():
        return []
    try:
        with quiet_logger("datasets"):
            names = get_dataset_split_names(str(path), run.dataset_config)
    except Exception:  # noqa: BLE001 - a layout datasets cannot name splits of: loading it says what is wrong
        return []
    reads = set(re.findall(r"[A-Za-z_][\w-]*", run.train_split))  # "train+test", "test[:50%]": the split names train_split reads
    return [(key, name) for key, name in (("validation_split", "validation"), ("test_split", "test")) if getattr(run, key) is None and name in names and name not in reads]


def make_custom_splits(run, prepare=None) -> dict[str, Dataset]:
    """`train`, `validation` and `test` rows. A split the recipe does not name is held out of `train_split`: first
    `eval_num_prompts` validation rows, then `test_num_prompts` test rows, of the rows shuffled with HOLD_OUT_SEED.

    prepare(rows, split) -> rows, in their order: applied to each loaded split (the runner checks the columns and drops
    the prompts longer than max_prompt_length). The training split is shuffled with HOLD_OUT_SEED before it is prepared
    and the held-out rows are the first that remain, so the held-out splits have their full sizes, and two runs whose
    tokenizer or max_prompt_length drop other prompts still hold out the same rows wherever those fit in both."""
    prepare = prepare or (lambda rows, split: rows)
    train = load_custom_split(run.dataset_name, run.dataset_config, run.train_split, "train_split")
    for key, name in unused_splits(run):
        logger.warning("custom task: %s has a %r split, which %s: null leaves unused (those prompts are held out of train_split %r); "
                       "give %s: %s to use it", run.dataset_name, name, key, run.train_split, key, name)
    sizes = {"validation": run.eval_num_prompts if run.validation_split is None else 0, "test": run.test_num_prompts if run.test_split is None else 0}
    splits = {}
    train = prepare(train.shuffle(seed=HOLD_OUT_SEED) if sum(sizes.values()) else train, "train")
    if sum(sizes.values()):
        if sum(sizes.values()) >= len(train):
            raise UserError(
                f"eval_num_prompts: {sizes['validation']} validation + {sizes['test']} test prompts held out of the {len(train)} rows of "
                f"{run.dataset_name!r} split {run.train_split!r} leave none to train on; lower eval_num_prompts/test_num_prompts "
                "or name validation_split/test_split"
            )
        start = 0
        for name, size in sizes.items():
            if size:
                splits[name], start = train.select(range(start, start + size)), start + size
        train = train.select(range(start, len(train)))
    splits["train"] = train
    for name in ("validation", "test"):
        if name not in splits:
            splits[name] = prepare(load_custom_split(run.dataset_name, run.dataset_config, getattr(run, f"{name}_split"), f"{name}_split"), name)
    warn_about_shared_prompts(splits)
    return {name: splits[name] for name in ("train", "validation", "test")}


def warn_about_shared_prompts(splits: dict[str, Dataset], column: str = "prompt") -> None:
    """A warning where validation or test prompts are also training prompts (a data set with repeated rows, or split
    files that overlap): the held-out scores then partly measure memorised prompts."""
    import json

    if not all(column in rows.column_names for rows in splits.values()):
        return
    key = lambda value: value if isinstance(value, str) else json.dumps(value, sort_keys=True)  # noqa: E731 - chat messages are lists
    train = {key(value) for value in splits["train"][column]}
    for name in ("validation", "test"):
        shared = sum(key(value) in train for value in splits[name][column])
        if shared:
            logger.warning("custom task: %d of the %d %s prompts are also training prompts (repeated rows in the data, or overlapping "
                           "splits): its scores partly measure prompts the policy trained on", shared, len(splits[name]), name)


def prompt_dataset(rows: Dataset, column: str, tokenizer, model_name: str, max_prompt_length: int, split: str = "", chat_template_kwargs: dict | None = None) -> tuple[Dataset, int]:
    """(rows with `prompt` in place of `column`; rows dropped for a prompt longer than `max_prompt_length` tokens).
    Chat messages stay messages, as TRL keeps a conversational data set: the trainers and the evaluation render them
    with the tokenizer's chat template and the generation prompt, and the reward functions receive the messages and
    each completion as one assistant message, as TRL hands them. Their length is counted on that rendering (with TRL
    GRPO's `chat_template_kwargs`, as TRL renders them); a prompt is
    dropped rather than cut, since a cut chat prompt loses its generation prompt.
    A missing (null) or empty prompt, or one of another kind than the first row's, is refused in one line that counts
    them: there is nothing for the policy to continue, and dropping them would hide a broken data file."""
    first = rows[0][column]
    if first is not None and not isinstance(first, (str, list)):  # the column's kind, before counting its rows
        raise UserError(f"prompt_column: {column!r} holds {type(first).__name__} values, not text or chat messages ([{{role, content}}, ...])")
    if what := bad_prompt_column(rows, column):
        raise UserError(f"prompt_column: {column!r} has {what} in the {len(rows)} rows of the {split or 'given'} split; every prompt must be "
                        "non-empty text or chat messages (drop or fill those rows)")
    if is_conversational(first):
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(
                f"prompt_column: {column!r} holds chat messages, but the tokenizer of {model_name!r} has no chat template to render "
                "them; give text prompts or a model with a chat template"
            )

        def render(value):
            return render_chat(tokenizer, value, chat_template_kwargs)
    else:  # text: every value is, or bad_prompt_column above counted it
        def render(value):
            return value

    def to_prompt(row):
        return {"prompt": row[column], "num_prompt_tokens": len(tokenizer(render(row[column]), add_special_tokens=False)["input_ids"])}

    dataset = rows.map(to_prompt, remove_columns=[column])
    kept = dataset.filter(lambda n: 0 < n <= max_prompt_length, input_columns="num_prompt_tokens")
    return kept.remove_columns("num_prompt_tokens"), len(dataset) - len(kept)
