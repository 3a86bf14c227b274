"""`python -m grade_trl.probe RECIPE [RECIPE ...]`: draw K independent gradient estimates of each recipe's method on
one fixed prompt batch and print their variance, SNR and cosines (and, with --bias, GRADE's bias against an
unbiased score-function reference). What is measured and why: `grade_trl.probing`.

    OMP_NUM_THREADS=1 python -m grade_trl.probe recipes/tiny/imdb_grade_ste.yaml recipes/tiny/imdb_reinforce.yaml \\
        --num_estimates 16 --num_prompts 8 --output outputs/probe/init.json
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time

from .errors import stop_in_one_line_while_importing

if __name__ == "__main__":  # Ctrl-C during the seconds of imports below: one line, not a traceback
    stop_in_one_line_while_importing()

import torch  # noqa: E402

from .build import build_probe_trainer  # noqa: E402
from .cli import Command, Option, check_writable_folder, exit_process, quiet_libraries
from .errors import UserError
from .methods import get_method
from .probing import completions_per_estimate, estimator_statistics, first_rows, grade_bias, gradient_estimates, prompt_text, score_function_reference
from .recipe import build_recipe, load_recipe_file, recipe_list_keys, shared_overrides
from .results import write_json_atomic

logger = logging.getLogger("grade_trl.probe")

COMMAND = Command(
    prog="grade_trl.probe",
    description=__doc__.split("\n\n")[0],
    positional="RECIPE.yaml",
    nargs="+",
    forwards_overrides=True,
    override_list_keys=recipe_list_keys,
    options=(
        Option("checkpoint", str | None, None, "A run's output_dir, model/ folder or checkpoint-N folder to probe instead of the recipe's initial model (one recipe)."),
        Option("step", int | None, None, "The optimizer step the probe stands for (GRADE's tau); default the checkpoint's global_step, else 0."),
        Option("num_estimates", int, 16, "K: independent gradient estimates (>= 2)."),
        Option("num_prompts", int, 8, "The fixed batch: the first N training prompts."),
        Option("probe_seed", int, 0, "Seed of the estimates' sampling / Gumbel noise."),
        Option("include_value_loss", bool, False, "PPO: also differentiate the value loss (and probe the value head)."),
        Option("project_dim", int | None, None, "Sketch each gradient to this many dimensions (large models); None keeps them whole."),
        Option("bias", bool, False, "Relaxed methods (grade*): also estimate the bias against an unbiased score-function reference."),
        Option("bias_batches", int, 32, "Reference batches for --bias (its relative standard error falls as 1/sqrt)."),
        Option("bias_samples_per_prompt", int, 4, "Samples per prompt of each reference batch (>= 2: leave-one-out baseline)."),
        Option("bias_reference", str | None, None, "A file to keep the score-function reference in and reuse from: it depends on the model, prompts, reward, "
               "KL and lengths, not on the estimator, tau or relax_top_k, so a sweep over those computes it once (within one command the "
               "recipes share it anyway). Reused only when the settings it records match."),
        Option("output", str, "probe.json", "The JSON file the results go to (rewritten after each recipe)."),
    ),
    epilog="Every other --key value is a recipe override applied to every recipe (a key only some methods read: to their recipes).",
)


def check_options(paths: list[str], options: dict) -> None:
    if options["num_estimates"] < 2:
        raise UserError(f"--num_estimates must be >= 2 (a variance needs two estimates), got {options['num_estimates']}")
    if options["num_prompts"] < 1:
        raise UserError(f"--num_prompts must be >= 1, got {options['num_prompts']}")
    if not 0 <= options["probe_seed"] < 2**32:  # as a run's seed (it was accepted, and numpy's seeding refused it later)
        raise UserError(f"--probe_seed must be an integer from 0 to 2^32 - 1, got {options['probe_seed']}")
    if options["checkpoint"] is not None and len(paths) > 1:
        raise UserError(f"--checkpoint holds one run's weights: give one recipe with it, not {len(paths)}")
    if options["bias"] and options["bias_samples_per_prompt"] < 2:
        raise UserError(f"--bias_samples_per_prompt must be >= 2 (leave-one-out baseline), got {options['bias_samples_per_prompt']}")
    if options["bias"] and options["bias_batches"] < 2:  # its relative standard error divides by (n - 1)
        raise UserError(f"--bias_batches must be >= 2 (the reference's standard error needs two batches), got {options['bias_batches']}")
    if options["project_dim"] is not None and options["project_dim"] < 1:
        raise UserError(f"--project_dim must be >= 1 (or left out: gradients whole), got {options['project_dim']}")
    if options["step"] is not None and options["step"] < 0:
        raise UserError(f"--step must be >= 0 (the optimizer step the probe stands for), got {options['step']}")
    for key in ("output", "bias_reference"):  # files written after minutes of work: checked before it
        if options[key] is not None:
            if os.path.isdir(options[key]):
                raise UserError(f"--{key}: {options[key]!r} is a folder; give a file path")
            check_writable_folder(f"--{key}", os.path.dirname(os.path.abspath(options[key])))


# Settings of a GRADE recipe that change its estimates but not the score-function reference (the gradient of the hard
# objective at the same parameters), or nothing at all: excluded from the reference's key.
_NOT_IN_REFERENCE = frozenset({
    "method", "estimator", "tau_start", "tau_end", "tau_anneal_steps", "tau_schedule", "tau_backward", "rao_samples", "gapped_margin",
    "relax_top_k", "rollout_cache", "rollout_checkpointing", "recompute_reference_and_reward", "output_dir", "logging_dir", "run_name",
})


def reference_key(recipe, options: dict) -> str:
    """What the score-function reference depends on, as one string: the recipe's settings but the estimator's, and the probe's."""
    settings = {f.name: getattr(recipe.run, f.name) for f in dataclasses.fields(recipe.run)}
    settings.update({f.name: getattr(recipe.config, f.name) for f in dataclasses.fields(recipe.config) if f.init})
    settings = {k: v for k, v in settings.items() if k not in _NOT_IN_REFERENCE}
    settings.update({k: options[k] for k in ("checkpoint", "step", "num_prompts", "probe_seed", "project_dim", "bias_batches", "bias_samples_per_prompt")})
    return json.dumps(settings, sort_keys=True, default=str)


def cached_reference(trainer, prompts, recipe, options: dict, cache: dict) -> tuple[dict, bool]:
    """The score-function reference for this recipe: from `cache` (this command's), the --bias_reference file, or computed
    (then kept in both). Returns (reference, reused)."""
    key = reference_key(recipe, options)
    if key in cache:
        return cache[key], True
    path = options["bias_reference"]
    if path and os.path.isfile(path):
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - whatever torch.load makes of a file it did not write (pickle, zip, EOF errors)
            raise UserError(f"--bias_reference: {path!r} is not a reference this probe wrote ({type(error).__name__}); give another path or delete it") from None
        if not isinstance(stored, dict):
            raise UserError(f"--bias_reference: {path!r} is not a reference this probe wrote; give another path or delete it")
        if stored.get("key") == key:
            cache[key] = stored["reference"]
            return cache[key], True
        logger.warning("%s holds a reference for other settings; computing a new one and replacing it", path)
    reference = score_function_reference(trainer, prompts, options["bias_batches"], options["bias_samples_per_prompt"], options["probe_seed"], options["project_dim"])
    cache[key] = reference
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save({"key": key, "reference": reference}, path)
    return reference, False


def probe_recipe(recipe, path: str, options: dict, reference_cache: dict | None = None) -> dict:
    """Build one recipe's trainer, probe it on its first `num_prompts` training prompts, return one result row."""
    trainer, task = build_probe_trainer(recipe, options["checkpoint"], options["step"])
    if len(task.train_dataset) < options["num_prompts"]:  # a smaller batch than asked would change what the figures mean
        raise UserError(f"--num_prompts: {path} has {len(task.train_dataset)} training prompts, fewer than the {options['num_prompts']} asked; "
                        f"give --num_prompts {len(task.train_dataset)} or less")
    prompts = first_rows(task.train_dataset, options["num_prompts"])
    start = time.time()
    G = gradient_estimates(trainer, prompts, options["num_estimates"], options["probe_seed"], options["include_value_loss"], options["project_dim"])
    row = {
        "recipe": path,
        "method": recipe.run.method,
        "task": recipe.run.task,
        "step": trainer.state.global_step,
        "checkpoint": options["checkpoint"],
        "num_params": sum(p.numel() for p in trainer.probed_parameters(options["include_value_loss"])),
        "dimensions": G.shape[1],
        "num_estimates": G.shape[0],
        "completions_per_estimate": completions_per_estimate(trainer, len(prompts)),
        **estimator_statistics(G),
        "seconds": time.time() - start,
        "prompts": [prompt_text(p) for p in prompts],
    }
    method = get_method(recipe.run.method)
    if method.relaxed:
        row.update(tau=trainer.tau, estimator=trainer.args.estimator, relax_top_k=trainer.args.relax_top_k)
    if options["bias"] and not method.relaxed:
        logger.info("%s: --bias is for relaxed methods; %s's estimator is unbiased, so no bias is estimated", path, recipe.run.method)
    if options["bias"] and method.relaxed:
        start = time.time()
        reference, reused = cached_reference(trainer, prompts, recipe, options, {} if reference_cache is None else reference_cache)
        row["bias"] = grade_bias(trainer, prompts, seed=options["probe_seed"], estimates=G, project_dim=options["project_dim"], reference=reference)
        row["bias"].update(seconds=time.time() - start, reference_reused=reused)
    return row


def _resolved(value) -> str:
    """A noise-corrected statistic, or why there is none (`probing.compare_means` gives NaN where the noise swamps it)."""
    return "n/a: lost in the noise" if value is None or value != value else f"{value:.3f}"


def format_table(rows: list[dict]) -> str:
    """One line per recipe: the scale-dependent statistics, then the scale-free ones."""
    header = f"{'recipe':<28} {'method':<10} {'compl.':>6} {'mean_sq_norm':>12} {'trace_cov':>11} {'mean_norm':>9} {'snr':>8} {'snr/compl':>9} {'snr_plugin':>10} {'cos_mean':>8} {'cos_loo':>8} {'sec':>6}"
    lines = [header]
    for r in rows:
        lines.append(
            f"{os.path.splitext(os.path.basename(r['recipe']))[0]:<28} {r['method']:<10} {r['completions_per_estimate']:>6} {r['mean_sq_norm']:>12.4g} "
            f"{r['trace_cov']:>11.4g} {r['mean_norm']:>9.4g} {r['snr']:>8.4f} {r['snr'] / r['completions_per_estimate']:>9.5f} {r['snr_plugin']:>10.4f} {r['cosine_to_mean']:>8.4f} {r['cosine_loo']:>8.4f} {r['seconds']:>6.0f}"
        )
    for r in rows:
        if "bias" in r:
            b = r["bias"]
            lines.append(
                f"bias {r['method']} (tau {r['tau']:g}, top-k {r['relax_top_k'] or 'all'}): vs the score-function reference ({b['reference_samples']} samples, relative SE {b['reference_relative_se']:.3f}): "
                f"cosine {b['cosine']:.3f} (noise-corrected {_resolved(b['cosine_corrected'])}), relative error {b['relative_error']:.3f} "
                f"(noise floor {b['noise_floor']:.3f}; noise-corrected bias {_resolved(b['relative_bias'])})"
            )
    return "\n".join(lines)


def probe(paths: list[str], options: dict, overrides: dict, argv: list[str]) -> int:
    check_options(paths, options)
    files = {path: load_recipe_file(path) for path in paths}
    routed, notes = shared_overrides(files, overrides)  # a key only some methods read goes to their recipes (max_new_tokens, max_completion_length)
    for note in notes:
        logger.warning(note)
    recipes = [build_recipe({**files[path], **routed[path]}, bare_keys=routed[path].bare) for path in paths]  # validate all before any work
    if options["bias"] and not any(get_method(recipe.run.method).relaxed for recipe in recipes):
        raise UserError(f"--bias: the bias is GRADE's, against an unbiased reference, and applies to relaxed methods (grade*); these recipes run "
                        f"{', '.join(sorted({recipe.run.method for recipe in recipes}))}, whose estimators are unbiased")
    if options["include_value_loss"] and not any(recipe.run.method == "ppo" for recipe in recipes):
        raise UserError(f"--include_value_loss: only PPO has a value loss (and a value head to probe); these recipes run "
                        f"{', '.join(sorted({recipe.run.method for recipe in recipes}))}")
    quiet_libraries()
    command = " ".join(["python -m grade_trl.probe", *argv])
    rows, reference_cache = [], {}
    for path, recipe in zip(paths, recipes):
        logger.info("probing %s (%s): %d estimates on %d prompts", path, recipe.run.method, options["num_estimates"], options["num_prompts"])
        rows.append(probe_recipe(recipe, path, options, reference_cache))
        write_json_atomic(options["output"], {"command": command, "options": options, "overrides": overrides, "results": rows})
    print(format_table(rows))
    print(f"\nresults: {options['output']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return COMMAND.main(argv, lambda paths, options, overrides: probe(paths, options, overrides, argv))


if __name__ == "__main__":
    exit_process(main)
