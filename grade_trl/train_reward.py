"""Train the sentiment reward head a recipe uses, without training a policy.

    python -m grade_trl.train_reward RECIPE.yaml [--key value ...] [--force]

Uses the recipe's data, split sizes, seed, backbone and `reward_model_path`. An existing head is
reused unless `--force` is given. Prints the held-out accuracy on the validation split. Runs
launched from the recipe train the head themselves when it is missing; this command is for
training it once up front, or again after changing its settings.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from .recipe import RecipeError, parse_recipe
from .rewards.sentiment import HEAD_FILE


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    force = "--force" in argv
    argv = [a for a in argv if a != "--force"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        recipe = parse_recipe(argv)
        from .data.imdb import make_imdb_splits
        from .models import load_tokenizer
        from .run import loading
        from .tasks import load_or_train_sentiment_model

        run = recipe.run
        if force and (Path(run.reward_model_path) / HEAD_FILE).exists():
            (Path(run.reward_model_path) / HEAD_FILE).unlink()
        with loading("model_name_or_path", run.model_name_or_path):
            tokenizer = load_tokenizer(run.reward_backbone or run.model_name_or_path)
        with loading("dataset_name", run.dataset_name):
            splits = make_imdb_splits(run.dataset_name, recipe.config.seed, run.reward_split_size, run.policy_split_size, run.validation_split_size)
            _, info = load_or_train_sentiment_model(run, tokenizer, splits, recipe.config.seed)
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"reward head at {run.reward_model_path}: held-out accuracy {info['heldout_accuracy']:.3f} on {info['heldout_size']} validation reviews")
    return 0


if __name__ == "__main__":
    sys.exit(main())
