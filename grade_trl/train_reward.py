"""Train the sentiment reward head a recipe uses, without training a policy.

    python -m grade_trl.train_reward RECIPE.yaml [--key value ...] [--force]

Uses the recipe's data, split sizes, seed, backbone and `reward_model_path`. An existing head is
reused unless `--force` is given. Prints the held-out accuracy on the validation split. Runs
launched from the recipe train the head themselves when it is missing; this command is for
training it once up front, or again after changing its settings.
"""

from __future__ import annotations

from .errors import UserError, loading, stop_in_one_line_while_importing

if __name__ == "__main__":  # Ctrl-C during the imports below (the recipe's configs): one line, not a traceback
    stop_in_one_line_while_importing()

from .cli import Command, Option, check_writable_folder, exit_process  # noqa: E402 - after the handling above
from .recipe import build_recipe, load_recipe_file, recipe_list_keys

COMMAND = Command(
    prog="grade_trl.train_reward",
    description=__doc__.split("\n\n")[0],
    positional="RECIPE.yaml",
    forwards_overrides=True,
    override_list_keys=recipe_list_keys,
    options=(Option("force", bool, False, "Train the head again even where one exists."),),
    epilog="Every other --key value is a recipe override.",
)


def train_reward(paths: list[str], options: dict, overrides: dict) -> int:
    from .data.imdb import make_imdb_splits
    from .models import has_tokenizer_files, load_tokenizer
    from .tasks import load_or_train_sentiment_model

    recipe = build_recipe({**load_recipe_file(paths[0]), **overrides}, bare_keys=getattr(overrides, "bare", ()))
    run = recipe.run
    if run.task != "imdb_sentiment":
        raise UserError(f"task: {run.task!r} has no sentiment reward head to train; train_reward trains the head of task imdb_sentiment (the IMDB recipes)")
    key, backbone = ("reward_backbone", run.reward_backbone) if run.reward_backbone else ("model_name_or_path", run.model_name_or_path)
    if not has_tokenizer_files(backbone):
        raise UserError(f"{key}: {backbone!r} has no tokenizer files (tokenizer.json, or vocab.json and merges.txt, ...); copy the tokenizer of the model it was trained with into it")
    with loading(key, backbone):
        tokenizer = load_tokenizer(backbone)
    with loading("dataset_name", run.dataset_name):
        splits = make_imdb_splits(run.dataset_name, recipe.config.seed, run.reward_split_size, run.policy_split_size, run.validation_split_size)
    if options["force"]:  # where no head is, the recipe's check has already looked
        check_writable_folder("reward_model_path", run.reward_model_path)
    # --force trains again; the new head replaces the old one only once trained (a failure leaves the old one);
    # the loads inside name their own keys (reward_backbone / model_name_or_path, reward_model_path)
    _, info = load_or_train_sentiment_model(run, tokenizer, splits, recipe.config.seed, force=options["force"])
    print(f"reward head at {run.reward_model_path}: held-out accuracy {info['heldout_accuracy']:.3f} on {info['heldout_size']} validation reviews")
    return 0


def main(argv: list[str] | None = None) -> int:
    return COMMAND.main(argv, train_reward)


if __name__ == "__main__":
    exit_process(main)
