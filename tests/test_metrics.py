"""The method registry and the metric contract, end to end: every registry method runs through the runner (with
the probe and the live doctor), the doctor CLI and the analysis, and every key it logs is in the metric table.

Shrunk as tests/test_run_e2e.py::shrunk: 2 optimizer steps, 8 new tokens, 6 evaluation prompts; the probe draws
2 estimates on 2 prompts at step 2.
"""

import json

import pytest

from grade_trl import analysis, doctor, metrics
from grade_trl.methods import METHODS

from .conftest import REPO, module_folder
from .test_run_e2e import load_results, shrunk


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{method: results} of one shrunk run of each registry method's tiny IMDB recipe, laid out as a comparison folder."""
    from grade_trl.run import main

    with module_folder(tmp_path_factory, "registry") as root:
        out = {}
        for name in METHODS:
            argv = shrunk(root, name=f"{name}/seed42", recipe=str(REPO / "recipes" / "tiny" / f"imdb_{name}.yaml"), max_steps=2, logging_steps=1,
                          probe_steps="[2]", probe_num_estimates=2, probe_num_prompts=2)
            assert main(argv) == 0, name
            out[name] = load_results(root / name / "seed42" / "results.json")
        yield root, out


@pytest.mark.slow
def test_every_logged_key_is_in_the_metric_table(runs):
    _, results = runs
    for name, r in results.items():
        keys = {k for row in r["history"] for k in row}
        assert metrics.unknown_keys(keys) == [], name
        assert {"reward", "kl", "kl_per_token", "entropy", "completions/mean_length", "eval_reward", "eval_best_reward", "test_reward",
                "test_best_ckpt_reward", "probe_snr"} <= keys, name
        assert not any(k.startswith(("val_", "val/", "best_val")) or k == "objective/kl" for k in keys), name  # no old or duplicate names


@pytest.mark.slow
def test_kl_means_nats_per_completion_for_every_method(runs):
    _, results = runs
    for name, r in results.items():
        rows = [row for row in r["history"] if "kl_per_token" in row]
        assert rows, name
        for row in rows:
            assert row["kl"] >= 0 and row["kl_per_token"] >= 0
            # sum KL / sum lengths per micro-batch; the window mean of the ratio equals the ratio of the means when
            # the window's completions have equal lengths (8 tokens here unless EOS): within 10%.
            assert row["kl"] == pytest.approx(row["kl_per_token"] * row["completions/mean_length"], rel=0.1, abs=1e-6), (name, row)


@pytest.mark.slow
def test_every_registry_method_runs_through_doctor_and_analysis(runs, capsys):
    root, results = runs
    for name in METHODS:
        assert doctor.main([str(root / name / "seed42")]) in (0, 1), name  # a verdict, not an input error
        report = capsys.readouterr().out
        logs = len([row for row in results[name]["history"] if "loss" in row and "train_runtime" not in row])
        assert f"({logs} training logs, 2 evaluations)" in report, report  # evaluations at steps 0 and 2
    assert analysis.main([str(root)]) == 0
    stats = json.loads((root / "analysis" / "statistics.json").read_text())
    assert set(stats["methods"]) == set(METHODS)
    table = (root / "analysis" / "comparison.md").read_text()
    assert all(f"| {name} |" in table for name in METHODS)


def test_the_readme_lists_the_metric_table():
    readme = (REPO / "README.md").read_text()
    assert metrics.markdown_table() in readme


def test_metric_lookup_matches_patterns_and_test_rows():
    assert metrics.lookup("rewards/sentiment/mean").key == "rewards/{name}/mean"
    assert metrics.lookup("eval_pass_at_8").key == "eval_pass_at_{k}"
    assert metrics.lookup("test_best_ckpt_gold_reward").key == "test_best_ckpt_{name}"
    assert metrics.lookup("test_distinct_2").key == "test_{name}"
    assert metrics.unknown_keys(["test_nonsense", "val_reward", "val/error", "objective/kl", "step"]) == ["objective/kl", "test_nonsense", "val/error", "val_reward"]
    # Trainer.evaluate()'s rows: eval_ before a training key, or before a dict eval_dataset's set name (a user trial found
    # eval_kl, eval_loss and PPO's eval_policy/* flagged as unknown); a key that is neither stays unknown
    evaluate_keys = ["eval_kl", "eval_loss", "eval_tau", "eval_completions/mean_length", "eval_policy/approxkl", "eval_value/error", "eval_a_reward", "eval_my_set_kl"]
    assert {metrics.lookup(key).key for key in evaluate_keys} == {"eval_{name}"} and metrics.lookup("eval_reward").key == "eval_reward"
    assert metrics.unknown_keys(["eval_nonsense", "eval_a_nonsense", "eval_eval_kl"]) == ["eval_a_nonsense", "eval_nonsense"]  # eval_eval_kl: a set named eval


def test_the_keys_the_doctor_and_analysis_read_are_in_the_table():
    """The readers ask for keys by these names (metrics' constants, the doctor's validation keys): a misspelt one would
    silently make a check 'not applicable' instead of failing."""
    from grade_trl import diagnostics

    named = [metrics.KL, metrics.KL_PER_TOKEN, metrics.ENTROPY, metrics.REWARD, metrics.REWARD_STD, metrics.LOSS, metrics.GRAD_NORM_MEAN,
             *metrics.CLIP_FRACTION_KEYS, metrics.VALUE_LOSS, metrics.EXPLAINED_VARIANCE, *diagnostics.VALIDATION_KEYS]
    assert metrics.unknown_keys(named) == []
    assert metrics.unknown_keys(["rewrad", "eval_acuracy"]) == ["eval_acuracy", "rewrad"]


def test_the_logging_window_weights_each_mean_by_its_samples():
    """`MetricWindow`: a mean over 2 samples counts twice one over 1 (3 eval prompts scoring 0, 0, 3 in batches of 2: 1.0,
    not 1.5); its weight is positional only, so a reward may log a metric named `weight` (an audit); values restored from
    a window saved before the weights existed count as the first weighted value."""
    from grade_trl.trainers.metrics import MetricWindow

    window = MetricWindow()
    window.add(2, reward=0.0, weight=5.0)
    window.add(1, reward=3.0, weight=8.0)
    assert window.flush() == {"reward": pytest.approx(1.0), "weight": pytest.approx(6.0)} and window.flush() == {}
    old = MetricWindow()
    del old.__dict__["weights"]  # as unpickled from a checkpoint of before 2026-12-08
    old.values["kl"] += [1.0, 3.0]
    old.add(4, kl=5.0)
    assert old.flush() == {"kl": pytest.approx(3.0)}
