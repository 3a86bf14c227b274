"""Tasks: what is optimised (data splits, prompts, rewards), independent of how (the trainers).

A trainer never knows which task it runs; the runner builds a task and hands its prompt
datasets and reward callables to whichever method the recipe names.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from accelerate import PartialState
from datasets import Dataset

from .data.imdb import clean_review, make_imdb_splits, prompt_dataset
from .models import resolve_model_path
from .rewards.length import LengthReward
from .rewards.sentiment import SentimentReward, SentimentRewardModel, has_trained_head, train_sentiment_head

logger = logging.getLogger(__name__)


@dataclass
class Task:
    name: str
    train_dataset: Dataset  # `prompt` column
    validation_prompts: list[str]
    test_prompts: list[str]
    reward_funcs: list
    info: dict = field(default_factory=dict)  # e.g. the reward model's held-out accuracy


def imdb_prompt_splits(run, tokenizer, seed: int) -> tuple[dict, dict]:
    """Disjoint IMDB splits and the `prompt` datasets of the policy, validation and test splits."""
    splits = make_imdb_splits(
        run.dataset_name,
        seed=seed,
        reward_size=run.reward_split_size,
        policy_size=run.policy_split_size,
        validation_size=run.validation_split_size,
        test_size=run.test_split_size,
    )
    prompts = {name: prompt_dataset(splits[name], tokenizer, run.prompt_max_chars, run.max_prompt_length) for name in ("policy", "validation", "test")}
    return splits, prompts


def _task(name: str, run, splits, prompts, reward_funcs, **info) -> Task:
    return Task(
        name=name,
        train_dataset=prompts["policy"].select_columns(["prompt"]),
        validation_prompts=prompts["validation"]["prompt"][: run.eval_num_prompts],
        test_prompts=prompts["test"]["prompt"][: run.test_num_prompts],
        reward_funcs=reward_funcs,
        info={**info, "split_sizes": {name: len(split) for name, split in splits.items()}},
    )


def build_imdb_sentiment(run, tokenizer, seed: int) -> Task:
    """IMDB prompts and the learned sentiment reward (trained on the reward split when no head exists)."""
    splits, prompts = imdb_prompt_splits(run, tokenizer, seed)
    reward_model, info = load_or_train_sentiment_model(run, tokenizer, splits, seed)
    reward = SentimentReward(reward_model, tokenizer, include_prompt=run.reward_input == "prompt_completion")
    return _task("imdb_sentiment", run, splits, prompts, [reward], reward_model=info)


def build_length(run, tokenizer, seed: int) -> Task:
    """IMDB prompts and the length reward `2 - words / 16` (shorter is better)."""
    splits, prompts = imdb_prompt_splits(run, tokenizer, seed)
    return _task("length", run, splits, prompts, [LengthReward(tokenizer.eos_token_id)])


def load_or_train_sentiment_model(run, tokenizer, splits, seed: int) -> tuple[SentimentRewardModel, dict]:
    """Reuse the head at `reward_model_path` if it was trained on this backbone, else train and save it there."""
    backbone = run.reward_backbone or run.model_name_or_path
    path = run.reward_model_path
    with PartialState().main_process_first():  # the main process trains and saves; the others then load
        if has_trained_head(path):
            model = SentimentRewardModel.load(path, backbone)
            trained_on = model.metadata.get("backbone_path")
            if trained_on and trained_on != resolve_model_path(backbone):
                raise ValueError(
                    f"reward_model_path {path!r} holds a head trained on {trained_on!r}, not on {backbone!r}; "
                    "point reward_model_path at a new folder to train one for this backbone"
                )
            logger.info("reusing sentiment reward head from %s (held-out accuracy %.3f)", path, model.metadata.get("heldout_accuracy", float("nan")))
            return model, model.metadata
        model = SentimentRewardModel.from_backbone(backbone)
        metrics = train_sentiment_head(
            model,
            tokenizer,
            [clean_review(t) for t in splits["reward"]["text"]],
            splits["reward"]["label"],
            [clean_review(t) for t in splits["validation"]["text"]],
            splits["validation"]["label"],
            max_length=run.reward_max_length,
            epochs=run.reward_epochs,
            learning_rate=run.reward_learning_rate,
            seed=seed,
        )
        metadata = {**metrics, "backbone_path": resolve_model_path(backbone), "dataset": run.dataset_name, "seed": seed}
        if PartialState().is_main_process:
            model.save(path, metadata)
        model.metadata = {"backbone": backbone, **metadata}
        logger.info("trained sentiment reward head: held-out accuracy %.3f on %d validation reviews", metrics["heldout_accuracy"], metrics["heldout_size"])
        return model, model.metadata


TASK_BUILDERS = {"imdb_sentiment": build_imdb_sentiment, "length": build_length}
