"""IMDB loading, splits and prompts."""

import gzip
import json

import pytest

from grade_trl.data import load_imdb, make_imdb_splits, prompt_dataset, review_prompt
from grade_trl.data.imdb import clean_review

from .conftest import SHARED_IMDB


def _check_splits(splits):
    texts = {name: set(split["text"]) for name, split in splits.items() if name != "test"}
    names = list(texts)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not texts[a] & texts[b], f"{a} and {b} overlap"
    for name, split in splits.items():
        assert set(split["label"]) == {0, 1}, f"{name} lacks a label"


def test_embedded_sample_splits_are_disjoint_and_balanced():
    splits = make_imdb_splits("embedded", seed=42, reward_size=1500, policy_size=1000, validation_size=499)
    assert {k: len(v) for k, v in splits.items()} == {"reward": 1500, "policy": 1000, "validation": 499, "test": 1000}
    _check_splits(splits)


def test_sizes_are_capped_by_what_exists():
    splits = make_imdb_splits("embedded", seed=0, reward_size=5000, policy_size=10000, validation_size=2000)
    total = sum(len(splits[k]) for k in ("reward", "policy", "validation"))
    assert total <= 3000 and len(splits["policy"]) > len(splits["reward"]) > len(splits["validation"]) > 0
    _check_splits(splits)


def test_files_are_sorted_by_label_so_unshuffled_splits_would_be_one_class():
    raw = load_imdb("embedded", "train")
    assert set(raw.select(range(1000))["label"]) == {0}  # what shuffling before splitting prevents


@pytest.mark.skipif(not SHARED_IMDB.exists(), reason="needs ../shared/data/imdb (full IMDB); the embedded sample is tested above")
def test_full_imdb_default_splits():
    splits = make_imdb_splits(str(SHARED_IMDB), seed=42)
    # IMDB test repeats 201 of its reviews and shares 123 with IMDB train: all dropped (clean_test_split)
    assert [len(splits[k]) for k in ("reward", "policy", "validation", "test")] == [5000, 10000, 2000, 24676]
    _check_splits(splits)
    train = {" ".join(clean_review(t).lower().split()) for t in load_imdb(str(SHARED_IMDB), "train")["text"]}
    test = [" ".join(clean_review(t).lower().split()) for t in splits["test"]["text"]]
    assert len(set(test)) == len(test) and not set(test) & train


def test_the_test_split_drops_repeats_and_reviews_the_training_data_has(tmp_path, caplog):
    """A test file that repeats 50 training reviews (one with other case and spacing) and one of its own is cleaned,
    with one warning line; reviews that only look alike (other words) stay."""
    train = [{"text": f"Review number {i}. It was {'good' if i % 2 else 'bad'}.", "label": i % 2} for i in range(200)]
    test = [{"text": f"Test review {i}. Quite {'fine' if i % 2 else 'poor'}.", "label": i % 2} for i in range(100)]
    test += [dict(row) for row in train[:49]] + [{"text": "  REVIEW number 49.   It was good. ", "label": 1}] + [dict(test[0])]
    for name, rows in (("train", train), ("test", test)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    with caplog.at_level("WARNING", logger="grade_trl.data.imdb"):
        splits = make_imdb_splits(str(tmp_path), seed=0, reward_size=50, policy_size=100, validation_size=50)
    assert sorted(splits["test"]["text"]) == sorted(r["text"] for r in test[:100])
    assert [r.getMessage() for r in caplog.records] == ["IMDB test: dropped 1 repeated reviews and 50 that IMDB train also has (case and whitespace ignored); 100 test reviews remain"]


def test_local_parquet_and_jsonl_files(tmp_path):
    rows = [{"text": f"review {i}. It was {'good' if i % 2 else 'bad'}.", "label": i % 2} for i in range(20)]
    with open(tmp_path / "train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    assert len(load_imdb(str(tmp_path), "train")) == 20
    load_imdb(str(tmp_path), "train").to_parquet(str(tmp_path / "x.parquet"))
    assert load_imdb(str(tmp_path / "x.parquet"), "train")["label"] == [r["label"] for r in rows]
    with gzip.open(tmp_path / "bad.jsonl.gz", "wt") as f:
        f.write(json.dumps({"review": "no text column"}) + "\n")
    with pytest.raises(ValueError, match="lacks columns"):
        load_imdb(str(tmp_path / "bad.jsonl.gz"), "train")


def test_review_prompt_rules():
    text = "Great film!<br /><br />The second sentence is here. A third one that is not used."
    assert clean_review(text) == "Great film! The second sentence is here. A third one that is not used."
    assert review_prompt(text) == "Great film! The second sentence is here."
    long = "word " * 100 + "end."
    prompt = review_prompt(long)
    assert len(prompt) <= 200 and prompt.startswith("word")


def test_prompt_dataset_respects_char_and_token_limits(tokenizer):
    splits = make_imdb_splits("embedded", seed=1, reward_size=10, policy_size=200, validation_size=10)
    prompts = prompt_dataset(splits["policy"], tokenizer, max_chars=200, max_tokens=32)
    assert prompts.column_names == ["label", "prompt"]
    for p in prompts["prompt"]:
        assert 0 < len(p) <= 200 and "<br" not in p
        assert len(tokenizer(p, add_special_tokens=False)["input_ids"]) <= 32
