"""Turn a comparison folder into figures, statistics, tables and a report.

    python -m grade_trl.analysis RESULTS_DIR [--output_dir RESULTS_DIR/analysis]

Reads every `{RESULTS_DIR}/{name}/seed{k}/results.json` (completed runs only) and, when it is there,
`{RESULTS_DIR}/comparison.json` for the command, the thresholds and the method order; the per-method
numbers are recomputed from the runs with the same code as `grade_trl.compare`, so a folder without
comparison.json (or with runs added by hand) works too. Writes to the output folder:

    report.md          the figures, the tables, the statistics, the seeds and the command
    comparison.md/.tex the comparison table (Markdown; LaTeX with booktabs)
    statistics.json    every test below with its inputs' sizes
    *.png              learning_curves, validation_curves, grad_norm, estimator_variance, sample_efficiency,
                       test_comparison, reward_kl_frontier, tau_ablation (each skipped, with a note in
                       report.md, when the histories lack its metrics)

Statistics. Across seeds (one value per run): 95% t-interval and percentile bootstrap interval (nominal
95%: it undercovers with few seeds, see `stats.bootstrap_ci`) of each method's mean test reward; Welch's
t-test, Cohen's d and Hedges' g for every pair of methods, with Holm's adjustment over the pairs that have a
test (2 seeds or more on each side). Within one seed (the same test prompts for every method;
paired by prompt text): paired t-test, Wilcoxon signed-rank test and d_z on the per-prompt test
rewards, Holm-adjusted over all (pair, seed) tests. The per-prompt tests measure whether two trained
policies differ on these prompts; only the across-seed tests speak to the methods' training variance.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from pathlib import Path

from .errors import stop_in_one_line_while_importing

if __name__ == "__main__":  # Ctrl-C during the imports below (scipy, matplotlib): one line, not a traceback
    stop_in_one_line_while_importing()

from . import metrics  # noqa: E402 - after the handling above
from .cli import Command, Option, exit_process
from .comparison import build_comparison, from_fewer_runs, runs_and_results_in_folder, with_the_same_protocol, with_the_same_settings
from .errors import UserError
from .methods import relaxed_methods
from .results import RESULTS_FILE, evaluation_rows, last_training_value, read_json, shape_problem, test_metric, test_name, test_per_prompt, training_rows, write_json_atomic
from .stats import (
    bootstrap_ci,
    cohens_d,
    hedges_g,
    holm_adjust,
    mean_ci,
    pair_by_prompt,
    paired_effect_size,
    paired_t_test,
    welch_t_test,
    wilcoxon_signed_rank,
)

logger = logging.getLogger(__name__)

TAU_FIELDS = ("tau_start", "tau_end", "tau_schedule", "tau_anneal_steps")  # the relaxed methods' config (GumbelGRADEConfig)
# the probe's history rows; the leave-one-out cosine, not the cosine to the mean, which includes the estimate itself
# (1/sqrt(K) for pure noise: REINFORCE looked half aligned at K = 4 in a journey audit)
PROBE_KEYS = tuple(f"{metrics.PROBE_PREFIX}_{k}" for k in ("trace_cov", "snr", "mean_sq_norm", "cosine_loo"))


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_runs(results_dir: Path) -> tuple[dict | None, dict[str, list[dict]], list[str]]:
    """(comparison.json or None, {name: [run, ...]}, the runs not in the tables and why) with run = {seed, run_dir,
    results}: by seed, the completed runs of each name trained with the settings comparison.json names for it, else with
    its newest run's (`with_the_same_settings`).
    Said, not skipped silently: a seed missing from every table changes its means."""
    if not results_dir.is_dir():
        raise UserError(f"no such folder: {results_dir} (give the --output_dir of `python -m grade_trl.compare`)")
    comparison = read_json(results_dir / "comparison.json")
    if (results_dir / "comparison.json").is_file() and not isinstance(comparison, dict):
        logger.warning("%s is not readable JSON (a copy cut short?): the report names no command", results_dir / "comparison.json")
        comparison = None
    runs: dict[str, list[dict]] = {}
    left_out: list[str] = []
    found = runs_and_results_in_folder(results_dir)
    for record, results in found:
        path = Path(record["run_dir"]) / RESULTS_FILE
        if record["status"] == "completed":
            runs.setdefault(record["name"], []).append({"seed": record["seed"], "run_dir": record["run_dir"], "results": results})
        elif record["status"] == "pending":  # compare launched it: no results.json yet, or one that does not parse
            data = read_json(path) if path.is_file() else None
            why = "launched, no results.json (the same compare command again runs it)" if not path.is_file() else \
                f"its {path} is not readable (cut short, or edited by hand)" if data is None else f"its {path} is not a results.json (edited by hand?): {shape_problem(data)}"
            left_out.append(f"{record['name']} seed {record['seed']}: {why}")
        else:
            still = " (still training, or killed without a word: its last snapshot)" if record["status"] == "running" else ""
            left_out.append(f"{record['name']} seed {record['seed']}: {record['status']}{still} (the same compare command again resumes or reruns it)")
    in_folder = {(record["name"], record["seed"]) for record, _ in found}
    for record in (comparison or {}).get("runs") or []:  # in the last command's list, never started (it was stopped first)
        if isinstance(record, dict) and (record.get("name"), record.get("seed")) not in in_folder:
            left_out.append(f"{record.get('name')} seed {record.get('seed')}: not started (the same compare command again runs it)")
    for name, group in runs.items():  # the settings comparison.json names for it (its last compare command's), else its newest run's
        reference = (((comparison or {}).get("methods") or {}).get(name) or {}).get("settings")
        kept, differing, _ = with_the_same_settings([(run["results"], run["run_dir"]) for run in group], reference if isinstance(reference, dict) else None)
        left_out += [f"{name} seed {group[i]['seed']}: trained with other settings than the comparison's {name} runs ({why})" for i, why in differing.items()]
        runs[name] = [group[i] for i in kept]
    every = [(name, run) for name, group in runs.items() for run in group]  # one task and evaluation for every name: comparison.json's
    other_protocol, _ = with_the_same_protocol([run["results"] for _, run in every], recorded_protocol(comparison))
    left_out += [f"{every[i][0]} seed {every[i][1]['seed']}: another task, evaluation or process count than the comparison's other runs ({why})"
                 for i, why in other_protocol.items()]
    dropped = {every[i][1]["run_dir"] for i in other_protocol}
    runs = {name: [run for run in group if run["run_dir"] not in dropped] for name, group in runs.items()}
    runs = {name: group for name, group in runs.items() if group}  # a name none of whose runs has its comparison's settings: not a row
    for line in left_out:
        logger.warning("not in the tables: %s", line)
    if not runs:
        raise UserError(f"no completed runs under {results_dir} (expected {results_dir}/<method>/seed<k>/results.json with status 'completed'"
                        + (f"; {len(left_out)} not in the tables, said above)" if left_out else ")"))
    order = list((comparison or {}).get("methods", {})) + sorted(runs)
    return comparison, {name: sorted(runs[name], key=lambda r: r["seed"]) for name in dict.fromkeys(order) if name in runs}, left_out


def recompute_comparison(comparison: dict | None, runs: dict[str, list[dict]]) -> dict:
    """comparison.json's content recomputed from the runs found (same code as grade_trl.compare)."""
    meta = {k: comparison[k] for k in ("command", "commands", "output_dir", "seeds", "overrides", "launcher") if comparison and k in comparison}
    thresholds = (comparison or {}).get("thresholds", {}).get("fractions") or [0.6, 0.7, 0.8]
    records = []
    for name, group in runs.items():
        for run in group:
            config = run["results"].get("config") or {}
            records.append({
                "name": name,
                "method": (config.get("run") or {}).get("method"),
                "recipe": ((comparison or {}).get("methods", {}).get(name) or {}).get("recipe"),
                "seed": run["seed"],
                "run_dir": run["run_dir"],
                "status": "completed",
            })
    return build_comparison(records, thresholds, meta, protocol_reference=recorded_protocol(comparison))


def recorded_protocol(comparison: dict | None) -> dict | None:
    """The task, evaluation and process count comparison.json says its tables hold (`comparison.protocol`), or None
    (no comparison.json, or one written before it recorded them)."""
    recorded = (comparison or {}).get("protocol")
    return recorded if isinstance(recorded, dict) and recorded else None


# ---------------------------------------------------------------------------------------------
# Curves
# ---------------------------------------------------------------------------------------------


def seed_series(group: list[dict], rows_of, key: str) -> list[dict[int, float]]:
    """One {step: value} per run of the rows `rows_of(history)` that have `key`."""
    return [{row["step"]: row[key] for row in rows_of(run["results"].get("history") or []) if row.get(key) is not None} for run in group]


def band(series: list[dict[int, float]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps, mean and 95% t-interval over the runs that have each step (the mean itself where only one has it)."""
    steps = sorted(set().union(*series)) if series else []
    mean, low, high = [], [], []
    for step in steps:
        est = mean_ci([s[step] for s in series if step in s])
        mean.append(est.mean)
        low.append(est.low if est.low is not None else est.mean)
        high.append(est.high if est.high is not None else est.mean)
    return steps, mean, low, high


def has_key(runs: dict[str, list[dict]], key: str) -> bool:
    return any(key in row for group in runs.values() for run in group for row in run["results"].get("history") or [])


def kl_at(history: list[dict], step: int) -> float | None:
    """The KL of the last training log at or before `step`; 0 at step 0 (the policy is the reference)."""
    return 0.0 if step == 0 else last_training_value(history, metrics.KL, step)


# ---------------------------------------------------------------------------------------------
# Figures: each returns a note (why it was skipped) or None when it wrote its file
# ---------------------------------------------------------------------------------------------


class Figures:
    """Draws the figures of one comparison into `out`; `written` and `skipped` collect what happened."""

    def __init__(self, runs: dict[str, list[dict]], comparison: dict, out: Path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.plt, self.runs, self.comparison, self.out = plt, runs, comparison, out
        cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        self.color = {name: cycle[i % len(cycle)] for i, name in enumerate(runs)}
        self.val_key = comparison["metric"]["validation"] or metrics.eval_key("reward")
        self.written: dict[str, str] = {}
        self.skipped: dict[str, str] = {}

    def save(self, fig, name: str, caption: str) -> None:
        fig.tight_layout()
        fig.savefig(self.out / f"{name}.png", dpi=120)
        self.plt.close(fig)
        self.written[name] = caption

    def curve(self, ax, rows_of, key: str, log: bool = False) -> None:
        for name, group in self.runs.items():
            steps, mean, low, high = band(seed_series(group, rows_of, key))
            if steps:
                ax.plot(steps, mean, marker="o", ms=3, color=self.color[name], label=f"{name} (n={len(group)})")
                ax.fill_between(steps, low, high, color=self.color[name], alpha=0.2)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)

    def learning_curves(self) -> None:
        if not has_key(self.runs, metrics.REWARD):
            self.skipped["learning_curves"] = "no training `reward` in the histories"
            return
        keys = [k for k in (metrics.REWARD, metrics.KL) if has_key(self.runs, k)]
        fig, axes = self.plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
        for ax, key in zip(axes[0], keys):
            self.curve(ax, training_rows, key)
        axes[0][0].set_title("training reward (relaxed for GRADE), mean and 95% CI over seeds")
        axes[0][0].legend()
        self.save(fig, "learning_curves", "Training reward and KL per logging window: mean over seeds, band = 95% t-interval.")

    def validation_curves(self) -> None:
        if not has_key(self.runs, self.val_key):
            self.skipped["validation_curves"] = f"no `{self.val_key}` evaluations in the histories"
            return
        fig, (ax, gap_ax) = self.plt.subplots(1, 2, figsize=(12, 4))
        self.curve(ax, lambda h: evaluation_rows(h, self.val_key), self.val_key)
        names, gaps_final, gaps_best = [], [], []
        for name, group in self.runs.items():
            test = [test_metric(r["results"]["final"], test_name(r["results"])) for r in group]
            last = [rows[-1]["step"] for r in group if (rows := evaluation_rows(r["results"]["history"], self.val_key))]
            est = mean_ci(test)
            if est.mean is not None and last:
                err = [[est.mean - (est.low if est.low is not None else est.mean)], [(est.high if est.high is not None else est.mean) - est.mean]]
                ax.errorbar([max(last)], [est.mean], yerr=err, fmt="s", ms=7, mfc="white", color=self.color[name], capsize=4)
            names.append(name)
            gaps_final.append(self._gaps(group, "final"))
            gaps_best.append(self._gaps(group, "best"))
        ax.set_title("validation (lines) and test at the end (squares)")
        ax.legend()
        self._paired_bars(gap_ax, names, [("final checkpoint", gaps_final), ("best checkpoint", gaps_best)])
        gap_ax.axhline(0, color="black", lw=0.8)
        gap_ax.set_ylabel(f"{self.val_key} - test")
        gap_ax.set_title("validation - test gap (best: selected on validation)")
        self.save(fig, "validation_curves", "Validation metric over training (mean, 95% CI band) with the final test value; right: validation minus test, "
                  "for the final checkpoint and for the checkpoint selected on validation (its gap includes the selection's optimism).")

    def _gaps(self, group: list[dict], checkpoint: str) -> list[float]:
        gaps = []
        for run in group:
            final, history = run["results"]["final"], run["results"]["history"]
            test = test_metric(final, test_name(run["results"]), checkpoint)
            rows = evaluation_rows(history, self.val_key)
            if checkpoint == "final":
                val = rows[-1][self.val_key] if rows else None
            else:
                val = max((row[self.val_key] for row in rows), default=None)
            if test is not None and val is not None:
                gaps.append(val - test)
        return gaps

    def _paired_bars(self, ax, names: list[str], groups: list[tuple[str, list[list[float]]]]) -> None:
        """Bars of the mean with 95% t-interval error bars and the per-seed values as dots; one bar per (name, group)."""
        width = 0.8 / len(groups)
        for g, (label, values) in enumerate(groups):
            for i, (name, vals) in enumerate(zip(names, values)):
                est = mean_ci(vals)
                if est.mean is None:
                    continue
                x = i + (g - (len(groups) - 1) / 2) * width
                yerr = None if est.low is None else [[est.mean - est.low], [est.high - est.mean]]
                ax.bar(x, est.mean, width * 0.9, color=self.color[name], alpha=1.0 if g == 0 else 0.45, yerr=yerr, capsize=4,
                       label=label if i == 0 else None, edgecolor="black", lw=0.5)
                ax.scatter([x] * len(vals), vals, color="black", s=10, zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.grid(alpha=0.3, axis="y")
        if len(groups) > 1:
            ax.legend()

    def grad_norm(self) -> None:
        if not has_key(self.runs, "grad_norm_mean"):
            self.skipped["grad_norm"] = "no `grad_norm_mean` in the histories"
            return
        fig, ax = self.plt.subplots(figsize=(7, 4))
        self.curve(ax, training_rows, "grad_norm_mean", log=True)
        ax.set_title("pre-clipping gradient norm (window mean over optimizer steps)")
        ax.legend()
        self.save(fig, "grad_norm", "Pre-clipping gradient norm, mean over each logging window's optimizer steps (log scale). "
                  "Its spread over steps is not an estimator variance; see estimator_variance.")

    def estimator_variance(self) -> None:
        keys = [k for k in PROBE_KEYS if has_key(self.runs, k)]
        if not keys:
            self.skipped["estimator_variance"] = f"no `probe_*` keys ({', '.join(PROBE_KEYS)}) in the histories (the gradient-variance probe was not run)"
            return
        fig, axes = self.plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4), squeeze=False)
        for ax, key in zip(axes[0], keys):
            self.curve(ax, lambda h, k=key: [row for row in h if row.get(k) is not None], key, log=key != "probe_cosine_loo")
        axes[0][0].legend()
        self.save(fig, "estimator_variance", "Gradient-estimator probe: K independent gradient estimates on the same prompt batch at each probed checkpoint "
                  "(trace of their covariance, signal-to-noise ratio, mean squared norm, and the leave-one-out cosine: each estimate "
                  "against the mean of the others, 0 for pure noise); mean over seeds. The trace and the squared norm compare "
                  "within a method only (each method's gradient has its own scale); the SNR and the cosine compare across methods.")

    def sample_efficiency(self) -> None:
        methods = self.comparison["methods"]
        fractions = [str(f) for f in self.comparison["thresholds"]["fractions"]]
        units = [u for u in ("steps", "samples", "seconds") if any(methods[n]["sample_efficiency"][f][u]["mean"] is not None for n in methods for f in fractions)]
        if not fractions or not units:
            self.skipped["sample_efficiency"] = "no run reached any threshold (or no run improved on the initial validation reward)"
            return
        fig, axes = self.plt.subplots(1, len(units), figsize=(6 * len(units), 4), squeeze=False)
        width = 0.8 / len(methods)
        for ax, unit in zip(axes[0], units):
            for m, (name, entry) in enumerate(methods.items()):
                for i, f in enumerate(fractions):
                    cell = entry["sample_efficiency"][f]
                    x = i + (m - (len(methods) - 1) / 2) * width
                    height = cell[unit]["mean"]
                    ax.bar(x, height or 0, width * 0.9, color=self.color.get(name))
                    ax.text(x, height or 0, f"{cell['reached']}/{cell['of']}", ha="center", va="bottom", fontsize=8)
            ax.set_xticks(range(len(fractions)), [f"{float(f):.0%}" for f in fractions])
            ax.set_xlabel("fraction f of the best validation gain of the seed")
            ax.set_ylabel(f"{unit} to reach (mean over seeds that did)")
            ax.grid(alpha=0.3, axis="y")
        from matplotlib.patches import Patch

        axes[0][0].legend(handles=[Patch(color=self.color[name], label=name) for name in methods])
        self.save(fig, "sample_efficiency", "Steps, samples and seconds to reach target_s(f) = r0_s + f (r*_s - r0_s), mean over the seeds that reached it "
                  "(k/n above each bar; an empty bar: none did).")

    def test_comparison(self) -> None:
        names = list(self.runs)
        panels = [("test", "test_best_ckpt", "test")]
        if any(self.comparison["methods"][n]["test_gold"]["mean"] is not None for n in names):
            panels.append(("test_gold", "test_gold_best_ckpt", "gold (independent judge)"))
        if all(self.comparison["methods"][n]["test"]["mean"] is None for n in names):
            self.skipped["test_comparison"] = "no test metrics in the results"
            return
        fig, axes = self.plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
        for ax, (final_key, best_key, title) in zip(axes[0], panels):
            values = lambda key: [[v for v in self.comparison["methods"][n][key]["per_seed"] if v is not None] for n in names]  # noqa: E731
            self._paired_bars(ax, names, [("final checkpoint", values(final_key)), ("best-validation checkpoint", values(best_key))])
            ax.set_title(f"{title}: mean, 95% CI over seeds, seeds as dots")
        self.save(fig, "test_comparison", "Test metric of the final and the best-validation checkpoints: mean over seeds with 95% t-interval; dots are seeds.")

    def reward_kl_frontier(self) -> None:
        if not has_key(self.runs, "kl"):
            self.skipped["reward_kl_frontier"] = "no `kl` in the histories"
            return
        gold_key = metrics.eval_key("gold_reward")
        panels = [(self.val_key, "test", "learned reward (proxy)")]
        if gold_key != self.val_key and has_key(self.runs, gold_key):
            panels.append((gold_key, "test_gold", "gold judge"))
        fig, axes = self.plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
        for ax, (val_key, summary_key, title) in zip(axes[0], panels):
            for name, group in self.runs.items():
                if not has_key({name: group}, metrics.KL):  # TRL's GRPO and CISPO log no KL with beta 0 (their default)
                    continue
                points: dict[int, list[tuple[float, float]]] = {}
                for run in group:
                    history = run["results"]["history"]
                    for row in evaluation_rows(history, val_key):
                        kl = kl_at(history, row["step"])
                        if kl is not None:
                            points.setdefault(row["step"], []).append((kl, row[val_key]))
                steps = sorted(points)
                xs = [sum(p[0] for p in points[s]) / len(points[s]) for s in steps]
                ys = [sum(p[1] for p in points[s]) / len(points[s]) for s in steps]
                ax.plot(xs, ys, "-", color=self.color[name], alpha=0.6, label=f"{name}: validation over training")
                entry = self.comparison["methods"][name]
                ax.scatter(entry["kl"]["per_seed"], entry[summary_key]["per_seed"], color=self.color[name], marker="D", s=40, edgecolor="black", zorder=3)
            ax.set_xlabel("KL(policy || reference), nats per completion")
            ax.set_ylabel(val_key.removeprefix(metrics.eval_key("")))
            ax.set_title(f"{title} vs KL (diamonds: test, one per run)")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        self.save(fig, "reward_kl_frontier", "Reward against KL to the reference: lines follow the validation evaluations (mean over seeds; KL of the training "
                  "log at that step, 0 at step 0); diamonds are each run's final test value and final KL. Proxy rising while gold falls is reward hacking. "
                  "A method that logs no KL (TRL's GRPO and CISPO with beta 0, their default) is not drawn.")

    def tau_ablation(self) -> None:
        groups: dict[str, list[dict]] = {}
        settings = set()  # the tau schedules themselves: two estimators at one tau are no ablation (a journey audit)
        for group in self.runs.values():
            for run in group:
                config = run["results"].get("config") or {}
                method, trainer = (config.get("run") or {}).get("method"), config.get("trainer") or {}
                if method in relaxed_methods():
                    schedule = trainer.get("tau_schedule", "linear")
                    tau = f"{trainer.get('tau_start')}" if schedule == "constant" else f"{trainer.get('tau_start')}->{trainer.get('tau_end')} over {trainer.get('tau_anneal_steps')}"
                    groups.setdefault(f"{method} tau {tau}", []).append(run)
                    settings.add(tau)
        if len(settings) < 2:
            self.skipped["tau_ablation"] = f"{len(settings)} GRADE tau setting(s) in these runs; an ablation needs runs that differ in {', '.join(TAU_FIELDS)}"
            return
        fig, (bar_ax, curve_ax) = self.plt.subplots(1, 2, figsize=(13, 4.5))
        labels = sorted(groups)
        cycle = self.plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, label in enumerate(labels):
            runs = groups[label]
            est = mean_ci([test_metric(r["results"]["final"], test_name(r["results"])) for r in runs])
            if est.mean is not None:
                yerr = None if est.low is None else [[est.mean - est.low], [est.high - est.mean]]
                bar_ax.bar(i, est.mean, 0.7, color=cycle[i % len(cycle)], yerr=yerr, capsize=4, edgecolor="black", lw=0.5)
            steps, mean, low, high = band(seed_series(runs, lambda h: evaluation_rows(h, self.val_key), self.val_key))
            curve_ax.plot(steps, mean, marker="o", ms=3, color=cycle[i % len(cycle)], label=f"{label} (n={len(runs)})")
            curve_ax.fill_between(steps, low, high, color=cycle[i % len(cycle)], alpha=0.2)
        bar_ax.set_xticks(range(len(labels)), labels, rotation=15, fontsize=8)
        bar_ax.set_title("GRADE test metric by tau setting (95% CI)")
        curve_ax.set_xlabel("step")
        curve_ax.set_ylabel(self.val_key)
        curve_ax.legend(fontsize=8)
        self.save(fig, "tau_ablation", "GRADE runs grouped by their relaxation temperature schedule (tau_start -> tau_end over tau_anneal_steps).")

    def draw_all(self) -> None:
        for draw in (self.learning_curves, self.validation_curves, self.grad_norm, self.estimator_variance, self.sample_efficiency,
                     self.test_comparison, self.reward_kl_frontier, self.tau_ablation):
            draw()


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def _none_if_nan(x):
    return None if x is None or x != x else x


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def statistics(runs: dict[str, list[dict]], comparison: dict) -> dict:
    """Per method (t and bootstrap intervals), across seeds (Welch, d, g, Holm) and within seeds (paired t, Wilcoxon, d_z, Holm)."""
    methods = {}
    for name, entry in comparison["methods"].items():
        values = [v for v in entry["test"]["per_seed"] if v is not None]
        t_est, boot = mean_ci(values), bootstrap_ci(values, seed=0)
        methods[name] = {"n": len(values), "mean": t_est.mean, "t_ci": [t_est.low, t_est.high], "bootstrap_ci": [boot.low, boot.high]}
    pairs = []
    for a, b in itertools.combinations(comparison["methods"], 2):
        xa = [v for v in comparison["methods"][a]["test"]["per_seed"] if v is not None]
        xb = [v for v in comparison["methods"][b]["test"]["per_seed"] if v is not None]
        welch = welch_t_test(xa, xb)
        pairs.append({
            "a": a, "b": b, "n_a": len(xa), "n_b": len(xb),
            "mean_difference": (sum(xa) / len(xa) - sum(xb) / len(xb)) if xa and xb else None,
            "t": _none_if_nan(welch.statistic), "dof": welch.dof, "p": _none_if_nan(welch.p_value),
            "cohens_d": _none_if_nan(cohens_d(xa, xb)), "hedges_g": _none_if_nan(hedges_g(xa, xb)),
        })
    for pair, adjusted in zip(pairs, holm_adjust([p["p"] if p["p"] is not None else float("nan") for p in pairs])):
        pair["p_holm"] = _none_if_nan(adjusted)

    paired = []
    for a, b in itertools.combinations(runs, 2):
        by_seed_b = {run["seed"]: run for run in runs[b]}
        for run_a in runs[a]:
            run_b = by_seed_b.get(run_a["seed"])
            if run_b is None:
                continue
            (pa, ra), (pb, rb) = (test_per_prompt(r["results"]["final"], test_name(r["results"])) for r in (run_a, run_b))
            if ra is None or rb is None:
                continue
            if pa is not None and pb is not None:
                xa, xb = pair_by_prompt(pa, ra, pb, rb)
            else:  # no prompt texts: the contract keeps the test prompts in the same order for one seed
                xa, xb = (ra, rb) if len(ra) == len(rb) else ([], [])
            kept = [(x, y) for x, y in zip(xa, xb) if _is_number(x) and _is_number(y)]  # a NaN reward is stored as null: that prompt's pair is left out
            xa, xb = [x for x, _ in kept], [y for _, y in kept]
            if len(xa) < 2:
                continue
            t, w = paired_t_test(xa, xb), wilcoxon_signed_rank(xa, xb)
            paired.append({
                "a": a, "b": b, "seed": run_a["seed"], "n_pairs": len(xa), "mean_difference": sum(x - y for x, y in zip(xa, xb)) / len(xa),
                "t": _none_if_nan(t.statistic), "p_t": _none_if_nan(t.p_value), "wilcoxon_w": _none_if_nan(w.statistic), "p_wilcoxon": _none_if_nan(w.p_value),
                "d_z": _none_if_nan(paired_effect_size(xa, xb)),
            })
    for key in ("p_t", "p_wilcoxon"):
        for row, adjusted in zip(paired, holm_adjust([r[key] if r[key] is not None else float("nan") for r in paired])):
            row[f"{key}_holm"] = _none_if_nan(adjusted)
    return {"metric": comparison["metric"]["test"], "methods": methods, "across_seeds": pairs, "within_seed": paired}


# ---------------------------------------------------------------------------------------------
# Tables and report
# ---------------------------------------------------------------------------------------------


def _num(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _est(est: dict, digits: int = 3, latex: bool = False, seeds: int | None = None) -> str:
    """mean ± CI half-width; with `(n=k)` where only k of the method's `seeds` runs have the value."""
    if est["mean"] is None:
        return "–"
    fewer = from_fewer_runs(est, seeds) if seeds is not None else ""
    if est["ci_high"] is None:
        return _num(est["mean"], digits) + fewer
    pm = " $\\pm$ " if latex else " ± "
    return f"{est['mean']:.{digits}f}{pm}{est['ci_high'] - est['mean']:.{digits}f}{fewer}"


def table_rows(comparison: dict, latex: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison table (means ± 95% CI half-widths over seeds; `(n=k)` where a value comes from
    only k of the method's completed runs)."""
    fractions = [str(f) for f in comparison["thresholds"]["fractions"]]
    metric = (comparison["metric"]["test"] or "reward").replace("_", " ")
    header = ["method", "seeds", f"test {metric}", "test (best ckpt)", "gold reward", "KL", "best val"]
    header += [f"steps to {float(f):.0%}" for f in fractions] + ["train wall time (min)", "peak mem (MB)"]
    rows = []
    for name, entry in comparison["methods"].items():
        wall = entry["wall_seconds"]
        wall_min = {k: (wall[k] / 60 if wall[k] is not None else None) for k in ("mean", "ci_low", "ci_high")}
        seeds = len(entry["seeds"])
        row = [name, str(seeds), _est(entry["test"], latex=latex, seeds=seeds), _est(entry["test_best_ckpt"], latex=latex, seeds=seeds),
               _est(entry["test_gold"], latex=latex, seeds=seeds), _est(entry["kl"], 2, latex, seeds), _est(entry["best_validation"], latex=latex, seeds=seeds)]
        for f in fractions:
            cell = entry["sample_efficiency"][f]
            row.append(f"{_num(cell['steps']['mean'], 1)} ({cell['reached']}/{cell['of']})")  # a mean of 4.5 steps is not 4
        row += [_est(wall_min, 1, latex), _num(entry["peak_memory_mb"]["mean"], 0)]
        rows.append(row)
    return header, rows


def markdown_table(comparison: dict) -> str:
    header, rows = table_rows(comparison)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def latex_table(comparison: dict) -> str:
    header, rows = table_rows(comparison, latex=True)

    def esc(text: str) -> str:
        return text.replace("\\", "\\textbackslash{}").replace("_", "\\_").replace("%", "\\%").replace("&", "\\&") if "$" not in text else text

    seeds = sorted({len(e["seeds"]) for e in comparison["methods"].values()})
    caption = (f"Comparison over {'/'.join(map(str, seeds))} seeds: mean $\\pm$ 95\\% t-interval half-width. Steps to f\\%: mean steps to "
               "$r_0 + f (r^* - r_0)$ over the seeds that reached it (reached/seeds).")
    lines = ["\\begin{table}[t]", "\\centering", "\\small", f"\\caption{{{caption}}}", "\\label{tab:comparison}",
             "\\begin{tabular}{l" + "r" * (len(header) - 1) + "}", "\\toprule", " & ".join(esc(h) for h in header) + " \\\\", "\\midrule"]
    lines += [" & ".join(esc(c) for c in row) + " \\\\" for row in rows]
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(lines) + "\n"


def _p(x) -> str:
    return "–" if x is None else (f"{x:.2g}" if x < 0.001 else f"{x:.3f}")


def command_lines(comparison: dict) -> list[str]:
    """The compare command that made the folder, or each of them in order where several wrote into it (a recipe added
    later): the report covers every run in the folder, whichever command ran it."""
    commands = comparison.get("commands") or ([comparison["command"]] if comparison.get("command") else [])
    if not commands:
        return ["Command: unknown (no comparison.json in the folder; numbers recomputed from the runs)."]
    if len(commands) == 1:
        return [f"Command: `{commands[0]}`"]
    return [f"Commands: {len(commands)} wrote into this folder, in this order (a name's runs are those trained with the settings of "
            "the last command that ran it; any other is listed as not in the tables):", ""] + [f"{i}. `{c}`" for i, c in enumerate(commands, 1)]


def budget_lines(comparison: dict) -> list[str]:
    """`Budget: ...` (optimizer steps x completions per step of each name's runs), with a warning where the names'
    budgets differ: the tables compare them as they are (a matched-KL or a longer run may differ on purpose)."""
    budgets = {}
    for name, entry in comparison["methods"].items():
        budget = entry.get("budget") or {}
        pairs = sorted({(steps, per_step) for steps, per_step in zip(budget.get("steps") or [], budget.get("samples_per_step") or [])}, key=str)
        if pairs:
            budgets[name] = " / ".join(f"{steps} x {_count(per_step)}" for steps, per_step in pairs)
    if not budgets:
        return []
    differ = len(set(budgets.values())) > 1
    return ["Budget (optimizer steps x completions per step): " + "; ".join(f"{name}: {text}" for name, text in budgets.items()) + "."
            + (" **The methods' budgets differ**: their rows compare runs of different lengths or batch sizes." if differ else "")]


def _count(value) -> str:
    """8.0 -> "8", 0.9 -> "0.9", 1048576 -> "1048576" (not `:g`'s 1.04858e+06)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def generation_lines(comparison: dict) -> list[str]:
    """A warning where the names' runs generate differently: evaluation (lengths, temperature, top-p; TRL's GRPO
    evaluates with min_new_tokens 0 unless eval_min_new_tokens is set) or training's sampling (temperature, top-p: what
    each KL is measured under). Nothing when they agree or were not recorded."""

    def described(settings: dict) -> str:
        return ", ".join(f"{key.replace('_', ' ') if key != 'top_p' else 'top-p'} {_count(value)}" for key, value in settings.items())

    lines = []
    for part, warning in (
        ("evaluation", "**The methods' evaluations generate differently**: their validation and test values score completions of other "
                       "lengths or from another distribution (give every recipe the same `eval_min_new_tokens`, `max_new_tokens` "
                       "(`max_completion_length`), `eval_temperature` and `eval_top_p`)"),
        ("training", "**The methods sample differently in training**: each KL is measured under its own sampling distribution (with "
                     "top-p < 1 it includes -log of the nucleus mass per token), so the KL column and the reward-KL figure compare "
                     "different quantities"),
    ):
        found = {name: {k: v for k, v in ((entry.get("generation") or {}).get(part) or {}).items() if v is not None} for name, entry in comparison["methods"].items()}
        found = {name: settings for name, settings in found.items() if settings}
        if len({json.dumps(settings, sort_keys=True) for settings in found.values()}) > 1:
            lines.append(f"{warning}: " + "; ".join(f"{name}: {described(settings)}" for name, settings in found.items()) + ".")
    return lines


def report(comparison: dict, stats: dict, figures: Figures, table: str, left_out: list[str] = ()) -> str:
    """report.md: what was run, the table, the figures, the statistics and what was skipped; `left_out`: the runs in the
    folder that are not in the tables, and why (`load_runs`)."""
    seeds = {name: entry["seeds"] for name, entry in comparison["methods"].items()}
    th = comparison["thresholds"]
    lines = [
        "# Comparison report", "",
        *command_lines(comparison),
        "",
        "Seeds: " + "; ".join(f"{name}: {len(s)} ({', '.join(map(str, s))})" for name, s in seeds.items()) + ".",
        *budget_lines(comparison),
        *generation_lines(comparison),
        f"Metric: validation `{comparison['metric']['validation']}`, test `{comparison['metric']['test']}`.",
        "",
        *([f"**Not in the tables** ({len(left_out)} run{'s' if len(left_out) > 1 else ''} of the folder):", "", *(f"- {line}." for line in left_out), ""] if left_out else []),
        "## Comparison", "", table, "",
        "Mean ± half-width of the 95% Student t-interval over seeds (with 2-3 seeds these are wide: t = 12.7 for 2 seeds, 4.3 for 3). "
        "KL: the last training window's KL(policy || reference), nats per completion (–: the method logged none, as TRL's GRPO and "
        "CISPO with beta 0, their default). "
        "Steps to f: per seed s (the seed also draws the validation split), target_s(f) = r0_s + f (r*_s - r0_s) with r0_s the mean step-0 "
        "validation value and r*_s the best validation value of any run of that seed; mean steps to the first evaluation at or above it over "
        "the seeds that reached it (reached/seeds). Targets: "
        + "; ".join(f"seed {s}: r0 {_num(t['initial_validation'])}, r* {_num(t['best_validation'])}, " + ", ".join(f"{float(f):.0%} = {_num(v)}" for f, v in t["targets"].items())
                    for s, t in th["per_seed"].items()) + ".",
        "",
        "## Figures", "",
    ]
    for name, caption in figures.written.items():
        lines += [f"![{name}]({name}.png)", "", f"*{caption}*", ""]
    if figures.skipped:
        lines += ["Skipped:", ""] + [f"- {name}: {why}." for name, why in figures.skipped.items()] + [""]
    lines += ["## Statistics", "", f"Across seeds (test `{stats['metric']}`, final checkpoint): per method, the 95% t-interval and the percentile "
              "bootstrap interval (10,000 resamples, seed 0). The bootstrap's 95% is nominal: with few seeds it cannot reach beyond the observed values and "
              "covers the true mean far less often (for normal data about 52% of the time with 2 seeds, 75% with 3, 83% with 5, 89% with 10); "
              "report the t-interval.", "",
              "| method | n | mean | t 95% CI | bootstrap CI (nominal 95%) |", "|---|---:|---:|---:|---:|"]
    for name, m in stats["methods"].items():
        lines.append(f"| {name} | {m['n']} | {_num(m['mean'])} | [{_num(m['t_ci'][0])}, {_num(m['t_ci'][1])}] | [{_num(m['bootstrap_ci'][0])}, {_num(m['bootstrap_ci'][1])}] |")
    family = sum(p["p"] is not None for p in stats["across_seeds"])
    lines += ["", f"Pairwise Welch's t-tests across seeds (two-sided), Holm-adjusted over the family of the {family} of {len(stats['across_seeds'])} "
              "method pairs that have a test (at least 2 seeds on each side, and some spread); effect sizes Cohen's d and Hedges' g (small-sample corrected).", "",
              "| a | b | mean a - b | t | dof | p | p (Holm) | d | g |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for p in stats["across_seeds"]:
        lines.append(f"| {p['a']} | {p['b']} | {_num(p['mean_difference'])} | {_num(p['t'], 2)} | {_num(p['dof'], 1)} | {_p(p['p'])} | {_p(p['p_holm'])} | "
                     f"{_num(p['cohens_d'], 2)} | {_num(p['hedges_g'], 2)} |")
    if stats["within_seed"]:
        lines += ["", "Paired tests on per-prompt test rewards within each seed (the methods of one seed score the same test prompts, paired by prompt "
                  "text; a prompt whose reward is missing on either side is left out): paired t-test and Wilcoxon signed-rank test (two-sided), each "
                  f"Holm-adjusted over the (pair, seed) tests that have a p-value ({sum(r['p_t'] is not None for r in stats['within_seed'])} t-tests, "
                  f"{sum(r['p_wilcoxon'] is not None for r in stats['within_seed'])} Wilcoxon tests); d_z = mean "
                  "difference / its std. These compare two trained policies on these prompts, not the methods' seed-to-seed variation.", "",
                  "| a | b | seed | prompts | mean a - b | t | p (Holm) | W | p Wilcoxon (Holm) | d_z |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in stats["within_seed"]:
            lines.append(f"| {r['a']} | {r['b']} | {r['seed']} | {r['n_pairs']} | {_num(r['mean_difference'])} | {_num(r['t'], 2)} | {_p(r['p_t_holm'])} | "
                         f"{_num(r['wilcoxon_w'], 1)} | {_p(r['p_wilcoxon_holm'])} | {_num(r['d_z'], 2)} |")
    else:
        lines += ["", "No paired tests: no two methods share a seed with per-prompt test rewards."]
    return "\n".join(lines) + "\n"


def analyse(results_dir: str | os.PathLike, output_dir: str | os.PathLike | None = None) -> Path:
    """Write the report, tables, statistics and figures of a comparison folder; return the report's path."""
    results_dir = Path(results_dir)
    out = Path(output_dir) if output_dir else results_dir / "analysis"
    comparison_file, runs, left_out = load_runs(results_dir)
    comparison = recompute_comparison(comparison_file, runs)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"--output_dir: cannot make the folder {str(out)!r} ({error.strerror or error}); give a folder you can write to") from None
    figures = Figures(runs, comparison, out)
    figures.draw_all()
    stats = statistics(runs, comparison)
    write_json_atomic(out / "statistics.json", stats)
    table = markdown_table(comparison)
    (out / "comparison.md").write_text(table + "\n")
    (out / "comparison.tex").write_text(latex_table(comparison))
    (out / "report.md").write_text(report(comparison, stats, figures, table, left_out))
    return out / "report.md"


COMMAND = Command(
    prog="grade_trl.analysis",
    description="Figures, statistics, tables and report.md of a `grade_trl.compare` folder ({dir}/{name}/seed{k}/results.json).",
    positional="RESULTS_DIR",
    options=(Option("output_dir", str | None, None, "Where to write (default: RESULTS_DIR/analysis)."),),
)


def main(argv: list[str] | None = None) -> int:
    def body(paths, options, _) -> int:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("grade_trl.analysis needs matplotlib (pip install -e '.[analysis]')") from None
        print(f"report: {analyse(paths[0], options['output_dir'])}")
        return 0

    return COMMAND.main(argv, body)


if __name__ == "__main__":
    exit_process(main)
