"""Every GRADE estimator through the gradient probe at several temperatures, with its bias against the unbiased
score-function reference, next to REINFORCE and GRPO for scale: one table and one figure (bias against SNR).

Each (estimator, tau) is `python -m grade_trl.probe recipes/tiny/imdb_<method>.yaml --tau_start TAU
--tau_schedule constant --bias ...` on the same 8 prompts at the initial model; the reference is computed once and
shared (`--bias_reference`: it does not depend on the estimator, tau or relax_top_k). `--top_k` adds GRADE-STE rows
with the top-k relaxation (the memory switch), whose change to the estimator shows in its bias.

    OMP_NUM_THREADS=2 python benchmarks/estimator_probe.py --output_dir docs/results/estimator_probe
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from grade_trl.methods import METHODS  # noqa: E402
from grade_trl.probe import main as probe_main  # noqa: E402

GRADE_METHODS = tuple(name for name, method in METHODS.items() if method.relaxed)  # every relaxed method in the registry


def run_probe(recipe: str, overrides: list[str], output: Path, common: list[str]) -> dict:
    if not output.is_file():
        assert probe_main([str(REPO / "recipes" / "tiny" / f"{recipe}.yaml"), *common, *overrides, "--output", str(output)]) == 0
    return json.loads(output.read_text())["results"][0]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(GRADE_METHODS), choices=GRADE_METHODS)
    parser.add_argument("--taus", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--top_k", type=int, nargs="*", default=[64, 256], help="GRADE-STE rows with relax_top_k k (at every tau)")
    parser.add_argument("--num_estimates", type=int, default=16)
    parser.add_argument("--num_prompts", type=int, default=8)
    parser.add_argument("--bias_batches", type=int, default=96)
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/estimator_probe"))
    args = parser.parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    common = ["--num_estimates", str(args.num_estimates), "--num_prompts", str(args.num_prompts), "--output_dir", str(args.output_dir / "runs")]
    bias = ["--bias", "--bias_batches", str(args.bias_batches), "--bias_reference", str(args.output_dir / "reference.pt")]
    rows = []
    for name in ("reinforce", "grpo"):
        rows.append({"name": name, "tau": None, "top_k": 0, **run_probe(f"imdb_{name}", [], args.output_dir / f"{name}.json", common)})
    for method in args.methods:
        for top_k in [0] + (args.top_k if method == "grade_ste" else []):
            for tau in args.taus:
                overrides = ["--tau_start", str(tau), "--tau_schedule", "constant", "--relax_top_k", str(top_k), *bias]
                out = args.output_dir / f"{method}_tau{tau:g}_top{top_k}.json"
                rows.append({"name": method, "tau": tau, "top_k": top_k, **run_probe(f"imdb_{method}", overrides, out, common)})
    (args.output_dir / "summary.json").write_text(json.dumps({"command": " ".join(sys.argv), "rows": [{k: v for k, v in r.items() if k != "prompts"} for r in rows]}, indent=1) + "\n")
    table = markdown(rows)
    (args.output_dir / "table.md").write_text(table + "\n")
    print(table)
    figure(rows, args.output_dir / "bias_vs_snr.png")
    return {"rows": rows}


def number(value) -> str:
    """Two decimals; "n/a" where the probe could not tell (None or NaN: the estimates' noise swamps their mean)."""
    return "n/a" if value is None or value != value else f"{value:.2f}"


def resolved(bias: dict) -> bool:
    """Whether the bias is measurable: the estimates' own noise (noise_floor, relative to the reference's norm) is below
    the reference's norm. Above 1 the noise-corrected numbers subtract two large noisy quantities and mean nothing."""
    return bias["noise_floor"] < 1.0 and bias["relative_bias"] is not None and bias["relative_bias"] == bias["relative_bias"]


def markdown(rows: list[dict]) -> str:
    lines = ["| estimator | tau | top-k | snr / completion | cosine_loo | mean_norm | relative bias (noise-corrected) | cosine to the reference (noise-corrected) | noise floor |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = r.get("bias")
        if not b:
            bias_cells = "0 (unbiased) | 1 | -"
        elif resolved(b):
            bias_cells = f"{number(b['relative_bias'])} | {number(b['cosine_corrected'])} | {number(b['noise_floor'])}"
        else:
            bias_cells = f"n/a | n/a | {b['noise_floor']:.3g}"
        lines.append(f"| {r['name']} | {r['tau'] if r['tau'] is not None else '-'} | {r['top_k'] or 'all'} | {r['snr'] / r['completions_per_estimate']:.4f} | "
                     f"{r['cosine_loo']:.3f} | {r['mean_norm']:.3g} | {bias_cells} |")
    if any("bias" in r for r in rows):
        b = next(r["bias"] for r in rows if "bias" in r)
        lines.append(f"\n(reference: {b['reference_samples']} score-function samples, relative standard error {b['reference_relative_se']:.2f}; "
                     "n/a: the estimator's own noise exceeds the reference's norm, so its bias cannot be resolved)")
    return "\n".join(lines)


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    styles = {"grade_ste": ("o", "C0"), "grade": ("s", "C1"), "grade_reinmax": ("D", "C2"), "grade_rao": ("^", "C3"), "grade_gapped": ("v", "C4")}
    top_k_colors = {64: "C5", 256: "C6"}
    for offset, r in enumerate(r for r in rows if "bias" not in r):
        snr = r["snr"] / r["completions_per_estimate"]
        ax.scatter([snr], [0.0], marker="*", s=150, color="black")
        ax.annotate(r["name"], (snr, 0.0), textcoords="offset points", xytext=(5, 5 + 12 * offset))
    for r in rows:
        if "bias" not in r or not resolved(r["bias"]):
            continue  # unbiased references drawn above; unresolved noise: no bias to plot (the table says n/a)
        snr = r["snr"] / r["completions_per_estimate"]
        marker, color = styles[r["name"]]
        if r["top_k"]:
            marker, color = "x", top_k_colors.get(r["top_k"], "C7")
        label = r["name"] + (f" top-{r['top_k']}" if r["top_k"] else "")
        ax.scatter([snr], [r["bias"]["relative_bias"]], marker=marker, color=color, label=label)
        ax.annotate(f"{r['tau']:g}", (snr, r["bias"]["relative_bias"]), textcoords="offset points", xytext=(4, 2), fontsize=8)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("SNR per completion (log)")
    ax.set_ylabel("relative bias vs the score-function reference")
    ax.set_title("GRADE estimators at tau 0.5 / 1 / 2 (numbers: tau), tiny IMDB, initial model")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
