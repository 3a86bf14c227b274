"""Run a recipe: `python -m grade_trl.run RECIPE.yaml [--key value ...]` (or under `accelerate launch -m`).

recipe -> task (data, prompts, rewards) -> trainer -> evaluation -> results.json, model/.
Bad input exits with code 2 and one line on stderr; a reward function that fails mid-run
stops the run after results.json has been written with everything logged so far.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager

from .recipe import Recipe, RecipeError, help_text, parse_recipe
from .rewards.base import RewardFunctionError

logger = logging.getLogger("grade_trl")


def _quiet_libraries() -> None:
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()


def build_peft_config(run):
    if not run.use_peft:
        return None
    from peft import LoraConfig

    return LoraConfig(r=run.lora_r, lora_alpha=run.lora_alpha, lora_dropout=run.lora_dropout, target_modules=run.lora_target_modules, task_type="CAUSAL_LM")


def completion_lengths(config) -> tuple[int, int]:
    """(max, min) new tokens of the method's own generations; evaluation uses the same limits."""
    if hasattr(config, "max_new_tokens"):
        return config.max_new_tokens, config.min_new_tokens
    return config.max_completion_length, 0  # TRL's GRPOConfig has no minimum


def build_trainer(run_args, config, task, tokenizer, callbacks):
    """The method's trainer, built from the recipe; every trainer takes the same task, rewards and callbacks."""
    from .models import resolve_model_path

    common = dict(reward_funcs=task.reward_funcs, args=config, train_dataset=task.train_dataset, processing_class=tokenizer, peft_config=build_peft_config(run_args), callbacks=callbacks)
    if run_args.method in ("grpo", "cispo"):
        from .trainers.grpo import GRPOTrainer

        # TRL loads the policy from a path itself and re-loads its reference from the policy's `_name_or_path`,
        # so it is given the resolved local path (or hub id), never an in-memory model.
        return GRPOTrainer(model=resolve_model_path(run_args.model_name_or_path), **common)
    from .trainers import GumbelGRADETrainer, PPOTrainer, REINFORCETrainer

    trainer_class = {"grade": GumbelGRADETrainer, "grade_ste": GumbelGRADETrainer, "reinforce": REINFORCETrainer, "ppo": PPOTrainer}
    return trainer_class[run_args.method](model=run_args.model_name_or_path, **common)


def results_payload(recipe: Recipe, trainer, status: str, final: dict, error: str | None = None) -> dict:
    payload = {
        "status": status,
        "config": {"recipe": recipe.raw, "run": vars(recipe.run), "trainer": recipe.config.to_dict()},
        "history": list(trainer.state.log_history) if trainer is not None else [],
        "final": final,
    }
    if error:
        payload["error"] = error
    return payload


@contextmanager
def loading(key: str, value: str):
    """Turn a failure to load `value` (unreachable hub id, unreadable file, wrong schema) into a one-line error."""
    try:
        yield
    except (OSError, ValueError, ConnectionError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RecipeError(f"{key}: cannot load {value!r}: {first_line} (give a local path, `embedded`, or a hub id reachable from here)") from None


def run(recipe: Recipe) -> int:
    import torch
    from accelerate import PartialState
    from transformers import set_seed

    from .evaluation import GenerationSettings, RewardEvaluationCallback, evaluate_reward
    from .models import load_tokenizer
    from .report import summary_table
    from .results import write_json_atomic
    from .tasks import TASK_BUILDERS

    run_args, config = recipe.run, recipe.config
    PartialState(cpu=config.use_cpu)  # join the process group now: the task's set-up is shared between processes
    set_seed(config.seed)
    results_path = os.path.join(config.output_dir, "results.json")
    with loading("model_name_or_path", run_args.model_name_or_path):
        tokenizer = load_tokenizer(run_args.model_name_or_path)
    with loading("dataset_name", run_args.dataset_name):
        task = TASK_BUILDERS[run_args.task](run_args, tokenizer, config.seed)

    max_new_tokens, min_new_tokens = completion_lengths(config)
    if run_args.eval_min_new_tokens is not None:
        min_new_tokens = min(run_args.eval_min_new_tokens, max_new_tokens)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, temperature=run_args.eval_temperature, top_p=run_args.eval_top_p)
    eval_callback = RewardEvaluationCallback(
        task.validation_prompts, task.reward_funcs, settings, eval_steps=int(config.eval_steps or 100), seed=run_args.eval_seed, weights=config.reward_weights
    )
    with loading("model_name_or_path", run_args.model_name_or_path):
        trainer = build_trainer(run_args, config, task, tokenizer, [eval_callback])
    eval_callback.trainer = trainer
    is_main = trainer.accelerator.is_main_process

    start = time.time()
    try:
        trainer.train()
    except BaseException as error:  # keep everything logged so far, whatever stopped the run
        if is_main:
            status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
            write_json_atomic(results_path, results_payload(recipe, trainer, status, {"task": task.info}, f"{type(error).__name__}: {error}"))
        raise
    train_minutes = (time.time() - start) / 60

    trainer.save_model(os.path.join(config.output_dir, "model"))
    policy = trainer.accelerator.unwrap_model(trainer.model)
    test = evaluate_reward(policy, tokenizer, task.test_prompts, task.reward_funcs, settings, run_args.eval_seed, trainer.accelerator, config.reward_weights)
    before, after = eval_callback.results[0], eval_callback.results[trainer.state.global_step]
    train_logs = [h for h in trainer.state.log_history if "kl" in h]
    final = {
        "task": task.info,
        "steps": trainer.state.global_step,
        "train_minutes": train_minutes,
        "val_reward_before": {"mean": before["mean"], "std": before["std"]},
        "val_reward_after": {"mean": after["mean"], "std": after["std"]},
        "best_val_reward": eval_callback.best_reward,
        "best_val_step": eval_callback.best_step,
        "test_reward": {"mean": test["mean"], "std": test["std"], "n": len(test["rewards"]), "rewards": test["rewards"]},
        "kl": train_logs[-1]["kl"] if train_logs else None,
        "samples": [
            {
                "prompt": before["prompts"][i],
                "before": before["completions"][i],
                "before_reward": before["rewards"][i],
                "after": after["completions"][i],
                "after_reward": after["rewards"][i],
            }
            for i in range(min(run_args.num_samples_to_show, len(before["prompts"])))
        ],
        "device": str(trainer.accelerator.device),
        "num_processes": trainer.accelerator.num_processes,
        "torch": torch.__version__,
    }
    if is_main:
        write_json_atomic(results_path, results_payload(recipe, trainer, "completed", final))
        print(summary_table(final))
        print(f"\nresults: {results_path}\nmodel:   {os.path.join(config.output_dir, 'model')}")
    trainer.accelerator.wait_for_everyone()
    return 0


def _close_process_group() -> None:
    """Leave the process group before exit: a gloo group torn down by the interpreter aborts the process (SIGABRT)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        recipe = parse_recipe(argv)
        _quiet_libraries()
        return run(recipe)
    except (RecipeError, RewardFunctionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        _close_process_group()


if __name__ == "__main__":
    sys.exit(main())
