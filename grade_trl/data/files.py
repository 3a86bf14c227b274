"""Loading one split of a data set from a hub id, a local folder or file, or the bundled sample."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

from datasets import Dataset, load_dataset

from ..errors import quiet_logger

EMBEDDED = "embedded"
"""The name that resolves to a task's bundled sample under `grade_trl/assets/`."""

_LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".gz": "json", ".parquet": "parquet"}


def _local_files(path: Path, split: str) -> tuple[str, str]:
    """(builder, file) for `split` in a folder (train.jsonl[.gz] / train.parquet / train-*.parquet) or a file."""
    if path.is_file():
        return _LOCAL_SUFFIXES.get(path.suffix, "json"), str(path)
    for pattern in (f"{split}.jsonl.gz", f"{split}.jsonl", f"{split}.json", f"{split}.parquet", f"{split}-*.parquet"):
        matches = sorted(path.glob(pattern)) or sorted(path.glob(f"*/{pattern}"))
        if matches:
            return _LOCAL_SUFFIXES[matches[0].suffix], str(matches[0]) if len(matches) == 1 else [str(m) for m in matches]
    raise FileNotFoundError(f"no {split} file in {path} (expected {split}.jsonl, {split}.jsonl.gz or {split}.parquet)")


def _innermost(error: BaseException) -> BaseException:
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    return error


def _root_cause(error: BaseException) -> str:
    """The innermost exception's first line (e.g. the JSON error under datasets' DatasetGenerationError); for datasets'
    CastError, whose first line is "Couldn't cast" and whose last says why, that reason in our words."""
    error = _innermost(error)
    text = str(error).strip().splitlines()
    if "column names don't match" in str(error):
        return f"{type(error).__name__}: the files' columns differ (every file of a folder must have the same column names)"
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def first_bad_json_line(file: str) -> str | None:
    """'line N is not JSON: <why>' (or not an object) for the first line of a JSON-lines file (gzipped or not) that is not one JSON object, or None.
    datasets' own error names a byte position of its fallback reader ("Trailing data at position 313"), not the line."""
    if not file.endswith((".jsonl", ".jsonl.gz")):
        return None
    with (gzip.open if file.endswith(".gz") else open)(file, "rt", encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                return f"line {number} is not JSON: {error.msg.removesuffix(' at')} at column {error.colno}"  # json's msg ends "... at"
            if not isinstance(row, dict):
                return f"line {number} is a JSON {type(row).__name__}, not an object with the data's columns"
    return None


def check_not_one_file(source: str, name: str) -> None:
    """A task that reads a train and a test split (IMDB, GSM8K) from a local source needs a folder: one file would serve
    as both splits (IMDB's test then lost every review to the train overlap, a traceback after set-up; GSM8K's train
    every problem to the test)."""
    if source != EMBEDDED and Path(os.path.expanduser(source)).is_file():
        raise ValueError(f"{source} is one file; {name} needs its train and test splits: give a folder holding train.jsonl and test.jsonl "
                         "(or .jsonl.gz / .parquet), a hub id, or `embedded`")


def load_split(source: str, split: str, embedded_dir: Path, columns: tuple[str, ...], name: str, hub_config: str | None = None) -> Dataset:
    """One split with (at least) `columns`: from `embedded` (`embedded_dir`), a local folder or file, else the hub.

    A local folder holds `{split}.jsonl`, `.jsonl.gz` or `.parquet` (or `{split}-*.parquet` shards);
    raises ValueError naming the missing columns when the data has another schema.
    """
    if source == EMBEDDED:
        source = str(embedded_dir)
    path = Path(os.path.expanduser(source))
    if path.exists():
        builder, files = _local_files(path, split)
        if isinstance(files, str) and os.path.getsize(files) == 0:
            raise ValueError(f"{files} is empty")
        try:
            with quiet_logger("datasets"):  # it logs a file it cannot parse twice (its handler, the root's) before raising
                dataset = load_dataset(builder, data_files={split: files}, split=split)
        except Exception as error:  # datasets wraps a parse error in DatasetGenerationError: name the file and the cause
            bad_line = first_bad_json_line(files) if isinstance(files, str) else None
            raise ValueError(f"cannot read {files} as {builder}: {bad_line or _root_cause(error)}") from None
        if len(dataset) == 0:
            raise ValueError(f"{files} has no rows")
    else:
        dataset = load_dataset(source, hub_config, split=split) if hub_config else load_dataset(source, split=split)
    missing = set(columns) - set(dataset.column_names)
    if missing:
        raise ValueError(f"{name} data at {source!r} lacks columns {sorted(missing)}; expected the hub schema {', '.join(f'`{c}`' for c in columns)}")
    return dataset
