"""grade_trl.compare and grade_trl.analysis: thresholds on a hand-made history, bad input, failures, and a real
comparison of two tiny recipes x 2 seeds turned into the report.

Shrunk settings (as tests/test_run_e2e.py::shrunk, so one run takes ~15 s on 2 cores): 4 optimizer steps,
evaluation every 2, 8 new tokens, 6 validation and 6 test prompts, 60-200 reviews per split, 2 head epochs.
"""

import json
import os
import re
import shlex
import shutil
import sys

import numpy as np
import pytest
import scipy.stats as ss

from grade_trl import analysis, compare, comparison as comparisons
from grade_trl.cli import parse_overrides
from grade_trl.errors import UserError
from grade_trl.results import load_results, read_results, write_json_atomic

from .conftest import REPO, module_folder

RECIPES = [str(REPO / "recipes" / "tiny" / "imdb_reinforce.yaml"), str(REPO / "recipes" / "tiny" / "imdb_grade_ste.yaml")]


def shrunk_overrides(reward_model_path):
    overrides = {
        "max_steps": 4, "eval_steps": 2, "logging_steps": 2, "eval_num_prompts": 6, "test_num_prompts": 6, "reward_split_size": 200,
        "policy_split_size": 100, "validation_split_size": 60, "reward_epochs": 2, "max_new_tokens": 8, "min_new_tokens": 2,
        "reward_model_path": reward_model_path, "disable_tqdm": "true",
    }
    return [item for key, value in overrides.items() for item in (f"--{key}", str(value))]


# ---- thresholds and statistics on hand-made runs ------------------------------------------------


def synthetic_run(val_rewards, method="grade_ste", tau_start=2.0, seed=1, test=0.7, kl=1.0):
    """A completed results.json with evaluations every 10 steps, elapsed 1.5 s per step, 8 samples per step."""
    history = []
    for i, value in enumerate(val_rewards):
        step = 10 * i
        history.append({"eval_reward": value, "eval_gold_reward": value - 0.1, "eval_wall_seconds": 1.5 * step, "step": step})
        if step:
            history.append({"reward": value, "kl": kl * i, "loss": -value, "grad_norm_mean": 1.0 + i, "step": step})
            history.append({"probe_trace_cov": 0.1 * i, "probe_snr": 2.0, "probe_mean_sq_norm": 1.0, "probe_cosine_to_mean": 0.5, "probe_cosine_loo": 0.2, "step": step})
    prompts = [f"prompt {k}" for k in range(5)]
    rewards = [test + 0.01 * k * (1 if method == "grade_ste" else -1) for k in range(5)]
    final = {
        "steps": 10 * (len(val_rewards) - 1), "samples_per_step": 8, "peak_memory_mb": 100.0, "kl": kl, "validation_metric": "eval_reward",
        "best_validation": max(val_rewards), "best_validation_step": 10 * int(np.argmax(val_rewards)),
        "test": {c: {"metrics": {"reward": float(np.mean(rewards)), "gold_reward": test - 0.1}, "prompts": prompts, "rewards": rewards} for c in ("final", "best")},
    }
    config = {"run": {"method": method}, "trainer": {"seed": seed, "tau_start": tau_start, "tau_end": 0.5, "tau_schedule": "linear", "tau_anneal_steps": 100}}
    return {"status": "completed", "config": config, "history": history, "final": final}


def test_thresholds_are_per_seed_and_count_the_first_evaluation_reaching_them(tmp_path):
    # seed 1: r0 = 0.5, r* = 0.9 -> targets 0.74 / 0.78 / 0.82; a reaches 0.8 at step 20 and 0.9 at 30; b peaks at 0.75 (step 30).
    # seed 2: r0 = 0.3, r* = 0.4 -> targets 0.36 / 0.37 / 0.38; a reaches 0.4 at step 20; b never.
    histories = {("a", 1): [0.5, 0.6, 0.8, 0.9], ("b", 1): [0.5, 0.55, 0.7, 0.75], ("a", 2): [0.3, 0.3, 0.4], ("b", 2): [0.3, 0.35, 0.2]}
    records = []
    for (name, seed), values in histories.items():
        run_dir = tmp_path / name / f"seed{seed}"
        write_json_atomic(run_dir / "results.json", synthetic_run(values, seed=seed))
        records.append({"name": name, "method": "grade_ste", "recipe": None, "seed": seed, "run_dir": str(run_dir), "status": "completed"})
    records.append({"name": "b", "method": "grade_ste", "recipe": None, "seed": 3, "run_dir": str(tmp_path / "b" / "seed3"), "status": "failed"})
    comparison = comparisons.build_comparison(records, [0.6, 0.7, 0.8], {})

    seed1 = comparison["thresholds"]["per_seed"]["1"]
    assert seed1["initial_validation"] == pytest.approx(0.5) and seed1["best_validation"] == pytest.approx(0.9)
    assert [seed1["targets"][f] for f in ("0.6", "0.7", "0.8")] == pytest.approx([0.74, 0.78, 0.82])
    assert comparison["thresholds"]["per_seed"]["2"]["targets"]["0.8"] == pytest.approx(0.38)
    a, b = comparison["methods"]["a"]["sample_efficiency"], comparison["methods"]["b"]["sample_efficiency"]
    assert a["0.6"]["steps"]["per_seed"] == [20, 20] and a["0.8"]["steps"]["per_seed"] == [30, 20] and a["0.8"]["steps"]["mean"] == 25
    assert a["0.6"]["samples"]["per_seed"] == [160, 160] and a["0.8"]["seconds"]["per_seed"] == [45.0, 30.0]
    assert b["0.6"]["steps"]["per_seed"] == [30, None] and b["0.6"]["reached"] == 1 and b["0.6"]["of"] == 2
    assert b["0.7"]["steps"]["mean"] is None and b["0.7"]["reached"] == 0
    assert comparison["methods"]["b"]["failed_seeds"] == [3] and comparison["methods"]["b"]["seeds"] == [1, 2]
    # No improvement on r0 in a seed: no targets there (not "reached at step 0").
    flat = comparisons.threshold_targets([{"initial_validation": 0.5, "best_validation": 0.5}], [0.6])
    assert flat["targets"] == {"0.6": None}


def test_a_cell_from_fewer_runs_than_the_method_has_says_how_many(tmp_path):
    # GRPO with beta 0 logs no kl: a run without it is left out of that cell's mean and interval, and the cell says so
    records = []
    for seed in (1, 2, 3):
        run = synthetic_run([0.5, 0.6, 0.7], seed=seed, test=0.6 + 0.01 * seed)
        if seed == 3:
            run["final"]["kl"] = None
        write_json_atomic(tmp_path / "a" / f"seed{seed}" / "results.json", run)
        records.append({"name": "a", "method": "grade_ste", "recipe": None, "seed": seed, "run_dir": str(tmp_path / "a" / f"seed{seed}"), "status": "completed"})
    comparison = comparisons.build_comparison(records, [0.5], {})
    assert comparison["methods"]["a"]["kl"]["n"] == 2 and comparison["methods"]["a"]["test"]["n"] == 3
    row = analysis.markdown_table(comparison).splitlines()[2].split(" | ")
    assert row[1] == "3" and row[5].endswith(" (n=2)") and "(n=" not in row[2]
    assert row[7] == f"{comparison['methods']['a']['sample_efficiency']['0.5']['steps']['mean']:.1f} (3/3)"  # steps to 50%, one decimal
    line = compare.summary_lines(comparison).splitlines()[1]
    assert line.count("(n=2)") == 1


def test_two_estimators_at_one_tau_are_no_tau_ablation(tmp_path):
    """Found by a journey audit: GRADE-STE and Gumbel-softmax GRADE at the same tau were drawn as a tau ablation (the
    groups were method x tau). The figure needs runs that differ in tau."""
    for name in ("grade_ste", "grade"):
        for seed in (1, 2):
            write_json_atomic(tmp_path / name / f"seed{seed}" / "results.json", synthetic_run([0.5, 0.6, 0.7], method=name, tau_start=2.0, seed=seed))
    assert analysis.main([str(tmp_path)]) == 0
    assert not (tmp_path / "analysis" / "tau_ablation.png").exists()
    assert "tau_ablation: 1 GRADE tau setting(s)" in (tmp_path / "analysis" / "report.md").read_text()


def test_the_reward_kl_figure_leaves_out_a_method_that_logs_no_kl(tmp_path, monkeypatch):
    """TRL's GRPO with beta 0 (its default) logs no KL: it is neither drawn nor in the legend of the reward-KL figure
    (its empty curve had taken a legend entry and a colour); a method with KL keeps its line. The caption says why."""
    from grade_trl.analysis import Figures

    for name in ("grade_ste", "grpo"):
        for seed in (1, 2):
            run = synthetic_run([0.5, 0.6, 0.7], method=name, seed=seed)
            if name == "grpo":
                run["history"] = [{k: v for k, v in row.items() if k != "kl"} for row in run["history"]]
                run["final"]["kl"] = None
            write_json_atomic(tmp_path / name / f"seed{seed}" / "results.json", run)
    drawn = {}

    def keep(self, fig, name, caption):
        drawn[name] = ([text.get_text() for ax in fig.axes if ax.get_legend() for text in ax.get_legend().get_texts()],
                       [line.get_label() for ax in fig.axes for line in ax.get_lines()], caption)
        self.plt.close(fig)
        self.written[name] = caption

    monkeypatch.setattr(Figures, "save", keep)
    assert analysis.main([str(tmp_path)]) == 0
    legend, lines, caption = drawn["reward_kl_frontier"]
    assert legend == ["grade_ste: validation over training"] and lines == legend * 2, (legend, lines)  # one line per panel: proxy, gold
    assert "A method that logs no KL (TRL's GRPO and CISPO with beta 0, their default) is not drawn." in caption


def test_analysis_without_comparison_json_draws_probe_and_tau_figures(tmp_path, capsys):
    # Two GRADE-STE tau settings, 2 seeds each; no comparison.json: the runs are scanned.
    for name, tau, offset in (("grade_ste", 2.0, 0.0), ("grade_ste_tau1", 1.0, 0.1)):
        for seed in (1, 2):
            values = [0.5, 0.6 + offset, 0.7 + offset + 0.01 * seed]
            write_json_atomic(tmp_path / name / f"seed{seed}" / "results.json", synthetic_run(values, tau_start=tau, seed=seed, test=0.6 + offset + 0.01 * seed))
    assert analysis.main([str(tmp_path)]) == 0
    out = tmp_path / "analysis"
    report = (out / "report.md").read_text()
    for figure in ("learning_curves", "validation_curves", "grad_norm", "estimator_variance", "sample_efficiency", "test_comparison", "reward_kl_frontier", "tau_ablation"):
        assert (out / f"{figure}.png").stat().st_size > 10_000 and f"![{figure}]({figure}.png)" in report
    assert "Command: unknown" in report and "Skipped" not in report
    stats = json.loads((out / "statistics.json").read_text())
    pair = stats["across_seeds"][0]
    # Welch on the per-seed test rewards, recomputed with scipy; d and g signs follow a - b.
    xa = [0.61 + 0.02, 0.62 + 0.02]  # mean of test + 0.01 k, k = 0..4, is test + 0.02
    xb = [0.71 + 0.02, 0.72 + 0.02]
    ref = ss.ttest_ind(xa, xb, equal_var=False)
    assert (pair["a"], pair["b"]) == ("grade_ste", "grade_ste_tau1")
    assert pair["t"] == pytest.approx(ref.statistic) and pair["p"] == pytest.approx(ref.pvalue) and pair["p_holm"] == pytest.approx(ref.pvalue)
    assert [row["seed"] for row in stats["within_seed"]] == [1, 2] and all(row["n_pairs"] == 5 for row in stats["within_seed"])


def test_analysis_leaves_out_a_prompt_whose_reward_is_missing_and_names_each_holm_family(tmp_path):
    # results.json stores a NaN reward as null: that prompt drops out of the paired tests (a TypeError traceback before)
    for name, test in (("grade_ste", 0.6), ("reinforce", 0.7), ("ppo", 0.65)):
        seeds = (1, 2) if name != "ppo" else (1,)  # one seed of ppo: its pairs have no Welch test
        for seed in seeds:
            run = synthetic_run([0.5, 0.6, 0.7], method=name if name != "ppo" else "reinforce", seed=seed, test=test + 0.01 * seed)
            if name == "grade_ste" and seed == 1:
                for checkpoint in ("final", "best"):
                    run["final"]["test"][checkpoint]["rewards"][2] = None
            write_json_atomic(tmp_path / name / f"seed{seed}" / "results.json", run)
    assert analysis.main([str(tmp_path)]) == 0
    stats = json.loads((tmp_path / "analysis" / "statistics.json").read_text())
    rows = {(r["a"], r["b"], r["seed"]): r for r in stats["within_seed"]}
    row = rows[("grade_ste", "reinforce", 1)]
    assert row["n_pairs"] == 4 and rows[("grade_ste", "reinforce", 2)]["n_pairs"] == 5
    kept = [k for k in range(5) if k != 2]
    xa, xb = [0.61 + 0.01 * k for k in kept], [0.71 - 0.01 * k for k in kept]
    assert row["p_t"] == pytest.approx(ss.ttest_rel(xa, xb).pvalue) and row["mean_difference"] == pytest.approx(np.mean(np.subtract(xa, xb)))
    report = (tmp_path / "analysis" / "report.md").read_text()
    assert sum(p["p"] is not None for p in stats["across_seeds"]) == 1  # only grade_ste-reinforce has 2 seeds on each side
    assert "Holm-adjusted over the family of the 1 of 3 method pairs that have a test" in report
    assert "bootstrap CI (nominal 95%)" in report


def test_a_folder_of_several_commands_is_summed_up_whole_with_each_names_newest_settings(tmp_path, caplog):
    """Found by a journey audit. (1) A second compare into a folder (a method added) wrote a comparison.json of its own
    runs only, whose targets disagreed with the report's. (2) A seed an earlier command ran with another budget was
    averaged into the name's cells. (3) The analysis said nothing of runs that were interrupted or never started."""
    def run(name, seed, max_steps, when, status="completed", test=0.7):
        data = synthetic_run([0.5, 0.6, 0.7 + 0.01 * seed], method=name, seed=seed, test=test)
        data.update(status=status, written_at=when)
        data["config"]["recipe"] = {"method": name, "max_steps": max_steps, "seed": seed, "output_dir": str(tmp_path / name / f"seed{seed}")}
        write_json_atomic(tmp_path / name / f"seed{seed}" / "results.json", data)

    run("reinforce", 44, 4, "2026-12-06T10:00:00+00:00", test=0.1)  # the first command's third seed, at 4 steps
    run("reinforce", 42, 6, "2026-12-06T11:00:00+00:00")  # a second command reran seeds 42 and 43 at 6 steps
    run("reinforce", 43, 6, "2026-12-06T11:05:00+00:00")
    run("ppo", 42, 6, "2026-12-06T12:00:00+00:00")
    run("ppo", 43, 6, "2026-12-06T12:01:00+00:00", status="interrupted")
    comparison = {"command": "c", "runs": [{"name": "ppo", "seed": s, "status": "pending"} for s in (42, 43, 44)]}  # seed 44 never started
    write_json_atomic(tmp_path / "comparison.json", comparison)

    records = comparisons.runs_in_folder(tmp_path)
    assert [(r["name"], r["seed"], r["status"]) for r in records] == [("ppo", 42, "completed"), ("ppo", 43, "interrupted"), ("reinforce", 42, "completed"),
                                                                       ("reinforce", 43, "completed"), ("reinforce", 44, "completed")]
    summed = comparisons.build_comparison(records, [0.6], {})
    assert set(summed["methods"]) == {"ppo", "reinforce"} and summed["methods"]["reinforce"]["seeds"] == [42, 43]
    assert summed["methods"]["reinforce"]["other_settings"] == [{"seed": 44, "run_dir": str(tmp_path / "reinforce" / "seed44"),
                                                                 "differs": "max_steps 4 (the comparison's: 6)"}]
    assert summed["methods"]["reinforce"]["test"]["per_seed"] == pytest.approx([0.68, 0.68])  # not seed 44's 0.08
    # the first command again (it skips seed 44, completed with its settings): its settings, not the newest run's, decide
    first = comparisons.build_comparison(records, [0.6], {}, settings={"reinforce": {"method": "reinforce", "max_steps": 4}})
    assert first["methods"]["reinforce"]["seeds"] == [44] and [r["seed"] for r in first["methods"]["reinforce"]["other_settings"]] == [42, 43]
    assert first["methods"]["reinforce"]["settings"] == {"method": "reinforce", "max_steps": 4} and first["methods"]["ppo"]["settings"]["max_steps"] == 6

    with caplog.at_level("WARNING", logger="grade_trl.analysis"):
        _, runs, left_out = analysis.load_runs(tmp_path)
    assert {name: [r["seed"] for r in group] for name, group in runs.items()} == {"ppo": [42], "reinforce": [42, 43]}
    assert left_out == ["ppo seed 43: interrupted (the same compare command again resumes or reruns it)",
                        "ppo seed 44: not started (the same compare command again runs it)",
                        "reinforce seed 44: trained with other settings than the comparison's reinforce runs (max_steps 4 (the comparison's: 6))"]
    assert analysis.main([str(tmp_path)]) == 0
    text = (tmp_path / "analysis" / "report.md").read_text()
    assert "**Not in the tables** (3 runs of the folder):\n\n- ppo seed 43: interrupted" in text and "Seeds: ppo: 1 (42); reinforce: 2 (42, 43)." in text

    # settings are matched as the runs read them (a review): 2e-05 as a string or a number, a default spelt out (bf16 no)
    assert comparisons.run_settings({"method": "reinforce", "learning_rate": "2e-05", "bf16": "no", "seed": 1}, with_seed=False) == \
        comparisons.run_settings({"method": "reinforce", "learning_rate": 2e-05, "seed": 2}, with_seed=False) == {"method": "reinforce", "learning_rate": 2e-05}
    argv = compare.overrides_argv({"learning_rate": 1e-05, "beta": 0.5})
    assert argv == ["--learning_rate", "1.0e-05", "--beta", "0.5"] and dict(parse_overrides(argv)) == {"learning_rate": 1e-05, "beta": 0.5}
    # a name none of whose runs has its comparison's settings is no row (it was a KeyError in the figures)
    stale = json.loads((tmp_path / "comparison.json").read_text())
    write_json_atomic(tmp_path / "comparison.json", {**stale, "methods": {"ppo": {"settings": {"method": "ppo", "max_steps": 100}}}})
    _, runs, left_out = analysis.load_runs(tmp_path)
    assert list(runs) == ["reinforce"] and "ppo seed 42: trained with other settings than the comparison's ppo runs (max_steps 6 (the comparison's: 100))" in left_out
    write_json_atomic(tmp_path / "comparison.json", stale)

    # compare into the folder (its one run fails at once): its comparison.json still sums up the runs the others left
    fails = ["--launcher", f"{sys.executable} -c 'import sys; sys.exit(3)'"]
    assert compare.main([str(REPO / "recipes" / "tiny" / "imdb_grade_ste.yaml"), "--seed_list", "42", "--output_dir", str(tmp_path), *fails]) == 1
    written = json.loads((tmp_path / "comparison.json").read_text())
    assert list(written["methods"]) == ["grade_ste", "ppo", "reinforce"] and written["methods"]["reinforce"]["seeds"] == [42, 43]
    assert written["methods"]["grade_ste"]["failed_seeds"] == [42] and written["methods"]["reinforce"]["other_settings"][0]["seed"] == 44


def test_failed_seeds_are_the_failed_runs_of_the_comparisons_settings(tmp_path):
    """A failed run another command left in the folder with other settings is not one of this comparison's failures."""
    def run(seed, max_steps, status):
        data = synthetic_run([0.5, 0.6, 0.7], method="reinforce", seed=seed)
        data.update(status=status, written_at=f"2026-12-06T1{seed - 40}:00:00+00:00")
        data["config"]["recipe"] = {"method": "reinforce", "max_steps": max_steps, "seed": seed}
        write_json_atomic(tmp_path / "reinforce" / f"seed{seed}" / "results.json", data)

    run(41, 4, "failed")  # an earlier command's, at 4 steps
    run(42, 6, "completed")
    run(43, 6, "failed")
    (tmp_path / "reinforce" / "seed44").mkdir()  # failed before it wrote results.json: its settings are unknown, so it counts
    records = comparisons.runs_in_folder(tmp_path) + [{"name": "reinforce", "method": "reinforce", "recipe": None, "seed": 44,
                                                       "run_dir": str(tmp_path / "reinforce" / "seed44"), "status": "failed"}]
    entry = comparisons.build_comparison(records, [0.6], {})["methods"]["reinforce"]
    assert entry["seeds"] == [42] and entry["failed_seeds"] == [43, 44]
    # the command that ran at 4 steps: its failure is seed 41's
    entry = comparisons.build_comparison(records, [0.6], {}, settings={"reinforce": {"method": "reinforce", "max_steps": 4}})["methods"]["reinforce"]
    assert entry["seeds"] == [] and entry["failed_seeds"] == [41, 44]


def test_a_key_only_some_methods_read_goes_to_their_runs(tmp_path, caplog):
    """Found by a journey audit: no override could shorten the completions of a comparison of GRPO with our trainers,
    since `--max_new_tokens` was refused for GRPO and `--max_completion_length` for the others; the same in probe. Now
    each goes to the runs whose method reads it, with a note naming the recipes that do not get it; a key no method reads
    is still refused in one line."""
    grade, grpo = str(REPO / "recipes" / "tiny" / "imdb_grade_ste.yaml"), str(REPO / "recipes" / "tiny" / "imdb_grpo.yaml")
    fails = ["--launcher", f"{sys.executable} -c 'import sys; sys.exit(3)'"]  # the commands are what is tested: each run fails at once
    with caplog.at_level("WARNING", logger="grade_trl.compare"):
        assert compare.main([grade, grpo, "--seed_list", "42", "--output_dir", str(tmp_path / "both"), *fails, "--max_new_tokens", "8", "--max_completion_length", "8"]) == 1
    commands = [run["command"] for run in json.loads((tmp_path / "both" / "comparison.json").read_text())["runs"]]
    assert "imdb_grade_ste.yaml --max_new_tokens 8 --seed 42" in commands[0] and "imdb_grpo.yaml --max_completion_length 8 --seed 42" in commands[1]
    notes = [record.getMessage() for record in caplog.records if "goes to 1 of 2 recipes" in record.getMessage()]
    assert notes == [f"--max_new_tokens goes to 1 of 2 recipes, not to {grpo}, whose method (grpo) does not read it: TRL's GRPO limits the completion "
                     "with `max_completion_length`; `max_new_tokens` is the name in grade_trl's own trainers (grade*, reinforce, ppo); set max_completion_length",
                     f"--max_completion_length goes to 1 of 2 recipes, not to {grade}, whose method (grade_ste) does not read it: grade_ste limits the completion "
                     "with `max_new_tokens` (and `min_new_tokens`); `max_completion_length` is TRL GRPO's name for it; set max_new_tokens"]
    assert compare.main([grade, grpo, "--seed_list", "42", "--output_dir", str(tmp_path / "typo"), "--max_new_tokenz", "8"]) == 2
    assert not (tmp_path / "typo").exists()


def test_options_are_parsed_and_unknown_keys_forwarded_with_their_values():
    recipes, options, forwarded = compare.COMMAND.parse(
        ["a.yaml", "b.yaml", "--seeds", "2", "--max_steps", "50", "--use_peft", "--output_dir", "x", "--lr=3e-4", "--force", "--thresholds", "0.5", "0.9",
         "--probe_steps", "[0, 150]"]
    )
    assert recipes == ["a.yaml", "b.yaml"]
    assert (options["seeds"], options["output_dir"], options["force"], options["thresholds"]) == (2, "x", True, [0.5, 0.9])
    assert forwarded == {"max_steps": 50, "use_peft": True, "lr": "3e-4", "probe_steps": [0, 150]}
    # each run gets them back as the same values
    assert compare.overrides_argv(forwarded) == ["--max_steps", "50", "--use_peft", "true", "--lr", "3e-4", "--probe_steps", "[0, 150]"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["missing.yaml", "--output_dir", "{tmp}"], "recipe file not found: missing.yaml"),
        ([RECIPES[0], "--output_dir", "{tmp}", "--seed", "3"], "--seed is set by compare"),
        ([RECIPES[0], "--output_dir", "{tmp}", "--resume_from_checkpoint", "true"], "--resume_from_checkpoint is set by compare for every run: the same command"),
        ([RECIPES[0], "--output_dir", "{tmp}", "--learnig_rate", "3"], "unknown recipe key 'learnig_rate'"),
        ([RECIPES[0], RECIPES[0], "--output_dir", "{tmp}"], "is given twice"),
        ([RECIPES[0], "--output_dir", "{tmp}", "--thresholds", "[1.5]"], "--thresholds: expected fractions in (0, 1]"),
        ([RECIPES[0], "--output_dir", "{tmp}", "--thresholds", "[-1]"], "--thresholds: expected fractions in (0, 1]"),
        ([RECIPES[0], "--output_dir", "{tmp}", "--thresholds", "[]"], "--thresholds: expected fractions in (0, 1]"),
        ([RECIPES[0], str(REPO / "recipes" / "imdb_reinforce.yaml"), "--output_dir", "{tmp}"], "two recipes would write to the same folder"),
        # a value forgotten: the string "True" before (a folder ./True, a recipe key set to "True")
        ([RECIPES[0], "--output_dir"], "--output_dir: given without a value; write --output_dir VALUE (str)"),
        ([RECIPES[0], "--output_dir", "{tmp}", "--max_steps"], "imdb_reinforce.yaml: max_steps: given without a value; write --max_steps VALUE (int)"),
        ([RECIPES[0], "--output_dir", "{tmp}/results.json/sub"], "--output_dir: cannot write into"),  # the file made below
        ([RECIPES[0], "--output_dir", "{tmp}", "--seeds", "-1"], "--seeds: the number of seeds must be from 1 to 1,000, got -1"),  # said "got []"
        ([RECIPES[0], "--output_dir", "{tmp}", "--seeds", "4294967295"], "--seeds: the number of seeds must be from 1 to 1,000"),  # memory grew to the OOM killer
        ([RECIPES[0], "--output_dir", "{tmp}", "--seed_list", "1", "1"], "--seed_list: seeds must be distinct"),
        ([RECIPES[0], "--output_dir", "{tmp}", "--seed_list", "[]"], "--seed_list: seeds must be distinct, at least one and at most 1,000, got []"),  # ran the default seeds
        ([RECIPES[0], "--output_dir", "{tmp}", "--seed_list", "1", "4294967296"], "--seed_list: seed 4294967296 is not a seed"),  # seed 1 trained first
        # a typo of compare's own option is forwarded as a recipe key: the error names the option it resembles too
        ([RECIPES[0], "--output_dir", "{tmp}", "--frce"], "unknown recipe key 'frce' for method 'reinforce'; see `python -m grade_trl.run --help` for the keys "
                                                          "(or grade_trl.compare's option --force?)"),
    ],
)
def test_compare_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    never_runs = ["--launcher", f"{sys.executable} -c 'import sys; sys.exit(5)'"]  # should validation let one through, it fails fast
    (tmp_path / "results.json").write_text("")  # a file where a folder is asked for (was a NotADirectoryError traceback, runs started)
    assert compare.main([a.replace("{tmp}", str(tmp_path)) for a in argv] + never_runs) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "comparison.json").exists() and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_launcher_that_is_no_program_is_one_line_and_exit_2(tmp_path, capsys):
    assert compare.main([RECIPES[0], "--output_dir", str(tmp_path), "--launcher", "no_such_launcher_xyz --flag"]) == 2  # was a FileNotFoundError traceback
    assert capsys.readouterr().err.strip().splitlines() == ["error: --launcher: 'no_such_launcher_xyz --flag' does not start with a program found on PATH "
                                                            "(e.g. 'accelerate launch --num_processes 2')"]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "launcher, message",
    [
        ("accelerate launch --config_file {tmp}/nope.yaml", "--launcher: accelerate cannot read its --config_file '{tmp}/nope.yaml': The passed configuration file"),
        ("accelerate launch --config_file {tmp}/bad.yaml", "--launcher: accelerate cannot read its --config_file '{tmp}/bad.yaml': "),
        ("accelerate launch --num_procs 2", "--launcher: accelerate launch refuses '--num_procs 2': unrecognized arguments: --num_procs"),
        ("accelerate launch --config_file 'x", "--launcher: \"accelerate launch --config_file 'x\" cannot be split into words (No closing quotation)"),
    ],
)
def test_a_launcher_accelerate_refuses_is_one_line_before_any_run(tmp_path, capsys, launcher, message):
    """Every run failed on it before (a FileNotFoundError traceback in each run's log, exit 1)."""
    (tmp_path / "bad.yaml").write_text("compute_environment: LOCAL_MACHINE\nno_such_key: 1\n")  # a key Accelerate's config does not have
    out = tmp_path / "out"
    assert compare.main([RECIPES[0], "--output_dir", str(out), "--launcher", launcher.replace("{tmp}", str(tmp_path))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: " + message.replace("{tmp}", str(tmp_path))), err
    assert not out.exists()
    compare.check_launcher(f"accelerate launch --config_file {REPO / 'accelerate_configs' / 'cpu.yaml'} --num_processes 2")  # the README's: accepted


def test_analysis_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert analysis.main([str(tmp_path / "nope")]) == 2
    assert analysis.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: no such folder") and err[1].startswith("error: no completed runs under")


def test_failed_runs_are_recorded_and_the_exit_code_is_1(tmp_path):
    # A launcher that exits 3 stands in for a run that crashes: the runner itself is what is tested here.
    launcher = f"{sys.executable} -c 'import sys; sys.exit(3)'"
    assert compare.main([RECIPES[0], "--output_dir", str(tmp_path), "--seeds", "2", "--launcher", launcher]) == 1
    comparison = json.loads((tmp_path / "comparison.json").read_text())
    assert [(r["seed"], r["status"], r["returncode"]) for r in comparison["runs"]] == [(42, "failed", 3), (43, "failed", 3)]
    assert comparison["methods"]["reinforce"]["failed_seeds"] == [42, 43] and comparison["methods"]["reinforce"]["test"]["n"] == 0
    assert comparison["runs"][0]["command"].startswith(launcher.split()[0]) and "--seed 42" in comparison["runs"][0]["command"]


# ---- a real comparison ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_comparison(tmp_path_factory):
    with module_folder(tmp_path_factory, "cmp") as tmp:
        # --jobs 2: two runs at a time, the first two training the shared reward head side by side
        argv = [*RECIPES, "--seeds", "2", "--jobs", "2", "--output_dir", str(tmp / "cmp"), *shrunk_overrides(tmp / "reward_model")]
        assert compare.main(argv) == 0
        yield tmp / "cmp", argv


def reached_step(history, target):
    """Independent re-implementation: first evaluation step with eval_reward >= target."""
    for row in sorted((r for r in history if "eval_reward" in r), key=lambda r: r["step"]):
        if row["eval_reward"] >= target:
            return row["step"]
    return None


@pytest.mark.slow
def test_compare_writes_what_the_results_files_say(real_comparison):
    out, argv = real_comparison
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["command"] == "python -m grade_trl.compare " + " ".join(argv)
    assert [(r["name"], r["seed"], r["status"]) for r in comparison["runs"]] == [("reinforce", 42, "completed"), ("grade_ste", 42, "completed"),
                                                                                 ("reinforce", 43, "completed"), ("grade_ste", 43, "completed")]
    results = {(name, seed): json.loads((out / name / f"seed{seed}" / "results.json").read_text()) for name in ("reinforce", "grade_ste") for seed in (42, 43)}
    for (name, seed), r in results.items():
        assert r["config"]["trainer"]["seed"] == seed and r["config"]["trainer"]["max_steps"] == 4  # the shared budget reached every run
    for name in ("reinforce", "grade_ste"):
        entry = comparison["methods"][name]
        test = [results[(name, s)]["final"]["test"]["final"]["metrics"]["reward"] for s in (42, 43)]
        low, high = ss.t.interval(0.95, 1, loc=np.mean(test), scale=ss.sem(test))
        assert entry["test"]["per_seed"] == test and entry["test"]["mean"] == pytest.approx(np.mean(test))
        assert (entry["test"]["ci_low"], entry["test"]["ci_high"]) == (pytest.approx(low), pytest.approx(high))
        assert entry["test_gold"]["per_seed"] == [results[(name, s)]["final"]["test"]["final"]["metrics"]["gold_reward"] for s in (42, 43)]
        assert entry["test_best_ckpt"]["per_seed"] == [results[(name, s)]["final"]["test"]["best"]["metrics"]["reward"] for s in (42, 43)]
        assert entry["kl"]["per_seed"] == [results[(name, s)]["final"]["kl"] for s in (42, 43)]
        assert entry["best_validation"]["per_seed"] == [max(h["eval_reward"] for h in results[(name, s)]["history"] if "eval_reward" in h) for s in (42, 43)]
        assert entry["peak_memory_mb"]["per_seed"] == [results[(name, s)]["final"]["peak_memory_mb"] for s in (42, 43)]
        assert all(w > 1 for w in entry["wall_seconds"]["per_seed"])
    for seed in (42, 43):
        runs = [results[(name, seed)]["history"] for name in ("reinforce", "grade_ste")]
        r0 = np.mean([h[0]["eval_reward"] for h in runs])
        r_star = max(row["eval_reward"] for h in runs for row in h if "eval_reward" in row)
        for f in ("0.6", "0.7", "0.8"):
            target = comparison["thresholds"]["per_seed"][str(seed)]["targets"][f]
            if r_star <= r0:
                assert target is None
                continue
            assert target == pytest.approx(r0 + float(f) * (r_star - r0))
            for k, name in enumerate(("reinforce", "grade_ste")):
                step = reached_step(runs[k], target)
                cell = comparison["methods"][name]["sample_efficiency"][f]
                assert cell["steps"]["per_seed"][seed - 42] == step
                assert cell["samples"]["per_seed"][seed - 42] == (None if step is None else step * results[(name, seed)]["final"]["samples_per_step"])

    # Resume: completed runs are not run again.
    mtimes = {key: (out / key[0] / f"seed{key[1]}" / "results.json").stat().st_mtime_ns for key in results}
    assert compare.main(argv) == 0
    again = json.loads((out / "comparison.json").read_text())
    assert all(r["skipped"] for r in again["runs"]) and again["methods"] == comparison["methods"]
    assert mtimes == {key: (out / key[0] / f"seed{key[1]}" / "results.json").stat().st_mtime_ns for key in results}


@pytest.mark.slow
def test_run_names_never_reuse_a_folder_another_recipe_of_the_method_wrote(tmp_path):
    """Two comparisons into one folder (the README's matched-KL commands): a method's name is taken only where no other
    recipe of that method is in the command or has runs in the folder; otherwise the recipe's file stem."""
    big = {"imdb_grpo.yaml": "grpo", "imdb_grade_ste.yaml": "grade_ste", "floor1.yaml": "grade_ste", "rao_kl003.yaml": "grade_rao"}
    assert compare.run_names(big) == {"imdb_grpo.yaml": "grpo", "imdb_grade_ste.yaml": "imdb_grade_ste", "floor1.yaml": "floor1", "rao_kl003.yaml": "grade_rao"}
    existing = {"grpo": ("imdb_grpo.yaml", "grpo"), "imdb_grade_ste": ("imdb_grade_ste.yaml", "grade_ste"), "floor1": ("floor1.yaml", "grade_ste"),
                "grade_rao": ("rao_kl003.yaml", "grade_rao")}
    later = {"ste_kl1.yaml": "grade_ste", "rao_kl1.yaml": "grade_rao", "gapped_kl1.yaml": "grade_gapped", "imdb_grpo.yaml": "grpo"}
    assert compare.run_names(later, existing) == {"ste_kl1.yaml": "ste_kl1", "rao_kl1.yaml": "rao_kl1", "gapped_kl1.yaml": "grade_gapped", "imdb_grpo.yaml": "grpo"}
    # a rerun of the first command keeps its folders, whatever the second command added (it resumes or skips its runs)
    both = {**existing, "rao_kl1": ("rao_kl1.yaml", "grade_rao"), "grade_gapped": ("gapped_kl1.yaml", "grade_gapped")}
    assert compare.run_names(big, both) == compare.run_names(big)
    # what runs_in reads: each run's compare_run.json command and results.json's recipe
    run = tmp_path / "grade_rao" / "seed42"
    run.mkdir(parents=True)
    (run / "compare_run.json").write_text(json.dumps({"command": "python -m grade_trl.run recipes/rao_kl003.yaml --seed 42 --output_dir x"}))
    (run / "results.json").write_text(json.dumps({"status": "completed", "history": [], "config": {"recipe": {"method": "grade_rao"}}, "final": {}}))
    assert compare.runs_in(tmp_path) == {"grade_rao": ("recipes/rao_kl003.yaml", "grade_rao")}


def test_resume_reruns_a_completed_run_whose_settings_changed(real_comparison, tmp_path):
    out, argv = real_comparison
    shutil.copytree(out / "reinforce" / "seed42", tmp_path / "reinforce" / "seed42")
    # a compare stopped while its run completed leaves the run's info saying "running": the rerun still skips the run
    info = json.loads((tmp_path / "reinforce" / "seed42" / "compare_run.json").read_text())
    (tmp_path / "reinforce" / "seed42" / "compare_run.json").write_text(json.dumps({"command": info["command"], "status": "running"}))
    fails = ["--launcher", f"{sys.executable} -c 'import sys; sys.exit(3)'"]  # any run actually started fails at once
    same = [RECIPES[0], "--seed_list", "42", "--output_dir", str(tmp_path), *argv[argv.index("--max_steps"):]]
    assert compare.main(same) == 0  # same settings, same launcher: skipped
    assert json.loads((tmp_path / "comparison.json").read_text())["runs"][0]["skipped"] is True
    # another launcher (another number of processes would train another batch per step): run again, here failing at once;
    # the completed run was reused before, whatever the launcher
    assert compare.main(same + fails) == 1
    # the run that starts over took the completed run's results with it: a launch stopped before its first write left the
    # completed run's results beside its own compare_run.json, and the report paired them (a journey audit)
    assert not (tmp_path / "reinforce" / "seed42" / "results.json").exists()
    assert compare.main(same + fails + ["--learning_rate", "5e-5"]) == 1  # other settings: run again (and here it fails)
    written = json.loads((tmp_path / "comparison.json").read_text())
    run = written["runs"][0]
    assert run["status"] == "failed" and run["returncode"] == 3 and "--learning_rate 5e-5" in run["command"]
    # the three commands wrote into this folder, and the report names each (it covers every run there); one once
    assert [c.split("grade_trl.compare ")[1] for c in written["commands"]] == [shlex.join(a) for a in (same, same + fails, same + fails + ["--learning_rate", "5e-5"])]
    lines = analysis.command_lines(written)
    assert lines[0].startswith("Commands: 3 wrote into this folder, in this order") and lines[2:] == [f"{i}. `{c}`" for i, c in enumerate(written["commands"], 1)]
    assert analysis.command_lines({"command": "c", "commands": ["c"]}) == ["Command: `c`"] == analysis.command_lines({"command": "c"})


def test_the_launcher_of_a_runs_command():
    plain = "/envs/a/bin/python3 -m grade_trl.run r.yaml --seed 42 --output_dir x"
    accelerate = "accelerate launch --num_processes 2 --config_file c.yaml -m grade_trl.run r.yaml --seed 42 --output_dir x"
    assert compare.launcher_of(plain) == "python" == compare.launcher_of("python -m grade_trl.run r.yaml")
    assert compare.launcher_of(accelerate) == "accelerate launch --num_processes 2 --config_file c.yaml"
    assert compare.launcher_of("python -m accelerate.commands.launch --num_processes 2 -m grade_trl.run r.yaml") == "python -m accelerate.commands.launch --num_processes 2"
    assert compare.launcher_of(None) is None


@pytest.mark.slow
def test_analysis_of_the_real_comparison(real_comparison):
    out, argv = real_comparison
    assert analysis.main([str(out)]) == 0
    report_dir = out / "analysis"
    for name in ("report.md", "comparison.md", "comparison.tex", "statistics.json", "learning_curves.png", "validation_curves.png",
                 "grad_norm.png", "test_comparison.png", "reward_kl_frontier.png"):
        assert (report_dir / name).stat().st_size > 100, name
    markdown = (report_dir / "comparison.md").read_text().splitlines()
    assert markdown[0].startswith("| method | seeds | test reward |") and len(markdown) == 4
    for line, name in zip(markdown[2:], ("reinforce", "grade_ste")):
        assert re.match(rf"\| {name} \| 2 \| \d\.\d{{3}} ± \d\.\d{{3}} \|", line), line
    latex = (report_dir / "comparison.tex").read_text()
    assert latex.index("\\toprule") < latex.index("\\midrule") < latex.index("grade\\_ste & 2 &") < latex.index("\\bottomrule")
    assert latex.count("\\begin{tabular}") == latex.count("\\end{tabular}") == 1
    report = (report_dir / "report.md").read_text()
    assert f"Command: `python -m grade_trl.compare {' '.join(argv)}`" in report
    assert "reinforce: 2 (42, 43); grade_ste: 2 (42, 43)" in report and "Holm" in report
    assert "estimator_variance: no `probe_*` keys" in report and "tau_ablation: 1 GRADE tau setting" in report
    stats = json.loads((report_dir / "statistics.json").read_text())
    assert [(r["seed"], r["n_pairs"]) for r in stats["within_seed"]] == [(42, 6), (43, 6)]  # same 6 test prompts per seed, paired by text


def test_results_readers_accept_only_the_results_schema(tmp_path):
    """compare, comparison and analysis read runs through `read_results` (None until a whole results.json is there);
    `load_results` is the strict reader with a one-line error."""
    run = tmp_path / "run"
    assert read_results(run) is None
    run.mkdir()
    (run / "results.json").write_text('{"status": "completed", "hist')  # half-written
    assert read_results(run) is None
    write_json_atomic(run / "results.json", {"history": []})  # no status: not ours
    assert read_results(run) is None
    with pytest.raises(UserError, match="not a results.json written by grade_trl.run"):
        load_results(run)
    write_json_atomic(run / "results.json", {"status": "interrupted", "config": {}, "history": [{"step": 1}], "final": {}})
    assert read_results(run)["status"] == "interrupted" and load_results(run / "results.json")["history"] == [{"step": 1}]
    # hand-edited files the readers' users would crash on (KeyError 'final', AttributeError on a row)
    write_json_atomic(run / "results.json", {"status": "completed", "config": {}, "history": [{"step": 1}]})
    assert read_results(run) is None
    write_json_atomic(run / "results.json", {"status": "completed", "config": {}, "history": [1, 2], "final": {}})
    assert read_results(run) is None
    # a part the readers step into, of another type (a fuzz audit: tracebacks in doctor, compare and analysis)
    for part, value, problem in [("config", [1], "'config' is a list, expected an object"),
                                 ("final", "x", "'final' is a string, expected an object"),
                                 ("final.task", 7, "'final.task' is an integer, expected an object"),
                                 ("config.run", [], "'config.run' is a list, expected an object"),
                                 ("final.kl", "0.3", "'final.kl' is a string, expected an integer or a number"),
                                 ("final.steps", True, "'final.steps' is true/false, expected an integer"),
                                 ("final.validation_before", {"reward": "0.5"}, "'final.validation_before.reward' is a string, expected a number (or null)")]:
        data = {"status": "completed", "config": {"run": {}}, "history": [{"step": 1}], "final": {"task": {}}}
        *parents, last = part.split(".")
        holder = data
        for key in parents:
            holder = holder[key]
        holder[last] = value
        write_json_atomic(run / "results.json", data)
        assert read_results(run) is None
        with pytest.raises(UserError) as info:
            load_results(run)
        assert str(info.value) == f"{run / 'results.json'} is not a results.json written by grade_trl.run: {problem}"
    # a log row's value or step of another type (analysis' curves and thresholds: a TypeError traceback)
    for row, problem in [({"step": 1, "eval_reward": "abc"}, "'history' row 1's 'eval_reward' is a string, expected a number (or null)"),
                         ({"step": "seven", "eval_reward": 0.5}, "'history' row 1 has no step (an integer >= 0), got 'seven'")]:
        write_json_atomic(run / "results.json", {"status": "completed", "config": {}, "history": [{"step": 0, "eval_reward": 0.1}, row], "final": {}})
        assert read_results(run) is None
        with pytest.raises(UserError) as info:
            load_results(run)
        assert str(info.value).endswith(problem)


def test_analysis_says_which_results_it_cannot_read_and_where_it_cannot_write(tmp_path, caplog, capsys):
    """A seed whose results.json is cut short is skipped with a warning naming it (it was dropped silently, changing
    every mean), and an --output_dir that cannot be a folder is one line (it was a FileExistsError traceback)."""
    good, cut = tmp_path / "cmp" / "reinforce" / "seed42", tmp_path / "cmp" / "reinforce" / "seed43"
    good.mkdir(parents=True)
    cut.mkdir(parents=True)
    write_json_atomic(good / "results.json", {"status": "completed", "config": {}, "history": [{"step": 1}], "final": {}})
    (cut / "results.json").write_text('{"status": "completed", "config": {}, "hist')
    with caplog.at_level("WARNING", logger="grade_trl.analysis"):
        _, runs, left_out = analysis.load_runs(tmp_path / "cmp")
    assert [run["seed"] for run in runs["reinforce"]] == [42]
    assert left_out == [f"reinforce seed 43: its {cut / 'results.json'} is not readable (cut short, or edited by hand)"]
    write_json_atomic(cut / "results.json", {"status": "completed", "config": {"recipe": "reinforce"}, "history": [{"step": 1}], "final": {}})
    _, _, left_out = analysis.load_runs(tmp_path / "cmp")  # read, but of another shape: which part, so that it can be mended
    assert left_out == [f"reinforce seed 43: its {cut / 'results.json'} is not a results.json (edited by hand?): 'config.recipe' is a string, expected an object"]
    assert any(left_out[0] in record.getMessage() for record in caplog.records)
    (tmp_path / "a_file").write_text("")
    assert analysis.main([str(tmp_path / "cmp"), "--output_dir", str(tmp_path / "a_file")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: --output_dir: cannot make the folder {str(tmp_path / 'a_file')!r}")


def test_a_killed_comparison_resumes_its_unfinished_run_from_the_checkpoint(tmp_path):
    """A run of the comparison stopped after its step-2 checkpoint (its later files removed, as a SIGKILL leaves them)
    is resumed from that checkpoint by the next compare, and ends with the history of the run that was not stopped."""
    recipe = str(REPO / "recipes" / "tiny" / "length_reinforce.yaml")
    overrides = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--eval_steps", "2", "--logging_steps", "1", "--eval_num_prompts", "4",
                 "--test_num_prompts", "4", "--eval_best_of_n", "1", "--policy_split_size", "16", "--validation_split_size", "8",
                 "--max_new_tokens", "6", "--min_new_tokens", "2", "--per_device_train_batch_size", "4", "--disable_tqdm", "true"]
    argv = [recipe, "--seed_list", "42", "--output_dir", str(tmp_path), *overrides]
    assert compare.main(argv) == 0
    run_dir = tmp_path / "reinforce" / "seed42"
    straight = load_results(run_dir)
    for leftover in ("results.json", "model", "best_model", "checkpoint-4"):
        path = run_dir / leftover
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    assert compare.main(argv) == 0
    record = json.loads((tmp_path / "comparison.json").read_text())["runs"][0]
    assert record["status"] == "completed" and record["resumed_from"] == str(run_dir / "checkpoint-2") and not record["skipped"]
    resumed = load_results(run_dir)
    assert resumed["final"]["resumed_from"] == str(run_dir / "checkpoint-2")
    clock = {"eval_wall_seconds", "eval_train_seconds", "train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "train_loss"}
    assert [{k: v for k, v in row.items() if k not in clock} for row in resumed["history"]] == [{k: v for k, v in row.items() if k not in clock} for row in straight["history"]]


def test_a_signal_to_compare_stops_its_run_with_a_checkpoint_and_the_rerun_resumes_it(tmp_path):
    """Ctrl-C to compare's process group (the runs have their own sessions, so compare alone gets it): compare passes it on, its run finishes the step, saves a
    checkpoint and exits; compare then exits 143. Before, compare died at once and the run went on alone, holding the
    output_dir's lock, so a rerun was refused. The rerun resumes the run from that checkpoint to completion."""
    import signal
    import subprocess
    import time

    recipe = str(REPO / "recipes" / "tiny" / "length_reinforce.yaml")
    overrides = ["--max_steps", "24", "--save_strategy", "steps", "--save_steps", "4", "--save_total_limit", "2", "--eval_steps", "24", "--logging_steps", "1", "--eval_num_prompts", "4",
                 "--test_num_prompts", "4", "--eval_best_of_n", "1", "--policy_split_size", "16", "--validation_split_size", "8",
                 "--max_new_tokens", "6", "--min_new_tokens", "2", "--per_device_train_batch_size", "4", "--disable_tqdm", "true"]
    argv = [recipe, "--seed_list", "42", "--output_dir", str(tmp_path / "cmp"), *overrides]
    run_dir = tmp_path / "cmp" / "reinforce" / "seed42"
    # its own process group, as a terminal's foreground job: Ctrl-C there signals the whole group
    process = subprocess.Popen([sys.executable, "-m", "grade_trl.compare", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while not (run_dir / "checkpoint-4" / "grade_trl_state_rank0.pt").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert process.poll() is None, process.communicate()[1][-2000:]
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: the runs, in their own sessions, get it once, from compare (twice, they stop without a checkpoint)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130 and err.strip().splitlines()[-1] == "interrupted by SIGINT", err[-2000:]
    stopped = load_results(run_dir)  # the run stopped itself (graceful stop), not orphaned: its results.json says so
    assert stopped["status"] == "interrupted" and 4 <= int(stopped["final"]["checkpoint"].rsplit("checkpoint-", 1)[1]) < 24

    first_launch = json.loads((run_dir / "compare_run.json").read_text())["wall_seconds"]
    assert compare.main(argv) == 0
    record = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["runs"][0]
    assert record["status"] == "completed" and record["resumed_from"] == stopped["final"]["checkpoint"]
    assert record["wall_seconds"] > first_launch > 0  # both launches' time, not the last one's only
    assert load_results(run_dir)["final"]["steps"] == 24
    assert "interrupted by SIGINT" in (run_dir / "log.txt").read_text()  # the resumed run's log was appended to, not truncated


def test_runs_of_another_task_evaluation_or_process_count_are_left_out_and_named(tmp_path):
    """Found by a journey audit: a length-reward run in a sentiment comparison's folder was tabled and t-tested against
    the others, and its best validation value became r* of the sentiment runs' targets; runs on 2 processes (whose
    validation samples differ) were pooled with runs on 1. Every name's runs now share the task, evaluation and process
    count of most of the folder's runs; the others are named, not tabled."""
    def run(name, seed, task=None, processes=1):
        data = synthetic_run([0.5, 0.6, 0.7], method=name, seed=seed)
        data["config"]["recipe"] = {"method": name, "seed": seed, **({"task": task} if task else {})}
        data["final"]["num_processes"] = processes
        write_json_atomic(tmp_path / name / f"seed{seed}" / "results.json", data)

    for seed in (42, 43):
        run("grade_ste", seed)
        run("reinforce", seed)
    run("length_reinforce", 42, task="length")
    run("ppo", 42, processes=2)
    records = comparisons.runs_in_folder(tmp_path)
    summed = comparisons.build_comparison(records, [0.6], {})
    assert summed["methods"]["grade_ste"]["seeds"] == [42, 43] and summed["methods"]["length_reinforce"]["seeds"] == []
    assert summed["methods"]["length_reinforce"]["other_settings"][0]["differs"].startswith('task "length" (the comparison\'s: null)')
    assert summed["methods"]["ppo"]["seeds"] == [] and "num_processes 2 (the comparison's: 1)" in summed["methods"]["ppo"]["other_settings"][0]["differs"]
    _, runs, left_out = analysis.load_runs(tmp_path)
    assert sorted(runs) == ["grade_ste", "reinforce"]
    assert sorted(line.split(":")[0] for line in left_out) == ["length_reinforce seed 42", "ppo seed 42"], left_out
    assert all("another task, evaluation or process count" in line for line in left_out)


def test_the_report_states_each_methods_budget_and_says_when_they_differ(tmp_path):
    """Found by a journey audit: a REINFORCE rerun at 6 steps was tabled and t-tested against GRADE-STE at 4 without a
    word. The report states each name's optimizer steps x completions per step, and says when they differ."""
    for name, steps in (("grade_ste", 2), ("reinforce", 3)):
        for seed in (42, 43):
            data = synthetic_run([0.5 + 0.1 * k for k in range(steps + 1)], method=name, seed=seed)
            data["config"]["recipe"] = {"method": name, "seed": seed}
            write_json_atomic(tmp_path / name / f"seed{seed}" / "results.json", data)
    summed = comparisons.build_comparison(comparisons.runs_in_folder(tmp_path), [0.6], {})
    assert summed["methods"]["reinforce"]["budget"] == {"steps": [30, 30], "samples_per_step": [8, 8]}
    lines = analysis.budget_lines(summed)
    assert lines == ["Budget (optimizer steps x completions per step): grade_ste: 20 x 8; reinforce: 30 x 8. **The methods' budgets differ**: "
                     "their rows compare runs of different lengths or batch sizes."], lines
    summed["methods"]["reinforce"]["budget"] = {"steps": [20, 20], "samples_per_step": [8, 8]}
    assert analysis.budget_lines(summed) == ["Budget (optimizer steps x completions per step): grade_ste: 20 x 8; reinforce: 20 x 8."]


def test_the_report_says_when_methods_generate_differently(tmp_path):
    """Found by a journey audit: TRL's GRPO evaluated with min_new_tokens 0 where REINFORCE's recipe evaluated with 4,
    and PPO sampled at temperature 0.7, top-p 0.9 (its KL 1.1 nats before any update) beside REINFORCE's 1.0, 1.0,
    tabled side by side without a word. results.json records the evaluation's generation; the report warns."""
    generation = {"grpo": ({"temperature": 1.0, "top_p": 1.0}, 0), "reinforce": ({"temperature": 1.0, "top_p": 1.0}, 4),
                  "ppo": ({"temperature": 0.7, "top_p": 0.9}, 4)}
    for name, (sampling, min_new_tokens) in generation.items():
        data = synthetic_run([0.5, 0.6, 0.7], method=name, seed=42)
        data["config"]["recipe"] = {"method": name, "seed": 42}
        data["config"]["trainer"] = dict(sampling)
        data["final"]["task"] = {"evaluation_generation": {"max_new_tokens": 16, "min_new_tokens": min_new_tokens, "temperature": 1.0, "top_p": 0.9}}
        write_json_atomic(tmp_path / name / "seed42" / "results.json", data)
    summed = comparisons.build_comparison(comparisons.runs_in_folder(tmp_path), [0.6], {})
    assert summed["methods"]["ppo"]["generation"] == {"training": {"temperature": 0.7, "top_p": 0.9},
                                                     "evaluation": {"max_new_tokens": 16, "min_new_tokens": 4, "temperature": 1.0, "top_p": 0.9}}
    evaluation, training = analysis.generation_lines(summed)
    assert evaluation.startswith("**The methods' evaluations generate differently**") and "grpo: max new tokens 16, min new tokens 0, temperature 1, top-p 0.9" in evaluation
    assert training.startswith("**The methods sample differently in training**") and "ppo: temperature 0.7, top-p 0.9" in training
    for name in ("grpo", "ppo"):
        summed["methods"][name]["generation"] = summed["methods"]["reinforce"]["generation"]
    assert analysis.generation_lines(summed) == []
    summed["methods"]["ppo"]["generation"] = None  # written before evaluation_generation was recorded: nothing to compare
    assert analysis.generation_lines(summed) == []


def test_an_earlier_commands_runs_of_another_task_do_not_outvote_this_commands(tmp_path):
    """Found by a review: with the protocol taken from most of the folder's runs, three earlier length runs outvoted the
    two runs the writing command had just trained, which were then left out. The writing command's names decide, and
    comparison.json records the protocol, which the analysis keeps to."""
    def run(name, seed, task=None):
        data = synthetic_run([0.5, 0.6, 0.7], method=name, seed=seed)
        data["config"]["recipe"] = {"method": name, "seed": seed, **({"task": task} if task else {})}
        write_json_atomic(tmp_path / name / f"seed{seed}" / "results.json", data)

    for seed in (1, 2, 3):
        run("length_reinforce", seed, task="length")
    run("grade_ste", 42)
    run("reinforce", 42)
    command = {"grade_ste": {"method": "grade_ste"}, "reinforce": {"method": "reinforce"}}
    summed = comparisons.build_comparison(comparisons.runs_in_folder(tmp_path), [0.6], {}, command)
    assert summed["methods"]["grade_ste"]["seeds"] == [42] and summed["methods"]["reinforce"]["seeds"] == [42]
    assert summed["methods"]["length_reinforce"]["seeds"] == [] and summed["protocol"] == {"num_processes": 1}
    write_json_atomic(tmp_path / "comparison.json", summed)
    _, runs, left_out = analysis.load_runs(tmp_path)
    assert sorted(runs) == ["grade_ste", "reinforce"] and len(left_out) == 3, left_out
