"""The one place that prints a user-facing summary (the quickstart's before/after table)."""

from __future__ import annotations

import textwrap


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _score(value) -> str:
    return "  - " if value is None else f"{value:.2f}"


def summary_table(final: dict) -> str:
    """Validation metrics before/after, KL, test metrics of the final and best checkpoints, a few completions."""
    before, after = final["validation_before"], final["validation_after"]
    test = final.get("test", {})
    prefix = "val"  # a label: the validation metrics are logged as eval_{name}
    lines = ["", f"{'':<34}{'before':>12}{'after':>12}"]
    for name in ("reward", "reward_std", "gold_reward", "best_of_n_reward", "accuracy", "format_reward", "completion_length", "distinct_2"):
        if name in before and name in after:
            lines.append(f"{prefix + ' ' + name:<34}{before[name]:>12.3f}{after[name]:>12.3f}")
    kl = final.get("kl")  # None: a GRPO run without a KL term (beta 0)
    lines.append(f"{'KL to reference (last log)':<34}{0.0:>12.3f}" + (f"{kl:>12.3f}" if kl is not None else f"{'-':>12}"))
    primary = final["validation_metric"].removeprefix("eval_")
    for tag in ("final", "best"):
        if tag in test:
            for name in (primary, "format_reward", "gold_reward"):  # format: GSM8K (its answer line read or not)
                if name in test[tag]["metrics"]:
                    label = f"test {name} ({tag} ckpt)" if tag == "final" else f"test {name} (best, step {final.get('best_validation_step')})"
                    lines.append(f"{label:<34}{'':>12}{test[tag]['metrics'][name]:>12.3f}")
    lines.append(f"{'optimizer steps / minutes':<34}{'':>12}{final['steps']:>6d} / {final['train_minutes']:.1f}")
    if stopped := final.get("doctor_stopped"):
        skipped = f", its update not applied ({final['steps'] - 1} updates)" if stopped["update_skipped"] else ""
        lines.append(f"stopped by the run doctor on {stopped['check']} at step {stopped['step']}{skipped}")
    for i, sample in enumerate(final.get("samples", []), 1):
        lines += ["", f"sample {i}  prompt: {_clip(sample['prompt'], 100)}"]
        for tag in ("before", "after"):
            text = textwrap.fill(_clip(sample[tag], 220), width=96, initial_indent=f"  {tag:<6} [{_score(sample[tag + '_reward'])}] ", subsequent_indent=" " * 17)
            lines.append(text)
    return "\n".join(lines)
