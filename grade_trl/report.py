"""The one place that prints a user-facing summary (the quickstart's before/after table)."""

from __future__ import annotations

import textwrap


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def summary_table(final: dict) -> str:
    """Validation reward before/after, KL, test reward, and a few completions before/after."""
    before, after = final["val_reward_before"], final["val_reward_after"]
    lines = [
        "",
        f"{'':<28}{'before':>12}{'after':>12}",
        f"{'validation reward (mean)':<28}{before['mean']:>12.3f}{after['mean']:>12.3f}",
        f"{'validation reward (std)':<28}{before['std']:>12.3f}{after['std']:>12.3f}",
        f"{'KL to reference (last log)':<28}{0.0:>12.3f}{final.get('kl') or float('nan'):>12.3f}",
    ]
    if "test_reward" in final:
        lines.append(f"{'test reward (mean)':<28}{'':>12}{final['test_reward']['mean']:>12.3f}")
    lines.append(f"{'optimizer steps / minutes':<28}{'':>12}{final['steps']:>6d} / {final['train_minutes']:.1f}")
    for i, sample in enumerate(final.get("samples", []), 1):
        lines += ["", f"sample {i}  prompt: {_clip(sample['prompt'], 100)}"]
        for tag in ("before", "after"):
            text = textwrap.fill(_clip(sample[tag], 220), width=96, initial_indent=f"  {tag:<6} [{sample[tag + '_reward']:.2f}] ", subsequent_indent=" " * 17)
            lines.append(text)
    return "\n".join(lines)
