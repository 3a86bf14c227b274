"""IMDB: loading (hub id, local file or folder, or the embedded sample), disjoint splits, prompts.

Splits follow the GRADE experiment: from IMDB train, shuffled with the seed BEFORE splitting
(the files are sorted by label), a reward-model split, a policy-prompt split and a validation
split; the test split comes from IMDB test and is used once, at the end.
"""

from __future__ import annotations

import html
import logging
import re

from datasets import Dataset

from ..models import ASSETS_DIR
from .files import check_not_one_file, load_split

logger = logging.getLogger(__name__)

def load_imdb(source: str = "stanfordnlp/imdb", split: str = "train") -> Dataset:
    """Load one IMDB split with columns `text`, `label` from a hub id, a local path, or `embedded`."""
    return load_split(source, split, ASSETS_DIR / "imdb_sample", ("text", "label"), "IMDB")


def split_sizes(available: int, requested: dict[str, int]) -> dict[str, int]:
    """Cap the requested split sizes by what exists, shrinking every split in proportion."""
    total = sum(requested.values())
    if total <= available:
        return dict(requested)
    scale = available / total
    sizes = {name: int(n * scale) for name, n in requested.items()}
    logger.warning("IMDB train has %d rows, fewer than the %d requested; splits scaled to %s", available, total, sizes)
    return sizes


def make_imdb_splits(
    source: str,
    seed: int,
    reward_size: int = 5000,
    policy_size: int = 10000,
    validation_size: int = 2000,
    test_size: int | None = None,
) -> dict[str, Dataset]:
    """Disjoint `reward`, `policy`, `validation` splits of IMDB train and a `test` split of IMDB test.

    Shuffled with `seed` before splitting; duplicate reviews (IMDB train has some) are dropped first,
    so no text lands in two splits. The test split drops its own duplicates and every review IMDB train also
    has (`clean_test_split`). Raises if two splits share a review or a split lacks a label.
    """
    check_not_one_file(source, "IMDB")
    train = deduplicate(check_labels(load_imdb(source, "train"), source, "train")).shuffle(seed=seed)
    sizes = split_sizes(len(train), {"reward": reward_size, "policy": policy_size, "validation": validation_size})
    splits, start = {}, 0
    for name, size in sizes.items():
        splits[name] = train.select(range(start, start + size))
        start += size
    test = clean_test_split(check_labels(load_imdb(source, "test"), source, "test"), train).shuffle(seed=seed)
    splits["test"] = test.select(range(min(test_size or len(test), len(test))))
    check_disjoint(splits)
    return splits


def check_labels(dataset: Dataset, source: str, split: str) -> Dataset:
    """IMDB's labels are 0 (negative) and 1 (positive), both present; anything else is one ValueError naming the data."""
    labels = set(dataset["label"])
    if not labels <= {0, 1} or any(isinstance(label, bool) for label in labels):
        found = sorted(map(repr, labels))[:5]
        raise ValueError(f"{split} data at {source!r}: `label` must be 0 (negative) or 1 (positive), found {', '.join(found)}")
    if len(labels) < 2:
        raise ValueError(f"{split} data at {source!r} has only label {labels.pop()}; the sentiment task needs reviews of both labels")
    return dataset


def deduplicate(dataset: Dataset) -> Dataset:
    """Keep the first row of each distinct `text`."""
    seen: set[str] = set()
    keep = [i for i, text in enumerate(dataset["text"]) if not (text in seen or seen.add(text))]
    return dataset if len(keep) == len(dataset) else dataset.select(keep)


def normalised(text: str) -> str:
    """The review as a duplicate check compares it: markup removed, case and whitespace folded."""
    return " ".join(clean_review(text).lower().split())


def clean_test_split(test: Dataset, train: Dataset) -> Dataset:
    """The test reviews without repeats and without any review that IMDB train also holds (compared `normalised`),
    so the test measures prompts no split trained on, nor the gold judge (fitted on IMDB train). One warning line
    says what was dropped. The full IMDB test has 201 repeats and 123 reviews that are also in train."""
    seen = {normalised(text) for text in train["text"]}
    keep, repeats, in_train, test_seen = [], 0, 0, set()
    for i, text in enumerate(test["text"]):
        key = normalised(text)
        if key in test_seen:
            repeats += 1
        elif key in seen:
            in_train += 1
        else:
            keep.append(i)
        test_seen.add(key)
    if repeats or in_train:
        logger.warning("IMDB test: dropped %d repeated reviews and %d that IMDB train also has (case and whitespace ignored); %d test reviews remain", repeats, in_train, len(keep))
    return test if len(keep) == len(test) else test.select(keep)


def check_disjoint(splits: dict[str, Dataset]) -> None:
    seen: dict[str, str] = {}
    for name in ("reward", "policy", "validation"):
        for text in splits[name]["text"]:
            if text in seen and seen[text] != name:
                raise ValueError(f"IMDB splits overlap: a review is in both {seen[text]!r} and {name!r}")
            seen[text] = name
    for name, split in splits.items():
        if len(split) and len(set(split["label"])) < 2:
            raise ValueError(f"IMDB split {name!r} has only label {split['label'][0]}: too few reviews of one label for its size")


_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def clean_review(text: str) -> str:
    """Remove `<br />` tags and HTML entities, fold whitespace (as the embedded model was trained)."""
    return " ".join(html.unescape(_BREAK.sub(" ", text)).split())


def review_prompt(text: str, max_chars: int = 200) -> str:
    """The first one or two sentences of a review, at most `max_chars` characters (cut at a word)."""
    sentences = _SENTENCE_END.split(clean_review(text))
    prompt = sentences[0]
    if len(sentences) > 1 and len(prompt) + 1 + len(sentences[1]) <= max_chars:
        prompt = f"{prompt} {sentences[1]}"
    if len(prompt) > max_chars:
        prompt = prompt[:max_chars].rsplit(" ", 1)[0]
    return prompt


def truncate_to_tokens(text: str, tokenizer, max_tokens: int) -> str:
    """Keep the first `max_tokens` tokens of `text` (the prompt must read as the start of a review)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def prompt_dataset(split: Dataset, tokenizer, max_chars: int = 200, max_tokens: int = 32) -> Dataset:
    """A dataset with a `prompt` column (TRL's convention) plus the review's `label`."""

    def to_prompt(row):
        return {"prompt": truncate_to_tokens(review_prompt(row["text"], max_chars), tokenizer, max_tokens)}

    return split.map(to_prompt, remove_columns=[c for c in split.column_names if c != "label"])
