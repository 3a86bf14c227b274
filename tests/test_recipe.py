"""Recipes: parsing, overrides, and one-line errors with exit code 2 for bad input."""

import dataclasses
import re
import subprocess
import sys
import typing

import pytest

from grade_trl.errors import UserError
from grade_trl.methods import METHODS
from grade_trl.recipe import RecipeError, RunArguments, build_recipe, help_text, parse_overrides, parse_recipe

from .conftest import REPO

RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_recipe_builds(path):
    recipe = parse_recipe([str(path)])
    assert recipe.config.output_dir and recipe.run.method in METHODS
    if recipe.run.method == "cispo":
        assert recipe.config.loss_type == "cispo" and recipe.config.epsilon_high == 5.0
    if recipe.run.method in ("grpo", "cispo"):  # TRL keeps dropout by default; every grade_trl method turns it off
        assert recipe.config.disable_dropout is True


FULL_SIZE = [p for p in sorted((REPO / "recipes").glob("*.yaml")) if p.name != "quickstart.yaml"]


@pytest.mark.parametrize("path", FULL_SIZE, ids=lambda p: p.name)
def test_full_size_recipes_checkpoint_at_each_evaluation_and_keep_two(path):
    config = parse_recipe([str(path)]).config
    assert config.save_strategy == "steps" and config.save_steps == config.eval_steps and config.save_total_limit == 2


def test_push_to_hub_and_hub_model_id_reach_the_trainer_config():
    """Only the argument path (offline): Trainer pushes `model/` and the checkpoints when push_to_hub is true."""
    config = parse_recipe([str(REPO / "recipes/quickstart.yaml"), "--push_to_hub", "true", "--hub_model_id", "me/grade-ste-imdb"]).config
    assert config.push_to_hub is True and config.hub_model_id == "me/grade-ste-imdb"
    assert parse_recipe([str(REPO / "recipes/quickstart.yaml")]).config.push_to_hub is False


@pytest.mark.parametrize("method", list(METHODS))
def test_ddp_and_dataloader_defaults_fit_the_machine(method):
    """No DDP search for unused parameters (every method's loss reaches every trainable parameter; a recipe may still
    ask for it); no pinned memory on the CPU (torch warns that it has no accelerator to pin for)."""
    values = {"method": method, "output_dir": "x", **({"bf16": False} if method in ("grpo", "cispo") else {})}
    config = build_recipe(values).config
    assert config.ddp_find_unused_parameters is False
    assert build_recipe({**values, "ddp_find_unused_parameters": True}).config.ddp_find_unused_parameters is True
    if config.use_cpu:
        assert config.dataloader_pin_memory is False


def test_overrides_win_over_the_file_and_are_typed():
    recipe = parse_recipe([str(REPO / "recipes/quickstart.yaml"), "--max_steps", "7", "--learning_rate=3e-5", "--use_peft"])
    assert recipe.config.max_steps == 7 and recipe.config.learning_rate == 3e-5 and recipe.run.use_peft is True
    assert recipe.raw["max_steps"] == 7


@pytest.mark.parametrize("method", ["grade_ste", "grpo"])
def test_report_to_takes_several_values_a_comma_list_or_null_as_trl_cli_does(tmp_path, method):
    recipe = REPO / "recipes" / "tiny" / ("length_grade_ste.yaml" if method == "grade_ste" else "length_grpo.yaml")
    base = [str(recipe), "--output_dir", str(tmp_path / "run")]
    for extra, expected in (
        (["--report_to", "tensorboard", "wandb"], ["tensorboard", "wandb"]),  # TRL's CLI (nargs)
        (["--report_to", "tensorboard,wandb"], ["tensorboard", "wandb"]),
        (["--report_to=tensorboard, wandb"], ["tensorboard", "wandb"]),
        (["--report_to", "[tensorboard, wandb]"], ["tensorboard", "wandb"]),
        (["--report_to", "tensorboard"], ["tensorboard"]),
        (["--report_to", "null"], []),  # no tracker (transformers would look up one named None)
        (["--report_to", "none"], []),
    ):
        assert parse_recipe(base + extra).config.report_to == expected, extra
    file = tmp_path / "recipe.yaml"
    file.write_text(recipe.read_text() + "\nreport_to: tensorboard, wandb\n")
    assert parse_recipe([str(file), "--output_dir", str(tmp_path / "run")]).config.report_to == ["tensorboard", "wandb"]
    with pytest.raises(UserError, match="report_to: unknown reporter 'foo'"):
        parse_recipe(base + ["--report_to", "tensorboard,foo"])
    with pytest.raises(UserError, match="unexpected argument 'x'"):  # a key that takes one value still takes one
        parse_recipe(base + ["--learning_rate", "1e-4", "x"])


def test_compare_train_reward_and_probe_forward_several_values_as_run_takes_them():
    """`--report_to wandb tensorboard` given to compare, train_reward or probe reaches the recipe as a list, as it does
    for grade_trl.run (these commands read their command line before knowing the recipe's method, so they take the
    list keys of every config; a key that takes one value still takes one)."""
    from grade_trl import compare, probe, train_reward
    from grade_trl.cli import is_list_type
    from grade_trl.methods import get_method
    from grade_trl.recipe import recipe_list_keys

    for command in (compare.COMMAND, train_reward.COMMAND, probe.COMMAND):
        _, _, forwarded = command.parse(["recipe.yaml", "--report_to", "tensorboard", "wandb", "--probe_steps", "2", "--max_steps", "3"])
        assert forwarded == {"report_to": ["tensorboard", "wandb"], "probe_steps": [2], "max_steps": 3}, command.prog
        with pytest.raises(UserError, match="unexpected argument 'x'"):
            command.parse(["recipe.yaml", "--learning_rate", "1e-4", "x"])
    # the union is right only while no key is a list in one config and a single value in another
    keys = recipe_list_keys()
    for cls in [RunArguments] + [get_method(name).config_class for name in METHODS]:
        for name, tp in typing.get_type_hints(cls).items():
            assert (name in keys) == is_list_type(tp), (cls.__name__, name)


@pytest.mark.parametrize("method", ["grade_ste", "grpo"])
def test_yaml_no_is_the_strategy_no_not_false(tmp_path, method):
    """YAML 1.1 reads `no` as false; `save_strategy: no` (file or --save_strategy no) is Trainer's "no" strategy."""
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(f"method: {method}\nsave_strategy: no\neval_strategy: no\nbf16: false\n")
    config = parse_recipe([str(recipe_file), "--logging_strategy", "no"]).config
    assert (config.save_strategy, config.eval_strategy, config.logging_strategy) == ("no", "no", "no")
    for key, value in (("save_strategy", "sometimes"), ("eval_strategy", "off"), ("lr_scheduler_type", "cosine_wrong")):
        with pytest.raises(RecipeError, match=f"^{key}: expected one of .*got '{value}'$"):
            parse_recipe([str(recipe_file), f"--{key}", value])


def test_yaml_merge_keys_and_anchors_still_load_with_unique_keys_required(tmp_path):
    """Duplicate keys are refused (tests/test_bad_input.py), but `<<: *defaults` merges as YAML says, an explicit key
    winning over a merged one (a review found merge keys broken by the first version of the check)."""
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("method: grade_ste\nreward_kwargs: {length: &common {target: 20, scale: 1.0}, other: {<<: *common, target: 30}}\n")
    from grade_trl.recipe import load_recipe_file

    assert load_recipe_file(str(recipe_file))["reward_kwargs"] == {"length": {"target": 20, "scale": 1.0}, "other": {"target": 30, "scale": 1.0}}


def test_yaml_scientific_notation_without_dot_is_a_float():
    assert build_recipe({"learning_rate": "1e-4", "output_dir": "x"}).config.learning_rate == 1e-4


@pytest.mark.parametrize(
    "values,message",
    [
        ({"learnig_rate": 1e-4}, r"unknown recipe key 'learnig_rate' for method 'grade_ste'; did you mean learning_rate"),
        ({"method": "ppo2"}, r"unknown method 'ppo2'"),
        ({"max_steps": "many"}, r"max_steps: expected an integer, got 'many'"),
        ({"max_steps": 1.5}, r"max_steps: expected an integer"),
        ({"use_peft": "maybe"}, r"use_peft: expected true or false"),
        ({"model_name_or_path": "./no/such/model"}, r"model_name_or_path: no such file or folder './no/such/model'"),
        ({"gold_judge": "./no/such/judge"}, r"^gold_judge: no such file or folder './no/such/judge' from the current folder '[^']+' \(a relative path is read from where the command runs, not from the recipe's folder\); give an existing local path, a hub id, or `tfidf` or `none`$"),
        ({"gold_judge": "/no/such/judge"}, r"^gold_judge: no such file or folder '/no/such/judge'; give an existing local path"),
        # a bare file name is a file, not a hub id (a journey audit: it was "the hub cannot be reached")
        ({"task": "custom", "method": "reinforce", "dataset_name": "nope.jsonl", "reward_funcs": "[grade_trl.rewards.LengthReward]"},
         r"^dataset_name: no such file or folder 'nope.jsonl' from the current folder"),
        ({"method": "grade", "estimator": "ste"}, r"method 'grade' means estimator='soft'"),
        ({"tau_start": 0}, r"^tau_start: must be > 0, got 0"),
        ({"reward_input": "everything"}, r"^reward_input: must be 'completion' or 'prompt_completion'"),
        # a GRADE recipe run with `--method reinforce`: the key is another method's, not unknown (was "did you mean eval_steps?")
        ({"method": "reinforce", "tau_anneal_steps": 150}, r"^tau_anneal_steps: a key of grade, grade_ste, grade_reinmax, grade_rao, grade_gapped, not of method 'reinforce'; "
                                                           r"remove it \(--tau_anneal_steps null on the command line\), or start from a recipe written for reinforce"),
        ({"method": "grpo", "num_mini_batches": 2}, r"^num_mini_batches: a key of ppo, not of method 'grpo'"),
        # a key of another task: accepted and ignored before (GSM8K evaluated its 500 default problems, not the 5 asked)
        ({"method": "grpo", "task": "gsm8k", "eval_num_prompts": 5}, r"^eval_num_prompts: only tasks imdb_sentiment, length, custom read it, not task "
                                                                     r"'gsm8k'; task 'gsm8k' reads eval_num_problems; remove it"),
        ({"method": "reinforce", "task": "gsm8k", "policy_split_size": 100}, r"^policy_split_size: only tasks imdb_sentiment, length read it, not task 'gsm8k';"),
        ({"method": "reinforce", "task": "length", "eval_pass_k": 4}, r"^eval_pass_k: only task gsm8k reads it, not task 'length'; remove it"),
        ({"method": "grpo", "task": "gsm8k", "eval_pass_k": 1}, r"^eval_pass_k: expected 0 \(off\) or an integer from 2 to 1,024"),  # was accepted, did nothing
    ],
)
def test_bad_values_raise_one_line_errors(values, message):
    with pytest.raises(RecipeError, match=message) as info:
        build_recipe({"output_dir": "x", **values})
    assert "\n" not in str(info.value)


def test_override_syntax_errors():
    with pytest.raises(UserError, match="options are written --key value"):
        parse_overrides(["max_steps", "3"])


@pytest.mark.parametrize("method", list(METHODS))
def test_help_lists_every_key_the_method_accepts_grouped_with_defaults(method):
    text = help_text(method)
    config_cls = METHODS[method].config_class
    accepted = [f.name for f in dataclasses.fields(RunArguments) if f.init] + [f.name for f in dataclasses.fields(config_cls) if f.init]
    listed = re.findall(r"^  (\w+) \(default ", text, flags=re.M)
    assert sorted(set(listed)) == sorted(set(accepted))  # every accepted key (max_prompt_length feeds both run and method)
    run_at, method_at, trainer_at = text.index("Run keys"), text.index("Method keys"), text.index("Trainer keys")
    assert run_at < method_at < trainer_at
    assert text.index("  learning_rate (default") > method_at if METHODS[method].config_class.__module__.startswith("grade_trl.trainers.") and method not in ("grpo", "cispo") else True  # overridden default
    assert text.index("  output_dir (default") > trainer_at and text.index("  eval_num_prompts (default") < method_at
    for key, value in METHODS[method].implied.items():
        assert f"  {key} (default {value!r})" in text  # the value the method's name fixes
    expected_unit = "per token" if method in ("grpo", "cispo", "reinforce") else "per completion"  # beta vs kl_coef / init_kl_coef
    assert f"`{METHODS[method].kl_coefficient}` weighs the KL to the reference {expected_unit}" in text


def test_beta_has_one_meaning_and_grade_names_its_coefficient_kl_coef():
    with pytest.raises(RecipeError, match="beta: grade weighs the KL summed over the completion, with `kl_coef`"):
        build_recipe({"method": "grade", "output_dir": "x", "beta": 0.1})
    with pytest.raises(RecipeError, match="beta: ppo weighs the KL summed over the completion, with `init_kl_coef"):
        build_recipe({"method": "ppo", "output_dir": "x", "beta": 0.1})
    assert build_recipe({"method": "grade", "output_dir": "x", "kl_coef": 0.3}).config.kl_coef == 0.3
    for method in ("reinforce", "grpo"):
        assert build_recipe({"method": method, "output_dir": "x", "beta": 0.3, "bf16": False}).config.beta == 0.3
    for method in METHODS.values():  # each config declares the coefficient its registry entry names
        assert method.kl_coefficient in {f.name for f in dataclasses.fields(method.config_class)}


@pytest.mark.parametrize("method,key,fix", [
    ("grpo", "max_new_tokens", "set max_completion_length"),
    ("cispo", "min_new_tokens", "remove it, and set eval_min_new_tokens to evaluate with the other methods' minimum"),
    ("grpo", "num_samples_per_prompt", "set num_generations"),
    ("reinforce", "max_completion_length", "set max_new_tokens"),
    ("grade_ste", "max_completion_length", "set max_new_tokens"),
    ("reinforce", "num_generations", "set num_samples_per_prompt"),
    ("ppo", "num_generations", "remove it"),
])
def test_a_key_under_the_other_trainers_name_gets_the_name_to_use(method, key, fix):
    """A recipe moved between TRL's GRPO and our trainers brings the other's generation keys; the error names the key
    this method uses (it used to guess a spelling: 'max_new_tokens' -> 'did you mean eval_min_new_tokens?')."""
    with pytest.raises(RecipeError) as info:
        build_recipe({"method": method, "output_dir": "x", key: 8, "bf16": False})
    message = str(info.value)
    assert message.startswith(f"{key}: ") and fix in message and "\n" not in message, message
    assert "generation_kwargs" in {f.name for f in dataclasses.fields(METHODS["grpo"].config_class)}  # the fix exists


def test_a_method_switched_on_the_command_line_drops_the_other_methods_keys_with_null(tmp_path):
    """Found by a journey audit: `--method grpo` on a REINFORCE recipe was refused for its max_new_tokens, and
    `--max_new_tokens null` too, so the recipe file had to be edited. null now removes a key only another method reads;
    a null key no method reads is still an unknown key."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: reinforce\ntask: length\nmax_new_tokens: 8\nmin_new_tokens: 2\nnum_samples_per_prompt: 2\n")
    with pytest.raises(RecipeError, match=r"^max_new_tokens: TRL's GRPO limits .* \(--max_new_tokens null on the command line removes the recipe's\)$"):
        parse_recipe([str(recipe), "--method", "grpo", "--output_dir", str(tmp_path / "x")])
    switched = parse_recipe([str(recipe), "--method", "grpo", "--max_new_tokens", "null", "--min_new_tokens", "null", "--num_samples_per_prompt", "null",
                             "--max_completion_length", "8", "--bf16", "false", "--output_dir", str(tmp_path / "x")])
    assert switched.run.method == "grpo" and switched.config.max_completion_length == 8
    with pytest.raises(RecipeError, match=r"^unknown recipe key 'max_new_tokenz'"):
        parse_recipe([str(recipe), "--max_new_tokenz", "null", "--output_dir", str(tmp_path / "x")])


def test_a_spelling_hint_names_each_key_once():
    with pytest.raises(RecipeError, match=r"did you mean max_prompt_length, reward_max_length\?$"):
        build_recipe({"method": "reinforce", "output_dir": "x", "max_promt_length": 8})


CPU_ONLY = pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU's refusal of fp16; a GPU runs fp16")


def _run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "grade_trl.run", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize(
    "recipe_text,extra,message",
    [
        ("method: grade_ste\nlearnig_rate: 1.0e-4\n", [], "unknown recipe key 'learnig_rate'"),
        ("method: grade_ste\nmax_steps: lots\n", [], "max_steps: expected an integer"),
        ("method: sgd\n", [], "unknown method 'sgd'"),
        ("method: grade_ste\ndataset_name: ./missing_data\n", [], "dataset_name: no such file or folder"),
        ("method: [grade\n", [], "is not valid YAML"),
        ("method: grade_ste\n", ["--max_steps", "x"], "max_steps: expected an integer"),
        # found by a user trial (2026-12-08): a quoted number or boolean is a string by the recipe's own words
        ("method: grade_ste\nmax_steps: \"5\"\n", [], "max_steps: expected an integer, got the quoted string '5'; remove the quotes"),
        ("method: grade_ste\nlearning_rate: '1e-4'\n", [], "learning_rate: expected a number, got the quoted string '1e-4'; remove the quotes"),
        ("method: reinforce\nuse_peft: \"yes\"\n", [], "use_peft: expected true or false, got the quoted string 'yes'; remove the quotes"),
        ("method: grade_ste\n", ["--max_steps", '"5"'], "max_steps: expected an integer, got the quoted string '5'"),
        pytest.param("method: reinforce\nfp16: true\n", [], "fp16: float16 mixed precision needs a GPU", marks=CPU_ONLY),
        pytest.param("method: grpo\n", ["--fp16", "true"], "fp16: float16 mixed precision needs a GPU", marks=CPU_ONLY),
    ],
)
def test_cli_errors_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, monkeypatch, recipe_text, extra, message):
    """In this process (`main` is the command's whole body; the process's own exit is tested once, below)."""
    from grade_trl.run import main

    (tmp_path / "r.yaml").write_text(recipe_text + f"output_dir: {tmp_path / 'out'}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["r.yaml", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


@CPU_ONLY
def test_fp16_on_the_cpu_is_refused_from_the_recipe_or_the_accelerate_config(monkeypatch):
    """On the CPU Accelerate makes no float16 autocast: `fp16: true` trained in float32 while the config said fp16
    (2026-12-07). The accelerate config's `mixed_precision: fp16` reaches Trainer as ACCELERATE_MIXED_PRECISION;
    bf16, which the CPU does run, is accepted either way."""
    from transformers import TrainingArguments

    base = {"method": "reinforce", "model_name_or_path": "embedded", "output_dir": "/tmp/unused"}
    with pytest.raises(RecipeError, match=r"^fp16: float16 mixed precision needs a GPU: .* use bf16: true for mixed precision on the CPU"):
        build_recipe({**base, "fp16": True})
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert TrainingArguments(output_dir="/tmp/unused", use_cpu=True).mixed_precision == "fp16"  # what Trainer would have taken
    with pytest.raises(RecipeError, match=r"^mixed_precision: the accelerate config \(or --mixed_precision\) asks for fp16"):
        build_recipe(base)
    assert build_recipe({**base, "bf16": True}).config.bf16  # the recipe's bf16 wins over the config's fp16
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert build_recipe(base).config.mixed_precision == "bf16"


@CPU_ONLY
def test_bf16_on_a_cpu_without_fast_bfloat16_products_is_warned(monkeypatch, caplog):
    """On a CPU without AVX-512 torch's bfloat16 products take a slow path (an AVX2 host, 2026-12-07: 140x a float32
    product, 5x a GRADE-STE step): bf16 from the recipe or the accelerate config is then a warning that says so; where
    the CPU has the instructions, or without bf16, nothing is said."""
    import torch

    from grade_trl import recipe as recipe_module

    assert recipe_module.cpu_has_fast_bf16() is bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # torch's (oneDNN's) own check
    base = {"method": "grade_ste", "model_name_or_path": "embedded", "output_dir": "/tmp/unused"}
    warned = []
    for fast in (False, True):
        monkeypatch.setattr(recipe_module, "cpu_has_fast_bf16", lambda fast=fast: fast)
        for given, environment in (({"bf16": True}, "no"), ({}, "bf16"), ({}, "no")):
            monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", environment)
            caplog.clear()
            with caplog.at_level("WARNING", logger="grade_trl.recipe"):
                build_recipe({**base, **given})
            lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("bf16 on this CPU")]
            warned.append(len(lines))
            assert all("without AVX-512) is slower than float32" in line and "bf16: false" in line and "\n" not in line for line in lines), lines
    assert warned == [1, 1, 0, 0, 0, 0], warned


def test_cli_missing_recipe_file_ends_the_process_with_2_and_one_line(tmp_path):
    """The command as a process: exit code 2, one line, no traceback (the cases above, in-process, share this path)."""
    result = _run_cli("nope.yaml", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == ["error: recipe file not found: nope.yaml (give the path of a .yaml recipe, e.g. recipes/quickstart.yaml)"]


def test_cli_help_lists_keys(tmp_path, capsys):
    """The command itself once (a process), then the method-specific help in-process (the same `main`)."""
    from grade_trl.run import main

    result = _run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0 and "tau_anneal_steps" in result.stdout and "reward_input" in result.stdout
    assert main([str(REPO / "recipes" / "tiny" / "imdb_ppo.yaml"), "--help"]) == 0  # the recipe's method
    ppo = capsys.readouterr().out
    assert "  cliprange (default 0.2)" in ppo and "tau_anneal_steps" not in ppo
    assert main(["--help", "--method", "grpo"]) == 0
    grpo = capsys.readouterr().out
    assert "  num_generations (default" in grpo and "  beta (default" in grpo
    assert main(["--help", "--method", "sgd"]) == 2
    bad = capsys.readouterr().err
    assert "unknown method 'sgd'" in bad and "Traceback" not in bad


def test_cli_unloadable_model_and_data_exit_2_with_one_line(tmp_path, capsys, monkeypatch):
    from grade_trl.run import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"review": "no text column", "stars": 3}\n')
    cases = [
        (f"model_name_or_path: {tmp_path / 'not_a_model'}\n", f"model_name_or_path: {str(tmp_path / 'not_a_model')!r} is a folder without config.json, not a saved model"),
        (f"dataset_name: {tmp_path / 'data'}\n", "lacks columns ['label', 'text']"),
    ]
    for text, message in cases:
        (tmp_path / "r.yaml").write_text(f"method: grade_ste\noutput_dir: {tmp_path / 'out'}\n" + text)
        assert main(["r.yaml"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
        assert not (tmp_path / "out").exists()


def test_cispo_without_epsilon_high_warns(caplog):
    with caplog.at_level("WARNING", logger="grade_trl.trainers.grpo"):
        recipe = build_recipe({"method": "cispo", "output_dir": "x", "bf16": False})
    assert recipe.config.loss_type == "cispo"
    assert "set epsilon_high explicitly" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="grade_trl.trainers.grpo"):
        build_recipe({"method": "cispo", "output_dir": "x", "bf16": False, "epsilon_high": 5.0})
    assert "epsilon_high" not in caplog.text


def test_grade_trls_grpo_config_warns_a_library_user_too(caplog, tmp_path):
    """The two TRL settings the recipe warned about are the config's own warnings, so `GRPOConfig` used in a TRL project
    warns as a recipe does."""
    from grade_trl import GRPOConfig

    with caplog.at_level("WARNING", logger="grade_trl.trainers.grpo"):
        GRPOConfig(output_dir=str(tmp_path), loss_type="cispo", generation_kwargs={"min_new_tokens": 4}, use_cpu=True, bf16=False)
    assert "set epsilon_high explicitly" in caplog.text and "scores log-probs without it" in caplog.text


def test_min_new_tokens_through_trl_generation_kwargs_warns(caplog):
    with caplog.at_level("WARNING", logger="grade_trl.trainers.grpo"):
        build_recipe({"method": "grpo", "output_dir": "x", "bf16": False, "generation_kwargs": {"min_new_tokens": 8}})
    assert "scores log-probs without it" in caplog.text
    recipe = build_recipe({"method": "grpo", "output_dir": "x", "bf16": False, "eval_min_new_tokens": 8})
    assert recipe.run.eval_min_new_tokens == 8


@pytest.mark.parametrize(
    "recipe,processes,expected",
    [
        ("tiny/imdb_grade_ste.yaml", 1, 8),  # 8 prompts, one relaxed completion each
        ("tiny/imdb_ppo.yaml", 2, 8),  # a rollout of 16 prompts per process feeds 4 mini-batch steps: 16 x 2 / 4
        ("tiny/imdb_grpo.yaml", 1, 8),  # TRL counts completions: 2 prompts x 4 generations
        ("tiny/gsm8k_reinforce.yaml", 1, 8),  # 2 problems x 4 samples per prompt
    ],
)
def test_completions_per_step_counts_new_completions(recipe, processes, expected):
    parsed = parse_recipe([str(REPO / "recipes" / recipe)])
    assert parsed.config.completions_per_step(processes) == expected


@pytest.mark.parametrize("method", ["grade_ste", "reinforce", "ppo"])
def test_min_new_tokens_defaults_to_at_most_max_new_tokens(method):
    """`max_new_tokens: 12` alone is a complete setting (the default minimum of 16 follows it down); an explicit
    minimum above the maximum is still refused in one line."""
    short = build_recipe({"method": method, "output_dir": "x", "max_new_tokens": 12})
    assert (short.config.max_new_tokens, short.config.min_new_tokens) == (12, 12)
    assert build_recipe({"method": method, "output_dir": "x"}).config.min_new_tokens == 16
    with pytest.raises(UserError, match="min_new_tokens"):
        build_recipe({"method": method, "output_dir": "x", "max_new_tokens": 12, "min_new_tokens": 13})


def test_a_key_given_without_its_value_is_refused_and_a_flag_is_true(tmp_path):
    """`--output_dir` with its value forgotten was the string "True" (a folder ./True); true/false keys, and
    resume_from_checkpoint (true: the last checkpoint), still take a bare flag."""
    recipe = str(REPO / "recipes" / "tiny" / "length_reinforce.yaml")
    for key, kind in (("output_dir", "str | None"), ("learning_rate", "float"), ("max_new_tokens", "int")):
        with pytest.raises(RecipeError) as info:
            parse_recipe([recipe, f"--{key}"])
        assert str(info.value) == f"{key}: given without a value; write --{key} VALUE ({kind}): only true/false options may be given bare"
    parsed = parse_recipe([recipe, "--output_dir", str(tmp_path / "run"), "--use_peft", "--overwrite_output_dir"])
    assert parsed.run.use_peft is True and parsed.run.overwrite_output_dir is True
    with pytest.raises(RecipeError, match="resume_from_checkpoint: no complete checkpoint-N folder"):  # read as true: the last checkpoint
        parse_recipe([recipe, "--output_dir", str(tmp_path / "run"), "--resume_from_checkpoint"])
