"""Run a recipe: `python -m grade_trl.run RECIPE.yaml [--key value ...]` (or under `accelerate launch -m`).

recipe -> task (data, prompts, rewards) -> trainer -> evaluation -> results.json, model/.
Bad input exits with code 2 and one line on stderr; a reward function that fails mid-run
stops the run after results.json has been written with everything logged so far.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from contextlib import contextmanager

from .recipe import Recipe, RecipeError, help_text, parse_recipe
from .rewards.base import RewardFunctionError

logger = logging.getLogger("grade_trl")


def quiet_libraries() -> None:
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


def test_result(evaluator, policy, tokenizer, accelerator, seed: int) -> dict:
    """The test split's metrics, with the per-prompt values (`rewards`, `gold_rewards`, ...) kept for paired tests."""
    result = evaluator.evaluate(policy, tokenizer, "test", accelerator, seed)
    samples = result["samples"]
    out = {"metrics": result["metrics"], "prompts": [s["prompt"] for s in samples]}
    for key in ("reward", "gold_reward", "best_of_n_reward", "correct"):
        if samples and samples[0].get(key) is not None:
            out[f"{key}s"] = [s[key] for s in samples]
    return out


def completions_per_step(run_args, config, num_processes: int) -> float:
    """New completions generated per optimizer step, over all processes (the x axis of sample efficiency).

    A micro-batch is `per_device_train_batch_size` completions (TRL's GRPO counts completions, not
    prompts), REINFORCE's is that many prompts times `num_samples_per_prompt`. PPO reuses one rollout for `ppo_epochs * num_mini_batches` micro-steps
    and GRPO/CISPO for `num_iterations`, so only that fraction of a step's micro-batches is new.
    """
    per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * num_processes
    if run_args.method == "ppo":
        return per_step / (config.ppo_epochs * config.num_mini_batches)
    if run_args.method in ("grpo", "cispo"):
        return per_step / config.num_iterations
    if run_args.method == "reinforce":  # its batch counts prompts, each sampled num_samples_per_prompt times
        return per_step * config.num_samples_per_prompt
    return per_step


def peak_memory() -> float:
    """Peak accelerator memory (MB) where there is one, else this process's peak resident set."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


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


def build_task(recipe: Recipe):
    """The tokenizer and the task (data, rewards, evaluator with the run's generation settings)."""
    from .evaluation import GenerationSettings
    from .models import load_tokenizer
    from .tasks import TASK_BUILDERS

    run_args, config = recipe.run, recipe.config
    max_new_tokens, min_new_tokens = completion_lengths(config)
    if run_args.eval_min_new_tokens is not None:
        min_new_tokens = min(run_args.eval_min_new_tokens, max_new_tokens)
    settings = GenerationSettings(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        temperature=run_args.eval_temperature,
        top_p=run_args.eval_top_p,
        max_prompt_length=run_args.max_prompt_length,
    )
    with loading("model_name_or_path", run_args.model_name_or_path):
        tokenizer = load_tokenizer(run_args.model_name_or_path)
    with loading("dataset_name", run_args.dataset_name):
        task = TASK_BUILDERS[run_args.task](run_args, tokenizer, config.seed, settings, config.reward_weights)
    return tokenizer, task


def run(recipe: Recipe) -> int:
    import torch
    from accelerate import PartialState
    from transformers import set_seed

    from .doctor import DoctorCallback, build_settings
    from .evaluation import EvaluationCallback
    from .report import summary_table
    from .results import write_json_atomic

    run_args, config = recipe.run, recipe.config
    PartialState(cpu=config.use_cpu)  # join the process group now: the task's set-up is shared between processes
    set_seed(config.seed)
    results_path = os.path.join(config.output_dir, "results.json")
    tokenizer, task = build_task(recipe)

    eval_callback = EvaluationCallback(
        task.evaluator,
        eval_steps=int(config.eval_steps or 100),
        seed=run_args.eval_seed,
        best_model_dir=os.path.join(config.output_dir, "best_model") if run_args.save_best_model else None,
        early_stopping_patience=run_args.early_stopping_patience,
    )
    doctor = None
    if run_args.doctor != "off":
        stop_on = run_args.doctor_stop_on if run_args.doctor == "stop" else ()
        doctor = DoctorCallback(build_settings(run_args.doctor_settings or {}), stop_on=stop_on)
    callbacks = [eval_callback] + ([doctor] if doctor else [])
    if run_args.probe_steps:
        from .probe import GradientProbeCallback

        callbacks.append(GradientProbeCallback(run_args.probe_steps, run_args.probe_num_estimates, run_args.probe_num_prompts, seed=config.seed))
    with loading("model_name_or_path", run_args.model_name_or_path):
        trainer = build_trainer(run_args, config, task, tokenizer, callbacks)
    for callback in callbacks:
        callback.trainer = trainer
    is_main = trainer.accelerator.is_main_process
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    start = time.time()
    try:
        trainer.train()
    except BaseException as error:  # keep everything logged so far, whatever stopped the run
        if is_main:
            status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
            write_json_atomic(results_path, results_payload(recipe, trainer, status, {"task": task.info}, f"{type(error).__name__}: {error}"))
        raise
    train_minutes = (time.time() - start) / 60
    peak_memory_mb = peak_memory()

    trainer.save_model(os.path.join(config.output_dir, "model"))
    policy = trainer.accelerator.unwrap_model(trainer.model)
    test = {"final": test_result(task.evaluator, policy, tokenizer, trainer.accelerator, run_args.eval_seed)}
    if eval_callback.best_parameters is not None and eval_callback.best_step != trainer.state.global_step:
        saved = eval_callback.swap_in_best()
        test["best"] = test_result(task.evaluator, policy, tokenizer, trainer.accelerator, run_args.eval_seed)
        eval_callback.restore(saved)
    else:  # the final checkpoint is the best one
        test["best"] = test["final"]
    test_metrics = {f"test_{name}": v for name, v in test["final"]["metrics"].items()}
    test_metrics |= {f"test_best_{name}": v for name, v in test["best"]["metrics"].items()}
    eval_callback.log(trainer.state, test_metrics)  # into the history and to W&B/TensorBoard, as `test/...`
    prefix, primary = task.evaluator.prefix, task.evaluator.primary
    before, after = eval_callback.results[0], eval_callback.results[trainer.state.global_step]
    train_logs = [h for h in trainer.state.log_history if "kl" in h]
    final = {
        "task": task.info,
        "steps": trainer.state.global_step,
        "stopped_early": eval_callback.stopped_early_at is not None,
        "train_minutes": train_minutes,
        "samples_per_step": completions_per_step(run_args, config, trainer.accelerator.num_processes),
        "peak_memory_mb": peak_memory_mb,
        "validation_metric": f"{prefix}_{primary}",
        "validation_before": before["metrics"],
        "validation_after": after["metrics"],
        "best_validation": eval_callback.best_value,
        "best_validation_step": eval_callback.best_step,
        "test": test,
        "kl": train_logs[-1]["kl"] if train_logs else None,
        "doctor": [dataclasses.asdict(f) for f in doctor.findings] if doctor else None,
        "samples": [
            {
                "prompt": b["prompt"],
                "before": b["completion"],
                "before_reward": b.get("reward"),
                "after": a["completion"],
                "after_reward": a.get("reward"),
            }
            for b, a in list(zip(before["samples"], after["samples"]))[: run_args.num_samples_to_show]
        ],
        "device": str(trainer.accelerator.device),
        "num_processes": trainer.accelerator.num_processes,
        "torch": torch.__version__,
    }
    if primary == "reward":  # the names the IMDB/length summaries and earlier results use
        final["val_reward_before"] = {"mean": before["metrics"]["reward"], "std": before["metrics"]["reward_std"]}
        final["val_reward_after"] = {"mean": after["metrics"]["reward"], "std": after["metrics"]["reward_std"]}
        final["best_val_reward"], final["best_val_step"] = eval_callback.best_value, eval_callback.best_step
        rewards = test["final"]["rewards"]
        final["test_reward"] = {"mean": test["final"]["metrics"]["reward"], "std": test["final"]["metrics"]["reward_std"], "n": len(rewards), "rewards": rewards}
    if is_main:
        write_json_atomic(results_path, results_payload(recipe, trainer, "completed", final))
        print(summary_table(final))
        print(f"\nresults: {results_path}\nmodel:   {os.path.join(config.output_dir, 'model')}")
    finish_reporters(config)
    trainer.accelerator.wait_for_everyone()
    return 0


def finish_reporters(config) -> None:
    """Close the W&B run so its files are complete when `run` returns (the Trainer leaves it open)."""
    if "wandb" in (config.report_to or []):
        import wandb

        if wandb.run is not None:
            wandb.finish()


def close_process_group() -> None:
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
        quiet_libraries()
        return run(recipe)
    except (RecipeError, RewardFunctionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        close_process_group()


if __name__ == "__main__":
    sys.exit(main())
