"""The README's "Every method on the tiny recipes" table from finished runs: one row per run folder.

    python -m grade_trl.compare recipes/tiny/imdb_*.yaml recipes/tiny/length_*.yaml --seed_list 42 --jobs 2 --output_dir results/tiny_table
    python benchmarks/tiny_table.py results/tiny_table/*/seed42 [--json docs/results/tiny_table.json]

Columns: validation reward before and after training (`final.validation_before/after`), the final checkpoint's
test reward, the KL of every logged training window (min / max, nats per completion), the training windows'
mean completion length (first -> last), optimizer steps and training minutes (of the process's share of the
machine: with `--jobs 2` each run has one core).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grade_trl.metrics import KL  # noqa: E402
from grade_trl.comparison import RUN_INFO  # noqa: E402
from grade_trl.results import load_results, read_json, test_metric, training_rows  # noqa: E402

LENGTH_KEY = "completions/mean_length"


def recipe_stem(run: Path) -> str:
    """The recipe file's stem from compare's record of the command (compare_run.json), else compare's run name."""
    info = read_json(run / RUN_INFO) or {}
    recipe = next((word for word in str(info.get("command", "")).split() if word.endswith(".yaml")), None)
    return Path(recipe).stem if recipe else run.parent.name


def row(run: Path) -> dict:
    results = load_results(run)
    final, history = results["final"], results["history"]
    windows = training_rows(history)
    kls = [r[KL] for r in windows if r.get(KL) is not None]
    lengths = [r[LENGTH_KEY] for r in windows if r.get(LENGTH_KEY) is not None]
    return {
        "recipe": recipe_stem(run),
        "method": results["config"]["run"]["method"],
        "task": results["config"]["run"]["task"],
        "status": results["status"],
        "val_before": final["validation_before"]["reward"],
        "val_after": final["validation_after"]["reward"],
        "test_after": test_metric(final, "reward"),
        "kl_min": min(kls) if kls else None,
        "kl_max": max(kls) if kls else None,
        "length_first": lengths[0] if lengths else None,
        "length_last": lengths[-1] if lengths else None,
        "steps": final["steps"],
        "train_minutes": final["train_minutes"],
    }


def markdown(rows: list[dict]) -> str:
    def f(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    lines = ["| run | method | task | val before | val after | test after | KL min / max | train length | steps | train min |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['method']} | {r['task']} | {f(r['val_before'])} | {f(r['val_after'])} | {f(r['test_after'])} | "
                     f"{f(r['kl_min'])} / {f(r['kl_max'], 2)} | {f(r['length_first'], 1)} -> {f(r['length_last'], 1)} | {r['steps']} | {f(r['train_minutes'], 1)} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (each with results.json)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = [row(run) for run in args.runs]
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
