"""Recipes: one flat YAML mapping (plus `--key value` overrides) -> run arguments + the method's config.

Every key belongs either to `RunArguments` (what to optimise and how to judge it) or to the
method's config dataclass (how to optimise), as with TRL's `TrlParser`. All validation happens
here, before anything is loaded or written: a bad recipe fails in one line with exit code 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from .cli import Overrides, check_bare_flags, check_writable_folder, is_list_type, coerce, load_yaml, parse_overrides, range_error, unknown_key_hint
from .errors import UserError
from .methods import METHODS, get_method
from .reporting import missing_reporter

logger = logging.getLogger(__name__)


class RecipeError(UserError):
    """A recipe or override that cannot run; the message is one line that names the key and the fix. `unknown_key`:
    the key when it is not a recipe key at all (a command that forwards overrides then says which of its own options
    it resembles: `compare --frce`)."""

    def __init__(self, message: str, unknown_key: str | None = None):
        super().__init__(message)
        self.unknown_key = unknown_key


@dataclass
class RunArguments:
    """What a run optimises and how it is judged; the same for every method in a comparison."""

    method: str = field(default="grade_ste", metadata={"help": "Training method, one of: " + ", ".join(f"`{name}`" for name in METHODS) + " (grade_trl.methods; `--help --method NAME` for its keys)."})
    task: str = field(
        default="imdb_sentiment",
        metadata={
            "help": "Task: `imdb_sentiment` (learned P(positive) reward) or `length` (`2 - words / 16`), both on IMDB prompts; `gsm8k` (final-answer "
            "correctness + format reward, greedy accuracy; not for GRADE); or `custom`: your data set (dataset_name, prompt_column, train/validation/test_split) "
            "and reward functions (reward_funcs, import paths), as `trl grpo --dataset_name ... --reward_funcs ...` (README: Your own task in 3 steps)."
        },
    )
    model_name_or_path: str = field(default="embedded", metadata={"help": "Policy: hub id, local path, or `embedded` (the bundled tiny-imdb-gpt2)."})
    dataset_name: str = field(default="stanfordnlp/imdb", metadata={"help": "IMDB: hub id, a local folder with a file per split (train and test: .jsonl, .jsonl.gz or .parquet), or `embedded` (bundled 3k/1k sample). GSM8K (default `openai/gsm8k`, config main): the same forms, `embedded` being a bundled 1k/200 sample. custom (required): a hub id, a local folder, or a .jsonl/.json/.csv/.parquet file, as datasets.load_dataset reads them."})
    reward_split_size: int = field(default=5000, metadata={"help": "IMDB train reviews for the reward model (GRADE experiment: 5,000)."})
    policy_split_size: int = field(default=10000, metadata={"help": "IMDB train reviews whose openings are the training prompts (10,000)."})
    validation_split_size: int = field(default=2000, metadata={"help": "IMDB train reviews held out for validation (2,000)."})
    test_split_size: int | None = field(default=None, metadata={"help": "IMDB test reviews to draw test prompts from (default: all)."})
    prompt_max_chars: int = field(default=200, metadata={"help": "Prompts are the first 1-2 sentences of a review, at most this many characters."})
    max_prompt_length: int = field(default=32, metadata={"help": "IMDB and length: prompts are cut to this many tokens (GRADE experiment: 32). GSM8K (default 512) and custom (default 128): a longer prompt is dropped, not cut (a cut question has no answer). Also given to the trainer when its config has this key."})

    reward_model_path: str | None = field(default=None, metadata={"help": "Folder of the trained sentiment head; trained there when missing (default: {output_dir}/reward_model)."})
    reward_backbone: str | None = field(default=None, metadata={"help": "Frozen backbone of the reward model; must share the policy's vocabulary (default: the policy)."})
    reward_input: str = field(default="completion", metadata={"help": "What the reward scores, for every method alike: `completion` or `prompt_completion`."})
    reward_max_length: int = field(default=128, metadata={"help": "Tokens of each review the reward head is trained on."})
    reward_epochs: int = field(default=10, metadata={"help": "Epochs of reward-head training on frozen features."})
    reward_learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the reward head."})

    eval_num_prompts: int = field(default=100, metadata={"help": "Validation prompts scored at each evaluation (GRADE experiment: 100)."})
    test_num_prompts: int = field(default=500, metadata={"help": "Test prompts scored once at the end (GRADE experiment: 500)."})
    eval_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of evaluation generations (identical for every method)."})
    eval_top_p: float = field(default=0.9, metadata={"help": "Top-p of evaluation generations (GRADE experiment: 0.9)."})
    eval_min_new_tokens: int | None = field(default=None, metadata={"help": "Minimum new tokens of evaluation generations (default: the method's own `min_new_tokens`; 0 for TRL's GRPO, which has none). Set it to compare GRPO with the others on equal lengths."})
    eval_seed: int = field(default=1234, metadata={"help": "Seed of every evaluation's sampling, so each evaluation sees the same noise."})
    num_samples_to_show: int = field(default=3, metadata={"help": "Validation completions shown before/after training in the summary."})
    eval_best_of_n: int = field(default=4, metadata={"help": "Samples per prompt for `best_of_n_reward` (the best of N, mean over prompts); 1 turns it off. Costs N generations per prompt per evaluation."})
    gold_judge: str = field(
        default="tfidf",
        metadata={
            "help": "Independent judge scoring the same generations as `gold_reward` (IMDB): `tfidf` (TF-IDF + logistic regression fitted on IMDB train, offline), "
            "a sequence classifier's hub id or path (e.g. siebert/sentiment-roberta-large-english, lvwerra/distilbert-imdb), or `none`."
        },
    )
    save_best_model: bool = field(default=True, metadata={"help": "Save the best-validation checkpoint to {output_dir}/best_model and test it at the end beside the final one."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start over in an output_dir that holds an earlier run's checkpoint-N folders: they are deleted once the set-up has "
                  "checked the input. Without it such a run is refused (resume it with resume_from_checkpoint: true instead): a new run's "
                  "checkpoints among an earlier run's would make `resume_from_checkpoint: true` pick the earlier run's last one. An earlier "
                  "run's model/ and best_model/ are replaced either way, as its results.json is."},
    )
    early_stopping_patience: int = field(default=0, metadata={"help": "Stop when the validation metric has not improved for this many evaluations (0: off)."})
    doctor: str = field(default="warn", metadata={"help": "Run doctor during training (grade_trl/doctor.py): `warn` logs each finding once with its evidence and likely cause, `stop` also stops the run on the findings named by doctor_stop_on, `off` disables it. After a run: `python -m grade_trl.doctor OUTPUT_DIR`."})
    doctor_stop_on: list[str] = field(default_factory=lambda: ["error"], metadata={"help": "With doctor: stop, what stops the run: a severity (`error`: non-finite values, negative KL, gradient explosion; `warning`) or check ids such as reward_regression, kl_high."})
    probe_steps: list[int] | None = field(default=None, metadata={"help": "Optimizer steps (0 = before training) at which K independent gradient estimates on a fixed prompt batch are drawn and their mean squared norm, total variance, SNR and cosines logged as probe_* (grade_trl/probe.py); None: off."})
    probe_num_estimates: int = field(default=16, metadata={"help": "Independent gradient estimates per probe (>= 2); each costs one rollout and backward pass of the probe batch."})
    probe_num_prompts: int = field(default=8, metadata={"help": "The probe's fixed batch: the first N training prompts, the same for every method of a task."})
    nonfinite: str = field(default="stop", metadata={"help": "A NaN or inf gradient before an optimizer step (for every method): `stop` the run there (exit 2, results.json kept), or `skip` that update (no weight or optimizer-state change) and go on, counting it in results.json `final.nonfinite_skipped_steps`."})
    nonfinite_max_skips: int = field(default=10, metadata={"help": "With nonfinite: skip, the run stops as with `stop` at the skip after this many."})
    doctor_settings: dict | None = field(default=None, metadata={"help": "Overrides of the doctor's thresholds, e.g. {kl_max: 20, regression_evals: 3}; every setting: `python -m grade_trl.doctor --help`."})
    eval_num_problems: int = field(default=500, metadata={"help": "GSM8K: the first N test problems whose greedy accuracy is `eval_accuracy` at each evaluation (the users' runs: 500)."})
    test_num_problems: int | None = field(default=None, metadata={"help": "GSM8K: the first N test problems of the final test (default: the whole test split, 1,319)."})
    eval_pass_k: int = field(default=0, metadata={"help": "GSM8K: k > 1 also samples k completions per problem (eval_temperature, eval_top_p) for `pass_at_k` and `maj_at_k`; costs k more generations."})

    # task: custom (the recipe's own data and reward functions)
    dataset_config: str | None = field(default=None, metadata={"help": "custom: the data set's configuration name (datasets.load_dataset's `name`), for a hub data set with several."})
    train_split: str = field(default="train", metadata={"help": "custom: the split of the training prompts; datasets' slicing works (`train[:90%]`). A single local file has one split, `train`."})
    validation_split: str | None = field(default=None, metadata={"help": "custom: the split whose first eval_num_prompts rows are the validation prompts; null: eval_num_prompts rows held out of train_split (shuffled once with a fixed seed, so the same rows for every method and seed)."})
    test_split: str | None = field(default=None, metadata={"help": "custom: the split whose first test_num_prompts rows are the test prompts; null: test_num_prompts rows held out of train_split, after the validation rows."})
    prompt_column: str = field(default="prompt", metadata={"help": "custom: the column of the prompts: text, or chat messages ([{role, content}, ...]) rendered with the tokenizer's chat template and the generation prompt, as TRL does. Every other column reaches the reward functions as a keyword list, one value per completion. Prompts longer than max_prompt_length tokens are dropped."})
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "custom (required): the reward functions, summed with reward_weights: import paths `package.module.function` (TRL's signature "
            "`reward(prompts, completions, **kwargs) -> list[float]`; a class is built with reward_kwargs) or built-in names (`length`). Modules next to "
            "the recipe file import too. GRADE methods need every one differentiable (`differentiable = True`, `score_soft`)."
        },
    )
    reward_kwargs: dict | None = field(default=None, metadata={"help": "custom: the keyword arguments of each reward class in reward_funcs, by its path: {my_rewards.PositiveWords: {words: [great, fun]}}; a class whose __init__ takes `tokenizer` or `eos_token_id` also gets the policy's."})
    eval_reward_funcs: list[str] | None = field(default=None, metadata={"help": "custom: held-out reward functions (import paths, same signature), never trained on; their mean on the evaluation completions is `gold_reward`, as the IMDB judge's is."})
    eval_reward_kwargs: dict | None = field(default=None, metadata={"help": "custom: the keyword arguments of each class in eval_reward_funcs, by its path (as reward_kwargs)."})

    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (GRADE experiment: 16)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (GRADE experiment: 32)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout, written to the adapter's config (GRADE experiment: 0.05). Training turns every dropout of the policy off, LoRA's included, for every method (ours, and TRL's `disable_dropout` for GRPO/CISPO): the log-probs a loss scores must be the ones the tokens were sampled with."})
    lora_target_modules: list[str] | None = field(default=None, metadata={"help": "Modules to adapt (default: PEFT's choice for the architecture; GPT-2: c_attn, c_proj)."})

    def __post_init__(self):
        if self.reward_input not in ("completion", "prompt_completion"):
            raise ValueError(f"reward_input must be 'completion' or 'prompt_completion', got {self.reward_input!r}")
        if self.task not in TASKS:
            close = difflib.get_close_matches(str(self.task), list(TASKS), n=1)
            raise ValueError(f"task: unknown task {self.task!r}{' (did you mean ' + close[0] + '?)' if close else ''}; known tasks: {', '.join(TASKS)}")
        if self.probe_num_estimates < 2:
            raise ValueError(f"probe_num_estimates must be >= 2 (a variance needs two estimates), got {self.probe_num_estimates}")
        if self.nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be stop or skip, got {self.nonfinite!r}")
        if self.doctor not in ("warn", "stop", "off"):
            raise ValueError(f"doctor must be warn, stop or off, got {self.doctor!r}")
        from .diagnostics import build_settings, check_stop_on  # unknown settings or stop_on names raise a one-line error

        try:
            build_settings(self.doctor_settings or {})
        except UserError as error:
            raise ValueError(f"doctor_settings: {error}") from None
        try:
            check_stop_on(self.doctor_stop_on)
        except ValueError as error:  # the callback's own argument is stop_on: here it is the recipe's doctor_stop_on
            raise ValueError(f"doctor_{error}") from None


TASKS = ("imdb_sentiment", "length", "gsm8k", "custom")
# a chat-templated GSM8K question needs ~300 tokens; a custom prompt is dropped, not cut, when longer than max_prompt_length
TASK_DEFAULTS = {"gsm8k": {"dataset_name": "openai/gsm8k", "max_prompt_length": 512}, "custom": {"max_prompt_length": 128}}
CUSTOM_KEYS = ("dataset_config", "train_split", "validation_split", "test_split", "prompt_column", "reward_funcs", "reward_kwargs", "eval_reward_funcs", "eval_reward_kwargs")
_IMDB_TASKS = ("imdb_sentiment", "length")
TASK_KEYS = {  # keys that only some tasks read: under another task they were accepted and ignored without a word
    **dict.fromkeys(("eval_num_problems", "test_num_problems", "eval_pass_k"), ("gsm8k",)),
    **dict.fromkeys(("eval_num_prompts", "test_num_prompts"), (*_IMDB_TASKS, "custom")),
    **dict.fromkeys(("reward_split_size", "policy_split_size", "validation_split_size", "test_split_size", "prompt_max_chars"), _IMDB_TASKS),
}
TASK_KEY_TWINS = {"eval_num_prompts": "eval_num_problems", "test_num_prompts": "test_num_problems", "eval_num_problems": "eval_num_prompts",
                  "test_num_problems": "test_num_prompts"}  # what the other task calls it
NON_DIFFERENTIABLE_TASKS = {"gsm8k": "gsm8k's correctness reward is not (an exact match of the final answer has no gradient)"}


PATH_KEYS = ("model_name_or_path", "dataset_name", "reward_backbone", "gold_judge")


@dataclass
class Recipe:
    run: RunArguments
    config: Any  # the method's TrainingArguments subclass
    raw: dict  # the mapping as written (file + overrides), for results.json
    resume_from: str | None = None  # the checkpoint folder `resume_from_checkpoint` names (resume.resolve_checkpoint)


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def load_recipe_file(path: str) -> dict:
    if os.path.isdir(path):
        try:
            inside = sorted(name for name in os.listdir(path) if name.endswith((".yaml", ".yml")))
        except OSError:  # a folder that cannot be listed
            inside = []
        example = os.path.join(path, inside[0]) if inside else "recipes/quickstart.yaml"
        raise RecipeError(f"recipe {path} is a folder; give the path of a .yaml recipe, e.g. {example}")
    if not os.path.isfile(path):
        raise RecipeError(f"recipe file not found: {path} (give the path of a .yaml recipe, e.g. recipes/quickstart.yaml)")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"recipe {path} is not a text (UTF-8 YAML) file; give a .yaml recipe, e.g. recipes/quickstart.yaml") from None
    if not text.strip():
        raise RecipeError(f"recipe {path} is empty; a recipe is YAML `key: value` lines, at least `method:` (see recipes/)")
    try:
        data = load_yaml(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"recipe {path} is not valid YAML{where}: {getattr(error, 'problem', error)}") from None
    if data is None:  # comments only
        raise RecipeError(f"recipe {path} is empty; a recipe is YAML `key: value` lines, at least `method:` (see recipes/)")
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a mapping of key: value lines, got {type(data).__name__}")
    for key in data:
        if not isinstance(key, str):  # `1: 2`, `null: x`, `true: x` (a traceback in the unknown-key hint)
            written = {None: "null", True: "true", False: "false"}.get(key, key) if isinstance(key, (bool, type(None))) else key
            raise RecipeError(f"recipe {path}: key {written} is not a name (YAML reads it as {type(key).__name__}); recipe keys are names such as learning_rate")
    folder = os.path.dirname(os.path.abspath(path))
    if folder not in sys.path:  # reward modules next to the recipe import (`reward_funcs: [my_rewards.f]`), searched last
        sys.path.append(folder)
    return data


PATH_OR_MAPPING_KEYS = ("accelerator_config", "deepspeed", "fsdp_config")
"""TrainingArguments' `dict | str` keys whose string is a file path; for the others (`generation_kwargs`,
`chat_template_kwargs`, `lr_scheduler_kwargs`, ...) the string is only a mapping written as JSON."""


def mapping_only(key: str, hint):
    """A `dict | str | None` key whose string can only be a mapping (not in PATH_OR_MAPPING_KEYS) as `dict | None`, so
    that `generation_kwargs: max_tokens=8` is a one-line error here, not a failure of the trainer's `**kwargs` later."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else ()
    mapping = next((a for a in options if (typing.get_origin(a) or a) is dict), None)
    if key in PATH_OR_MAPPING_KEYS or str not in options or mapping is None:
        return hint
    return typing.Optional[mapping] if type(None) in options else mapping


@functools.lru_cache(maxsize=None)
def _keys_of(method_name: str) -> tuple[dict, dict]:
    """({key: field}, {key: type hint}) of a method's recipe: its config's fields and the run's."""
    config_cls = get_method(method_name).config_class
    hints = {**typing.get_type_hints(config_cls), **typing.get_type_hints(RunArguments)}
    return {**_fields(config_cls), **_fields(RunArguments)}, {key: mapping_only(key, hint) for key, hint in hints.items()}


def as_trained(values: dict) -> dict:
    """A recipe's values as the run reads them: each coerced to its key's type (`1e-05` and `1.0e-5`, `yes` and `true`
    alike), and the keys set to their default left out, so that two recipes that train alike compare equal (compare and
    analysis match runs by it). A key or value it cannot read stays as written."""
    method = str(values.get("method", RunArguments.method))
    if method not in METHODS:
        return dict(values)
    fields, hints = _keys_of(method)
    runner_default = runner_defaults(get_method(method), given=values)  # what a recipe that leaves a key out gets
    trained = {}
    for key, value in values.items():
        if key not in fields:
            trained[key] = value
            continue
        try:
            value = coerce(key, value, hints[key])
        except UserError:
            pass
        default = fields[key].default if fields[key].default is not dataclasses.MISSING else (
            fields[key].default_factory() if fields[key].default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        default = coerce(key, runner_default[key], hints[key]) if key in runner_default else default
        if key == "method" or value != default:
            trained[key] = value
    return trained


def method_reads(method_name: str, key: str) -> bool:
    """Whether a recipe of method `method_name` takes `key` (a run key, or a field of the method's config)."""
    return method_name in METHODS and key in _keys_of(method_name)[0]


def shared_overrides(recipes: dict[str, dict], overrides) -> tuple[dict[str, Any], list[str]]:
    """The command-line overrides of a command over several recipes (compare, probe), per recipe path: a key that some
    recipes' methods read and others do not goes to those that read it (`--max_new_tokens 8 --max_completion_length 8`
    shortens every method's completions, GRADE's and TRL GRPO's alike); a key that none reads goes to all, to be refused
    there as an unknown key. recipes: {path: the recipe file's mapping}. Also returns one note per key that some recipes
    do not get, naming them and, where their method has one, the key to use instead."""
    methods = {path: str(overrides.get("method", values.get("method", RunArguments.method))) for path, values in recipes.items()}
    skipped = {key: [path for path, method in methods.items() if not method_reads(method, key)] for key in overrides}
    skipped = {key: paths for key, paths in skipped.items() if paths and len(paths) < len(methods)}
    notes = []
    for key, paths in skipped.items():
        fixes = sorted({get_method(methods[path]).misplaced_keys.get(key, "") for path in paths if methods[path] in METHODS} - {""})
        notes.append(f"--{key} goes to {len(methods) - len(paths)} of {len(methods)} recipes, not to {', '.join(paths)}, whose method "
                     f"({', '.join(sorted({methods[path] for path in paths}))}) does not read it" + (f": {' / '.join(fixes)}" if fixes else ""))
    routed = {}
    for path in recipes:
        keys = [key for key in overrides if path not in skipped.get(key, ())]
        routed[path] = Overrides({key: overrides[key] for key in keys}, bare=set(getattr(overrides, "bare", ())) & set(keys))
    return routed, notes


def build_recipe(values: dict[str, Any], bare_keys=()) -> Recipe:
    """Validate `values` (file merged with overrides) and build the run arguments and the method's config.
    bare_keys: the overrides given as a bare `--flag` (`cli.Overrides.bare`), refused where the key takes a value."""
    raw = dict(values)
    method_name = str(values.get("method", RunArguments.method))
    if method_name not in METHODS:
        raise RecipeError(f"method: unknown method {method_name!r}{unknown_key_hint(method_name, list(METHODS), 'grade_trl.run')}; known methods: {', '.join(METHODS)}")
    method = get_method(method_name)
    config_cls = method.config_class
    run_fields, config_fields = _fields(RunArguments), _fields(config_cls)
    _, hints = _keys_of(method_name)

    task = str(values.get("task", RunArguments.task))
    if task in NON_DIFFERENTIABLE_TASKS and method.relaxed:
        raise RecipeError(f"method {method_name!r} cannot train task {task!r}: GRADE needs a differentiable reward; {NON_DIFFERENTIABLE_TASKS[task]}; use reinforce, ppo, grpo or cispo")
    values = {**TASK_DEFAULTS.get(task, {}), **values}  # the task's own data set and prompt length unless the recipe sets them
    if isinstance(values.get("report_to"), str) and "," in values["report_to"]:  # `wandb,tensorboard`, as a list key takes it
        values["report_to"] = [name.strip() for name in values["report_to"].split(",") if name.strip()]
    unset = []  # `--key null` on a key only another method reads: the recipe file's key removed (a method switched on the command line)
    for key in values:
        if key in run_fields or key in config_fields:
            continue
        owners = [name for name in METHODS if key in _fields(get_method(name).config_class)]
        if values[key] is None and owners:
            unset.append(key)
            continue
        if key in method.misplaced_keys:
            raise RecipeError(f"{key}: {method.misplaced_keys[key]} (--{key} null on the command line removes the recipe's)")
        if owners:  # a recipe written for another method, its method switched (`--method reinforce` on a GRADE recipe)
            raise RecipeError(f"{key}: a key of {', '.join(owners)}, not of method {method_name!r}; remove it (--{key} null on the command line), or "
                              f"start from a recipe written for {method_name} (recipes/tiny/ has one per method)")
        hint = unknown_key_hint(key, list(run_fields) + list(config_fields), "grade_trl.run")
        if not hint.startswith("; did you mean"):  # close to another method's key (`clip_range` in a REINFORCE recipe: PPO's `cliprange`)?
            others = {k: name for name in METHODS if name != method_name for k in _fields(get_method(name).config_class) if k not in config_fields}
            if close := difflib.get_close_matches(key, list(others), n=1):
                hint = f"; {close[0]} is a key of {others[close[0]]}, not of method {method_name!r}"
        raise RecipeError(f"unknown recipe key {key!r} for method {method_name!r}{hint}", unknown_key=key)
    for key in SHARDING_ARGUMENTS:
        if values.get(key) not in (None, "", False, [], {}):  # what Trainer reads as off
            raise RecipeError(f"{key}: the runner shards through Accelerate's config, not TrainingArguments' {key}; remove it and launch with "
                              f"accelerate launch --config_file accelerate_configs/{'zero3' if key == 'deepspeed' else 'fsdp2'}.yaml -m grade_trl.run "
                              "(README, \"Past one GPU\")")
    values = {key: value for key, value in values.items() if key not in unset}
    for key, value in method.implied.items():
        if key in values and values[key] != value:
            raise RecipeError(f"{key}: method {method_name!r} means {key}={value!r}, but the recipe sets {values[key]!r}")

    if isinstance(values.get("scale_rewards"), bool) or str(values.get("scale_rewards")).lower() in ("true", "false"):
        # TRL's `str | bool` key, typed `str`: true / false became the strings 'True' / 'False', which TRL's own mapping
        # (true: group, false: none) no longer matched, and the first step failed; TRL's meaning, as its words
        values["scale_rewards"] = "group" if str(values["scale_rewards"]).lower() == "true" else "none"
    try:
        check_bare_flags(bare_keys, hints, allowed=("resume_from_checkpoint",), name=lambda key: key)  # true: the last checkpoint
        run_kwargs = {k: coerce(k, v, hints[k]) for k, v in values.items() if k in run_fields}
        # A key both sides know (max_prompt_length) feeds both, so the data and the trainer agree.
        config_kwargs = {**method.implied, **{k: coerce(k, v, hints[k]) for k, v in values.items() if k in config_fields}}
    except UserError as error:
        raise RecipeError(str(error)) from None
    if "report_to" in config_kwargs and config_kwargs["report_to"] is None:  # null: no tracker (transformers would look one up named None)
        config_kwargs["report_to"] = "none"
    for key, value in runner_defaults(method, given=config_kwargs).items():
        config_kwargs.setdefault(key, value)
    if "use_cpu" not in config_kwargs and not has_accelerator():
        # Accelerate only joins processes started by `accelerate launch`/torchrun into one CPU (gloo) group when
        # told it is on the CPU; without this, each of N CPU processes would train alone on the whole data.
        config_kwargs["use_cpu"] = True
    check_launch(config_kwargs.get("use_cpu", False), relaxed=method.relaxed)
    check_cpu_precision(config_kwargs.get("use_cpu", False), bool(config_kwargs.get("fp16")), bool(config_kwargs.get("bf16")))
    check_paths(run_kwargs)
    if "max_prompt_length" in config_fields and "max_prompt_length" not in config_kwargs and "max_prompt_length" in run_kwargs:
        config_kwargs["max_prompt_length"] = run_kwargs["max_prompt_length"]
    if "activation_checkpointing" in config_fields and config_kwargs.get("activation_checkpointing") is None:
        # transformers 5 renamed gradient_checkpointing and warns (FutureWarning, two lines on stderr) whenever the old
        # name is set, which TRL's GRPOConfig does by default (True): the recipe's value, or that default, under the new name
        fields = {f.name: f for f in dataclasses.fields(config_cls)}
        old = config_kwargs.pop("gradient_checkpointing", fields["gradient_checkpointing"].default if "gradient_checkpointing" in fields else None)
        if old is not None:
            config_kwargs["activation_checkpointing"] = old
    check_enum_values(config_kwargs)
    if config_kwargs.get("save_strategy") == "best":
        # Trainer saves on a new best of the metrics its own evaluate() returns; the runner validates in a callback
        # (evaluation.py), so no checkpoint was ever saved (and without metric_for_best_model: a traceback after set-up)
        raise RecipeError("save_strategy: 'best' is not supported: the runner validates outside Trainer's evaluate, so Trainer would never "
                          "see a new best; the run keeps its best validation checkpoint in best_model/ (save_best_model), and "
                          "save_strategy steps saves resumable checkpoints")
    # Nor is Trainer's own evaluation: the runner hands Trainer no eval_dataset, so eval_strategy failed after set-up
    # (Trainer's traceback, exit 1, results.json written), and what reads evaluate()'s metrics never ran
    if config_kwargs.get("eval_strategy", "no") != "no":
        raise RecipeError(f"eval_strategy: {config_kwargs['eval_strategy']!r} is not supported: the runner validates in its own callback "
                          "(the validation reward every eval_steps, the best checkpoint kept in best_model/), not through Trainer's "
                          "evaluate, which has no eval_dataset here; remove eval_strategy and set eval_steps")
    for key in ("load_best_model_at_end", "eval_on_start"):
        if config_kwargs.get(key):
            raise RecipeError(f"{key}: not supported: Trainer's evaluate never runs in the runner, which validates in its own callback (at "
                              "step 0 too); the run keeps its best validation checkpoint in best_model/ and tests it after training "
                              "(save_best_model); remove the key")
    if config_kwargs.get("lr_scheduler_type") in ("reduce_lr_on_plateau", "greedy"):
        raise RecipeError(f"lr_scheduler_type: {config_kwargs['lr_scheduler_type']!r} steps on the metrics of Trainer's evaluate, which "
                          "never runs in the runner (it validates in its own callback); choose a schedule of the step, such as linear, "
                          "cosine or constant_with_warmup")
    for key, value in (*run_kwargs.items(), *config_kwargs.items()):  # before the configs' own checks, which may not name the key
        check_range(key, value)
    try:
        run = RunArguments(**run_kwargs)
        config = config_cls(**config_kwargs)
    except (ValueError, TypeError, ZeroDivisionError) as error:
        # the whole message on one line: transformers' "... but found" goes on, on its next lines, with what it found
        message = key_first(" ".join(line.strip() for line in str(error).splitlines() if line.strip()))
        if message.startswith("generation_batch_size: must be divisible by num_generations") and "generation_batch_size" not in values:
            # the key the user never set: TRL derives it from the batch size (x steps_per_generation, x processes)
            defaults = {f.name: f.default for f in dataclasses.fields(config_cls)}
            size, group = (config_kwargs.get(k, defaults.get(k)) for k in ("per_device_train_batch_size", "num_generations"))
            message = (f"per_device_train_batch_size: {size} x steps_per_generation (default gradient_accumulation_steps) x processes = TRL's "
                       f"generation_batch_size {message.rsplit('got ', 1)[-1]}, which must be a multiple of num_generations ({group}): "
                       "the completions of one prompt are generated together")
        raise RecipeError(message) from None
    check_ranges(run, config)
    check_keyword_arguments(config)
    max_steps = getattr(config, "max_steps", -1)
    if run.probe_steps and any(step < 0 or (max_steps > 0 and step > max_steps) for step in run.probe_steps):
        where = f"in [0, max_steps {max_steps}]" if max_steps > 0 else ">= 0"
        raise RecipeError(f"probe_steps: every step must be {where} (0: before training), got {run.probe_steps}; a step outside the run is never probed")
    if getattr(config, "save_only_model", False) and config.save_strategy != "no":  # SaveStrategy is a str enum
        logger.warning("save_only_model: true: its checkpoints hold no optimizer, scheduler or random state, so a stopped run cannot "
                       "resume from them (resume_from_checkpoint refuses them); leave it false to keep runs resumable")
    if not str(config.output_dir or "").strip():
        raise RecipeError(f"output_dir: expected a folder path for the run's results, got {config.output_dir!r}")
    check_output_names(config.output_dir)
    check_custom_task(values, method_name, run, config)
    if problem := missing_reporter(config.report_to):
        raise RecipeError(problem)
    if run.task == "imdb_sentiment":
        from .rewards.sentiment import has_trained_head

        # the run trains the head where there is none: minutes before it saves it (by default inside output_dir)
        key = "reward_model_path" if run.reward_model_path is not None else "output_dir"
        path = run.reward_model_path or os.path.join(config.output_dir, "reward_model")
        if not has_trained_head(path):
            check_writable_folder(key, path)
    if run.reward_model_path is None:
        run.reward_model_path = os.path.join(config.output_dir, "reward_model")
    from .resume import check_resumed_settings, resolve_checkpoint

    try:
        resume_from = resolve_checkpoint(config.resume_from_checkpoint, config.output_dir)
        if resume_from is not None:
            check_resumed_settings(resume_from, config.max_steps, raw, vars(run), num_processes=int(os.environ.get("WORLD_SIZE", "1")))
    except UserError as error:
        raise RecipeError(str(error)) from None
    return Recipe(run=run, config=config, raw=raw, resume_from=resume_from)


def check_output_names(output_dir: str) -> None:
    """output_dir is a folder that can be made or written into, and each name the run writes in it is free or of the kind
    the run writes there: a folder called results.json let the whole run train and then lost its results to a
    traceback; a file called model or best_model was a traceback at the first save (RecipeError otherwise)."""
    from .results import RESULTS_FILE
    from .safety import LOCK_FILE

    check_writable_folder("output_dir", output_dir)
    run_outputs = {RESULTS_FILE: "file", LOCK_FILE: "file", "model": "folder", "best_model": "folder"}  # run.py writes them
    for name, kind in run_outputs.items():
        path = os.path.join(output_dir, name)
        if os.path.lexists(path) and os.path.isdir(path) != (kind == "folder"):
            found = "a folder" if os.path.isdir(path) else "a file" if os.path.isfile(path) else "not a regular file (a broken link, a socket)"
            raise RecipeError(f"output_dir: {path!r} is {found}, where the run writes its {name} {kind}; move it away or give another output_dir")


def key_first(message: str) -> str:
    """A config's own error in the `<key>: ...` form of every other recipe error: "nonfinite must be stop or skip, got
    'x'" -> "nonfinite: must be ...", "top_k=-1: it must be >= 0" -> "top_k: must be >= 0, got -1", TRL's
    "generation_batch_size (8) must be divisible by ..." -> "generation_batch_size: must be ..., got 8", and
    transformers' "... requires non-zero --logging_steps" -> "logging_steps: ..."."""
    key = r"[a-z][a-z0-9_]*"  # a key name: lower case, digits after the first letter (`tf32`)
    if match := re.match(rf"^({key})=([^:,]+): (?:it )?(.*)$", message):
        return f"{match[1]}: {match[3]}, got {match[2]}"
    if match := re.match(rf"^({key}) \(([^)]*)\) (must .*?)\.?$", message):
        return f"{match[1]}: {match[3]}, got {match[2]}"
    if match := re.match(rf"^({key}) (must .*)$", message):
        return f"{match[1]}: {match[2]}"
    if not re.match(rf"^{key}: ", message) and (match := re.search(rf"--({key})", message)):
        return f"{match[1]}: {message}"
    return message


_MAX_SIZE = 10_000_000  # a ceiling no real run reaches, so a typo (1e12, 1e30) is refused instead of running until killed
# key -> (is the value right?, what is right). Checked on the built run arguments and config (defaults included)
# wherever the method has the key, before anything is loaded or written; None passes for optional keys.
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "learning_rate": (lambda v: v >= 0, "a number >= 0 (0 freezes the policy: an evaluation-only baseline)"),
    "reward_learning_rate": (lambda v: v > 0, "a number > 0"),
    "per_device_train_batch_size": (lambda v: 1 <= v <= 65_536, "an integer from 1 to 65,536"),
    "gradient_accumulation_steps": (lambda v: 1 <= v <= 65_536, "an integer from 1 to 65,536"),
    "max_steps": (lambda v: v == -1 or 1 <= v <= _MAX_SIZE, "-1 (num_train_epochs decides) or an integer from 1 to 10,000,000"),
    "num_train_epochs": (lambda v: 0 < v <= _MAX_SIZE, "a number > 0"),
    "max_grad_norm": (lambda v: v >= 0, "a number >= 0 (0: no clipping)"),
    "weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "eval_steps": (lambda v: float(v).is_integer() and 1 <= v <= _MAX_SIZE, "an integer >= 1: evaluate every N optimizer steps"),
    "max_prompt_length": (lambda v: 1 <= v <= 32_768, "an integer from 1 to 32,768"),
    "max_new_tokens": (lambda v: 1 <= v <= 32_768, "an integer from 1 to 32,768"),
    "max_completion_length": (lambda v: 1 <= v <= 32_768, "an integer from 1 to 32,768"),
    "eval_min_new_tokens": (lambda v: 0 <= v <= 32_768, "an integer from 0 to 32,768"),
    "num_samples_per_prompt": (lambda v: 1 <= v <= 65_536, "an integer from 1 to 65,536"),
    "eval_num_prompts": (lambda v: 1 <= v <= _MAX_SIZE, "an integer >= 1"),
    "test_num_prompts": (lambda v: 1 <= v <= _MAX_SIZE, "an integer >= 1"),
    "eval_num_problems": (lambda v: 1 <= v <= _MAX_SIZE, "an integer >= 1"),
    "test_num_problems": (lambda v: 1 <= v <= _MAX_SIZE, "an integer >= 1 (or null: every test problem)"),
    "eval_best_of_n": (lambda v: 1 <= v <= 1024, "an integer from 1 to 1,024"),
    "eval_pass_k": (lambda v: v == 0 or 2 <= v <= 1024, "0 (off) or an integer from 2 to 1,024 (pass@1 is the greedy accuracy already logged)"),
    "eval_temperature": (lambda v: v > 0, "a number > 0 (logits are divided by it; 0.1 for near-greedy)"),
    "eval_top_p": (lambda v: 0 < v <= 1, "a number in (0, 1] (1: nucleus sampling off)"),
    "reward_split_size": (lambda v: 0 <= v <= _MAX_SIZE, "an integer >= 0 (0: no reward-head split, as the length and gsm8k tasks)"),
    "policy_split_size": (lambda v: 1 <= v <= _MAX_SIZE, "an integer >= 1"),
    "validation_split_size": (lambda v: 1 <= v <= _MAX_SIZE, "an integer >= 1"),
    "test_split_size": (lambda v: 1 <= v <= _MAX_SIZE, "an integer >= 1 (or null: the whole test split)"),
    "prompt_max_chars": (lambda v: v >= 1, "an integer >= 1"),
    "reward_max_length": (lambda v: 1 <= v <= 32_768, "an integer from 1 to 32,768"),
    "reward_epochs": (lambda v: 1 <= v <= 10_000, "an integer from 1 to 10,000"),
    "num_samples_to_show": (lambda v: v >= 0, "an integer >= 0"),
    "early_stopping_patience": (lambda v: v >= 0, "an integer >= 0 (0: off)"),
    "nonfinite_max_skips": (lambda v: 0 <= v <= _MAX_SIZE, "an integer >= 0"),
    "probe_num_prompts": (lambda v: v >= 1, "an integer >= 1"),
    "seed": (lambda v: 0 <= v < 2**32, "an integer from 0 to 2^32 - 1"),
    "eval_seed": (lambda v: 0 <= v < 2**32, "an integer from 0 to 2^32 - 1"),
    "lora_r": (lambda v: v >= 1, "an integer >= 1"),
    "lora_alpha": (lambda v: v > 0, "a number > 0"),
    "lora_dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    # sampling and TRL GRPO/CISPO's own keys, which TRL does not check itself (a transformers traceback at the first
    # step, a ZeroDivisionError, or a run that completes with a meaningless setting); our configs check theirs too
    "temperature": (lambda v: v > 0, "a number > 0 (logits are divided by it; 0.1 for near-greedy)"),
    "top_p": (lambda v: 0 < v <= 1, "a number in (0, 1] (1: nucleus sampling off)"),
    "top_k": (lambda v: v >= 0, "an integer >= 0 (0: top-k off)"),
    "min_p": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "repetition_penalty": (lambda v: v > 0, "a number > 0 (1: off)"),
    "num_generations": (lambda v: 2 <= v <= 65_536, "an integer from 2 to 65,536 (GRPO's group advantage compares the completions of one prompt)"),
    "num_iterations": (lambda v: 1 <= v <= 1024, "an integer from 1 to 1,024"),
    "epsilon": (lambda v: v > 0, "a number > 0 (the clip range is [1 - epsilon, 1 + epsilon_high])"),
    "epsilon_high": (lambda v: v > 0, "a number > 0 (unset: epsilon)"),
    "beta": (lambda v: v >= 0, "a number >= 0 (0: no KL term)"),
    "steps_per_generation": (lambda v: 1 <= v <= 1024, "an integer from 1 to 1,024 (null: gradient_accumulation_steps)"),
    "generation_batch_size": (lambda v: 1 <= v <= _MAX_SIZE, "an integer >= 1 (null: per_device_train_batch_size x processes x steps_per_generation)"),
    "top_entropy_quantile": (lambda v: 0 <= v <= 1, "a number in [0, 1] (1: every token in the loss; the paper's 0.2)"),
    "delta": (lambda v: v > 1, "a number > 1 (two-sided GRPO's upper bound on the importance ratio; TRL recommends more than 1 + epsilon), or null: off"),
    # TrainingArguments' own keys that transformers does not check (a torch traceback after set-up, a run stopped by
    # diverged weights it blames on learning_rate, or a silent no-op) or checks in words that do not start with the key
    "adam_epsilon": (lambda v: v > 0, "a number > 0 (Adam divides by sqrt(v) + adam_epsilon; 1e-8 is the usual)"),
    "adam_beta1": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "adam_beta2": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "dataloader_num_workers": (lambda v: 0 <= v <= 1024, "an integer from 0 to 1,024 (0: load data in the main process)"),
    "dataloader_prefetch_factor": (lambda v: v >= 1, "an integer >= 1 (or null), with dataloader_num_workers >= 1"),
    "logging_steps": (lambda v: v > 0, "a number > 0: log every N optimizer steps (below 1: that fraction of the run)"),
    "save_steps": (lambda v: v > 0, "a number > 0: save every N optimizer steps (below 1: that fraction of the run)"),
    "save_total_limit": (lambda v: v >= 0, "an integer >= 0 (0 or null: keep every checkpoint)"),
    "warmup_steps": (lambda v: v >= 0, "a number >= 0: warm-up optimizer steps (below 1: that fraction of the run)"),
    "eval_delay": (lambda v: v >= 0, "a number >= 0"),
    "torch_empty_cache_steps": (lambda v: v >= 1, "an integer >= 1 (or null: never)"),
    "label_smoothing_factor": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
}


def check_range(key: str, value) -> None:
    """One key of RANGES in range (one line naming the key otherwise); other keys, None and booleans pass."""
    if problem := range_error(key, value, RANGES):
        raise RecipeError(problem)


def check_keyword_arguments(config) -> None:
    """The mappings a recipe hands to a library, checked where a typo would otherwise be a traceback at load or train
    time: `model_init_kwargs.dtype` is a torch dtype, `lr_scheduler_kwargs` are the schedule's own arguments."""
    import inspect

    import torch

    dtype = (getattr(config, "model_init_kwargs", None) or {}).get("dtype")
    if isinstance(dtype, str) and dtype != "auto" and not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise RecipeError(f"model_init_kwargs: dtype {dtype!r} is not a torch dtype; use float32, bfloat16, float16 or auto")
    scheduler_kwargs = getattr(config, "lr_scheduler_kwargs", None) or {}
    if scheduler_kwargs:
        from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
        from transformers.trainer_utils import SchedulerType

        schedule = TYPE_TO_SCHEDULER_FUNCTION.get(SchedulerType(config.lr_scheduler_type))
        parameters = inspect.signature(schedule).parameters if schedule else {}
        own = [name for name in parameters if name not in ("optimizer", "num_warmup_steps", "num_training_steps", "last_epoch")]
        if schedule and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            for key in scheduler_kwargs:
                if key not in parameters:
                    raise RecipeError(f"lr_scheduler_kwargs: {key!r} is not an argument of the {SchedulerType(config.lr_scheduler_type).value} schedule "
                                      f"(its own: {', '.join(own) or 'none'})")


def check_ranges(run: RunArguments, config) -> None:
    """Every key of RANGES the method has, in range (one line naming the key otherwise); an unusual tau schedule warns."""
    for key in RANGES:
        for holder in (run, config):
            check_range(key, getattr(holder, key, None))
    tau_start, tau_end = getattr(config, "tau_start", None), getattr(config, "tau_end", None)
    if tau_start is not None and tau_end is not None and tau_end > tau_start:
        logger.warning("tau_end (%s) > tau_start (%s): the temperature rises during training; GRADE's schedules usually anneal it down", tau_end, tau_start)


# The reward functions each built-in task sums (tasks.py builds them in this order), so that a wrong number of
# reward_weights is refused before the model loads instead of in the trainer's constructor.
BUILT_IN_REWARDS = {"imdb_sentiment": ("sentiment",), "length": ("length",), "gsm8k": ("gsm8k_correctness", "gsm8k_format")}


def check_reward_weights(weights, rewards, what: str) -> None:
    """One weight per reward function, or none (all 1), as TRL's `reward_weights`."""
    if weights is not None and len(weights) != len(rewards):
        raise RecipeError(f"reward_weights: {len(weights)} weights for {len(rewards)} {what}; give one weight per reward function")
    if weights and not any(weights):  # the run trained on a reward of 0 for every completion, and said nothing
        raise RecipeError(f"reward_weights: every weight is 0, so every completion's reward is 0 and there is nothing to learn; give {what} a non-zero weight")


# TRL GRPOConfig's enumerated keys, plain `str` fields that TRL checks only where it reads them: a misspelt loss_type
# passed set-up, ran the step-0 validation (results.json and best_model/ written) and failed at the first loss with a
# traceback. The values GRPOTrainer compares each with (trl/trainer/grpo_trainer.py; tests/test_bad_input.py checks
# this table against the installed TRL's source).
TRL_CHOICES = {
    "loss_type": ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"),
    "importance_sampling_level": ("token", "sequence"),
    "scale_rewards": ("group", "batch", "none"),  # or true / false (TRL: group / none)
    "multi_objective_aggregation": ("sum_then_normalize", "normalize_then_sum"),
}


def check_enum_values(config_kwargs: dict) -> None:
    """Trainer's enumerated keys (save_strategy, eval_strategy, lr_scheduler_type, ...), whose own error does not
    name the key, and TRL GRPO's (`TRL_CHOICES`), which TRL checks only at the first loss: a value outside the
    enumeration is refused here, naming it. Some method configs redeclare Trainer's as plain `str`, so their
    enumeration is read from TrainingArguments."""
    import enum

    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    for key, value in config_kwargs.items():
        enums = [t for t in typing.get_args(hints.get(key)) if isinstance(t, type) and issubclass(t, enum.Enum)]
        if enums and isinstance(value, str) and value not in {m.value for m in enums[0]}:
            raise RecipeError(f"{key}: expected one of {[m.value for m in enums[0]]}, got {value!r}")
        if key in TRL_CHOICES and isinstance(value, str) and value not in TRL_CHOICES[key]:
            raise RecipeError(f"{key}: expected one of {list(TRL_CHOICES[key])}, got {value!r}")


def check_custom_task(values: dict, method_name: str, run: RunArguments, config) -> None:
    """Task `custom`: its data set is named and every reward function imports, is callable, has TRL's signature and
    (GRADE) is differentiable; another task refuses the custom keys, and every task the keys of others (`TASK_KEYS`).
    Runs before anything is loaded."""
    from .rewards.imports import reward_specs

    for key, tasks in TASK_KEYS.items():
        if key in values and run.task not in tasks:
            twin = TASK_KEY_TWINS.get(key)
            use = f"; task {run.task!r} reads {twin}" if twin and run.task in TASK_KEYS[twin] else ""
            raise RecipeError(f"{key}: only task{'s' if len(tasks) > 1 else ''} {', '.join(tasks)} read{'' if len(tasks) > 1 else 's'} it, not task {run.task!r}{use}; "
                              "remove it, or start from a recipe written for this task")
    if run.task != "custom":
        for key in CUSTOM_KEYS:
            if key in values:
                raise RecipeError(f"{key}: only task custom reads it (task {run.task!r} brings its own data and rewards); set task: custom to use your own")
        check_reward_weights(getattr(config, "reward_weights", None), BUILT_IN_REWARDS[run.task], f"task {run.task}'s rewards ({', '.join(BUILT_IN_REWARDS[run.task])})")
        return
    if "dataset_name" not in values:
        raise RecipeError("dataset_name: task custom needs your data set: a hub id, a local folder, or a .jsonl/.json/.csv/.parquet file")
    if not run.reward_funcs:
        raise RecipeError("reward_funcs: task custom needs at least one reward function: an import path (my_rewards.keyword_reward) or a built-in (length)")
    try:
        specs = reward_specs("reward_funcs", run.reward_funcs, "reward_kwargs", run.reward_kwargs)
        reward_specs("eval_reward_funcs", run.eval_reward_funcs, "eval_reward_kwargs", run.eval_reward_kwargs)
    except UserError as error:
        raise RecipeError(str(error)) from None
    check_reward_weights(getattr(config, "reward_weights", None), specs, "reward_funcs")
    if get_method(method_name).relaxed:
        for spec in specs:
            lacks = spec.lacks_for_grade()
            if lacks:
                raise RecipeError(
                    f"method {method_name!r} cannot train reward {spec.path!r}: GRADE backpropagates through the reward, and it lacks "
                    f"{' and '.join(lacks)} (grade_trl/rewards/base.py); use reinforce, ppo, grpo or cispo, or give it both"
                )


# TrainingArguments' own sharding switches: Trainer would build its FSDP or DeepSpeed plugin from them, past the checks
# of `check_launch` (which read Accelerate's launch environment) and on a path no test of the runner covers; on one
# process `--fsdp full_shard` was a traceback from Trainer ("Using fsdp only works in distributed training"), exit 1.
SHARDING_ARGUMENTS = ("fsdp", "fsdp_config", "deepspeed")


def check_launch(use_cpu: bool, relaxed: bool = False) -> None:
    """Refuse a sharding launch that would not shard, or that GRADE cannot run. Accelerate turns FSDP and DeepSpeed on
    only for GPU-type processes: FSDP's branch in `AcceleratorState.__init__` sits under `distributed_type in
    [MULTI_GPU, ...]`, which a CPU launch (MULTI_CPU) is not, and DeepSpeed's under `ACCELERATE_USE_DEEPSPEED ... and
    not cpu`; either would train as plain data parallel with a full copy per process, without a word. relaxed (GRADE):
    FSDP's activation checkpointing wraps each decoder block in a checkpoint whose recomputation in backward calls the
    block's `cache.update` again, outside the rollout, and the recomputed keys and values no longer match (a
    CheckpointError in the first backward, with the chunked and the dynamic cache alike), so it is refused up front."""
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if (fsdp or deepspeed) and use_cpu:
        raise RecipeError(f"{'FSDP' if fsdp else 'DeepSpeed'} needs GPUs: Accelerate ignores it for CPU processes (use_cpu) and would run plain data parallel; launch with accelerate_configs/cpu.yaml on the CPU")
    if relaxed and fsdp and os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true":
        raise RecipeError(BLOCK_CHECKPOINTING_REFUSED)


def check_cpu_precision(use_cpu: bool, fp16: bool, bf16: bool) -> None:
    """Refuse float16 mixed precision on the CPU: Accelerate makes no float16 autocast and no loss scaler for CPU
    processes (`Accelerator.__init__`: its fp16 branch requires `device.type != "cpu"`), so such a run trained in float32
    while its config, results.json and trackers said fp16 (found 2026-12-07: `--fp16 true` on the CPU completed so).
    The accelerate config's `mixed_precision: fp16` (or `accelerate launch --mixed_precision fp16`) reaches Trainer
    as ACCELERATE_MIXED_PRECISION where the recipe sets neither fp16 nor bf16. bf16 autocast does run on the CPU."""
    if not use_cpu:
        return
    from_accelerate_config = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if fp16:
        raise RecipeError("fp16: float16 mixed precision needs a GPU: on the CPU Accelerate has no float16 autocast and the run would train in "
                          "float32 while its config says fp16; use bf16: true for mixed precision on the CPU, or leave fp16 out")
    if not bf16 and from_accelerate_config == "fp16":
        raise RecipeError("mixed_precision: the accelerate config (or --mixed_precision) asks for fp16, which the CPU cannot run (no float16 "
                          "autocast: the run would train in float32); set mixed_precision: no or bf16 there (accelerate_configs/cpu.yaml has no)")
    if (bf16 or from_accelerate_config == "bf16") and not cpu_has_fast_bf16():
        import torch

        logger.warning("bf16 on this CPU (%s, without AVX-512) is slower than float32: torch's bfloat16 matrix products take a slow path here "
                       "(GRADE-STE's step on the embedded model took 5x its float32 time on an AVX2 host); it still saves memory; without bf16 "
                       "(bf16: false, and mixed_precision: no in the accelerate config) it trains faster",
                       torch.backends.cpu.get_cpu_capability())


def cpu_has_fast_bf16() -> bool:
    """Whether torch's bfloat16 matrix products run on this CPU's vector instructions (oneDNN's own check: AVX-512 BW,
    VL and DQ on x86, BF16 on ARM). Without them they take a slow path: on an AVX2 host (2026-12-07) a 256 x 8,192 by
    8,192 x 256 product took 1.42 s in bfloat16 against 0.010 s in float32, and GRADE-STE's forward and backward of 8
    completions of 8 tokens on the embedded model 4.8 s under bf16 autocast against 1.0 s (one thread). The check is
    torch's private op: a torch without it says nothing (True) rather than fail a run over a warning."""
    import torch

    check = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    try:
        return True if check is None else bool(check())
    except RuntimeError:  # an op torch declares but this build does not register
        return True


BLOCK_CHECKPOINTING_REFUSED = (
    "fsdp_activation_checkpointing: GRADE's relaxed rollout cannot run under checkpointed decoder blocks (their "
    "recomputation re-enters its KV cache); set fsdp_activation_checkpointing: false in the accelerate config "
    "(accelerate_configs/fsdp2.yaml has it off), and lower memory with relax_top_k or bf16"
)


def has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()) or torch.backends.mps.is_available()


def check_paths(run_kwargs: dict) -> None:
    """A value that is meant to be a local path must exist (hub ids and `embedded` pass)."""
    from .models import looks_like_local_path

    for key in PATH_KEYS:
        value = run_kwargs.get(key)
        if value and value != "embedded" and looks_like_local_path(value) and not os.path.exists(os.path.expanduser(value)):
            other = "`tfidf` or `none`" if key == "gold_judge" else "`embedded`"
            where = "" if os.path.isabs(os.path.expanduser(value)) else f" from the current folder {os.getcwd()!r} (a relative path is read from where the command runs, not from the recipe's folder)"
            raise RecipeError(f"{key}: no such file or folder {value!r}{where}; give an existing local path, a hub id, or {other}")
        folder = os.path.expanduser(value) if value and value != "embedded" else ""
        if key in ("model_name_or_path", "reward_backbone") and os.path.isdir(folder) and not {"config.json", "adapter_config.json"} & _names_in(folder):
            # an empty folder or a data folder was blamed on its tokenizer files ("cannot build a tokenizer ...")
            raise RecipeError(f"{key}: {value!r} is a folder without config.json, not a saved model; give a folder written by save_pretrained "
                              "(config.json, the weights and the tokenizer), a hub id, or `embedded`")


def _names_in(folder: str) -> set[str]:
    """The names in `folder`; every name it might hold when it cannot be listed (the load then says what is wrong)."""
    try:
        return set(os.listdir(folder))
    except OSError:
        return {"config.json"}


def runner_defaults(method, given: Mapping[str, Any] = ()) -> dict[str, Any]:
    """Where a recipe of our methods (GRADE, REINFORCE, PPO) differs from their configs' defaults when it leaves a key
    out: `save_strategy: no`, since the runner writes the final model to output_dir/model itself and a checkpoint-N
    (the optimizer state besides) in a quick trial's folder would make its next run refuse the folder; a recipe that
    gives `save_steps` (`given`: its keys) keeps the configs' `steps`, as a TRL user expects of `save_steps` alone. The
    configs keep TrainingArguments' `steps` (every save_steps, and the last step), which a trainer called from code and
    `train(resume_from_checkpoint=True)` need. TRL's GRPO/CISPO keep TRL's defaults."""
    from .trainers.base_config import RolloutConfig

    return {"save_strategy": "no"} if issubclass(method.config_class, RolloutConfig) and "save_steps" not in given else {}


def parse_recipe(argv: list[str]) -> Recipe:
    """`RECIPE.yaml [--key value ...]` -> Recipe. Overrides win over the file."""
    if not argv or argv[0].startswith("--"):
        raise RecipeError("RECIPE.yaml missing: give a recipe (recipes/quickstart.yaml, or one of recipes/); usage: python -m grade_trl.run RECIPE.yaml [--key value ...]")
    values = load_recipe_file(argv[0])
    overrides = parse_overrides(argv[1:], list_keys=_list_keys(values, argv[1:]))
    values.update(overrides)
    return build_recipe(values, bare_keys=overrides.bare)


def _list_keys(values: dict, overrides: list[str]) -> list[str]:
    """The keys that take several values on the command line (`--report_to wandb tensorboard`, as TRL's CLI):
    the list-typed fields of the run arguments and of the method's config (the method named last wins)."""
    method_name = str(values.get("method", RunArguments.method))
    for i, token in enumerate(overrides):
        if token == "--method" and i + 1 < len(overrides):
            method_name = overrides[i + 1]
        elif token.startswith("--method="):
            method_name = token.partition("=")[2]
    return _list_fields([RunArguments] + ([get_method(method_name).config_class] if method_name in METHODS else []))


def recipe_list_keys() -> list[str]:
    """The list-typed keys of any recipe: those of the run arguments and of every method's config. compare, train_reward
    and probe read the overrides they forward before knowing which method each recipe runs; the union is right for all
    of them because no key is a list in one config and a scalar in another (tests/test_recipe.py checks it)."""
    return _list_fields([RunArguments] + [get_method(name).config_class for name in METHODS])


def _list_fields(classes: list[type]) -> list[str]:
    return sorted({name for cls in classes for name, tp in typing.get_type_hints(cls).items() if is_list_type(tp)})


# ---------------------------------------------------------------- --help


def _default(f: dataclasses.Field, implied: dict) -> Any:
    if f.name in implied:
        return implied[f.name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "(required)"


def _key_lines(fields: list[dataclasses.Field], implied: dict) -> list[str]:
    lines = []
    for f in fields:
        help_text = " ".join(str(f.metadata.get("help", "")).split())
        lines.append(f"  {f.name} (default {_default(f, implied)!r}): {help_text}")
    return lines


def help_text(method_name: str) -> str:
    """Every key a recipe of `method_name` accepts, with its help text and default, grouped run / method / Trainer."""
    from transformers import TrainingArguments

    method = get_method(method_name)
    config_cls = method.config_class
    trainer_names = {f.name for f in dataclasses.fields(TrainingArguments)}
    config_fields = [f for f in dataclasses.fields(config_cls) if f.init]
    # A field the method's config declares itself (its own, or a TrainingArguments default it overrides) is a method key.
    declared = set()
    for cls in config_cls.__mro__:
        if cls is TrainingArguments:
            break
        declared |= set(getattr(cls, "__annotations__", {}))
    method_keys = [f for f in config_fields if f.name in declared or f.name not in trainer_names]
    trainer_keys = [f for f in config_fields if f not in method_keys]
    implied = {**runner_defaults(method), **method.implied}
    lines = [
        "usage: python -m grade_trl.run RECIPE.yaml [--key value ...]",
        "       python -m grade_trl.run RECIPE.yaml --help      (the keys of the recipe's method)",
        "       python -m grade_trl.run --help --method NAME     (the keys of method NAME)",
        "",
        f"method {method_name}: {method.summary}",
        f"KL penalty: `{method.kl_coefficient}` weighs the KL to the reference {method.kl_coefficient_meaning} "
        f"(the logged `kl` is always nats per completion); per_device_train_batch_size counts {method.batch_counts}.",
        f"methods: {', '.join(METHODS)}",
        "",
        "Run keys (RunArguments: task, data, reward, evaluation; the same for every method):",
        *_key_lines([f for f in dataclasses.fields(RunArguments) if f.init], {}),
        "",
        f"Method keys ({config_cls.__module__}.{config_cls.__qualname__}):",
        *_key_lines(method_keys, implied),
        "",
        "Trainer keys (transformers.TrainingArguments, with their defaults for this method):",
        *_key_lines(trainer_keys, implied),
    ]
    return "\n".join(lines)


def help_for_argv(argv: list[str]) -> str:
    """`--help` of the runner: the keys of the method named by `--method`, else the recipe's, else the default method's."""
    args = [a for a in argv if a not in ("-h", "--help")]
    recipe_path = args[0] if args and not args[0].startswith("--") else None
    overrides = parse_overrides(args[1:] if recipe_path else args)
    method = overrides.get("method") or (load_recipe_file(recipe_path).get("method") if recipe_path else None) or RunArguments.method
    if str(method) not in METHODS:
        raise RecipeError(f"method: unknown method {method!r}; known methods: {', '.join(METHODS)}")
    return help_text(str(method))
