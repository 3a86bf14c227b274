"""Bad input, table-driven: every case is refused with one line naming the key that is wrong and what would be right,
exit code 2 and nothing written. Recipe values are checked in-process by `build_recipe` (before anything loads);
recipe files and data files go through the runner's `main`, which must leave neither output_dir nor the reward
model's folder behind."""

import io
import json
import contextlib
import os
import shutil
import warnings

import pytest

from grade_trl.errors import UserError
from grade_trl.recipe import RecipeError, build_recipe

from .conftest import REPO

QUICKSTART = str(REPO / "recipes" / "quickstart.yaml")

# (recipe values, the key the one-line error must start with)
RECIPE_CASES = [
    ({"learning_rate": -1e-4}, "learning_rate"),
    ({"learning_rate": -1}, "learning_rate"),
    ({"learning_rate": ".nan"}, "learning_rate"),
    ({"learning_rate": "inf"}, "learning_rate"),
    ({"learning_rate": "fast"}, "learning_rate"),
    ({"per_device_train_batch_size": 0}, "per_device_train_batch_size"),
    ({"per_device_train_batch_size": -8}, "per_device_train_batch_size"),
    ({"per_device_train_batch_size": 10**12}, "per_device_train_batch_size"),
    ({"per_device_train_batch_size": 2.5}, "per_device_train_batch_size"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
    ({"max_steps": 0}, "max_steps"),
    ({"max_steps": "1e30"}, "max_steps"),
    ({"max_steps": "many"}, "max_steps"),
    ({"num_train_epochs": 0}, "num_train_epochs"),
    ({"max_grad_norm": -1.0}, "max_grad_norm"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"eval_steps": 0}, "eval_steps"),
    ({"eval_steps": 0.5}, "eval_steps"),
    ({"max_prompt_length": 0}, "max_prompt_length"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 100000}, "max_new_tokens"),
    ({"max_new_tokens": 8, "min_new_tokens": 9}, "min_new_tokens"),
    ({"eval_num_prompts": 0}, "eval_num_prompts"),
    ({"test_num_prompts": -1}, "test_num_prompts"),
    ({"eval_best_of_n": 0}, "eval_best_of_n"),
    ({"eval_temperature": 0}, "eval_temperature"),
    ({"eval_temperature": -1}, "eval_temperature"),
    ({"eval_top_p": 0}, "eval_top_p"),
    ({"eval_top_p": 1.5}, "eval_top_p"),
    ({"eval_min_new_tokens": -1}, "eval_min_new_tokens"),
    ({"reward_split_size": -1}, "reward_split_size"),
    ({"policy_split_size": 0}, "policy_split_size"),
    ({"validation_split_size": -5}, "validation_split_size"),
    ({"test_split_size": 0}, "test_split_size"),
    ({"prompt_max_chars": 0}, "prompt_max_chars"),
    ({"reward_max_length": 0}, "reward_max_length"),
    ({"reward_epochs": 0}, "reward_epochs"),
    ({"reward_learning_rate": 0}, "reward_learning_rate"),
    ({"early_stopping_patience": -1}, "early_stopping_patience"),
    ({"nonfinite": "ignore"}, "nonfinite"),
    ({"nonfinite": "skip", "nonfinite_max_skips": -1}, "nonfinite_max_skips"),
    ({"resume_from_checkpoint": "true"}, "resume_from_checkpoint"),
    ({"resume_from_checkpoint": "/no/such/checkpoint-3"}, "resume_from_checkpoint"),
    ({"num_samples_to_show": -1}, "num_samples_to_show"),
    ({"seed": -1}, "seed"),
    ({"eval_seed": 2**40}, "eval_seed"),
    ({"use_peft": True, "lora_r": 0}, "lora_r"),
    ({"use_peft": True, "lora_dropout": 1.0}, "lora_dropout"),
    ({"use_peft": "maybe"}, "use_peft"),
    ({"probe_num_estimates": 1}, "probe_num_estimates"),
    ({"probe_num_prompts": 0}, "probe_num_prompts"),
    ({"kl_coef": -1}, "kl_coef"),
    ({"kl_coef": ".nan"}, "kl_coef"),
    ({"tau_start": 0}, "tau_start"),
    ({"tau_end": -1}, "tau_end: must be > 0, got -1"),  # was named tau_start (one check of both keys)
    ({"tau_start": 0.5, "tau_end": 0}, "tau_end: must be > 0, got 0"),
    ({"rao_samples": 0, "method": "grade_rao"}, "rao_samples"),
    ({"relax_top_k": -1}, "relax_top_k"),
    ({"estimator": "magic"}, "estimator"),
    ({"method": "grade", "estimator": "ste"}, "estimator"),
    ({"method": "ppo2"}, "method"),
    ({"learnig_rate": 1e-4}, "unknown recipe key 'learnig_rate'"),
    ({"method": "reinforce", "num_samples_per_prompt": 0}, "num_samples_per_prompt"),
    ({"method": "reinforce", "top_p": 0}, "top_p"),
    ({"method": "reinforce", "temperature": 0}, "temperature"),
    ({"method": "reinforce", "beta": ".nan"}, "beta"),
    ({"method": "grpo", "beta": "inf", "bf16": False}, "beta"),
    ({"method": "grpo", "max_completion_length": 0, "bf16": False}, "max_completion_length"),
    ({"method": "grpo", "kl_coef": 0.1, "bf16": False}, "kl_coef"),
    ({"method": "reinforce", "kl_coef": 0.1}, "kl_coef"),
    ({"method": "ppo", "beta": 0.1}, "beta"),
    ({"reward_input": "everything"}, "reward_input"),
    ({"model_name_or_path": "./no/such/model"}, "model_name_or_path"),
    ({"report_to": ["comet_ml"]}, "report_to: comet_ml is not installed; run `pip install comet-ml`"),  # not in the test environment
    ({"report_to": "mlflow"}, "report_to: mlflow is not installed; run `pip install mlflow`"),
    ({"report_to": ["tensorboard", "neptune"]}, "report_to: neptune is not installed"),
    ({"report_to": ["wandbb"]}, "report_to: unknown reporter 'wandbb'"),
    ({"method": "grpo", "bf16": False, "report_to": "comet_ml"}, "report_to"),
    ({"reward_weights": [1.0, 2.0]}, "reward_weights: 2 weights for 1 task imdb_sentiment's rewards (sentiment)"),
    ({"task": "gsm8k", "method": "reinforce", "reward_weights": [1.0]}, "reward_weights: 1 weights for 2 task gsm8k's rewards (gsm8k_correctness, gsm8k_format)"),
    ({"method": "grpo", "bf16": False, "task": "length", "reward_weights": [1.0, 0.5]}, "reward_weights"),
    ({"method": "reinforce", "task": "length", "reward_weights": [0]}, "reward_weights: every weight is 0"),  # trained on a reward of 0
    ({"method": "grpo", "bf16": False, "task": "gsm8k", "reward_weights": [0, 0.0]}, "reward_weights: every weight is 0"),
    ({"method": "ppo", "ppo_epochs": 10**9}, "ppo_epochs: must be an integer from 1 to 1,024"),  # trained every step on the first rollout
    ({"method": "ppo", "num_mini_batches": 0}, "num_mini_batches: must be >= 1"),  # named ppo_epochs first
    ({"method": "ppo", "lam": 2}, "lam: must lie in [0, 1]"),
    ({"method": "ppo", "ent_coef": -1}, "ent_coef: must be >= 0"),
    ({"method": "ppo", "adaptive_kl": True, "kl_horizon": 0}, "kl_horizon: must be > 0 for the adaptive KL controller"),
    ({"method": "grade_rao", "rao_samples": 10**6}, "rao_samples: must be an integer from 1 to 1,024"),  # asked the allocator for 262 GB after set-up
    # TRL GRPO/CISPO's own keys, which TRL does not check (a traceback at the first step, or a run that completes)
    ({"method": "grpo", "bf16": False, "temperature": 0}, "temperature: expected a number > 0"),
    ({"method": "cispo", "bf16": False, "temperature": -1}, "temperature: expected a number > 0"),
    ({"method": "grpo", "bf16": False, "top_k": -5}, "top_k: expected an integer >= 0"),
    ({"method": "grpo", "bf16": False, "top_p": 2}, "top_p: expected a number in (0, 1]"),
    ({"method": "grpo", "bf16": False, "num_generations": 0}, "num_generations: expected an integer from 2"),  # was a ZeroDivisionError
    ({"method": "grpo", "bf16": False, "num_generations": 1}, "num_generations: expected an integer from 2"),
    ({"method": "grpo", "bf16": False, "epsilon": -1}, "epsilon: expected a number > 0"),
    ({"method": "grpo", "bf16": False, "beta": -1}, "beta: expected a number >= 0"),
    # TRL GRPO's enumerated and ranged keys that TRL reads only at the first loss, or never checks (a 2026-12-07 audit):
    # a misspelt loss_type wrote results.json and best_model/ at step 0, then a traceback; steps_per_generation 0 was a
    # DataLoader traceback; top_entropy_quantile 2 and delta -1 trained without a word
    ({"method": "grpo", "bf16": False, "loss_type": "grpoo"}, "loss_type: expected one of ['grpo', 'dr_grpo', 'dapo', 'bnpo', 'cispo', 'sapo', 'luspo', 'vespo'], got 'grpoo'"),
    ({"method": "cispo", "bf16": False, "importance_sampling_level": "tokn"}, "importance_sampling_level: expected one of ['token', 'sequence'], got 'tokn'"),
    ({"method": "grpo", "bf16": False, "scale_rewards": "nonee"}, "scale_rewards: expected one of ['group', 'batch', 'none'], got 'nonee'"),
    ({"method": "grpo", "bf16": False, "multi_objective_aggregation": "sum"}, "multi_objective_aggregation: expected one of"),
    ({"method": "grpo", "bf16": False, "steps_per_generation": 0}, "steps_per_generation: expected an integer from 1 to 1,024"),
    ({"method": "grpo", "bf16": False, "generation_batch_size": 0}, "generation_batch_size: expected an integer >= 1"),
    ({"method": "grpo", "bf16": False, "top_entropy_quantile": 2}, "top_entropy_quantile: expected a number in [0, 1]"),
    ({"method": "grpo", "bf16": False, "delta": -1}, "delta: expected a number > 1"),
    ({"method": "grpo", "bf16": False, "delta": 1.0}, "delta: expected a number > 1"),
    # Trainer saves on a new best of its own evaluate()'s metrics, which the runner's validation (a callback) never
    # returns: no checkpoint was ever saved, and without metric_for_best_model it was a traceback after set-up
    ({"save_strategy": "best"}, "save_strategy: 'best' is not supported"),
    ({"method": "grpo", "bf16": False, "save_strategy": "best", "metric_for_best_model": "eval_reward"}, "save_strategy: 'best' is not supported"),
    # nor Trainer's own evaluation, which has no eval_dataset in the runner: eval_strategy was Trainer's traceback after
    # set-up (exit 1, results.json written); load_best_model_at_end's message stopped at "but found"; a scheduler on
    # evaluate()'s metrics was transformers' message without the key or the fix (a 2026-12-07 fresh-clone trial)
    ({"eval_strategy": "steps"}, "eval_strategy: 'steps' is not supported: the runner validates in its own callback"),
    ({"method": "grpo", "bf16": False, "eval_strategy": "epoch"}, "eval_strategy: 'epoch' is not supported"),
    ({"method": "reinforce", "save_strategy": "steps", "load_best_model_at_end": True}, "load_best_model_at_end: not supported"),
    ({"eval_on_start": True}, "eval_on_start: not supported"),
    ({"method": "ppo", "lr_scheduler_type": "reduce_lr_on_plateau"}, "lr_scheduler_type: 'reduce_lr_on_plateau' steps on the metrics of Trainer's evaluate"),
    ({"task": None}, "task: expected a string, got null; remove the key for its default"),  # was "unknown task 'None'"
    ({"reward_input": None}, "reward_input: expected a string, got null"),
    # TRL names generation_batch_size, which the recipe never set: the key to change is the batch size
    ({"method": "grpo", "bf16": False, "num_generations": 3}, "per_device_train_batch_size: 8 x steps_per_generation (default gradient_accumulation_steps) x processes = TRL's generation_batch_size 8, which must be a multiple of num_generations (3)"),
    # a config's own errors in the `<key>: ...` form
    ({"nonfinite": "ignore"}, "nonfinite: must be stop or skip, got 'ignore'"),
    ({"doctor": "loud"}, "doctor: must be warn, stop or off"),
    ({"logging_steps": 0}, "logging_steps: "),
    ({"kl_coef": -1}, "kl_coef: must be >= 0, got -1"),
    ({"method": "reinforce", "top_k": -1}, "top_k: expected an integer >= 0"),
    ({"output_dir": ""}, "output_dir: expected a folder path"),
    ({"probe_steps": [-1]}, "probe_steps: every step must be >= 0"),  # was accepted, and never probed
    ({"probe_steps": [-1], "max_steps": -1, "num_train_epochs": 1}, "probe_steps: every step must be >= 0"),
    ({"probe_steps": [0, 1000], "max_steps": 2}, "probe_steps: every step must be in [0, max_steps 2]"),
    ({"doctor_settings": {"baseline_rows": 0}}, "doctor_settings: baseline_rows: expected an integer >= 1, got 0"),  # was a crash at step 1
    ({"doctor_settings": {"kl_max": -5}}, "doctor_settings: kl_max: expected a number > 0"),
    ({"doctor_settings": {"kl_mx": 5}}, "doctor_settings: unknown doctor setting 'kl_mx'"),
    ({"reward_weights": [1.0, float("nan")]}, "reward_weights: expected a finite number, got nan"),  # the reason inside the list, not "expected list"
    ({"reward_weights": [1.0, "heavy"]}, "reward_weights: expected a number, got 'heavy'"),
    ({"output_dir": "  "}, "output_dir: expected a folder path"),
    ({"task": "custon"}, "task: unknown task 'custon' (did you mean custom?); known tasks:"),
    # mappings handed to a library: a typo was a traceback at load or train time (exit 1, results.json written)
    ({"model_init_kwargs": {"dtype": "float33"}}, "model_init_kwargs: dtype 'float33' is not a torch dtype"),
    ({"method": "grpo", "bf16": False, "model_init_kwargs": {"dtype": "float33"}}, "model_init_kwargs: dtype 'float33' is not a torch dtype"),
    # TrainingArguments' keys transformers does not check: a torch traceback after set-up (exit 1, results.json
    # written), a run stopped as "diverged" and blamed on learning_rate, or a message that did not start with the key
    ({"dataloader_num_workers": -1}, "dataloader_num_workers: expected an integer from 0 to 1,024"),
    ({"adam_epsilon": 0}, "adam_epsilon: expected a number > 0"),
    ({"adam_beta2": 1.0}, "adam_beta2: expected a number in [0, 1)"),
    ({"warmup_steps": -3}, "warmup_steps: expected a number >= 0"),
    ({"logging_steps": -1}, "logging_steps: expected a number > 0"),
    ({"torch_empty_cache_steps": 0}, "torch_empty_cache_steps: expected an integer >= 1"),
    ({"method": "grpo", "bf16": False, "adam_epsilon": -1e-8}, "adam_epsilon: expected a number > 0"),
    ({"lr_scheduler_type": "cosine", "lr_scheduler_kwargs": {"num_cyclez": 2}}, "lr_scheduler_kwargs: 'num_cyclez' is not an argument of the cosine schedule (its own: num_cycles)"),
    # TrainingArguments' sharding switches: `--fsdp full_shard` was Trainer's traceback (exit 1, results.json written); bare `--fsdp` was refused as a key needing a value
    ({"fsdp": True}, "fsdp: the runner shards through Accelerate's config, not TrainingArguments' fsdp; remove it and launch with accelerate launch --config_file accelerate_configs/fsdp2.yaml"),
    ({"fsdp": "full_shard"}, "fsdp: the runner shards through Accelerate's config"),
    ({"method": "grpo", "bf16": False, "fsdp_config": {"version": 2}}, "fsdp_config: the runner shards through Accelerate's config"),
    ({"deepspeed": "ds.json"}, "deepspeed: the runner shards through Accelerate's config, not TrainingArguments' deepspeed; remove it and launch with accelerate launch --config_file accelerate_configs/zero3.yaml"),
    # a `dict | str` key written inline as a mapping that is not one: TrainingArguments' json.loads said "Expecting
    # property name ..." without the key, or the mapping's last repeated key won; a string that is no mapping failed in the trainer
    ({"method": "grpo", "bf16": False, "chat_template_kwargs": "{enable_thinking: [false"}, "chat_template_kwargs: expected a mapping such as {name: value}, got '{enable_thinking: [false', which is not valid YAML"),
    ({"method": "grpo", "bf16": False, "chat_template_kwargs": "{a: 1, a: 2}"}, "chat_template_kwargs: expected a mapping such as {name: value}, got '{a: 1, a: 2}', which is not valid YAML (key 'a' is given twice (line 1); keep one)"),
    ({"lr_scheduler_kwargs": "{min_lr: [0"}, "lr_scheduler_kwargs: expected a mapping"),
    ({"method": "grpo", "bf16": False, "generation_kwargs": "max_tokens=8"}, "generation_kwargs: expected a mapping, got 'max_tokens=8'"),
]


@pytest.mark.parametrize("values,key", RECIPE_CASES, ids=[f"{i}-{key}" for i, (_, key) in enumerate(RECIPE_CASES)])
def test_a_bad_recipe_value_is_one_line_naming_its_key(values, key):
    with pytest.raises(RecipeError) as info, warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # nothing but the one line on stderr (transformers' renamed gradient_checkpointing)
        build_recipe({"output_dir": "x", **values})
    message = str(info.value)
    assert "\n" not in message and message.startswith(key), message


@pytest.mark.parametrize("reporter,install", [("trackio", "pip install -e '.[trackio]'"), ("wandb", "pip install -e '.[wandb]'"), ("tensorboard", "pip install -e '.[tensorboard]'")])
def test_a_reporter_that_is_not_installed_is_refused_with_its_pip_command(monkeypatch, reporter, install):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.split(".")[0] in (reporter, "tensorboardX") else find_spec(name, *a))
    with pytest.raises(RecipeError) as info:
        build_recipe({"output_dir": "x", "report_to": [reporter]})
    assert str(info.value) == f"report_to: {reporter} is not installed; run `{install}` or remove {reporter} from report_to"


def _rows(n, labels=(0, 1)):
    return [{"text": f"Review {i}: the film was {'great' if labels[i % len(labels)] else 'awful'}. More words.", "label": labels[i % len(labels)]} for i in range(n)]


def _jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


GOOD = _jsonl(_rows(300))
# (name, {file name: bytes} of the data folder, or None for a recipe-file case, extra argv / recipe text, expected start)
DATA_CASES = [
    ("empty train file", {"train.jsonl": b"", "test.jsonl": GOOD}, "dataset_name: cannot load"),
    ("truncated train file", {"train.jsonl": GOOD[:-25], "test.jsonl": GOOD}, "dataset_name: cannot load"),
    ("malformed train file", {"train.jsonl": b"{not json}\n", "test.jsonl": GOOD}, "dataset_name: cannot load"),
    ("binary train file", {"train.jsonl": bytes(range(256)) * 8, "test.jsonl": GOOD}, "dataset_name: cannot load"),
    ("single-label train", {"train.jsonl": _jsonl(_rows(300, labels=(1,))), "test.jsonl": GOOD}, "dataset_name: cannot load"),
    ("string labels", {"train.jsonl": _jsonl([dict(r, label="pos") for r in _rows(300)]), "test.jsonl": GOOD}, "dataset_name: cannot load"),
    ("labels 0 and 2", {"train.jsonl": _jsonl([dict(r, label=2 * r["label"]) for r in _rows(300)]), "test.jsonl": GOOD}, "dataset_name: cannot load"),
    ("wrong columns", {"train.jsonl": _jsonl([{"review": r["text"], "y": r["label"]} for r in _rows(300)]), "test.jsonl": GOOD}, "dataset_name: cannot load"),
    ("no test file", {"train.jsonl": GOOD}, "dataset_name: cannot load"),
    ("single-label test", {"train.jsonl": GOOD, "test.jsonl": _jsonl(_rows(300, labels=(0,)))}, "dataset_name: cannot load"),
]


def _main_quietly(argv):
    from grade_trl.run import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return code, [line for line in err.getvalue().splitlines() if line.startswith("error:")]


def test_trl_choices_are_the_values_the_installed_grpo_trainer_compares_with():
    """recipe.TRL_CHOICES lists, for each enumerated GRPOConfig key, the values GRPOTrainer's source compares it with
    (`args.loss_type == "luspo"`, `self.loss_type in ["grpo", ...]`): a TRL that adds or drops a loss type fails here
    instead of refusing a valid recipe or passing a misspelt one to the first loss. The right values pass."""
    import inspect
    import re

    from trl import GRPOTrainer

    from grade_trl.recipe import TRL_CHOICES

    source = inspect.getsource(inspect.getmodule(GRPOTrainer))
    for key, allowed in TRL_CHOICES.items():
        compared = set()
        for match in re.finditer(rf"\.{key} (?:==|!=|in|not in) (\[[^\]]*\]|\"[^\"]*\")", source):
            compared |= set(re.findall(r'"([^"]*)"', match.group(1)))
        assert compared and compared <= set(allowed), (key, compared, allowed)
        if key != "multi_objective_aggregation":  # its two values are compared; the others may be defaults compared nowhere
            assert set(allowed) - compared <= {"none", "token"}, (key, set(allowed) - compared)
        for value in allowed:
            build_recipe({"output_dir": "x", "method": "grpo", "bf16": False, key: value, **({"importance_sampling_level": "sequence"} if value == "luspo" else {})})
    build_recipe({"output_dir": "x", "method": "grpo", "bf16": False, "delta": 1.5, "top_entropy_quantile": 0.2, "steps_per_generation": 2})
    # scale_rewards is `str | bool` in TRL's words, typed `str`: true / false were the strings 'True' / 'False', which
    # TRL's own mapping missed (a ValueError at the first step)
    for value, meant in ((False, "none"), (True, "group"), ("false", "none"), ("True", "group")):
        assert build_recipe({"output_dir": "x", "method": "cispo", "bf16": False, "scale_rewards": value}).config.scale_rewards == meant, value


@pytest.mark.parametrize("name,files,start", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_a_bad_data_file_is_one_line_exit_2_nothing_written(tmp_path, name, files, start):
    data = tmp_path / "data"
    data.mkdir()
    for file_name, content in files.items():
        (data / file_name).write_bytes(content)
    out, reward_model = tmp_path / "run", tmp_path / "reward_model"
    code, errors = _main_quietly([QUICKSTART, "--dataset_name", str(data), "--output_dir", str(out), "--reward_model_path", str(reward_model), "--max_steps", "1"])
    assert code == 2 and len(errors) == 1 and errors[0].startswith(f"error: {start}"), errors
    assert not out.exists() and not reward_model.exists()


def test_one_file_for_a_task_with_train_and_test_splits_is_one_line(tmp_path):
    """IMDB and GSM8K read a train and a test split: one file served as both, so IMDB's test lost every review to the
    train overlap (a traceback after set-up, results.json written; a 2026-12-07 trial); GSM8K refused it already."""
    data = tmp_path / "train.jsonl"
    data.write_bytes(GOOD)
    for recipe in ("quickstart.yaml", "tiny/gsm8k_reinforce.yaml"):
        out = tmp_path / "run"
        code, errors = _main_quietly([str(REPO / "recipes" / recipe), "--dataset_name", str(data), "--output_dir", str(out)])
        assert code == 2 and len(errors) == 1 and errors[0].startswith(f"error: dataset_name: cannot load {str(data)!r}: ") and "is one file; " in errors[0] and "needs its train and test splits" in errors[0], errors
        assert not out.exists()


def test_a_damaged_weights_file_is_one_line_exit_2_nothing_written(tmp_path):
    from grade_trl.models import resolve_model_path

    model = tmp_path / "model"
    shutil.copytree(resolve_model_path("embedded"), model)
    with open(model / "model.safetensors", "r+b") as weights:
        weights.truncate(100_000)  # a copy cut short
    for recipe in ("length_grade_ste.yaml", "length_grpo.yaml"):
        out = tmp_path / "runs" / "length" / recipe  # folders the run would have made, parents included, are removed again
        code, errors = _main_quietly([str(REPO / "recipes" / "tiny" / recipe), "--model_name_or_path", str(model), "--output_dir", str(out)])
        assert code == 2 and errors == [f"error: model_name_or_path: cannot load {str(model)!r}: Error while deserializing header: incomplete "
                                        "metadata, file not fully covered (a damaged or truncated weights file: copy or download it again)"], errors
        assert not (tmp_path / "runs").exists()


def test_a_model_without_a_tokenizer_or_positions_for_prompt_and_completion_is_one_line(tmp_path):
    """transformers 5 builds an empty tokenizer from a folder without one, and a prompt plus completion past the model's
    positions is an index error at the first generation: both one line naming the key, exit 2, nothing written."""
    from grade_trl.models import resolve_model_path

    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(resolve_model_path("embedded"), name), model / name)
    half = tmp_path / "half_a_tokenizer"  # a tokenizer_config.json alone: transformers' five lines were cut to "... from one of: "
    shutil.copytree(model, half)
    shutil.copy(os.path.join(resolve_model_path("embedded"), "tokenizer_config.json"), half)
    cases = [
        ("length_grpo.yaml", ["--model_name_or_path", str(model)], f"error: model_name_or_path: {str(model)!r} has no tokenizer files"),
        ("length_reinforce.yaml", ["--model_name_or_path", str(half)], f"error: model_name_or_path: cannot load {str(half)!r}: its tokenizer files cannot build a "
                                                                         "tokenizer (no tokenizer.json, nor the vocabulary its tokenizer_config.json's class reads"),
        ("imdb_reinforce.yaml", ["--max_new_tokens", "240"], "error: max_new_tokens: max_prompt_length 32 + max_new_tokens 240 = 272 tokens, but 'embedded' has 256 positions"),
        ("length_grpo.yaml", ["--max_completion_length", "240"], "error: max_completion_length: max_prompt_length 32 + max_completion_length 240 = 272 tokens"),
    ]
    for recipe, extra, message in cases:
        code, errors = _main_quietly([str(REPO / "recipes" / "tiny" / recipe), "--output_dir", str(tmp_path / "runs" / "x"), *extra])
        assert code == 2 and len(errors) == 1 and errors[0].startswith(message), errors
        assert not (tmp_path / "runs").exists()


def test_a_bad_lora_target_or_model_argument_is_one_line_naming_its_key(tmp_path):
    """PEFT's and from_pretrained's refusals were blamed on model_name_or_path (lora_target_modules) or were a traceback
    with exit 1 and a results.json (a model_init_kwargs typo)."""
    for recipe in ("length_reinforce.yaml", "length_grpo.yaml"):
        out = tmp_path / "run"
        cases = [
            (["--use_peft", "true", "--lora_target_modules", "[c_atn]"], "error: lora_target_modules: Target modules {'c_atn'} not found in the base model."),
            (["--model_init_kwargs", "{dtyp: float32}"], "error: model_init_kwargs: 'dtyp' is an argument of neither from_pretrained nor the model"),
        ]
        for extra, start in cases:
            code, errors = _main_quietly([str(REPO / "recipes" / "tiny" / recipe), "--output_dir", str(out), "--max_steps", "1", *extra])
            assert code == 2 and len(errors) == 1 and errors[0].startswith(start), (recipe, errors)
            assert not out.exists()


def _unreachable_hub(monkeypatch, tmp_path):
    """A hub whose host refuses connections (a closed local port) and empty caches."""
    import socket

    import datasets.config
    from huggingface_hub import constants

    with socket.socket() as probe:  # a port nothing listens on: bound, then closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    for variable in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)
    return port


def test_an_unreachable_hub_id_is_one_line_at_once_not_after_the_hubs_retries(monkeypatch, tmp_path):
    """huggingface_hub retries an unreachable hub five times per file (50 s for a model id, 27 s for a data set id):
    a hub id that no local cache holds, with the hub's host refusing connections, is refused before that."""
    import socket

    from huggingface_hub import constants

    from grade_trl.models import unreachable_hub_id

    port = _unreachable_hub(monkeypatch, tmp_path)
    assert "cannot be reached from here" in unreachable_hub_id("someorg/some-model")
    for key in ("model_name_or_path", "dataset_name", "gold_judge"):  # gold_judge: a classifier's id, once blamed on dataset_name
        out = tmp_path / "run"
        code, errors = _main_quietly([QUICKSTART, f"--{key}", "someorg/missing", "--output_dir", str(out)])
        assert code == 2 and errors == [f"error: {key}: cannot load 'someorg/missing': the hub (http://127.0.0.1:{port}) cannot be reached from here "
                                        "(Connection refused) and no local cache holds it (give a local path or `embedded`, or download it where the hub is reachable)"], errors
        assert not out.exists()
    # what may still load is left to the libraries: a local path, `embedded`, a cached copy, offline mode, a proxy, a hub that answers
    assert unreachable_hub_id("embedded") is None and unreachable_hub_id(str(tmp_path)) is None
    (tmp_path / "hub" / "models--someorg--cached").mkdir(parents=True)
    (tmp_path / "datasets" / "someorg___prepared").mkdir(parents=True)
    assert unreachable_hub_id("someorg/cached") is None and unreachable_hub_id("someorg/prepared") is None
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert unreachable_hub_id("someorg/some-model") is None
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert unreachable_hub_id("someorg/some-model") is None
    monkeypatch.delenv("HTTPS_PROXY")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert unreachable_hub_id("someorg/some-model") is None


RECIPE_FILE_CASES = [
    ("binary recipe file", bytes(range(256)) * 4, "is not a text (UTF-8 YAML) file"),
    ("empty recipe file", b"", "is empty"),
    ("a comment only", b"# nothing here\n", "is empty"),
    ("a list, not a mapping", b"- method: grade_ste\n", "must be a mapping"),
    ("invalid YAML", b"method: [grade\n", "is not valid YAML"),
    ("a number for a key", b"task: length\n1: 2\n", "key 1 is not a name (YAML reads it as int)"),  # was a TypeError traceback in the key hint
    ("null for a key", b"task: length\nnull: 2\n", "key null is not a name (YAML reads it as NoneType)"),
    ("a misspelt key", b"method: grade_ste\nlearnig_rate: 1.0e-4\n", "unknown recipe key 'learnig_rate'"),
    # PyYAML keeps the last of a repeated key silently: the run trained at whichever learning_rate came last (a journey audit)
    ("a key given twice inside a mapping", b"method: grade_ste\nreward_kwargs: {a: 1, a: 2}\n", "key 'a' is given twice (line 2); keep one"),
    ("a key given twice", b"method: grade_ste\nlearning_rate: 1.0e+30\nmax_steps: 2\nlearning_rate: 1.0e-4\n",
     "is not valid YAML at line 4: key 'learning_rate' is given twice (lines 2 and 4); keep one"),
]


def test_a_folder_that_is_not_a_saved_model_is_named_as_such(tmp_path):
    """An empty folder, or a data folder, as model_name_or_path was blamed on its tokenizer files (a 2026-12-07 trial)."""
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", REPO / "grade_trl" / "assets" / "imdb_sample"):
        with pytest.raises(RecipeError) as info:
            build_recipe({"output_dir": str(tmp_path / "run"), "model_name_or_path": str(folder)})
        assert str(info.value) == (f"model_name_or_path: {str(folder)!r} is a folder without config.json, not a saved model; give a folder written by "
                                   "save_pretrained (config.json, the weights and the tokenizer), a hub id, or `embedded`")
    from grade_trl.models import resolve_model_path

    build_recipe({"output_dir": str(tmp_path / "run"), "model_name_or_path": str(resolve_model_path("embedded"))})  # a saved model passes


def test_a_folder_given_as_the_recipe_names_a_recipe_in_it(tmp_path):
    """`run recipes/tiny` said "recipe file not found" of a folder that exists (a 2026-12-07 trial)."""
    out = tmp_path / "run"
    code, errors = _main_quietly([str(REPO / "recipes" / "tiny"), "--output_dir", str(out)])
    assert code == 2 and errors == [f"error: recipe {REPO / 'recipes' / 'tiny'} is a folder; give the path of a .yaml recipe, e.g. "
                                    f"{REPO / 'recipes' / 'tiny' / 'gsm8k_cispo.yaml'}"], errors
    assert not out.exists()


@pytest.mark.parametrize("name,content,fragment", RECIPE_FILE_CASES, ids=[c[0] for c in RECIPE_FILE_CASES])
def test_a_bad_recipe_file_is_one_line_exit_2_nothing_written(tmp_path, name, content, fragment):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(content)
    out = tmp_path / "run"
    code, errors = _main_quietly([str(recipe), "--output_dir", str(out)])
    assert code == 2 and len(errors) == 1, errors
    assert fragment in errors[0], errors
    assert not out.exists()


def test_every_built_in_task_declares_how_many_rewards_it_sums():
    """The up-front reward_weights check knows each built-in task's rewards; the gsm8k recipes' [1.0, 0.5] pass it."""
    from grade_trl.recipe import BUILT_IN_REWARDS
    from grade_trl.tasks import TASK_BUILDERS

    assert set(BUILT_IN_REWARDS) == set(TASK_BUILDERS) - {"custom"}
    build_recipe({"output_dir": "x", "task": "gsm8k", "method": "reinforce", "reward_weights": [1.0, 0.5]})


def test_a_reward_head_is_reused_across_clones_and_refused_for_another_backbone(tmp_path, reward_model, tokenizer):
    """A head records its backbone as the recipe names it (`embedded`), so a clone elsewhere reuses it; a head trained
    on another backbone is refused in one line naming reward_model_path (it used to blame dataset_name)."""
    from grade_trl.tasks import load_or_train_sentiment_model

    run = build_recipe({"output_dir": str(tmp_path / "run"), "reward_model_path": str(tmp_path / "head")}).run
    reward_model.save(tmp_path / "head", {"backbone_path": "/another/clone/grade_trl/assets/tiny-imdb-gpt2"})
    model, metadata = load_or_train_sentiment_model(run, tokenizer, splits=None, seed=0)
    assert metadata["backbone"] == "embedded"
    reward_model.save(tmp_path / "head", {"backbone": "openai-community/gpt2", "backbone_path": "/models/gpt2"})
    with pytest.raises(UserError) as info:
        load_or_train_sentiment_model(run, tokenizer, splits=None, seed=0)
    assert str(info.value).startswith("reward_model_path: ") and "openai-community/gpt2" in str(info.value) and "\n" not in str(info.value)


def test_an_unwritable_reward_model_path_is_one_line_before_the_head_is_trained(tmp_path, monkeypatch):
    """The head is trained (minutes at full size) before it is saved: a folder it cannot be saved into is refused with
    the recipe, naming reward_model_path; it was blamed on dataset_name after the training. A save that fails anyway
    (a full disk) names reward_model_path too."""
    from grade_trl.rewards.sentiment import SentimentRewardModel

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = tmp_path / "run"
    code, errors = _main_quietly([QUICKSTART, "--output_dir", str(out), "--reward_model_path", str(blocker / "head"), "--max_steps", "1"])
    assert code == 2 and errors == [f"error: reward_model_path: cannot write into {str(blocker / 'head')!r} ({str(blocker)!r} is a file); "
                                    "give a folder you can write to"], errors
    assert not out.exists()

    def disk_full(self, path, metadata=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SentimentRewardModel, "save", disk_full)
    code, errors = _main_quietly([QUICKSTART, "--output_dir", str(out), "--reward_model_path", str(tmp_path / "head"), "--max_steps", "1",
                                  "--reward_split_size", "40", "--reward_epochs", "1"])
    assert code == 2 and errors == [f"error: reward_model_path: cannot save the trained head into {str(tmp_path / 'head')!r} (No space left on device); "
                                    "give a folder you can write to"], errors


def test_what_stands_where_the_run_writes_its_outputs_is_one_line_before_anything_runs(tmp_path):
    """A folder called results.json let the whole run train, then lost its results to a traceback (no results.json);
    a file called model or best_model was a traceback at the first save. Each is refused with the recipe, naming
    output_dir and the path, and left as it was."""
    cases = [
        ("results.json", "mkdir", "a folder, where the run writes its results.json file"),
        ("model", "touch", "a file, where the run writes its model folder"),
        ("best_model", "touch", "a file, where the run writes its best_model folder"),
        (".grade_trl.lock", "mkdir", "a folder, where the run writes its .grade_trl.lock file"),
    ]
    for name, make, found in cases:
        out = tmp_path / name.strip(".")
        (out / name).mkdir(parents=True) if make == "mkdir" else (out.mkdir(), (out / name).touch())
        with pytest.raises(UserError) as info:
            build_recipe({"method": "reinforce", "task": "length", "output_dir": str(out)})
        assert str(info.value) == f"output_dir: {str(out / name)!r} is {found}; move it away or give another output_dir"
        assert [p.name for p in out.iterdir()] == [name]
    as_file = tmp_path / "a_file"
    as_file.write_text("")
    with pytest.raises(UserError) as info:  # output_dir itself a file (each task; IMDB's check was the reward head's alone)
        build_recipe({"method": "reinforce", "task": "length", "output_dir": str(as_file / "run")})
    assert str(info.value) == f"output_dir: cannot write into {str(as_file / 'run')!r} ({str(as_file)!r} is a file); give a folder you can write to"
    (tmp_path / "resumable").mkdir()
    (tmp_path / "resumable" / "results.json").write_text("{}")  # the right kinds pass
    (tmp_path / "resumable" / "model").mkdir()
    build_recipe({"method": "reinforce", "task": "length", "output_dir": str(tmp_path / "resumable")})


def test_an_output_dir_that_cannot_be_made_leaves_no_parent_folders_behind(tmp_path):
    """mkdir made X/a/b and then failed on a name longer than the file system allows: the one line was right, but the
    empty parents stayed (a 2026-12-07 audit)."""
    out = tmp_path / "X" / "a" / "b" / ("y" * 300)
    code, errors = _main_quietly([str(REPO / "recipes" / "tiny" / "length_reinforce.yaml"), "--output_dir", str(out)])
    assert code == 2 and len(errors) == 1 and errors[0].startswith(f"error: output_dir: cannot write into {str(out)!r} (File name too long)"), errors
    assert not (tmp_path / "X").exists()


def test_only_the_models_load_is_blamed_on_model_name_or_path(tmp_path):
    """build_trainer wrapped the whole trainer construction in `loading('model_name_or_path')`, so a trainer's own
    refusal (here a reward that is not callable) read 'model_name_or_path: cannot load 'embedded': reward_funcs[0]: ...'."""
    import dataclasses

    from grade_trl.build import build_task, build_trainer
    from grade_trl.recipe import parse_recipe

    recipe = parse_recipe([str(REPO / "recipes" / "tiny" / "length_reinforce.yaml"), "--output_dir", str(tmp_path / "run")])
    tokenizer, task = build_task(recipe, gold_judge=False)
    with pytest.raises(ValueError) as info:
        build_trainer(recipe, dataclasses.replace(task, reward_funcs=[42]), tokenizer)
    assert str(info.value).startswith("reward_funcs[0]: int 42 is not callable"), info.value


def test_a_gsm8k_prompt_length_that_fits_no_problem_names_max_prompt_length(tmp_path):
    out = tmp_path / "run"
    code, errors = _main_quietly([str(REPO / "recipes" / "tiny" / "gsm8k_reinforce.yaml"), "--output_dir", str(out), "--max_prompt_length", "8"])
    assert code == 2 and errors == ["error: max_prompt_length: 8 tokens fit no GSM8K train prompt (GSM8K questions need about 256 tokens with a "
                                    "chat template); raise it"], errors
    assert not out.exists()


def test_a_damaged_head_metadata_file_names_reward_model_path(tmp_path):
    """A reward_model.json cut short was a JSONDecodeError traceback and a 'failed' results.json (before that, a line
    blaming dataset_name)."""
    head = tmp_path / "head"
    head.mkdir()
    (head / "head.safetensors").write_bytes(b"")
    (head / "reward_model.json").write_text('{"backbone": "emb')
    out = tmp_path / "run"
    code, errors = _main_quietly([QUICKSTART, "--output_dir", str(out), "--reward_model_path", str(head), "--max_steps", "1"])
    assert code == 2 and len(errors) == 1 and errors[0].startswith(f"error: reward_model_path: cannot read the head's reward_model.json in {str(head)!r}"), errors
    assert not out.exists()
    (head / "reward_model.json").write_text('{"backbone": "embedded"}')  # readable; the head's weights cut short
    (head / "head.safetensors").write_bytes(b"\x10" * 12)
    code, errors = _main_quietly([QUICKSTART, "--output_dir", str(out), "--reward_model_path", str(head), "--max_steps", "1"])
    assert code == 2 and len(errors) == 1 and errors[0].startswith(f"error: reward_model_path: cannot load {str(head)!r}"), errors  # was model_name_or_path
    assert not out.exists()
