"""Task `custom`: the recipe's own data set and reward functions (import paths), as `trl grpo --reward_funcs` takes them.

Bad input is table-driven, as in test_bad_input.py: recipe values are refused by `build_recipe` (before anything
loads); data that does not fit the rewards is refused by the runner after the data loads, before the trainer is
built: one line naming the key, exit code 2, nothing written. The runs use recipes/examples/custom_task.yaml shrunk
to seconds: 2 optimizer steps, 6 new tokens, 2 validation and 2 test prompts, best-of-N off, evaluation at the ends.
"""

import contextlib
import io
import json
import logging
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from grade_trl import metrics
from grade_trl.models import resolve_model_path
from grade_trl.recipe import RecipeError, build_recipe
from grade_trl.run import main

from .conftest import REPO

EXAMPLES = REPO / "recipes" / "examples"
EXAMPLE_RECIPE = str(EXAMPLES / "custom_task.yaml")
EXAMPLE_DATA = str(EXAMPLES / "prompts.jsonl")


@pytest.fixture
def example_rewards_importable(monkeypatch):
    """What the runner does for a recipe file: its folder is importable (build_recipe alone is given no file)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))


BASE = {"output_dir": "x", "task": "custom", "method": "reinforce", "dataset_name": EXAMPLE_DATA, "reward_funcs": ["my_rewards.keyword_reward"]}
# (recipe values over BASE, the key the one-line error must start with, a fragment it must hold)
RECIPE_CASES = [
    ({"reward_funcs": ["no_such_module.reward"]}, "reward_funcs", "cannot import module 'no_such_module'"),
    ({"reward_funcs": ["my_rewards.keywrd_reward"]}, "reward_funcs", "did you mean my_rewards.keyword_reward?"),
    ({"reward_funcs": ["keyword_reward"]}, "reward_funcs", "is not an import path"),
    ({"reward_funcs": ["/home/me/my_rewards.py:keyword_reward"]}, "reward_funcs", "'/home/me/my_rewards.py:keyword_reward' is a file path, not an import path; put the file"),
    ({"reward_funcs": ["rewards/my_rewards.keyword_reward"]}, "reward_funcs", "is a file path, not an import path"),
    ({"reward_funcs": ["my_rewards.re"]}, "reward_funcs", "is a module, not a function or class"),
    ({"reward_funcs": ["grade_trl.evaluation.distinct_n"]}, "reward_funcs", "has the wrong signature"),
    ({"reward_funcs": ["grade_trl.rewards.base.CheckedReward"]}, "reward_kwargs", "missing a required argument: 'func'"),
    ({"reward_funcs": ["grade_trl.rewards.sentiment.SentimentRewardModel"]}, "reward_funcs", "is a torch.nn.Module, which TRL's GRPOTrainer would run"),
    ({"reward_funcs": []}, "reward_funcs", "needs at least one reward function"),
    ({"reward_funcs": None}, "reward_funcs", "needs at least one reward function"),
    ({"eval_reward_funcs": ["my_rewards.nothing"]}, "eval_reward_funcs", "has no 'nothing'"),
    ({"method": "grade_ste"}, "method 'grade_ste' cannot train reward 'my_rewards.keyword_reward'", "lacks `differentiable = True` and a `score_soft"),
    ({"method": "grade", "reward_funcs": ["my_rewards.PositiveWords", "my_rewards.keyword_reward"]}, "method 'grade' cannot train reward 'my_rewards.keyword_reward'", "use reinforce"),
    ({"reward_weights": [1.0, 2.0]}, "reward_weights", "2 weights for 1 reward_funcs"),
    ({"reward_kwargs": {"my_rewards.keyword_reward": {"x": 1}}}, "reward_kwargs", "not a class"),
    ({"reward_kwargs": {"my_rewards.PositiveWords": {"words": ["fun"]}}}, "reward_kwargs", "is not one of reward_funcs"),
    # a misspelt key beside a class that needs its arguments: named as the typo, not as the class missing them
    ({"reward_funcs": ["grade_trl.rewards.base.CheckedReward"], "reward_kwargs": {"grade_trl.rewards.base.CheckedRewards": {"func": 1}}}, "reward_kwargs",
     "'grade_trl.rewards.base.CheckedRewards' is not one of reward_funcs ['grade_trl.rewards.base.CheckedReward']; did you mean 'grade_trl.rewards.base.CheckedReward'?"),
    ({"reward_funcs": ["my_rewards.PositiveWords"], "reward_kwargs": {"my_rewards.PositiveWords": {"colour": "red"}}}, "reward_kwargs", "unexpected keyword argument 'colour'"),
    # the closest path a function: it takes no arguments (it was suggested as if it could)
    ({"reward_funcs": ["my_rewards.keyword_reward", "my_rewards.PositiveWords"], "reward_kwargs": {"my_rewards.keyword_rewards": {"x": 1}}}, "reward_kwargs",
     "['my_rewards.keyword_reward', 'my_rewards.PositiveWords']; 'my_rewards.keyword_reward' is a function, which takes none; key reward_kwargs by the path of a reward class"),
    ({"reward_funcs": ["my_rewards.PositiveWords"], "reward_kwargs": {"my_rewards.PositiveWords": ["fun"]}}, "reward_kwargs", "must be a mapping"),
    ({"dataset_name": None}, "dataset_name", "needs your data set"),
    # a reward file named as a module of Python's (test.py, code.py) is behind it on the import path (a journey audit:
    # "module 'test' has no 'kw_len'" left the user guessing)
    ({"reward_funcs": ["test.keyword_reward"]}, "reward_funcs", "module 'test' is Python's own"),
    ({"reward_funcs": ["code.keyword_reward"]}, "reward_funcs", "if the reward is in a code.py of yours, Python's module comes first on the import path: rename yours"),
    ({"dataset_name": "./no/such/file.jsonl"}, "dataset_name", "no such file"),
    ({"task": "imdb_sentiment"}, "reward_funcs", "only task custom reads it"),
    ({"task": "length", "reward_funcs": None, "prompt_column": "text"}, "prompt_column", "only task custom reads it"),
]


@pytest.mark.parametrize("values,key,fragment", RECIPE_CASES, ids=[f"{i}-{c[1][:30]}" for i, c in enumerate(RECIPE_CASES)])
def test_a_bad_custom_recipe_is_one_line_naming_its_key(example_rewards_importable, values, key, fragment):
    merged = {k: v for k, v in {**BASE, **values}.items() if v is not None}
    with pytest.raises(RecipeError) as info:
        build_recipe(merged)
    message = str(info.value)
    assert "\n" not in message and message.startswith(key) and fragment in message, message


def test_a_reward_module_that_fails_in_its_own_code_is_not_blamed_on_where_it_lies(tmp_path, monkeypatch):
    """A module that was found and raised while importing (or imports what is not installed) was told it "must be
    importable from the current directory, the recipe's folder or an installed package" (a 2026-12-07 trial)."""
    (tmp_path / "raising_rewards.py").write_text('raise RuntimeError("config file missing")\n')
    (tmp_path / "needy_rewards.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cases = [("raising_rewards.f", "reward_funcs: importing module 'raising_rewards' of 'raising_rewards.f' raised RuntimeError: config file missing; "
              "fix the module where it fails"),
             ("needy_rewards.f", "reward_funcs: importing module 'needy_rewards' of 'needy_rewards.f' raised ModuleNotFoundError: No module named "
              "'no_such_dependency_xyz'; fix the module (or install what it imports)"),
             ("no_such_package_xyz.rewards.f", "reward_funcs: cannot import module 'no_such_package_xyz.rewards' of 'no_such_package_xyz.rewards.f' "
              "(ModuleNotFoundError: No module named 'no_such_package_xyz'); it must be importable from")]
    for path, expected in cases:
        with pytest.raises(RecipeError) as info:
            build_recipe({**BASE, "reward_funcs": [path]})
        assert str(info.value).startswith(expected), str(info.value)


def test_good_custom_recipes_build(example_rewards_importable):
    recipe = build_recipe({**BASE, "reward_funcs": ["my_rewards.keyword_reward", "length"], "reward_weights": [1.0, 0.5]})
    assert recipe.run.task == "custom" and recipe.config.reward_weights == [1.0, 0.5]
    grade = build_recipe({**BASE, "method": "grade_ste", "reward_funcs": ["my_rewards.PositiveWords", "length"]})  # both differentiable
    assert grade.run.reward_funcs == ["my_rewards.PositiveWords", "length"]


USER_REWARDS = '''
def keyword_reward(prompts, completions, keyword, **kwargs):
    return [float(k in c) for c, k in zip(completions, keyword)]

def nan_reward(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)

def exiting_reward(prompts, completions, **kwargs):
    import sys
    sys.exit(3)

def by_step(prompts, completions, trainer_state, log_metric, log_extra, **kwargs):  # TRL's keywords, in training and evaluation
    log_metric("by_step_calls", 1.0)
    log_metric("by_step_step", trainer_state.global_step)
    log_extra("by_step_note", ["x"] * len(completions))
    return [min(trainer_state.global_step, 1) * 1.0] * len(completions)

def as_trl_hands_them(prompts, completions, completion_ids, **kwargs):
    # TRL's conversational format: each prompt its messages, each completion one assistant message; the token ids too
    for prompt, completion, ids in zip(prompts, completions, completion_ids):
        assert isinstance(prompt, list) and prompt[-1]["role"] == "user", f"prompt {prompt!r}"
        assert isinstance(completion, list) and completion[0]["role"] == "assistant" and isinstance(completion[0]["content"], str), f"completion {completion!r}"
        assert isinstance(ids, list) and ids and all(isinstance(t, int) for t in ids), f"completion_ids {ids!r}"
    return [len(ids) / 10 for ids in completion_ids]

def takes_completion(prompts, completions, completion, **kwargs):
    return [1.0] * len(completions)

def reads_the_thinking(prompts, completions, **kwargs):
    # a thinking model's completions, parsed as TRL parses them: the generation prompt opened <think>, so the text up to
    # </think> is reasoning_content (and all of it, when the completion ends inside the thinking)
    for completion in completions:
        assert set(completion[0]) == {"role", "reasoning_content", "content"}, f"completion {completion!r}"
    return [float(len(c[0]["reasoning_content"])) for c in completions]
'''


def _rows(n, **extra):
    return [{"prompt": f"The film number {i} was", "keyword": "good", **extra} for i in range(n)]


# (name, data rows, recipe lines, the expected start of the one error line)
DATA_CASES = [
    ("no prompt column", [{"text": r["prompt"], "keyword": "good"} for r in _rows(20)], {}, "prompt_column: the train rows of"),
    ("prompt column named wrong", _rows(20), {"prompt_column": "question"}, "prompt_column: the train rows of"),
    ("a column the reward takes is missing", [{"prompt": r["prompt"]} for r in _rows(20)], {}, "reward_funcs: user_rewards.keyword_reward takes the column(s) keyword"),
    ("chat messages without a chat template", [{"prompt": [{"role": "user", "content": "Hi"}], "keyword": "a"}] * 20, {}, "prompt_column: 'prompt' holds chat messages, but the tokenizer"),
    ("prompts that are numbers", [{"prompt": i, "keyword": "a"} for i in range(20)], {}, "prompt_column: 'prompt' holds int values"),
    ("a null prompt (an empty csv cell)", _rows(19) + [{"prompt": None, "keyword": "a"}], {"validation_split": "train", "test_split": "train"},
     "prompt_column: 'prompt' has 1 null in the 20 rows of the train split"),
    ("an empty prompt", _rows(18) + [{"prompt": "", "keyword": "a"}] * 2, {"validation_split": "train", "test_split": "train"},
     "prompt_column: 'prompt' has 2 empty in the 20 rows of the train split"),
    ("a split the file lacks", _rows(20), {"validation_split": "validation"}, "validation_split: "),
    ("too few rows to hold out", _rows(20), {"eval_num_prompts": 12, "test_num_prompts": 8}, "eval_num_prompts: 12 validation + 8 test prompts"),
    ("prompts longer than max_prompt_length", _rows(20), {"max_prompt_length": 2}, "max_prompt_length: no train prompt"),
    # training drops a `completion` column (as TRL does) and evaluation passed it: the run failed at step 1
    ("a reward that takes the column completion", _rows(20, completion="x"), {"reward_funcs": "[user_rewards.takes_completion]"},
     "reward_funcs: user_rewards.takes_completion(prompts, completions, completion, **kwargs) takes 'completion', a column name TRL does not pass"),
]


def _main_quietly(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return code, [line for line in err.getvalue().splitlines() if line.startswith("error:")]


def _user_recipe(tmp_path, rows, **lines):
    """A recipe, its data and its reward module in one folder (the module imports because it sits beside the recipe)."""
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "user_rewards.py").write_text(USER_REWARDS)
    values = {
        "task": "custom", "method": "reinforce", "dataset_name": str(tmp_path / "data.jsonl"), "reward_funcs": "[user_rewards.keyword_reward]",
        "output_dir": str(tmp_path / "run"), "eval_num_prompts": 2, "test_num_prompts": 2, "eval_best_of_n": 1, "max_steps": 1, "max_new_tokens": 4,
        "min_new_tokens": 1, "save_best_model": "false", "disable_tqdm": "true", **lines,
    }
    if values["method"] in ("grpo", "cispo"):  # TRL GRPO's length key is max_completion_length, and it has no minimum
        del values["max_new_tokens"], values["min_new_tokens"]
    (tmp_path / "recipe.yaml").write_text("".join(f"{key}: {value}\n" for key, value in values.items()))
    return str(tmp_path / "recipe.yaml")


def test_a_jsonl_line_that_is_not_json_is_named_by_its_line_in_one_line(tmp_path, capfd):
    """Found by a journey audit: a custom .jsonl with a bad line 11 gave datasets' own message twice and then
    'Trailing data at position 52' (a byte position); GSM8K's files named the line. Now the custom task's do too."""
    recipe = _user_recipe(tmp_path, _rows(20))
    lines = (tmp_path / "data.jsonl").read_text().splitlines()
    (tmp_path / "data.jsonl").write_text("\n".join(lines[:10] + ["{not json"] + lines[10:]) + "\n")
    assert main([recipe]) == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert err == [f"error: dataset_name: cannot load {str(tmp_path / 'data.jsonl')!r}: cannot read split 'train': {tmp_path / 'data.jsonl'}: "
                   "line 11 is not JSON: Expecting property name enclosed in double quotes at column 2"], err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name,rows,lines,start", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_data_that_does_not_fit_is_one_line_exit_2_nothing_written(tmp_path, name, rows, lines, start):
    code, errors = _main_quietly([_user_recipe(tmp_path, rows, **lines)])
    assert code == 2 and len(errors) == 1 and errors[0].startswith(f"error: {start}"), errors
    assert not (tmp_path / "run").exists()


def test_a_reward_that_reads_trls_trainer_state_runs_in_training_and_evaluation(tmp_path):
    """TRL passes `trainer_state`, `log_metric` and `log_extra` to every reward call; the runner's evaluations do too
    (a reward that reads the step failed there before), and keep what `log_metric` reported as eval_ (and test) metrics."""
    code, errors = _main_quietly([_user_recipe(tmp_path, _rows(20), reward_funcs="[user_rewards.by_step]", max_steps=2, eval_steps=1, logging_steps=1)])
    assert code == 0 and errors == []
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    history = results["history"]
    assert [row["eval_reward"] for row in history if "eval_reward" in row] == [0.0, 1.0, 1.0]  # steps 0, 1, 2
    assert [row["by_step_calls"] for row in history if "by_step_calls" in row] == [1.0, 1.0]  # the training steps' log_metric
    assert [row["by_step_step"] for row in history if "by_step_step" in row] == [0.0, 1.0]  # read before each step's update
    assert [row["eval_by_step_step"] for row in history if "eval_by_step_step" in row] == [0.0, 1.0, 2.0]  # the evaluations'
    assert results["final"]["test"]["final"]["metrics"]["by_step_step"] == 2.0


@pytest.mark.parametrize("method", ["reinforce", "grpo"])
@pytest.mark.parametrize("reward,error", [
    ("nan_reward", "error: reward function 'nan_reward' returned nan for sample 0; rewards must be finite numbers (or None where it does not apply)"),
    # sys.exit in a reward ended the run with its code (3) and no word of why
    ("exiting_reward", "error: reward function 'exiting_reward' raised on sample 0: SystemExit: 3"),
])
def test_a_reward_module_beside_the_recipe_that_returns_nan_or_exits_stops_in_one_line(tmp_path, reward, error, method):
    """Imported rewards get the built-in ones' checks, under our trainers and TRL's: the first call stops the run."""
    grpo = {"bf16": "false", "max_completion_length": 4, "num_generations": 2, "per_device_train_batch_size": 2} if method == "grpo" else {}
    code, errors = _main_quietly([_user_recipe(tmp_path, _rows(20), reward_funcs=f"[user_rewards.{reward}]", method=method, **grpo)])
    assert code == 2 and errors == [error]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed"


def shrunk(tmp_path, name, recipe=EXAMPLE_RECIPE, lengths=(("max_new_tokens", 6), ("min_new_tokens", 2)), **extra):
    """The example recipe cut to seconds (each override: the example's value made smaller)."""
    overrides = {
        **dict(lengths),
        "dataset_name": EXAMPLE_DATA,  # the recipe's path is relative to the repository root
        "output_dir": tmp_path / name,
        "max_steps": 2,
        "eval_steps": 100,  # evaluate at steps 0 and 2 only
        "logging_steps": 1,
        "eval_num_prompts": 2,
        "test_num_prompts": 2,
        "eval_best_of_n": 1,
        "save_best_model": "false",
        "disable_tqdm": "true",
        **extra,
    }
    return [str(recipe)] + [item for key, value in overrides.items() for item in (f"--{key}", str(value))]


def policy_changed(folder) -> bool:
    trained = load_file(str(folder / "model" / "model.safetensors"))
    base = load_file(os.path.join(resolve_model_path("embedded"), "model.safetensors"))
    key = "transformer.h.0.attn.c_attn.weight"
    return not torch.allclose(trained[key].float(), base[key].float())


def test_the_example_runs_with_reinforce_and_evaluates_like_imdb(tmp_path):
    assert main(shrunk(tmp_path, "reinforce")) == 0
    results = json.loads((tmp_path / "reinforce" / "results.json").read_text())
    final, history = results["final"], results["history"]
    assert results["status"] == "completed" and final["steps"] == 2
    assert final["task"]["split_sizes"] == {"train": 36, "validation": 2, "test": 2}  # 40 rows, 2 + 2 held out
    train_logs = [h for h in history if "kl" in h]
    names = ("keyword_reward", "positive_words", "length")
    assert [h["step"] for h in train_logs] == [1, 2] and all(f"rewards/{n}/mean" in h for h in train_logs for n in names)
    evals = [h for h in history if "eval_reward" in h]
    assert [h["step"] for h in evals] == [0, 2]
    for h in evals:  # the weighted reward is the recipe's weights [1, 2, 0.1] on the per-function means
        means = [h[f"eval_rewards/{n}/mean"] for n in names]
        assert math.isclose(h["eval_reward"], means[0] + 2.0 * means[1] + 0.1 * means[2], rel_tol=1e-6)
        assert 0 <= h["eval_gold_reward"] <= 1 and {"eval_distinct_1", "eval_self_bleu"} <= set(h)
    assert len(final["test"]["final"]["gold_rewards"]) == 2 and "test_rewards/keyword_reward/mean" in history[-1]
    assert results["config"]["run"]["reward_kwargs"] == {"my_rewards.PositiveWords": {"words": ["great", "good", "fun", "love", "best", "wonderful"]}}
    assert metrics.unknown_keys(key for h in history for key in h) == []  # every key it logged is in the metric table
    assert policy_changed(tmp_path / "reinforce")


def test_the_example_trains_grade_on_its_differentiable_reward(tmp_path):
    argv = shrunk(tmp_path, "grade", method="grade_ste", reward_funcs="[my_rewards.PositiveWords, length]", reward_weights="[2.0, 0.1]")
    assert main(argv) == 0
    results = json.loads((tmp_path / "grade" / "results.json").read_text())
    train_logs = [h for h in results["history"] if "kl" in h]
    assert [h["step"] for h in train_logs] == [1, 2] and all("rewards/positive_words/mean" in h and "tau" in h for h in train_logs)
    assert policy_changed(tmp_path / "grade")


def test_the_example_runs_with_trl_grpo(tmp_path, example_rewards_importable):
    import yaml

    values = yaml.safe_load(open(EXAMPLE_RECIPE))
    del values["max_new_tokens"], values["min_new_tokens"]  # GRPO's length key is max_completion_length
    recipe = tmp_path / "custom_grpo.yaml"
    recipe.write_text(yaml.safe_dump({**values, "method": "grpo", "num_generations": 2, "per_device_train_batch_size": 4, "bf16": False}))
    assert main(shrunk(tmp_path, "grpo", recipe=recipe, lengths={"max_completion_length": 6})) == 0
    results = json.loads((tmp_path / "grpo" / "results.json").read_text())
    train_logs = [h for h in results["history"] if "rewards/keyword_reward/mean" in h]
    assert [h["step"] for h in train_logs] == [1, 2]
    assert results["final"]["test"]["final"]["metrics"]["completion_length"] > 0
    # TRL's default beta is 0: no KL term, so no kl logged at all (it was logged as null, which the run doctor read as
    # a non-finite metric: an error at every step, and a stop with `doctor: stop`)
    assert all("kl" not in h for h in train_logs) and results["final"].get("kl") is None
    assert not [f for f in results["final"]["doctor"] if f["severity"] == "error"], results["final"]["doctor"]


def test_the_example_differentiable_reward_matches_its_text_path_on_one_hot_tokens(tokenizer, example_rewards_importable):
    from my_rewards import PositiveWords

    reward = PositiveWords(tokenizer, words=["great", "fun"])
    text = " a great film, great fun and more"
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    one_hot = torch.nn.functional.one_hot(ids, len(tokenizer)).float()  # (1, T, V)
    soft = reward.score_soft(one_hot, torch.ones_like(ids))
    assert reward([""], [text])[0] == pytest.approx(soft.item()) and soft.item() > 0


def test_a_split_file_without_a_reward_column_or_an_empty_file_is_one_line_before_training(tmp_path):
    """datasets gives every split of a folder the union of its files' columns, filling a missing one with None: a
    test.jsonl without the reward's column passed the column check and failed at the final test, after training."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(20)))
    (folder / "test.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in _rows(4)))
    recipe = _user_recipe(tmp_path, _rows(20), dataset_name=str(folder), test_split="test")
    code, errors = _main_quietly([recipe])
    assert code == 2 and errors == [f"error: reward_funcs: user_rewards.keyword_reward takes the column(s) keyword, which the test rows of {str(folder)!r} lack "
                                    "(columns: prompt); add them to the data or give the parameters defaults"], errors
    assert not (tmp_path / "run").exists()
    (tmp_path / "empty.jsonl").write_text("")
    code, errors = _main_quietly([_user_recipe(tmp_path, _rows(20), dataset_name=str(tmp_path / "empty.jsonl"))])
    assert code == 2 and len(errors) == 1 and errors[0].endswith(f"{tmp_path / 'empty.jsonl'} is empty"), errors
    (tmp_path / "header.csv").write_text("prompt,keyword\n")  # datasets: 'Instruction "train" corresponds to no data!'
    code, errors = _main_quietly([_user_recipe(tmp_path, _rows(20), dataset_name=str(tmp_path / "header.csv"))])
    assert code == 2 and len(errors) == 1 and errors[0].endswith("split 'train' has no rows"), errors


def test_splits_from_a_folder_named_and_held_out_and_from_a_csv_file(tmp_path, caplog):
    from types import SimpleNamespace

    from grade_trl.data.custom import make_custom_splits

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"prompt": f"train {i}", "keyword": "a"}) + "\n" for i in range(10)))
    (folder / "test.jsonl").write_text("".join(json.dumps({"prompt": f"test {i}", "keyword": "b"}) + "\n" for i in range(3)))
    run = SimpleNamespace(dataset_name=str(folder), dataset_config=None, train_split="train", validation_split=None, test_split="test", eval_num_prompts=2, test_num_prompts=5)
    splits = make_custom_splits(run)
    assert {name: len(rows) for name, rows in splits.items()} == {"train": 8, "validation": 2, "test": 3}
    assert set(splits["train"]["prompt"]).isdisjoint(splits["validation"]["prompt"]) and all(p.startswith("test") for p in splits["test"]["prompt"])
    assert make_custom_splits(run)["validation"]["prompt"] == splits["validation"]["prompt"]  # held out the same way every time
    # the folder's test.jsonl left unused (test_split null): a warning naming the key that uses it (a journey audit: the
    # test prompts were held out of train without a word)
    with caplog.at_level(logging.WARNING, logger="grade_trl.data.custom"):
        held_out = make_custom_splits(SimpleNamespace(**{**vars(run), "test_split": None}))
    assert all(p.startswith("train") for p in held_out["test"]["prompt"])
    assert [r.getMessage() for r in caplog.records if "test_split" in r.getMessage()] == [f"custom task: {folder} has a 'test' split, which test_split: null leaves unused (those prompts "
                                                        "are held out of train_split 'train'); give test_split: test to use it"]

    # test prompts that are also training prompts (repeated rows): a warning with the count
    (folder / "test.jsonl").write_text("".join(json.dumps({"prompt": p, "keyword": "b"}) + "\n" for p in ("train 1", "train 2", "test 0")))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="grade_trl.data.custom"):
        make_custom_splits(run)
    assert [r.getMessage() for r in caplog.records] == ["custom task: 2 of the 3 test prompts are also training prompts (repeated rows in the data, "
                                                        "or overlapping splits): its scores partly measure prompts the policy trained on"]

    (tmp_path / "data.csv").write_text("question,answer\n" + "".join(f"q{i},{i}\n" for i in range(6)))
    run = SimpleNamespace(dataset_name=str(tmp_path / "data.csv"), dataset_config=None, train_split="train[:4]", validation_split="train[4:5]", test_split="train[5:]", eval_num_prompts=9, test_num_prompts=9)
    splits = make_custom_splits(run)
    assert [list(splits[name]["question"]) for name in ("train", "validation", "test")] == [["q0", "q1", "q2", "q3"], ["q4"], ["q5"]]


def test_chat_messages_are_counted_with_the_chat_template_and_other_columns_kept(tokenizer):
    import copy

    from datasets import Dataset

    from grade_trl.data.custom import prompt_dataset

    chat = copy.deepcopy(tokenizer)
    chat.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    rows = Dataset.from_list([{"messages": [{"role": "user", "content": "Name a film"}], "keyword": "film"}, {"messages": [{"role": "user", "content": "word " * 50}], "keyword": "x"}])
    prompts, dropped = prompt_dataset(rows, "messages", chat, "embedded", max_prompt_length=20)
    # the messages stay messages (the trainers and the evaluation render them; the rewards receive them, as TRL hands them)
    assert prompts.column_names == ["keyword", "prompt"] and prompts["prompt"] == [[{"role": "user", "content": "Name a film"}]] and prompts["keyword"] == ["film"]
    assert dropped == 1  # the long prompt is dropped, not cut (a cut chat prompt would lose its generation prompt)


CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"


def _chat_model(tmp_path, template: str = CHAT_TEMPLATE) -> str:
    """The embedded model copied with a chat template (it has none of its own)."""
    import shutil

    model = tmp_path / "chat_model"
    shutil.copytree(resolve_model_path("embedded"), model)
    (model / "chat_template.jinja").write_text(template)
    return str(model)


@pytest.mark.parametrize("method", ["reinforce", "grpo"])
def test_chat_prompts_reach_the_rewards_as_trl_hands_them_in_training_and_evaluation(tmp_path, method):
    """Found by a journey audit: the runner rendered chat prompts to text before any trainer saw them, so a TRL reward
    that reads `completions[i][0]["content"]` failed (TypeError) where the same reward worked with the trainers used
    directly; and the evaluations passed completion_ids=None. The reward here checks each call's prompts (messages),
    completions (one assistant message) and completion_ids (token ids), and raises otherwise."""
    rows = [{"prompt": [{"role": "system", "content": "You review films."}, {"role": "user", "content": f"Film {i} was"}]} for i in range(20)]
    lengths = {"max_completion_length": 4, "num_generations": 2, "per_device_train_batch_size": 4, "bf16": "false"} if method == "grpo" else {}
    recipe = _user_recipe(tmp_path, rows, method=method, model_name_or_path=_chat_model(tmp_path), reward_funcs="[user_rewards.as_trl_hands_them]", **lengths)
    code, errors = _main_quietly([recipe, "--eval_steps", "1", "--logging_steps", "1"])
    assert code == 0 and errors == [], errors
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [h["step"] for h in results["history"] if "eval_reward" in h] == [0, 1]
    assert [h["step"] for h in results["history"] if "loss" in h] == [1]
    assert results["final"]["test"]["final"]["prompts"][0].startswith("system: You review films.\nuser: Film ")  # as the policy read it


@pytest.mark.parametrize("method", ["reinforce", "grpo"])
def test_a_thinking_models_completions_reach_the_rewards_parsed_as_trl_parses_them(tmp_path, method):
    """TRL's GRPOTrainer hands the rewards `parse_response`'s message where the tokenizer has a response template (Qwen3
    and the like: thinking in `reasoning_content`, the answer in `content`); our trainers and the evaluations handed the
    decoded text as `content`, so a reward reading `content` scored the thinking under REINFORCE and not under GRPO.
    The model: the embedded one with Qwen3.5's thinking template, its tokens and its response template, saved as a
    user's would be (the response template in tokenizer_config.json)."""
    from transformers import AutoModelForCausalLM

    from .test_rewards import _thinking_tokenizer

    from grade_trl.models import load_tokenizer

    thinking = _thinking_tokenizer(load_tokenizer("embedded"))
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("embedded"))
    model.resize_token_embeddings(len(thinking))
    model.save_pretrained(tmp_path / "thinking_model")
    thinking.save_pretrained(tmp_path / "thinking_model")
    rows = [{"prompt": [{"role": "user", "content": f"Film {i} was"}]} for i in range(20)]
    lengths = {"max_completion_length": 4, "num_generations": 2, "per_device_train_batch_size": 4, "bf16": "false"} if method == "grpo" else {}
    recipe = _user_recipe(tmp_path, rows, method=method, model_name_or_path=str(tmp_path / "thinking_model"), reward_funcs="[user_rewards.reads_the_thinking]",
                          max_prompt_length=32, **lengths)
    code, errors = _main_quietly([recipe, "--eval_steps", "1", "--logging_steps", "1"])
    assert code == 0 and errors == [], errors
    history = json.loads((tmp_path / "run" / "results.json").read_text())["history"]
    assert [h["step"] for h in history if "eval_reward" in h] == [0, 1] and [h["step"] for h in history if "loss" in h] == [1]


def test_prompts_too_long_are_dropped_before_validation_and_test_rows_are_held_out(tmp_path):
    """Found by a journey audit: the rows were held out first and filtered after, so `eval_num_prompts: 4` evaluated
    on 3 prompts when one held-out prompt was too long. 8 of 24 rows are too long here; 4 + 2 are held out of the 16 left."""
    rows = _rows(16) + [{"prompt": "word " * 40, "keyword": "good"}] * 8
    code, errors = _main_quietly([_user_recipe(tmp_path, rows, eval_num_prompts=4, test_num_prompts=2, max_prompt_length=16)])
    assert code == 0 and errors == [], errors
    final = json.loads((tmp_path / "run" / "results.json").read_text())["final"]
    assert final["task"]["split_sizes"] == {"train": 10, "validation": 4, "test": 2} and final["task"]["dropped_long_prompts"] == {"train": 8}
    assert len(final["test"]["final"]["prompts"]) == 2


def test_the_held_out_rows_are_the_same_whatever_else_a_run_drops(tmp_path):
    """The held-out rows are the first rows of one fixed shuffle that fit: a run whose tokenizer or max_prompt_length
    drops another prompt tests on the same rows wherever they fit in both (a review found that filtering before the
    shuffle reshuffled every held-out row when one prompt more was dropped)."""
    from types import SimpleNamespace

    from grade_trl.data.custom import make_custom_splits

    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(30)))
    run = SimpleNamespace(dataset_name=str(tmp_path / "data.jsonl"), dataset_config=None, train_split="train", validation_split=None, test_split=None,
                          eval_num_prompts=4, test_num_prompts=3)
    every = make_custom_splits(run)
    held_out = list(every["validation"]["prompt"]) + list(every["test"]["prompt"])
    dropped = held_out[1]
    fewer = make_custom_splits(run, prepare=lambda rows, split: rows.filter(lambda row: row["prompt"] != dropped))
    assert list(fewer["validation"]["prompt"]) + list(fewer["test"]["prompt"])[:2] == [p for p in held_out if p != dropped]
    assert len(fewer["validation"]) == 4 and len(fewer["test"]) == 3 and dropped not in list(fewer["train"]["prompt"])


def test_trl_grpos_chat_template_kwargs_render_the_prompts_everywhere(tmp_path, tokenizer):
    """TRL's GRPOTrainer renders chat prompts with `chat_template_kwargs` (e.g. {enable_thinking: false}); the runner's
    length filter and its evaluations render them with the same (a review found them rendered without), and GSM8K,
    whose prompts are rendered before training, too."""
    import copy

    from grade_trl.build import build_task
    from grade_trl.data.gsm8k import format_prompt
    from grade_trl.evaluation import as_rendered_prompts
    from grade_trl.recipe import parse_recipe

    template = "{% for m in messages %}{% if loud %}LOUD {% endif %}{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = template
    messages = [[{"role": "user", "content": "Hi"}]]
    assert as_rendered_prompts(chat, messages, {"loud": True}) == (["LOUD Hi\nA:"], True) and as_rendered_prompts(chat, messages)[0] == ["Hi\nA:"]
    assert format_prompt("2 + 2?", chat, "Be brief.", {"loud": True}) == "LOUD Be brief.\nLOUD 2 + 2?\nA:"

    rows = [{"prompt": [{"role": "user", "content": f"Film {i}"}], "keyword": "good"} for i in range(20)]
    model = _chat_model(tmp_path, template)
    recipe = _user_recipe(tmp_path, rows, method="grpo", model_name_or_path=model, bf16="false", max_completion_length=4,
                          chat_template_kwargs="{loud: true}")
    _, task = build_task(parse_recipe([recipe]), gold_judge=False)
    assert task.evaluator.settings.chat_template_kwargs == {"loud": True}
    assert all(isinstance(prompt, list) for prompt in task.train_dataset["prompt"])  # messages: TRL renders them, with the same kwargs

    # our trainers take the same key (the audit found it refused for REINFORCE and PPO) and render with it
    from grade_trl.build import build_trainer

    recipe = _user_recipe(tmp_path, rows, method="reinforce", model_name_or_path=model, max_new_tokens=4,
                          chat_template_kwargs="{loud: true}")
    built = parse_recipe([recipe])
    tokenizer_, task = build_task(built, gold_judge=False)
    assert built.config.chat_template_kwargs == {"loud": True} and task.evaluator.settings.chat_template_kwargs == {"loud": True}
    trainer = build_trainer(built, task, tokenizer_, [])
    assert trainer.prompt_texts([{"prompt": [{"role": "user", "content": "Hi"}]}]) == ["LOUD Hi\nA:"]


def test_the_example_recipes_of_each_method_compare_alike():
    """recipes/examples/custom_task{,_ppo,_grpo}.yaml: one task under REINFORCE, PPO and TRL's GRPO for `compare`, with
    the same protocol (data, rewards, evaluation), budget (completions per step x steps), sampling and evaluation lengths."""
    from grade_trl.comparison import PROTOCOL_KEYS
    from grade_trl.recipe import parse_recipe

    recipes = [parse_recipe([str(EXAMPLES / name)]) for name in ("custom_task.yaml", "custom_task_ppo.yaml", "custom_task_grpo.yaml")]
    assert [r.run.method for r in recipes] == ["reinforce", "ppo", "grpo"]
    assert len({json.dumps([getattr(r.run, key, None) for key in PROTOCOL_KEYS], default=str) for r in recipes}) == 1
    assert {(r.config.completions_per_step(1), r.config.max_steps) for r in recipes} == {(8, 40)}
    assert {(r.config.temperature, r.config.top_p) for r in recipes} == {(1.0, 1.0)}
    assert {r.config.new_token_limits[0] for r in recipes} == {16} and recipes[2].run.eval_min_new_tokens == recipes[0].config.new_token_limits[1] == 4
    assert recipes[2].config.disable_dropout is True  # as our trainers: TRL keeps dropout by default
