"""From a recipe to the objects a run needs: the task, the trainer (through the method registry) and the callbacks.

The runner and the probe build through these functions, so a method or a task is constructed in one
place only (`benchmarks/step_cost.py` builds the trainer classes itself, to vary what the recipes fix).
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import tempfile

from .errors import UserError, loading
from .methods import get_method
from .recipe import Recipe

logger = logging.getLogger(__name__)


def build_peft_config(run):
    if not run.use_peft:
        return None
    from peft import LoraConfig

    return LoraConfig(r=run.lora_r, lora_alpha=run.lora_alpha, lora_dropout=run.lora_dropout, target_modules=run.lora_target_modules, task_type="CAUSAL_LM")


def check_lora_targets(run_args, config) -> None:
    """`lora_target_modules` that name no module of the model: PEFT's refusal as one line naming that key, found on a
    weightless copy of the model (meta device) before the trainer is built; inside its construction the error would be
    blamed on model_name_or_path. A model whose config cannot be read here is left to the load, which names it."""
    if not run_args.use_peft or not run_args.lora_target_modules:
        return
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import resolve_model_path

    init = config.model_init_kwargs or {}
    remote = {"trust_remote_code": bool(init.get("trust_remote_code", False))}
    try:  # a hub id's config from the local cache only: never the hub's retries before the load's own line
        model_config = AutoConfig.from_pretrained(resolve_model_path(run_args.model_name_or_path), revision=init.get("revision"), local_files_only=True, **remote)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config, **remote)
    except Exception:  # noqa: BLE001 - the real load reports it, under model_name_or_path
        return
    try:
        get_peft_model(model, build_peft_config(run_args))
    except ValueError as error:
        raise UserError(f"lora_target_modules: {str(error).strip().splitlines()[0]}") from None


def build_task(recipe: Recipe, gold_judge: bool = True):
    """The tokenizer and the task (data, rewards, evaluator with the run's generation settings).

    gold_judge: False skips fitting the independent judge (the probe and the benchmark do not evaluate).
    """
    import dataclasses

    from .evaluation import GenerationSettings
    from .models import load_tokenizer
    from .tasks import TASK_BUILDERS

    run_args, config = recipe.run, recipe.config
    if not gold_judge:
        run_args = dataclasses.replace(run_args, gold_judge="none", eval_reward_funcs=None, eval_reward_kwargs=None)
    max_new_tokens, min_new_tokens = config.new_token_limits
    if run_args.eval_min_new_tokens is not None:
        min_new_tokens = min(run_args.eval_min_new_tokens, max_new_tokens)
    settings = GenerationSettings(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        temperature=run_args.eval_temperature,
        top_p=run_args.eval_top_p,
        max_prompt_length=run_args.max_prompt_length,
        chat_template_kwargs=config.chat_template_kwargs or None,  # every method's (TRL GRPOConfig's key, our configs' too)
    )
    check_model_fits(run_args, config)
    check_lora_targets(run_args, config)
    with loading("model_name_or_path", run_args.model_name_or_path):
        tokenizer = load_tokenizer(run_args.model_name_or_path)
    check_relax_top_k(getattr(config, "relax_top_k", 0), len(tokenizer))
    # the task's builder names its data loads dataset_name (`loading`) and its other inputs by their own keys
    task = TASK_BUILDERS[run_args.task](run_args, tokenizer, config.seed, settings, config.reward_weights)
    # what evaluation generates with, which a comparison must keep alike (analysis.generation_lines): the lengths follow
    # each method's own keys unless eval_min_new_tokens is set
    task.info["evaluation_generation"] = {key: getattr(settings, key) for key in ("max_new_tokens", "min_new_tokens", "temperature", "top_p")}
    return tokenizer, task


def check_model_fits(run_args, config) -> None:
    """The policy's folder has a tokenizer, and its positions hold a prompt and a completion: each a one-line error
    naming the key (transformers 5 builds an empty tokenizer from a folder without one, and a sequence past the
    model's positions fails with an index error at the first generation or scoring)."""
    from .models import has_tokenizer_files, position_limit, positions_problem, resolve_model_path

    name = run_args.model_name_or_path
    init = config.model_init_kwargs or {}
    limit = position_limit(name, **{k: init[k] for k in ("trust_remote_code", "revision") if k in init})
    if os.path.isfile(os.path.join(resolve_model_path(name), "config.json")) and not has_tokenizer_files(name):  # a model folder without a tokenizer
        raise UserError(f"model_name_or_path: {name!r} has no tokenizer files (tokenizer.json, or vocab.json and merges.txt, ...); "
                        "copy the tokenizer of the model it was trained with into it")
    if problem := positions_problem(run_args.max_prompt_length, config.new_token_limit_key, config.new_token_limits[0], limit, repr(name)):
        raise UserError(problem)


def check_relax_top_k(top_k: int, vocabulary: int) -> None:
    """relax_top_k at or above the vocabulary is refused (it would relax every token the long way); from a quarter of it a
    warning: the sparse path keeps an index and a gathered row beside each value, so it saved nothing there (embedded
    model, V = 8,192: saved bytes 0.67x the full vocabulary's at k = 64, 1.33x at k = 4,096; a journey audit)."""
    if not top_k:
        return
    if top_k >= vocabulary:
        raise UserError(f"relax_top_k: {top_k} is not below the vocabulary's {vocabulary:,} tokens; give 0 for the whole vocabulary, or a k "
                        "well below it (the published GRADE code: 256 of 50,257)")
    if 4 * top_k >= vocabulary:
        logger.warning("relax_top_k %d is a quarter or more of the %d-token vocabulary: the sparse relaxation likely saves no memory there "
                       "(it keeps indices and gathered rows beside the values); 0 relaxes the whole vocabulary", top_k, vocabulary)


def build_trainer(recipe: Recipe, task, tokenizer, callbacks=()):
    """The method's trainer (its registry entry's class), built from the recipe; every method takes the same task,
    rewards and callbacks. Each callback with a `trainer` attribute is attached to it."""
    from .models import NO_HUB_KERNELS, resolve_model_path
    from .trainers.base import load_policy

    run_args, config = recipe.run, recipe.config
    method = get_method(run_args.method)

    def build(model):
        return method.trainer_class(model=model, reward_funcs=task.reward_funcs, args=config, train_dataset=task.train_dataset,
                                    processing_class=tokenizer, peft_config=build_peft_config(run_args), callbacks=list(callbacks))

    def attach(trainer):
        for callback in callbacks:
            if hasattr(callback, "trainer"):
                callback.trainer = trainer
        return trainer

    config.model_init_kwargs = {**NO_HUB_KERNELS, **(config.model_init_kwargs or {})}  # TRL loads its policy and reference with these
    # TRL loads the policy from a path itself and re-loads its reference from the policy's `_name_or_path`, so it is
    # given the resolved local path (or hub id), never an in-memory model; our trainers get the loaded model.
    # Only the load is under `loading` (its errors name model_name_or_path); our trainers' own checks name their keys.
    # TRL's GRPO loads inside its constructor, so there the constructor is.
    try:
        if method.loads_model_from_path:
            with loading("model_name_or_path", run_args.model_name_or_path):
                return attach(build(resolve_model_path(run_args.model_name_or_path)))
        with loading("model_name_or_path", run_args.model_name_or_path):
            model = load_policy(run_args.model_name_or_path, config)
    except TypeError as error:  # from_pretrained passes what it does not know on to the model's __init__
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(error))
        if unknown and unknown.group(1) in config.model_init_kwargs:
            raise UserError(f"model_init_kwargs: {unknown.group(1)!r} is an argument of neither from_pretrained nor the model ({str(error).splitlines()[0]})") from None
        raise
    return attach(build(model))


def build_callbacks(recipe: Recipe, task, resume_from: str | None = None, graceful_stop=None) -> dict:
    """{"resume": ResumeCallback, "graceful_stop": GracefulStop, "evaluation": EvaluationCallback, "doctor":
    DoctorCallback or None, "probe": GradientProbeCallback or None, "nonfinite_guard": NonFiniteGuard, "last_window":
    LogTheLastWindow}, in the order
    the Trainer must call them (the resume state is restored before anything evaluates).

    resume_from: the checkpoint folder the run resumes from (resume.resolve_checkpoint), or None. graceful_stop: the
    resume.GracefulStop whose handler the runner installed for SIGTERM/SIGINT (default: a new one)."""
    from .diagnostics import build_settings
    from .doctor_callback import DoctorCallback
    from .evaluation import EvaluationCallback
    from .probing import GradientProbeCallback
    from .resume import PARAMETER_SETTINGS, GracefulStop, ResumeCallback
    from .safety import NonFiniteGuard
    from .trainers.metrics import LogTheLastWindow

    run_args, config = recipe.run, recipe.config
    graceful_stop = graceful_stop or GracefulStop()
    evaluation = EvaluationCallback(
        task.evaluator,
        eval_steps=int(config.eval_steps or 100),
        seed=run_args.eval_seed,
        best_model_dir=os.path.join(config.output_dir, "best_model") if run_args.save_best_model else None,
        early_stopping_patience=run_args.early_stopping_patience,
        graceful_stop=graceful_stop,
    )
    callbacks = {
        "resume": ResumeCallback(evaluation, resume_from, settings={key: getattr(run_args, key) for key in PARAMETER_SETTINGS}),
        "graceful_stop": graceful_stop,
        "evaluation": evaluation,
        "doctor": None,
        "probe": None,
        "nonfinite_guard": NonFiniteGuard(run_args.nonfinite, run_args.nonfinite_max_skips),  # before every optimizer step
        "last_window": LogTheLastWindow(),
    }
    if run_args.doctor != "off":
        stop_on = run_args.doctor_stop_on if run_args.doctor == "stop" else ()
        eval_size = task.evaluator.size("validation")  # regression_min_z's n
        callbacks["doctor"] = DoctorCallback(build_settings(run_args.doctor_settings or {}, {"eval_size": eval_size} if eval_size else {}), stop_on=stop_on)
    if run_args.probe_steps:
        callbacks["probe"] = GradientProbeCallback(run_args.probe_steps, run_args.probe_num_estimates, run_args.probe_num_prompts, seed=config.seed)
    return callbacks


def use_the_runs_reward_head(recipe: Recipe, checkpoint: str) -> None:
    """Point the recipe at the reward head the checkpoint's run trained, or refuse in one line: a probe of a trained
    policy must score it with the reward it was trained on, and a head missing at a path relative to where the probe
    runs would otherwise be trained anew there (another head, minutes later)."""
    from .results import read_results
    from .rewards.sentiment import has_trained_head

    folder = os.path.abspath(checkpoint)
    run_dir = os.path.dirname(folder) if os.path.basename(folder) in ("model", "best_model") or os.path.basename(folder).startswith("checkpoint-") else folder
    own = os.path.join(run_dir, "reward_model")  # where a run puts it when its recipe names no reward_model_path
    if recipe.raw.get("reward_model_path") is None and has_trained_head(own):
        if os.path.abspath(recipe.run.reward_model_path) != own:
            recipe.run.reward_model_path = own
            logger.info("--checkpoint %s: scoring with its run's reward head %s", checkpoint, own)
    elif not has_trained_head(recipe.run.reward_model_path):
        recorded = (((read_results(run_dir) or {}).get("config") or {}).get("run") or {}).get("reward_model_path")
        if isinstance(recorded, str) and os.path.isabs(recorded) and has_trained_head(recorded):  # the run's own, where it was
            recipe.run.reward_model_path = recorded
            logger.info("--checkpoint %s: scoring with its run's reward head %s (its results.json's)", checkpoint, recorded)
            return
        said = f" (its results.json says {recorded!r}, relative to where the run was launched)" if isinstance(recorded, str) else ""
        where = "" if os.path.isabs(recipe.run.reward_model_path) else " (relative to this folder)"
        raise UserError(f"reward_model_path: no trained reward head at {recipe.run.reward_model_path!r}{where} to score the "
                        f"checkpoint {checkpoint!r} with; give --reward_model_path the folder of the head its run trained{said}")


def build_probe_trainer(recipe: Recipe, checkpoint: str | None = None, step: int | None = None):
    """(trainer, task) of a recipe for drawing gradient estimates: no evaluation, no judge, no training.

    checkpoint: a folder saved by a run (`{output_dir}/model`, a `checkpoint-N` folder, or an `output_dir` holding
    `model/`): its policy weights (PPO: and value head) are loaded into the trainer; the reference stays the recipe's
    model. step: the optimizer step the probe stands for (GRADE's tau depends on it); default the checkpoint's
    `trainer_state.json` global_step, else 0.
    """
    import json

    from accelerate import PartialState
    from transformers import set_seed

    if checkpoint is not None:
        if os.path.isdir(os.path.join(checkpoint, "model")):
            checkpoint = os.path.join(checkpoint, "model")
        if not os.path.isdir(checkpoint):
            raise UserError(f"--checkpoint: no such folder {checkpoint!r} (give a run's output_dir, its model/ folder or a checkpoint-N folder)")
    PartialState(cpu=recipe.config.use_cpu)
    set_seed(recipe.config.seed)
    if checkpoint is not None and recipe.run.task == "imdb_sentiment":
        use_the_runs_reward_head(recipe, checkpoint)
    tokenizer, task = build_task(recipe, gold_judge=False)
    # the probe trains and saves nothing, but Trainer creates its output_dir: a temporary folder, not the recipe's run folder
    recipe.config.output_dir = tempfile.mkdtemp(prefix="grade_trl_probe_")
    atexit.register(shutil.rmtree, recipe.config.output_dir, ignore_errors=True)
    trainer = build_trainer(recipe, task, tokenizer)
    if checkpoint is not None:
        with loading("--checkpoint", checkpoint):
            trainer._load_from_checkpoint(checkpoint)
        state_file = os.path.join(checkpoint, "trainer_state.json")
        if step is None and os.path.isfile(state_file):
            with open(state_file) as f:
                step = json.load(f).get("global_step")
        if step is None:  # a run's model/ or best_model/ has no trainer_state.json: its run's results.json says how far it trained
            from .results import read_results

            folder = os.path.dirname(os.path.abspath(checkpoint))
            final = (read_results(folder) or {}).get("final") or {}
            key = "best_validation_step" if os.path.basename(os.path.abspath(checkpoint)) == "best_model" else "steps"
            if isinstance(final.get(key), int):
                step = final[key]
                logger.info("--checkpoint %s: probing as step %d (%s's final.%s; --step to choose)", checkpoint, step, os.path.join(folder, "results.json"), key)
            else:
                logger.warning("--checkpoint %s: no trainer_state.json or results.json says its step: probing as step 0 (GRADE's tau at step 0); "
                               "give --step", checkpoint)
    trainer.state.global_step = int(step or 0)
    return trainer, task
