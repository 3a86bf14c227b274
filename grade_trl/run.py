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

from . import metrics
from .build import build_callbacks, build_task, build_trainer
from .cli import quiet_libraries, run_safely
from .recipe import Recipe, help_for_argv, parse_recipe
from .results import RESULTS_FILE, last_training_value, payload, write_json_atomic

logger = logging.getLogger("grade_trl")


def peak_memory() -> float:
    """Peak accelerator memory (MB) where there is one, else this process's peak resident set."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def config_record(recipe: Recipe) -> dict:
    return {"recipe": recipe.raw, "run": vars(recipe.run), "trainer": recipe.config.to_dict()}


def run(recipe: Recipe) -> int:
    import torch
    from accelerate import PartialState
    from transformers import set_seed

    from .evaluation import evaluate_test
    from .report import summary_table

    run_args, config = recipe.run, recipe.config
    PartialState(cpu=config.use_cpu)  # join the process group now: the task's set-up is shared between processes
    set_seed(config.seed)
    results_path = os.path.join(config.output_dir, RESULTS_FILE)
    tokenizer, task = build_task(recipe)
    callbacks = build_callbacks(recipe, task)
    eval_callback, doctor = callbacks["evaluation"], callbacks["doctor"]
    trainer = build_trainer(recipe, task, tokenizer, [c for c in callbacks.values() if c is not None])
    is_main = trainer.accelerator.is_main_process
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    start = time.time()
    try:
        trainer.train()
    except BaseException as error:  # keep everything logged so far, whatever stopped the run
        if is_main:
            status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
            write_json_atomic(results_path, payload(status, config_record(recipe), trainer.state.log_history, {"task": task.info}, f"{type(error).__name__}: {error}"))
        raise
    train_minutes = (time.time() - start) / 60
    peak_memory_mb = peak_memory()

    trainer.save_model(os.path.join(config.output_dir, "model"))
    policy = trainer.accelerator.unwrap_model(trainer.model)
    test = {"final": evaluate_test(task.evaluator, policy, tokenizer, trainer.accelerator, run_args.eval_seed)}
    if eval_callback.best_parameters is not None and eval_callback.best_step != trainer.state.global_step:
        saved = eval_callback.swap_in_best()
        test["best"] = evaluate_test(task.evaluator, policy, tokenizer, trainer.accelerator, run_args.eval_seed)
        eval_callback.restore(saved)
    else:  # the final checkpoint is the best one
        test["best"] = test["final"]
    test_metrics = {f"{metrics.TEST_PREFIX}_{name}": v for name, v in test["final"]["metrics"].items()}
    test_metrics |= {f"{metrics.TEST_BEST_PREFIX}_{name}": v for name, v in test["best"]["metrics"].items()}
    eval_callback.log(trainer.state, test_metrics)  # into the history and to W&B/TensorBoard, as `test/...`
    primary = task.evaluator.primary
    before, after = eval_callback.results[0], eval_callback.results[trainer.state.global_step]
    final = {
        "task": task.info,
        "steps": trainer.state.global_step,
        "stopped_early": eval_callback.stopped_early_at is not None,
        "train_minutes": train_minutes,
        "samples_per_step": config.completions_per_step(trainer.accelerator.num_processes),
        "peak_memory_mb": peak_memory_mb,
        "validation_metric": metrics.eval_key(primary),
        "validation_before": before["metrics"],
        "validation_after": after["metrics"],
        "best_validation": eval_callback.best_value,
        "best_validation_step": eval_callback.best_step,
        "test": test,
        "kl": last_training_value(trainer.state.log_history, metrics.KL),
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
    if is_main:
        write_json_atomic(results_path, payload("completed", config_record(recipe), trainer.state.log_history, final))
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        return run_safely(lambda: print(help_for_argv(argv)) or 0)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    def body() -> int:
        recipe = parse_recipe(argv)
        quiet_libraries()
        return run(recipe)

    return run_safely(body)


if __name__ == "__main__":
    sys.exit(main())
