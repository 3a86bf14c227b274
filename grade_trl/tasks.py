"""Tasks: what is optimised (data splits, prompts, rewards), independent of how (the trainers).

A trainer never knows which task it runs; the runner builds a task and hands its prompt
datasets and reward callables to whichever method the recipe names.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

from accelerate import PartialState
from datasets import Dataset

from .data.custom import make_custom_splits
from .data.custom import prompt_dataset as custom_prompt_dataset
from .data.gsm8k import make_gsm8k_splits
from .data.imdb import clean_review, load_imdb, make_imdb_splits, prompt_dataset
from .errors import UserError, loading
from .evaluation import Evaluator, GenerationSettings, RewardEvaluator
from .evaluation_gsm8k import GSM8KEvaluator
from .models import fingerprint, learned_positions, resolve_model_path
from .rewards.base import NOT_PASSED_COLUMNS, MeanReward
from .rewards.gsm8k import GSM8KCorrectness, GSM8KFormat
from .rewards.imports import reward_specs
from .rewards.length import LengthReward
from .rewards.sentiment import META_FILE, SentimentReward, SentimentRewardModel, has_trained_head, read_head_metadata, train_sentiment_head

logger = logging.getLogger(__name__)


@dataclass
class Task:
    name: str
    train_dataset: Dataset  # `prompt` column, plus any columns the reward functions take as kwargs
    reward_funcs: list
    evaluator: Evaluator  # what validation and test measure
    info: dict = field(default_factory=dict)  # e.g. the reward model's held-out accuracy


def imdb_prompt_splits(run, tokenizer, seed: int) -> tuple[dict, dict]:
    """Disjoint IMDB splits and the `prompt` datasets of the policy, validation and test splits."""
    with loading("dataset_name", run.dataset_name):
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


def evaluation_size(key: str, count: int, available: int, split: str) -> int:
    """`count` prompts of a split that has `available`: all of them, with a warning, when it asks for more."""
    if count > available:
        logger.warning("%s %d is more than the %d %s prompts there are: evaluating on all %d", key, count, available, split, available)
    return min(count, available)


def _imdb_task(name: str, run, splits, prompts, reward_funcs, settings: GenerationSettings, weights, judge=None, **info) -> Task:
    evaluation_prompts = {
        split: prompts[split]["prompt"][: evaluation_size(key, getattr(run, key), len(prompts[split]), split)]
        for split, key in (("validation", "eval_num_prompts"), ("test", "test_num_prompts"))
    }
    return Task(
        name=name,
        train_dataset=prompts["policy"].select_columns(["prompt"]),
        reward_funcs=reward_funcs,
        evaluator=RewardEvaluator(evaluation_prompts, reward_funcs, settings, weights, judge=judge, best_of_n=run.eval_best_of_n),
        info={**info, "split_sizes": {name: len(split) for name, split in splits.items()}},
    )


def build_imdb_sentiment(run, tokenizer, seed: int, settings: GenerationSettings, weights=None) -> Task:
    """IMDB prompts, the learned sentiment reward (trained on the reward split when no head exists), a gold judge."""
    splits, prompts = imdb_prompt_splits(run, tokenizer, seed)
    reward_model, info = load_or_train_sentiment_model(run, tokenizer, splits, seed)
    reward = SentimentReward(reward_model, tokenizer, include_prompt=run.reward_input == "prompt_completion")
    judge = build_gold_judge(run.gold_judge, run.dataset_name, seed)
    judge_info = {"gold_judge": run.gold_judge, "gold_judge_test_accuracy": judge.test_accuracy} if judge else {}
    return _imdb_task("imdb_sentiment", run, splits, prompts, [reward], settings, weights, judge, reward_model=info, **judge_info)


def build_length(run, tokenizer, seed: int, settings: GenerationSettings, weights=None) -> Task:
    """IMDB prompts and the length reward `2 - words / 16` (shorter is better); the reward is exact, no judge."""
    splits, prompts = imdb_prompt_splits(run, tokenizer, seed)
    return _imdb_task("length", run, splits, prompts, [LengthReward(tokenizer.eos_token_id)], settings, weights)


@functools.lru_cache(maxsize=4)
def build_gold_judge(spec: str, dataset_name: str, seed: int, max_test_reviews: int = 5000):
    """`tfidf`: TF-IDF + logistic regression fitted on the IMDB train reviews; `none`; or a classifier's hub id/path.

    Its accuracy on (at most `max_test_reviews` of) the IMDB test reviews is kept as `test_accuracy`. Cached per
    process (several runs in one process, tests and notebooks, share it) and, for `tfidf`, on disk between runs
    (`rewards.judge.fitted_tfidf_judge`: the fit is deterministic, about 30 s on the full IMDB train set).
    """
    from .rewards.judge import ClassifierJudge, fitted_tfidf_judge

    if spec == "none":
        return None
    with loading("dataset_name", dataset_name):
        test = load_imdb(dataset_name, "test").shuffle(seed=seed)
        train = load_imdb(dataset_name, "train") if spec == "tfidf" else None
    test = test.select(range(min(max_test_reviews, len(test))))
    if spec == "tfidf":  # kept on disk between runs (`fitted_tfidf_judge`); [:] reads a column in one go
        judge = fitted_tfidf_judge(train["text"][:], train["label"][:])
    else:
        with loading("gold_judge", spec):
            judge = ClassifierJudge(spec)
    judge.test_accuracy = judge.accuracy([clean_review(t) for t in test["text"][:]], test["label"][:])
    logger.info("gold judge %s: accuracy %.3f on %d IMDB test reviews", spec, judge.test_accuracy, len(test))
    return judge


def load_or_train_sentiment_model(run, tokenizer, splits, seed: int, force: bool = False) -> tuple[SentimentRewardModel, dict]:
    """Reuse the head at `reward_model_path` if it was trained on this backbone, else train and save it there
    (`force`: train it again even where one exists; the new head replaces the old one only once it is trained)."""
    backbone = run.reward_backbone or run.model_name_or_path
    key = "reward_backbone" if run.reward_backbone else "model_name_or_path"
    path = run.reward_model_path
    with PartialState().main_process_first():  # the main process trains and saves; the others then load
        if has_trained_head(path) and not force:
            try:
                metadata = read_head_metadata(path)
            except (OSError, ValueError) as error:  # unreadable, or not JSON (a copy cut short)
                raise UserError(f"reward_model_path: cannot read the head's {META_FILE} in {path!r} ({str(error).splitlines()[0]}); train it again "
                                "with `python -m grade_trl.train_reward RECIPE.yaml --force`, or point reward_model_path at a new folder") from None
            # The backbone as the recipe names it (`embedded`, a hub id) identifies it on every machine; the resolved
            # path only on the one that trained it (heads saved before the name was recorded have the path only).
            trained_on, trained_on_path = metadata.get("backbone"), metadata.get("backbone_path")
            if trained_on != backbone and trained_on_path and trained_on_path != resolve_model_path(backbone):
                raise UserError(
                    f"reward_model_path: {path!r} holds a head trained on {trained_on or trained_on_path!r}, not on {backbone!r}; "
                    "point reward_model_path at a new folder to train one for this backbone"
                )
            with loading(key, backbone):  # reads the backbone's config and weights files
                current = fingerprint(backbone)
            if metadata.get("backbone_fingerprint") is not None and current is not None and metadata["backbone_fingerprint"] != current:
                raise UserError(
                    f"reward_model_path: {path!r} holds a head trained on an earlier {backbone!r} (its config or weights have changed "
                    "since); train it again with `python -m grade_trl.train_reward RECIPE.yaml --force`, or point reward_model_path at a new folder"
                )
            with loading(key, backbone):
                model = SentimentRewardModel.from_backbone(backbone)
            with loading("reward_model_path", path):  # a damaged head file is the head's folder's fault, not the backbone's
                try:
                    model.load_head(path)
                except RuntimeError as error:  # the head's shape does not fit this backbone's width
                    raise UserError(f"reward_model_path: {path!r} holds a head that does not fit {backbone!r} ({str(error).splitlines()[-1].strip()}); "
                                    "point reward_model_path at a new folder to train one for this backbone") from None
            check_reward_max_length(run, model, backbone, key)
            logger.info("reusing sentiment reward head from %s (held-out accuracy %.3f)", path, model.metadata.get("heldout_accuracy", float("nan")))
            return model, model.metadata
        if len(splits["reward"]) == 0:
            raise UserError("reward_split_size: 0 reviews to train the sentiment reward head on; give at least 1 (a few hundred for a useful head)")
        with loading(key, backbone):
            model = SentimentRewardModel.from_backbone(backbone)
        check_reward_max_length(run, model, backbone, key)
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
        metadata = {**metrics, "backbone_path": resolve_model_path(backbone), "backbone_fingerprint": fingerprint(backbone), "dataset": run.dataset_name, "seed": seed}
        if PartialState().is_main_process:
            try:
                model.save(path, metadata)
            except OSError as error:  # checked before anything was loaded (recipe.check_writable_folder); the disk may still fill
                raise UserError(f"reward_model_path: cannot save the trained head into {path!r} ({error.strerror or error}); "
                                "give a folder you can write to") from None
        model.metadata = {"backbone": backbone, **metadata}
        logger.info("trained sentiment reward head: held-out accuracy %.3f on %d validation reviews", metrics["heldout_accuracy"], metrics["heldout_size"])
        return model, model.metadata


def check_reward_max_length(run, model: SentimentRewardModel, backbone: str, key: str) -> None:
    """The reward scores at most `reward_max_length` tokens, which the backbone must have positions for (an index
    error deep in the first scoring otherwise)."""
    limit = learned_positions(model.backbone.config)
    if limit is not None and run.reward_max_length > limit:
        raise UserError(f"reward_max_length: {run.reward_max_length} tokens, but the reward backbone {backbone!r} ({key}) has {limit} positions; set it to at most {limit}")


def build_gsm8k(run, tokenizer, seed: int, settings: GenerationSettings, weights=None) -> Task:
    """GSM8K problems, the binary correctness reward plus the format reward, greedy accuracy evaluation.

    Validation: the first `eval_num_problems` test problems (as the users evaluated); test: the first
    `test_num_problems` (or all). The train dataset keeps `answer` (the gold number), which reaches the
    rewards as a keyword, as in TRL. Test problems are fixed by file order, so `seed` does not change them.
    """
    with loading("dataset_name", run.dataset_name):
        splits, info = make_gsm8k_splits(run.dataset_name, tokenizer, run.max_prompt_length, run.eval_num_problems, run.test_num_problems,
                                         chat_template_kwargs=settings.chat_template_kwargs)
    reward_funcs = [GSM8KCorrectness(tokenizer=tokenizer), GSM8KFormat(tokenizer)]  # the tokenizer: a thinking model's answer is read after its thinking
    problems = {"validation": splits["validation"], "test": splits["test"]}
    return Task(
        name="gsm8k",
        train_dataset=splits["train"].select_columns(["prompt", "answer"]),
        reward_funcs=reward_funcs,
        evaluator=GSM8KEvaluator(problems, reward_funcs, settings, weights, pass_k=run.eval_pass_k),
        info=info,
    )


def build_custom(run, tokenizer, seed: int, settings: GenerationSettings, weights=None) -> Task:
    """The recipe's own data set and reward functions (import paths), evaluated as IMDB is: the weighted reward,
    each function's mean, best-of-N, diversity, and `eval_reward_funcs` (if any) as the gold score.

    Every column besides the prompt reaches the reward functions (and the judge) as a keyword list, in training as in
    evaluation. Validation/test rows are fixed by the data and HOLD_OUT_SEED, so `seed` does not change them.
    """
    specs = reward_specs("reward_funcs", run.reward_funcs, "reward_kwargs", run.reward_kwargs)
    eval_specs = reward_specs("eval_reward_funcs", run.eval_reward_funcs, "eval_reward_kwargs", run.eval_reward_kwargs)
    dropped = {}

    def prepare(rows, name: str):
        check_custom_columns(run, name, rows, {"reward_funcs": specs, "eval_reward_funcs": eval_specs})
        prompts, dropped[name] = custom_prompt_dataset(rows, run.prompt_column, tokenizer, run.model_name_or_path, run.max_prompt_length, name,
                                                       settings.chat_template_kwargs)
        if len(prompts) == 0:
            raise UserError(f"max_prompt_length: no {name} prompt of {run.dataset_name!r} fits in {run.max_prompt_length} tokens; raise max_prompt_length")
        return prompts

    with loading("dataset_name", run.dataset_name):
        splits = make_custom_splits(run, prepare)  # prompts too long are dropped before validation and test rows are held out
    if any(dropped.values()):
        logger.warning("custom task: dropped %s prompts longer than max_prompt_length %d tokens", dropped, run.max_prompt_length)
    reward_funcs = [spec.build(tokenizer) for spec in specs]
    judge = MeanReward([spec.build(tokenizer, "eval_reward_funcs") for spec in eval_specs]) if eval_specs else None
    limits = {"validation": "eval_num_prompts", "test": "test_num_prompts"}
    evaluation = {name: splits[name].select(range(evaluation_size(key, getattr(run, key), len(splits[name]), name))) for name, key in limits.items()}
    columns = {name: {c: list(rows[c]) for c in rows.column_names if c not in NOT_PASSED_COLUMNS} for name, rows in evaluation.items()}
    prompts = {name: list(rows["prompt"]) for name, rows in evaluation.items()}
    evaluator = RewardEvaluator(prompts, reward_funcs, settings, weights, judge=judge, best_of_n=run.eval_best_of_n, columns=columns)
    info = {
        "dataset": run.dataset_name,
        "reward_funcs": list(run.reward_funcs),
        "eval_reward_funcs": list(run.eval_reward_funcs or []),
        "split_sizes": {name: len(rows) for name, rows in splits.items()},
        "dropped_long_prompts": dropped,
    }
    return Task(name="custom", train_dataset=splits["train"], reward_funcs=reward_funcs, evaluator=evaluator, info=info)


def check_custom_columns(run, split: str, rows, specs: dict) -> None:
    """The prompt column and every column a reward function takes (by key: its specs) are in the `split` rows: a one-line
    UserError otherwise, before any reward or trainer is built, so the runner writes nothing. A column whose every value
    is None counts as missing: `datasets` gives each split of a folder the union of its files' columns and fills a
    file's missing ones with None (a test.jsonl without the reward's column would have failed at the final test)."""
    columns = [c for c in rows.column_names if any(value is not None for value in rows[c])]
    if run.prompt_column not in columns:
        raise UserError(f"prompt_column: the {split} rows of {run.dataset_name!r} have no column {run.prompt_column!r}; their columns: {', '.join(columns)}")
    for key, group in specs.items():
        for spec in group:
            missing = [c for c in spec.columns if c not in columns]
            if missing:
                raise UserError(
                    f"{key}: {spec.path} takes the column(s) {', '.join(missing)}, which the {split} rows of {run.dataset_name!r} lack "
                    f"(columns: {', '.join(columns)}); add them to the data or give the parameters defaults"
                )


TASK_BUILDERS = {"imdb_sentiment": build_imdb_sentiment, "length": build_length, "gsm8k": build_gsm8k, "custom": build_custom}
