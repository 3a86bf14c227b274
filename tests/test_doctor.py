"""Run doctor: each check on a synthetic history that shows its failure (and only it), a healthy history
that raises nothing, the CLI's exit codes, and the live callback in a real training run."""

import json
import logging
import math
import random
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from transformers import TrainerControl, TrainerState

from grade_trl.diagnostics import CHECK_IDS, DoctorSettings, diagnose, run_checks
from grade_trl.doctor_callback import DoctorCallback
from grade_trl.doctor import main
from grade_trl.rewards.length import LengthReward
from grade_trl.trainers import REINFORCEConfig, REINFORCETrainer

from .conftest import REPO, write_intact

STEPS = list(range(10, 210, 10))  # training logs every 10 steps, 200 steps
EVAL_STEPS = [0, 50, 100, 150, 200]


def healthy(seed=0):
    """A run that learns: reward 0.5 -> 0.85, KL 0 -> 3 nats, steady entropy, gradients, clip fraction and value loss."""
    rng = random.Random(seed)
    history = []
    for step in STEPS:
        t = step / 200
        if step in EVAL_STEPS:
            history.append(eval_row(step, 0.5 + 0.35 * t, 0.8 + 0.15 * t, 0.55 + 0.2 * t))
        reward = 0.5 + 0.35 * t + rng.gauss(0, 0.02)
        kl = 3 * t + rng.gauss(0, 0.1)
        history.append({
            "loss": -reward + 0.1 * kl + rng.gauss(0, 0.02), "grad_norm": 2 + rng.gauss(0, 0.3), "learning_rate": 1e-4,
            "reward": reward, "reward_std": 0.3, "kl": kl, "entropy": 3.5 - 0.3 * t + rng.gauss(0, 0.05),
            "completions/mean_length": 20.0, "grad_norm_mean": 2 + rng.gauss(0, 0.2), "grad_norm_max": 3 + rng.gauss(0, 0.3),
            "policy/clipfrac": 0.2 + rng.gauss(0, 0.03), "loss/value": 0.05 + rng.gauss(0, 0.01),
            "value/explained_variance": 0.1 + 0.4 * t + rng.gauss(0, 0.03), "epoch": t, "step": step,
        })
    history.insert(0, eval_row(0, 0.5, 0.8, 0.55))
    history.append({"train_runtime": 60.0, "train_loss": -0.6, "epoch": 1.0, "step": 200})
    return history


def eval_row(step, reward, best_of_n, gold):
    return {"eval_reward": reward, "eval_reward_std": 0.3, "eval_best_of_n_reward": best_of_n, "eval_gold_reward": gold, "eval_best_reward": reward, "step": step}


def with_values(history, key, values: dict):
    """Set `key` to values[step] in the rows of those steps that already log `key`."""
    for row in history:
        if key in row and row["step"] in values:
            row[key] = values[row["step"]]
    return history


def with_evaluations(history, key, values: list):
    return with_values(history, key, dict(zip(EVAL_STEPS, values)))


def only(findings, check):
    """The one finding of `check`, after asserting that no other check fired."""
    assert [f.check for f in findings] == [check], [f.format() for f in findings]
    assert check in CHECK_IDS and findings[0].severity in ("warning", "error")  # a valid stop_on name
    return findings[0]


def test_healthy_history_raises_nothing_and_every_check_applies():
    findings, not_applicable = run_checks(healthy())
    assert findings == [] and not_applicable == []
    for seed in range(1, 6):  # other noise draws of the same healthy run
        assert diagnose(healthy(seed)) == []


def test_nonfinite_values_and_json_nulls():
    history = with_values(healthy(), "loss", {70: math.nan})
    with_values(history, "grad_norm", {70: math.inf})
    with_values(history, "kl", {80: None})  # how results.json stores NaN/inf
    finding = only(diagnose(history), "nonfinite")
    assert finding.severity == "error" and finding.steps == [70, 80]
    assert "loss=nan (step 70)" in finding.evidence and "kl=null (step 80)" in finding.evidence


def test_negative_kl():
    history = with_values(healthy(), "kl", {40: -3.1, 50: -0.05, 60: -12.0})  # -0.05 is within the k1 noise tolerance
    finding = only(diagnose(history), "negative_kl")
    assert finding.severity == "error" and finding.steps == [40, 60]
    assert "-12 (step 60)" in finding.evidence and "top-p" in finding.cause and "docs/background.md section 3" in finding.cause


def test_negative_kl_within_the_series_noise_is_a_warning_not_an_error():
    """Found by a user trial (2026-12-08): a healthy REINFORCE run with 4 completions a step logged k1 KLs swinging by a
    nat (the first 15 below, from that run); its -0.86 at step 8 was an error, and `doctor: stop` stopped the run there.
    Within 3 noise scales of the log-to-log differences it is a warning; a series negative on average stays an error."""
    kls = [0.0, 0.31, -0.05, 0.28, 0.05, 2.18, 0.82, -0.86, 0.7, 1.05, 0.54, 0.97, 0.87, 0.52, -0.19]
    history = [{"loss": 0.1, "kl": kl, "step": step} for step, kl in enumerate(kls, start=1)]
    finding = only(diagnose(history), "negative_kl")
    assert finding.severity == "warning" and finding.steps == [8, 15] and "noise" in finding.cause
    for step in range(8, 16):  # what the live doctor sees before each update from step 8 on: never an error
        assert all(f.severity != "error" for f in diagnose(history[:step]) if f.check == "negative_kl")
    mismatched = [{"loss": 0.1, "kl": -0.3 - 0.2 * step, "step": step} for step in range(1, 4)]  # negative throughout: the users' bug
    assert only(diagnose(mismatched), "negative_kl").severity == "error"
    # GRADE's KL is exact (summed over the vocabulary): no sampling noise to allow, so the same logs are errors (an audit);
    # the CLI reads that from the run's method
    from grade_trl.diagnostics import settings_from_config

    exact = DoctorSettings(**settings_from_config({"run": {"method": "grade_ste"}}))
    assert exact.kl_exact and not DoctorSettings(**settings_from_config({"run": {"method": "reinforce"}})).kl_exact
    assert only(diagnose(history, exact), "negative_kl").severity == "error"


def test_kl_far_above_adaptive_target():
    history = with_values(healthy(), "kl", {100: 25.0, 110: 40.0})
    finding = only(diagnose(history, DoctorSettings(kl_target=6.0)), "kl_high")  # 3 x 6 = 18 nats
    assert finding.steps == [100, 110] and "target 6 = 18" in finding.evidence and "adaptive controller" in finding.cause


def test_kl_above_absolute_ceiling_for_every_method():
    assert only(diagnose(with_values(healthy(), "kl", {150: 12.0})), "kl_high").steps == [150]
    assert diagnose(healthy(), DoctorSettings(kl_max=None)) == []
    # A TRL GRPO history: `kl` is per completion there too (the metric contract); its per-token `kl_per_token` is not read.
    grpo = [{k: v for k, v in row.items() if k not in ("policy/clipfrac", "loss/value", "value/explained_variance")} for row in healthy()]
    for row in grpo:
        if "kl" in row:
            row.update({"kl": 8.0, "kl_per_token": 0.4, "clip_ratio/region_mean": 0.0})
    assert diagnose(grpo) == []
    finding = only(diagnose(with_values(grpo, "kl", {120: 12.0})), "kl_high")
    assert finding.steps == [120] and "12 (step 120)" in finding.evidence and "nats per completion" in finding.evidence


def test_value_loss_spike():
    finding = only(diagnose(with_values(healthy(), "loss/value", {120: 3000.0})), "value_loss_spike")
    assert finding.steps == [120] and "3e+03 (step 120" in finding.evidence


def test_negative_explained_variance_must_be_sustained():
    history = with_values(healthy(), "value/explained_variance", {50: -0.5, 100: -0.5, 110: -0.3, 120: -0.8})
    finding = only(diagnose(history), "negative_explained_variance")
    assert finding.steps == [100, 110, 120]  # step 50 alone is one noisy window


def test_entropy_collapse():
    history = with_values(healthy(), "entropy", {s: 0.3 for s in range(150, 210, 10)})  # from ~3.5: an 91% drop
    finding = only(diagnose(history), "entropy_collapse")
    assert finding.steps == [150, 160, 170, 180, 190, 200]
    # Near-deterministic from the floor even with a small relative drop setting off.
    low = with_values(healthy(), "entropy", {190: 0.01, 200: 0.02})
    assert only(diagnose(low, DoctorSettings(entropy_drop=1.0)), "entropy_collapse").steps == [190, 200]


def test_a_collapse_inside_the_first_logs_is_found_against_the_highest_start():
    """Found by a journey audit: at learning rate 10 the entropy fell from 3.02 to 0 at the second log and the gradient
    norm to 0; the starting levels (the median / smallest of the first 3 logs) were 0 already, so the doctor saw no
    collapse and said "below its starting level 0". They are now the highest of the first logs."""
    steps = [row["step"] for row in healthy() if "loss" in row and "train_runtime" not in row]
    collapsed = with_values(healthy(), "entropy", {s: 0.0 for s in steps[1:]})
    collapsed = with_values(collapsed, "grad_norm_mean", {s: 0.0 for s in steps[1:]})
    findings = {f.check: f for f in diagnose(collapsed)}
    assert findings["entropy_collapse"].steps[:2] == steps[1:3] and "fell from 3.4" in findings["entropy_collapse"].evidence
    assert findings["grad_norm_vanishing"].steps[:2] == steps[1:3] and "starting level 1.99 (the highest" in findings["grad_norm_vanishing"].evidence  # was "0"


def test_clip_fraction_high():
    history = with_values(healthy(), "policy/clipfrac", {100: 0.6, 110: 0.7, 120: 0.55, 170: 0.9})
    finding = only(diagnose(history), "clip_fraction_high")
    assert finding.steps == [100, 110, 120]  # step 170 alone is not sustained


def flat_reward(history):
    rng = random.Random(1)
    return with_values(history, "reward", {s: 0.5 + rng.gauss(0, 0.02) for s in STEPS})


def test_clip_fraction_low_only_when_the_reward_does_not_rise():
    history = with_values(flat_reward(healthy()), "policy/clipfrac", {s: 0.01 for s in STEPS})
    finding = only(diagnose(history), "clip_fraction_low")
    assert finding.steps == STEPS and "lr 1e-6" in finding.cause
    # The same clip fraction while the reward rises (the tiny PPO recipes: 0-0.06) is not a problem.
    assert diagnose(with_values(healthy(), "policy/clipfrac", {s: 0.01 for s in STEPS})) == []
    # All zeros: one on-policy update per batch (TRL GRPO, num_iterations 1), the ratio is 1 by construction.
    assert diagnose(with_values(flat_reward(healthy()), "policy/clipfrac", {s: 0.0 for s in STEPS})) == []


def test_reward_regression_two_evaluations_in_a_row():
    history = with_evaluations(healthy(), "eval_reward", [0.5, 0.7, 0.8, 0.79, 0.77])
    finding = only(diagnose(history), "reward_regression")
    assert finding.steps == [100, 150, 200] and "0.8 (step 100) -> 0.79 (step 150) -> 0.77 (step 200)" in finding.evidence
    assert diagnose(history, DoctorSettings(regression_evals=3)) == []
    assert diagnose(with_evaluations(healthy(), "eval_reward", [0.5, 0.7, 0.8, 0.79, 0.81])) == []  # one fall


def test_reward_regression_needs_falls_beyond_the_evaluations_noise():
    # std 0.3 over prompts: with 16 prompts each evaluation's standard error is 0.3 / 4 = 0.075, a difference's
    # sqrt(2) x 0.075 = 0.106; falls of 0.01 and 0.02 are noise, falls of 0.15 and 0.12 are not
    noisy = with_evaluations(healthy(), "eval_reward", [0.5, 0.7, 0.8, 0.79, 0.77])
    assert diagnose(noisy, DoctorSettings(eval_size=16)) == []
    assert only(diagnose(noisy, DoctorSettings(eval_size=16, regression_min_z=0)), "reward_regression")  # the rule off
    assert only(diagnose(noisy, DoctorSettings(eval_size=10_000)), "reward_regression")  # 0.003 standard error: real falls
    real = with_evaluations(healthy(), "eval_reward", [0.5, 0.7, 0.8, 0.65, 0.53])
    [finding] = [f for f in diagnose(real, DoctorSettings(eval_size=16)) if f.check == "reward_regression"]  # and best-of-N's divergence
    assert finding.steps == [100, 150, 200] and "beyond 1 standard error of 16-prompt evaluations" in finding.evidence
    assert "reward_regression" not in [f.check for f in diagnose(real, DoctorSettings(eval_size=16, regression_min_z=1.5))]  # 0.12 < 1.5 x 0.106
    # GSM8K logs no std of its accuracy: the binomial sqrt(p (1 - p)) stands in (0.4 x 0.4 / 25 -> 0.1 a difference)
    history = [{k.replace("_reward", "_accuracy") if k.startswith("eval_") else k: v for k, v in row.items() if k not in ("eval_reward_std", "eval_best_of_n_reward")} for row in healthy()]
    accuracy = with_evaluations(history, "eval_accuracy", [0.5, 0.7, 0.8, 0.75, 0.7])
    assert diagnose(accuracy, DoctorSettings(eval_size=25)) == [] and only(diagnose(accuracy, DoctorSettings(eval_size=500)), "reward_regression")


def test_the_live_doctor_gets_the_tasks_evaluation_size(tmp_path):
    """The runner's doctor judges a fall against the standard error of its task's validation size (build_callbacks)."""
    from grade_trl.build import build_callbacks, build_task
    from grade_trl.recipe import parse_recipe

    recipe = parse_recipe([str(REPO / "recipes" / "tiny" / "length_reinforce.yaml"), "--output_dir", str(tmp_path / "run"), "--eval_num_prompts", "12",
                           "--policy_split_size", "40", "--validation_split_size", "20", "--test_split_size", "20"])
    _, task = build_task(recipe, gold_judge=False)
    assert build_callbacks(recipe, task)["doctor"].settings.eval_size == 12 == task.evaluator.size("validation")


def test_the_evaluation_size_comes_from_the_run():
    from grade_trl.diagnostics import evaluation_size_of, settings_from_config

    assert evaluation_size_of({"run": {"task": "imdb_sentiment", "eval_num_prompts": 100}}) == 100
    assert evaluation_size_of({"run": {"task": "custom", "eval_num_prompts": 100}, "final": {"task": {"split_sizes": {"validation": 40}}}}) == 40
    assert evaluation_size_of({"run": {"task": "gsm8k", "eval_num_prompts": 100, "eval_num_problems": 500}}) == 500
    assert evaluation_size_of({}) is None and "eval_size" not in settings_from_config({})
    assert settings_from_config({"run": {"task": "length", "eval_num_prompts": 8}})["eval_size"] == 8


def test_loss_rising_while_reward_flat():
    history = with_values(flat_reward(healthy()), "loss", {s: 0.198 + 0.25 * (s / 200) ** 2 for s in STEPS})  # users' 0.198 -> 0.447
    finding = only(diagnose(history), "loss_rising_reward_flat")
    assert finding.steps == [10, 20, 30, 180, 190, 200]
    # The same rise while the reward climbs is the KL term growing, not a stall.
    assert diagnose(with_values(healthy(), "loss", {s: 0.198 + 0.25 * (s / 200) ** 2 for s in STEPS})) == []


def test_gradient_norm_explosion():
    history = with_values(healthy(), "grad_norm_mean", {180: 900.0, 190: 5000.0})
    finding = only(diagnose(history), "grad_norm_explosion")
    assert finding.severity == "error" and finding.steps == [180, 190]


def test_gradient_norm_vanishing():
    history = with_values(healthy(), "grad_norm_mean", {160: 0.0, 170: 0.0, 180: 1e-3, 200: 0.0})
    finding = only(diagnose(history), "grad_norm_vanishing")
    assert finding.steps == [160, 170, 180]  # step 200 alone is not sustained


def test_best_of_n_rising_while_the_mean_falls():
    history = with_evaluations(healthy(), "eval_reward", [0.5, 0.7, 0.8, 0.7, 0.72])
    with_evaluations(history, "eval_best_of_n_reward", [0.8, 0.9, 0.93, 0.95, 0.97])
    finding = only(diagnose(history), "best_of_n_divergence")
    assert finding.steps == [100, 150, 200] and "0.8 -> 0.72" in finding.evidence and "0.93 -> 0.97" in finding.evidence


def test_reward_hacking_learned_reward_up_gold_judge_down():
    history = with_evaluations(healthy(), "eval_reward", [0.5, 0.7, 0.8, 0.9, 0.95])
    with_evaluations(history, "eval_gold_reward", [0.55, 0.65, 0.7, 0.62, 0.6])
    finding = only(diagnose(history), "reward_hacking")
    assert finding.steps == [100, 150, 200] and "eval_gold_reward fell 0.7 -> 0.6" in finding.evidence


def test_gsm8k_evaluation_rows_are_read_by_their_primary_metric():
    history = [{k.replace("_reward", "_accuracy") if k.startswith("eval_") else k: v for k, v in row.items()} for row in healthy()]
    assert diagnose(history) == []
    finding = only(diagnose(with_evaluations(history, "eval_accuracy", [0.5, 0.7, 0.8, 0.78, 0.76])), "reward_regression")
    assert finding.steps == [100, 150, 200] and "eval_accuracy" in finding.evidence


def test_missing_keys_mean_the_check_does_not_apply():
    findings, not_applicable = run_checks([{"loss": 1.0, "step": 1}])
    assert findings == [] and "reward_hacking" in not_applicable and "negative_kl" in not_applicable and "nonfinite" not in not_applicable


# ---- command line ------------------------------------------------------------------------------


def write_run(tmp_path, history, config=None):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"status": "completed", "config": config or {}, "history": history, "final": {}}))
    return run


def test_cli_healthy_run_exits_0(tmp_path, capsys):
    assert main([str(write_run(tmp_path, healthy()))]) == 0
    out = capsys.readouterr().out
    assert "no problems found" in out and "every check applied" in out


def test_cli_findings_exit_1_with_one_block_each(tmp_path, capsys):
    history = with_evaluations(healthy(), "eval_reward", [0.5, 0.7, 0.8, 0.79, 0.77])
    with_values(history, "kl", {40: -3.1})
    run = write_run(tmp_path, history)
    assert main([str(run / "results.json")]) == 1
    out = capsys.readouterr().out
    assert "[error] negative_kl at step 40" in out and "[warning] reward_regression at steps 100-200" in out
    assert main([str(run), "--regression_evals", "3", "--negative_kl_tolerance", "5"]) == 0  # overrides change the verdict


def test_cli_json_output(tmp_path, capsys):
    run = write_run(tmp_path, with_values(healthy(), "kl", {40: -3.1}))
    assert main([str(run), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert [(f["check"], f["severity"], f["steps"]) for f in data["findings"]] == [("negative_kl", "error", [40])]
    assert set(data["findings"][0]) == {"check", "severity", "steps", "evidence", "cause", "advice"}


@pytest.mark.parametrize("status,error,expected", [
    ("failed", "NonFiniteGradientError: step 2: the gradient is not finite", "[error] run_failed at step 200"),
    ("interrupted", "SIGTERM", "[warning] run_interrupted at step 200"),
])
def test_cli_a_run_that_did_not_complete_is_a_finding_not_healthy(tmp_path, capsys, status, error, expected):
    """A healthy history up to the step where the run failed (or was stopped) was reported as 'no problems found', exit 0."""
    run = write_run(tmp_path, healthy())
    data = json.loads((run / "results.json").read_text())
    (run / "results.json").write_text(json.dumps({**data, "status": status, "error": error, "final": {"checkpoint": str(run / "checkpoint-200")}}))
    assert main([str(run)]) == 1
    out = capsys.readouterr().out
    assert expected in out and error in out
    if status == "interrupted":
        assert f"--resume_from_checkpoint {run / 'checkpoint-200'}" in out


def test_cli_a_running_snapshot_says_the_run_may_have_been_killed(tmp_path, capsys):
    """results.json with status `running` (run.ResultsSnapshot): still training, or killed without a word (SIGKILL)."""
    run = write_run(tmp_path, healthy())
    data = json.loads((run / "results.json").read_text())
    (run / "results.json").write_text(json.dumps({**data, "status": "running", "written_at": "2026-12-06T21:00:00+00:00", "final": {"steps": 180}}))
    assert main([str(run)]) == 1
    out = capsys.readouterr().out
    assert "[warning] run_running at step 180" in out and "written 2026-12-06T21:00:00+00:00" in out and "SIGKILL" in out
    assert "run the same command again: it saved no checkpoint" in out


def test_results_snapshot_writes_at_the_first_log_then_at_most_once_a_minute_and_at_each_save(monkeypatch, caplog):
    from grade_trl import run as runner

    clock, written = [1000.0], []
    monkeypatch.setattr(runner.time, "monotonic", lambda: clock[0])
    snapshot = runner.ResultsSnapshot(lambda: written.append(clock[0]))
    for t in (1000.0, 1030.0, 1059.0, 1060.0, 1061.0):
        clock[0] = t
        snapshot.on_log(None, None, None)
    clock[0] = 1070.0
    snapshot.on_save(None, None, None)
    assert written == [1000.0, 1060.0, 1070.0]

    def unwritable():
        raise PermissionError(13, "Permission denied")

    failing = runner.ResultsSnapshot(unwritable)
    with caplog.at_level(logging.WARNING):
        failing.on_save(None, None, None)
        failing.on_save(None, None, None)  # the run goes on; one warning
    assert [r.getMessage() for r in caplog.records if "snapshot" in r.getMessage()] == [
        "could not write the results.json snapshot ([Errno 13] Permission denied); the run goes on"]


def test_cli_resume_advice_names_only_a_checkpoint_that_exists_and_the_runs_own_step(tmp_path, capsys):
    """Found by a journey audit: an interrupted run that saved no checkpoint (a second signal) was told to resume with
    --resume_from_checkpoint true, which the runner refuses; and a run that failed in step 2's evaluation was reported
    at the last logged step. The advice now names the checkpoint that exists (results.json's, else the latest complete
    one in the folder) or says the run starts over, and the step is results.json's `final.steps`."""
    from grade_trl.resume import STATE_FILE

    run = write_run(tmp_path, healthy())
    data = json.loads((run / "results.json").read_text())
    (run / "results.json").write_text(json.dumps({**data, "status": "interrupted", "error": "SIGTERM", "final": {"steps": 205}}))
    assert main([str(run)]) == 1
    out = capsys.readouterr().out
    assert "run_interrupted at step 205" in out and "resume_from_checkpoint" not in out and "run the same command again, which starts over" in out
    complete = run / "checkpoint-150"  # a complete checkpoint an earlier save left: the advice resumes from it
    complete.mkdir()
    for name in (STATE_FILE.format(rank=0), "trainer_state.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        write_intact(complete / name)
    (run / "checkpoint-200").mkdir()  # incomplete: not named
    (run / "results.json").write_text(json.dumps({**data, "status": "failed", "error": "ValueError: x", "final": {"steps": 205}}))
    assert main([str(run)]) == 1
    out = capsys.readouterr().out
    assert "run_failed at step 205" in out and f"--resume_from_checkpoint {complete} (the latest complete checkpoint" in out


def test_cli_reads_the_adaptive_kl_target_from_the_run_config(tmp_path, capsys):
    history = with_values(healthy(), "kl", {100: 8.0})  # under kl_max 10, above 3 x target 2
    config = {"run": {"method": "ppo"}, "trainer": {"adaptive_kl": True, "kl_target": 2.0}}
    assert main([str(write_run(tmp_path, history, config))]) == 1
    assert "[warning] kl_high at step 100" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{tmp}/nowhere"], "nowhere is not there"),
        (["{tmp}/folder_named_results"], "folder_named_results/results.json is a folder, not a file"),  # was "no such file" (a user trial)
        (["{tmp}/bad.json"], "cannot read"),
        (["{tmp}/nohistory.json"], "has no history"),
        (["{tmp}/run", "--kl_maxx", "5"], "unknown option --kl_maxx; did you mean --kl_max"),
        (["{tmp}/run", "--sustain_rows", "two"], "sustain_rows: expected an integer"),
        (["{tmp}/run", "--baseline_rows", "0"], "baseline_rows: expected an integer >= 1, got 0"),  # was a StatisticsError traceback
        (["{tmp}/run", "--trend_rows", "0"], "trend_rows: expected an integer >= 1, got 0"),
        (["{tmp}/run", "--kl_max", "-5"], "kl_max: expected a number > 0"),  # was accepted: every log flagged
        (["{tmp}/run", "--validation_key", "eval_nope"], "validation_key: no evaluation row of"),  # was accepted: validation checks silently off
        (["--json"], "RUN missing; usage: python -m grade_trl.doctor RUN [options]"),
        # a second run: the usage line alone said nothing of what was wrong
        (["{tmp}/wrong_type.json"], "wrong_type.json is not a results.json written by grade_trl.run: 'config' is a list, expected an object"),  # was a traceback
        (["{tmp}/run", "{tmp}/run2"], "unexpected argument {tmp}/run2 (the command takes one RUN; options are written --key value); usage:"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, message):
    write_run(tmp_path, healthy())
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "nohistory.json").write_text('{"status": "completed"}')
    (tmp_path / "folder_named_results" / "results.json").mkdir(parents=True)
    (tmp_path / "wrong_type.json").write_text(json.dumps({"status": "completed", "config": [1], "history": healthy(), "final": {}}))
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message.format(tmp=tmp_path) in err and err.count("\n") == 1


def test_module_entry_point(tmp_path):
    done = subprocess.run([sys.executable, "-m", "grade_trl.doctor", str(tmp_path / "missing")], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


# ---- live --------------------------------------------------------------------------------------


def test_callback_replays_a_run_warns_once_and_stops_on_a_named_check(caplog):
    # Evaluation rows reach on_log as the EvaluationCallback passes them: appended to log_history first.
    history = with_evaluations(healthy(), "eval_reward", [0.5, 0.7, 0.8, 0.79, 0.77])
    history = [row for row in history if "train_runtime" not in row] + [eval_row(250, 0.7, 0.85, 0.75)]
    state, control = TrainerState(), TrainerControl()
    callback = DoctorCallback(stop_on=["reward_regression"])
    stopped_at = None
    with caplog.at_level(logging.WARNING, logger="grade_trl.doctor_callback"):
        for row in history:
            state.global_step = row["step"]
            state.log_history.append(row)
            callback.on_log(None, state, control, logs=row)
            if control.should_training_stop and stopped_at is None:
                stopped_at = row["step"]
    assert stopped_at == 200  # the second fall in a row, evaluated at step 200
    assert [f.check for f in callback.findings] == ["reward_regression"]
    assert callback.findings[0].steps == [100, 150, 200, 250]  # the same finding (first step 100), updated
    warnings = [r.getMessage() for r in caplog.records if "reward_regression at" in r.getMessage()]
    assert len(warnings) == 1 and "steps 100-200" in warnings[0]


def test_callback_refuses_an_unknown_stop_on_name():
    with pytest.raises(ValueError, match="stop_on: unknown 'kl'; give a severity"):
        DoctorCallback(stop_on=["error", "kl"])


def reinforce_trainer(tmp_path, callback, max_steps):
    # Shrunk: 4 prompts per step, 6 new tokens, one log per step. top_p 0.9: the truncated sampling distribution
    # differs from the reference, so the KL is > 0 from the first step (README, REINFORCE and PPO).
    dataset = Dataset.from_dict({"prompt": ["This movie was", "The acting in this film", "I expected", "Worst"] * 8})
    args = REINFORCEConfig(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4, gradient_accumulation_steps=1, max_new_tokens=6,
        min_new_tokens=2, top_p=0.9, learning_rate=1e-4, logging_steps=1, use_cpu=True, disable_tqdm=True, report_to="none", save_strategy="no",
    )
    return REINFORCETrainer(model="embedded", reward_funcs=[LengthReward(eos_token_id=0)], args=args, train_dataset=dataset, callbacks=[callback])


def test_callback_in_a_real_run_warns_once_then_stops_when_asked(tmp_path, caplog):
    # A KL ceiling every real log exceeds: the finding appears at the first log and grows, warned once.
    warn_only = DoctorCallback(DoctorSettings(kl_max=1e-6))
    trainer = reinforce_trainer(tmp_path / "warn", warn_only, max_steps=3)
    with caplog.at_level(logging.WARNING, logger="grade_trl.doctor_callback"):
        trainer.train()
    kl = [(h["step"], h["kl"]) for h in trainer.state.log_history if "kl" in h]
    assert trainer.state.global_step == 3 and [s for s, v in kl if v > 1e-6] == [1, 2, 3]
    [finding] = [f for f in warn_only.findings if f.check == "kl_high"]
    assert finding.steps == [1, 2, 3]
    assert sum("kl_high at" in r.getMessage() for r in caplog.records) == 1

    # Stopping: the finding is seen on step 1's row before its update, so the update is skipped and the run stops.
    stopper = DoctorCallback(DoctorSettings(kl_max=1e-6), stop_on=["kl_high"])
    trainer = reinforce_trainer(tmp_path / "stop", stopper, max_steps=5)
    stopper.trainer = trainer
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.global_step == 1 and [f.steps for f in stopper.findings if f.check == "kl_high"] == [[1]]
    assert stopper.skipped_update_at == 1 and all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    assert not any(state for state in trainer.optimizer.state.values())  # AdamW never stepped

    # Without the trainer attached (a plain TrainerCallback use), it stops after the step's log, as before.
    late = DoctorCallback(DoctorSettings(kl_max=1e-6), stop_on=["kl_high"])
    trainer = reinforce_trainer(tmp_path / "late", late, max_steps=5)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.global_step == 1 and late.skipped_update_at is None
    assert not all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_runner_wires_the_live_doctor_and_keeps_its_findings(tmp_path):
    """`doctor: stop` in a recipe: the run stops at the first log that breaks a named check; results.json keeps the finding."""
    from grade_trl.run import main as run_main

    from .test_run_e2e import load_results, shrunk

    argv = shrunk(tmp_path, max_steps=6, logging_steps=1, eval_steps=3, doctor="stop", doctor_stop_on="[kl_high]", doctor_settings="{kl_max: 1.0e-6}")
    assert run_main(argv) == 0
    final = load_results(tmp_path / "run" / "results.json")["final"]
    assert final["steps"] < 6  # stopped by the doctor, not by max_steps
    assert [f["check"] for f in final["doctor"]] == ["kl_high"]
    assert final["test"]["final"]["metrics"]["reward"] is not None  # the final results are still written
    # what stopped it, and that its last step's update was not applied (the run said nothing of it before)
    assert final["doctor_stopped"] == {"check": "kl_high", "step": final["steps"], "update_skipped": True}
    # the doctor command checks the run with the run's own doctor_settings (it said "no problems found" before)
    assert main([str(tmp_path / "run")]) == 1
    assert main([str(tmp_path / "run"), "--kl_max", "1000"]) == 0  # its own options win
    # the reward regression's standard error uses the run's evaluation size (its 6 validation prompts)
    from grade_trl.diagnostics import evaluation_size_of

    assert evaluation_size_of({**load_results(tmp_path / "run" / "results.json")["config"], "final": final}) == 6


def test_log_rows_without_a_step_are_one_line(tmp_path, capsys):
    for rows, shown in (([{"kl": 1, "loss": 1}, {"kl": 2}], "None"), ([{"step": "x", "kl": 1}], "'x'")):
        path = tmp_path / "rows.json"
        path.write_text(json.dumps(rows))
        assert main([str(path)]) == 2  # were a KeyError and a ValueError traceback, exit 1
        assert capsys.readouterr().err.strip() == (f"error: {path}: log row 0 has no step (every row needs \"step\": its optimizer step, an integer >= 0), "
                                                   f"got {shown}")


@pytest.mark.parametrize("recipe", ["quickstart.yaml", "tiny/imdb_ppo.yaml"])
def test_cli_reads_a_checkpoint_folder_of_a_real_run(tmp_path, capsys, recipe):
    """`save_strategy: steps` writes checkpoint-N/ (save_total_limit 1 keeps the last); the doctor reads its trainer_state.json."""
    from grade_trl.run import main as run

    from .test_run_e2e import shrunk

    argv = shrunk(tmp_path, recipe=str(REPO / "recipes" / recipe), save_strategy="steps", save_steps=2, save_total_limit=1)
    assert run(argv) == 0
    checkpoint = tmp_path / "run" / "checkpoint-4"
    assert (checkpoint / "trainer_state.json").is_file() and not (tmp_path / "run" / "checkpoint-2").exists()
    capsys.readouterr()
    assert main([str(checkpoint)]) in (0, 1)  # a verdict, not an input error
    out = capsys.readouterr().out
    assert f"run doctor: {checkpoint / 'trainer_state.json'} (2 training logs, 3 evaluations)" in out, out
