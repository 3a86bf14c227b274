"""Runs that keep their results: signals on a real subprocess, the output_dir lock, the non-finite gradient guard,
and a failure after training. Resume after a SIGKILL: tests/test_resume.py."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from grade_trl.errors import UserError
from grade_trl.resume import is_complete
from grade_trl.rewards import LengthReward
from grade_trl.run import main
from grade_trl.safety import LOCK_FILE, LOSS_SCALE_OVERFLOWS_IN_A_ROW, NonFiniteGradientError, NonFiniteGuard, clipping_freezes_adam, output_dir_lock
from grade_trl.trainers import GumbelGRADEConfig, GumbelGRADETrainer

from .conftest import REPO
from .test_run_e2e import load_results, shrunk


def test_a_second_run_into_a_locked_output_dir_is_refused_and_a_stale_lock_is_not_obeyed(tmp_path, capsys):
    from grade_trl.run import main

    out = tmp_path / "run"
    with output_dir_lock(out):  # a live run holds the folder
        argv = shrunk(tmp_path)
        assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "output_dir:" in err[0] and f"is in use by another run (pid {os.getpid()})" in err[0]
    assert not (out / "results.json").exists()
    # The holder is gone (its lock file stays, naming a dead pid): the kernel dropped the lock, so a new run may start.
    (out / LOCK_FILE).write_text("999999999\n")
    with output_dir_lock(out):
        assert (out / LOCK_FILE).read_text().strip() == str(os.getpid())


def test_bad_input_found_inside_the_lock_leaves_no_folder_behind(tmp_path):
    out = tmp_path / "new" / "run"
    with pytest.raises(UserError, match="bad"):
        with output_dir_lock(out):
            raise UserError("bad data file")
    assert not out.exists()
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("the user's")
    with pytest.raises(UserError):
        with output_dir_lock(out):
            raise UserError("bad data file")
    assert (out / "keep.txt").exists()  # a folder that was there is never removed


def test_the_guard_stops_before_a_non_finite_gradient_is_applied():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    guard = NonFiniteGuard()
    model(torch.ones(1, 3)).sum().backward()
    guard.on_pre_optimizer_step(None, type("State", (), {"global_step": 4})(), None, model=model)  # finite: nothing happens
    model[1].weight.grad[0, 1] = float("nan")
    with pytest.raises(NonFiniteGradientError, match=r"step 5: the gradient is not finite \(nan in 1\.weight\)"):
        guard.on_pre_optimizer_step(None, type("State", (), {"global_step": 4})(), None, model=model)
    model[1].weight.grad[0, 1] = float("inf")
    with pytest.raises(NonFiniteGradientError, match=r"inf in 1\.weight"):
        guard.on_pre_optimizer_step(None, type("State", (), {"global_step": 4})(), None, model=model)


def test_under_fp16_loss_scaling_an_overflow_is_left_to_the_scaler():
    """fp16: an inf gradient is how the loss scaler finds its scale too high; it skips that step and halves the scale,
    so the guard lets 16 such steps in a row be (2^16, the default initial scale, down to 1), a finite step starts the
    count again, and the 17th in a row is treated as any non-finite gradient."""
    model = torch.nn.Linear(3, 1)
    optimizer = type("Optimizer", (), {"scaler": torch.amp.GradScaler("cpu")})()
    guard, state = NonFiniteGuard(), type("State", (), {"global_step": 0})()

    def step(finite: bool):
        model.zero_grad()
        model(torch.ones(1, 3)).sum().backward()
        if not finite:
            model.weight.grad[0, 0] = float("inf")
        guard.on_pre_optimizer_step(None, state, None, model=model, optimizer=optimizer)

    for _ in range(LOSS_SCALE_OVERFLOWS_IN_A_ROW):
        step(finite=False)  # the scaler's business
    step(finite=True)
    for _ in range(LOSS_SCALE_OVERFLOWS_IN_A_ROW):
        step(finite=False)
    with pytest.raises(NonFiniteGradientError, match=r"inf in weight"):
        step(finite=False)
    with pytest.raises(NonFiniteGradientError, match=r"inf in weight"):  # no scaler: the first one stops
        NonFiniteGuard().on_pre_optimizer_step(None, state, None, model=model, optimizer=None)


class NaNGradientReward(LengthReward):
    """A differentiable reward with a finite value and a NaN gradient (d sqrt(u)/du = inf at u = 0, times 0): past
    the reward check that GRADE applies to values, only the guard can see it."""

    def score_soft(self, soft_tokens, attention_mask):
        score = super().score_soft(soft_tokens, attention_mask)
        return score + torch.sqrt(score * 0.0)


def test_a_nan_gradient_stops_grade_before_its_first_update(tmp_path, tokenizer):
    args = GumbelGRADEConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=1, max_new_tokens=4, min_new_tokens=4,
        logging_steps=1, use_cpu=True, disable_tqdm=True, report_to="none", save_strategy="no",
    )
    trainer = GumbelGRADETrainer(model="embedded", reward_funcs=NaNGradientReward(tokenizer.eos_token_id), args=args, train_dataset=Dataset.from_dict({"prompt": ["This movie was"] * 4}),
                                 processing_class=tokenizer, callbacks=[NonFiniteGuard()])
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(NonFiniteGradientError, match="step 1: the gradient is not finite"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())  # the update was not applied


def test_weights_diverged_by_a_finite_update_are_named_as_such_not_blamed_on_the_reward(tmp_path, tokenizer):
    """A learning rate of 1e30: step 1's gradient is finite, so its update goes through, and the policy's logits at
    step 2 are not finite; the soft reward then returns NaN, which is the policy's doing, not the reward's."""
    args = GumbelGRADEConfig(
        output_dir=str(tmp_path), max_steps=3, learning_rate=1e30, per_device_train_batch_size=2, gradient_accumulation_steps=1, max_new_tokens=4,
        min_new_tokens=4, logging_steps=1, use_cpu=True, disable_tqdm=True, report_to="none", save_strategy="no",
    )
    trainer = GumbelGRADETrainer(model="embedded", reward_funcs=LengthReward(tokenizer.eos_token_id), args=args, train_dataset=Dataset.from_dict({"prompt": ["This movie was"] * 4}),
                                 processing_class=tokenizer, callbacks=[NonFiniteGuard()])
    with pytest.raises(NonFiniteGradientError, match=r"^step 2: the policy's logits are not finite \(its weights diverged in an earlier update, whose gradient was finite, so the guard let it through; or a half-precision forward overflowed\); lower learning_rate$"):
        trainer.train()
    assert trainer.state.global_step == 1


@pytest.mark.parametrize("recipe", ["length_reinforce.yaml", "length_grpo.yaml"])
def test_weights_diverged_by_a_finite_update_stop_any_method_in_one_line(tmp_path, recipe, capsys):
    """Found by a journey audit: with a learning rate of 1e30 REINFORCE and TRL's GRPO failed in torch's sampler
    ("probability tensor contains either inf, nan or element < 0") with a traceback and exit 1. The runner now names
    the diverged weights in one line, exit 2, results.json failed with that error and the history. In-process since
    2026-12-07 (`main`'s return is the command's exit code: test_recipe.py's CLI tests run the command itself)."""
    from .test_resume import argv

    assert main(argv(recipe, tmp_path / "run", learning_rate="1e30", max_steps=4, save_strategy="no")) == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr, stderr[-3000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("error: step ") and "the policy's logits are not finite" in line and "lower learning_rate" in line, line
    results = load_results(tmp_path / "run" / "results.json")
    assert results["status"] == "failed" and "the policy's logits are not finite" in results["error"] and results["history"]


def _allocate_more_than_any_machine_has(*args, **kwargs):
    torch.empty(2**50, dtype=torch.uint8)  # the CPU allocator's own error: "... can't allocate memory: you tried to allocate ..."


def test_out_of_memory_in_training_is_one_line_naming_what_lowers_the_peak(tmp_path, monkeypatch, capsys):
    """Out of memory once training started (the CPU allocator's RuntimeError, CUDA's OutOfMemoryError) was a traceback
    with exit 1 (a fuzz audit: rao_samples 10**6 asked for 262 GB): one line naming the settings that lower the peak,
    GRADE's memory switches for GRADE, exit 2, results.json failed with the history so far."""
    from grade_trl.safety import out_of_memory_error
    from grade_trl.trainers import REINFORCETrainer

    monkeypatch.setattr(REINFORCETrainer, "training_step", _allocate_more_than_any_machine_has)
    from .test_resume import argv

    assert main(argv("length_reinforce.yaml", tmp_path / "run", max_steps=2, save_strategy="no")) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == ("error: step 1: out of memory (can't allocate memory: you tried to allocate 1125899906842624 bytes); lower "
                    "per_device_train_batch_size (raise gradient_accumulation_steps to keep the batch) or max_new_tokens"), line
    results = load_results(tmp_path / "run" / "results.json")
    assert results["status"] == "failed" and "out of memory" in results["error"] and results["history"]  # step 0's validation
    try:
        _allocate_more_than_any_machine_has()
    except RuntimeError as error:
        grade = out_of_memory_error(error, 3, relaxed=True)
    assert str(grade).endswith("or max_new_tokens, or turn on GRADE's memory switches: rollout_checkpointing: true, relax_top_k: 256, bf16: true "
                               "(README, \"GRADE's cost\")")
    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 3.10 GiB is free.")
    assert str(out_of_memory_error(cuda, 5, relaxed=False)).startswith("step 5: out of memory (CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has")
    assert out_of_memory_error(RuntimeError("shape mismatch"), 1, relaxed=False) is None  # another error keeps its traceback
    assert str(out_of_memory_error(cuda, 5, relaxed=False, length_key="max_completion_length")).endswith("or max_completion_length")  # TRL GRPO's
    from grade_trl.rewards import compute_rewards

    def reward_out_of_memory(prompts, completions, **kwargs):
        _allocate_more_than_any_machine_has()

    with pytest.raises(RuntimeError, match="can't allocate memory"):  # passed on to the runner, not blamed on the reward function
        compute_rewards([reward_out_of_memory], ["p"], ["c"])


def test_the_one_line_error_starts_a_line_of_its_own_after_a_progress_bar(capsys):
    """Found by a journey audit: an error during a training step was printed after Trainer's open progress bar
    (`... 1/3 [00:00<00:00, 2.93it/s]error: ...`), so `grep '^error:'` found nothing. Open bars are closed first."""
    from tqdm.auto import tqdm

    from grade_trl.cli import run_safely

    def body():
        bar = tqdm(total=3)
        bar.update(1)
        raise UserError("reward function 'r' raised on sample 0")

    assert run_safely(body) == 2
    assert "\nerror: reward function 'r' raised on sample 0\n" in capsys.readouterr().err


class NaNGradientWhenAsked(NaNGradientReward):
    """NaNGradientReward while `nan` is set, a finite gradient otherwise."""

    nan = False

    def score_soft(self, soft_tokens, attention_mask):
        return super().score_soft(soft_tokens, attention_mask) if self.nan else LengthReward.score_soft(self, soft_tokens, attention_mask)


def test_nonfinite_skip_skips_each_bad_update_exactly_and_stops_past_the_limit(tmp_path, tokenizer):
    """`nonfinite: skip`: a step with a NaN gradient changes neither the weights nor AdamW's moments and step count;
    the finite steps between are applied; past max_skips the run stops as `stop` does."""
    args = GumbelGRADEConfig(
        output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=2, gradient_accumulation_steps=1, max_new_tokens=4, min_new_tokens=4,
        logging_steps=1, use_cpu=True, disable_tqdm=True, report_to="none", save_strategy="no",
    )
    guard = NonFiniteGuard("skip", max_skips=2)
    seen = []

    class Snapshot(TrainerCallback):  # the weights and AdamW's step count after every optimizer step
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            steps = [int(s["step"]) for s in optimizer.state.values() if "step" in s]
            seen.append((state.global_step, {n: p.detach().clone() for n, p in model.named_parameters()}, max(steps, default=0)))

    reward = NaNGradientWhenAsked(tokenizer.eos_token_id)

    class NaNOnEvenSteps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            reward.nan = (state.global_step + 1) % 2 == 0

    trainer = GumbelGRADETrainer(model="embedded", reward_funcs=reward, args=args, train_dataset=Dataset.from_dict({"prompt": ["This movie was"] * 12}),
                                 processing_class=tokenizer, callbacks=[NaNOnEvenSteps(), guard, Snapshot()])
    with pytest.raises(NonFiniteGradientError, match=r"^step 6: the gradient is not finite \(nan in .*\) after 2 skipped updates \(nonfinite_max_skips\)"):
        trainer.train()
    assert guard.skipped_steps == [2, 4]
    steps = {step: (weights, adam_steps) for step, weights, adam_steps in seen}
    assert [steps[s][1] for s in (1, 2, 3, 4)] == [1, 1, 2, 2]  # AdamW counted only the applied updates
    assert all(torch.equal(steps[1][0][n], steps[2][0][n]) for n in steps[1][0])  # step 2 was skipped: weights as after step 1
    assert not all(torch.equal(steps[2][0][n], steps[3][0][n]) for n in steps[2][0])  # step 3 was applied


def _saving_model_fails(monkeypatch, also=lambda folder: None):
    """Saving the final model/ fails after training (a full disk): a file in its way is refused at start-up now."""
    from grade_trl.trainers.base import ReadableSavesMixin

    save = ReadableSavesMixin.save_model

    def save_model(self, output_dir=None, _internal_call=False):
        if os.path.basename(str(output_dir)) == "model":
            also(os.path.dirname(str(output_dir)))
            raise OSError(28, "No space left on device", str(output_dir))
        return save(self, output_dir, _internal_call)

    monkeypatch.setattr(ReadableSavesMixin, "save_model", save_model)


def test_a_failure_after_training_keeps_the_history(tmp_path, capsys, monkeypatch):
    """Saving model/ fails: results.json still has status failed, the error and every row."""
    from grade_trl.run import main

    argv = shrunk(tmp_path)
    _saving_model_fails(monkeypatch)
    with pytest.raises(OSError, match="No space left on device"):
        main(argv)
    results = load_results(tmp_path / "run" / "results.json")
    assert results["status"] == "failed" and results["error"]
    assert any("loss" in row for row in results["history"]) and results["final"]["steps"] == 4 and results["final"]["train_minutes"] > 0


def test_a_results_json_that_cannot_be_written_does_not_hide_the_runs_error(tmp_path, caplog, monkeypatch):
    """Found by a journey audit: with output_dir replaced mid-run, writing the failed results.json raised too, and its
    traceback, chained onto the run's, hid the run's error. Now a log line says so and the run's error ends it."""
    from grade_trl.run import main

    argv = shrunk(tmp_path)
    # the run's error: saving model/ fails; and by then results.json cannot be replaced (a folder in its place)
    _saving_model_fails(monkeypatch, also=lambda folder: (os.remove(os.path.join(folder, "results.json")), os.mkdir(os.path.join(folder, "results.json"))))
    with caplog.at_level("ERROR", logger="grade_trl"), pytest.raises(Exception) as info:
        main(argv)
    assert not isinstance(info.value, IsADirectoryError) and "model" in str(info.value), repr(info.value)
    assert any(record.getMessage().startswith(f"could not write {tmp_path / 'run' / 'results.json'}") for record in caplog.records)


def test_a_closed_terminal_or_ctrl_backslash_stops_as_sigterm_does_and_nohup_is_respected():
    """SIGHUP (the terminal or SSH session closed) and SIGQUIT (Ctrl-\\) ended a run at once without a word, its
    results.json still `running` with the step-0 row only (a bad-input trial, 2026-12-07): both raise `Interrupted`
    now, as SIGTERM (the run's graceful stop then saves a checkpoint: the SIGHUP case of the test below). A SIGHUP
    that `nohup` set to be ignored stays ignored: the run was asked to outlive its terminal."""
    from grade_trl.errors import Interrupted, signals_raise

    previous = {signum: signal.signal(signum, signal.SIG_DFL) for signum in (signal.SIGHUP, signal.SIGQUIT)}  # as a terminal starts a command
    try:
        for signum, code in ((signal.SIGHUP, 129), (signal.SIGQUIT, 131)):
            with pytest.raises(Interrupted) as info, signals_raise():
                os.kill(os.getpid(), signum)
                time.sleep(5)  # the handler runs at the next bytecode
            assert info.value.signum == signum and info.value.exit_code == code
            assert signal.getsignal(signum) == signal.SIG_DFL  # restored after the block
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup
        with signals_raise():
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN and signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
            os.kill(os.getpid(), signal.SIGHUP)  # ignored: nothing is raised
            time.sleep(0.2)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_a_terminal_that_hangs_up_stops_the_run_with_its_checkpoint(tmp_path):
    """The run's output on a terminal (a pseudo-terminal here) that hangs up, as a closed SSH session does: the kernel
    sends SIGHUP and every later write to the terminal fails with EIO. The first fix (SIGHUP stops as SIGTERM does)
    still ended such a run as `failed` ("OSError: [Errno 5] Input/output error" at the next log row, before its
    checkpoint; an audit, 2026-12-07): stdout and stderr now leave the terminal for /dev/null on SIGHUP, and the run
    finishes its step, saves its checkpoint, writes results.json `interrupted` and exits 129. (A SIGHUP sent through
    pipes, as the test below sends SIGTERM and SIGINT, would not model the hang-up.)"""
    import pty
    import select

    argv = shrunk(tmp_path, max_steps=400, logging_steps=1, eval_steps=1000)
    pid, terminal = pty.fork()  # the child leads a session whose controlling terminal is this pseudo-terminal
    if pid == 0:
        try:
            os.chdir(REPO)
            signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as from a login shell, even if the suite runs under nohup
            os.execve(sys.executable, [sys.executable, "-m", "grade_trl.run", *argv], {**os.environ, "OMP_NUM_THREADS": "1"})
        finally:
            os._exit(127)
    seen, deadline = b"", time.time() + 240
    while b"'loss'" not in seen and time.time() < deadline:  # training has started once a loss row shows
        if select.select([terminal], [], [], 1)[0]:
            try:
                seen += os.read(terminal, 65536)
            except OSError:
                break
    os.close(terminal)  # the hang-up
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 129, seen[-2000:]
    results = load_results(tmp_path / "run" / "results.json")
    assert results["status"] == "interrupted" and any("loss" in row for row in results["history"]), results.get("error")
    assert results["final"]["checkpoint"] and is_complete(results["final"]["checkpoint"])


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_training_writes_results_and_exits_with_one_line(tmp_path, signum, code):
    argv = shrunk(tmp_path, max_steps=400, logging_steps=1, eval_steps=1000)
    process = subprocess.Popen([sys.executable, "-m", "grade_trl.run", *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"},
                               preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))  # as from a terminal, even if the suite runs under nohup
    deadline = time.time() + 240
    for line in process.stdout:  # the Trainer prints each logging row: training has started once a loss shows
        if "'loss'" in line or time.time() > deadline:
            break
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr[-2000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"interrupted by {signal.Signals(signum).name} at step ") and "results.json (status interrupted" in last
    results = load_results(tmp_path / "run" / "results.json")
    assert results["status"] == "interrupted" and any("loss" in row for row in results["history"])
    # The step was finished and checkpointed (resume.GracefulStop), and the line says how to go on from there.
    step = int(last.split(" at step ")[1].split(";")[0])
    checkpoint = tmp_path / "run" / f"checkpoint-{step}"
    assert results["final"]["checkpoint"] == str(checkpoint) and is_complete(str(checkpoint))
    assert last.endswith(f"resume with the same command and --resume_from_checkpoint {checkpoint}")
    if signum == signal.SIGTERM:  # resumed for two more steps, the history goes on where it stopped
        assert main(argv + ["--resume_from_checkpoint", "true", "--max_steps", str(step + 2)]) == 0
        resumed = load_results(tmp_path / "run" / "results.json")
        steps = [row["step"] for row in resumed["history"] if "loss" in row]
        assert resumed["status"] == "completed" and steps == list(range(1, step + 3))


def test_a_sigterm_before_the_run_starts_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """A SIGTERM during the seconds of imports and recipe parsing, before the run's own handling (the lock, the
    graceful stop): one line and exit 143, as later, not the default's silent death; nothing is written yet."""
    import grade_trl.run as run_module

    parse_recipe = run_module.parse_recipe

    def parse_then_terminated(argv):
        recipe = parse_recipe(argv)
        os.kill(os.getpid(), signal.SIGTERM)  # handled in this (the main) thread at its next bytecode
        time.sleep(5)
        return recipe

    class NotHandledByTheCommand(Exception):
        pass

    def outer(signum, frame):  # stands in for the default action, which would end pytest itself
        raise NotHandledByTheCommand()

    monkeypatch.setattr(run_module, "parse_recipe", parse_then_terminated)
    previous = signal.signal(signal.SIGTERM, outer)
    try:
        assert main(shrunk(tmp_path)) == 143
        assert signal.getsignal(signal.SIGTERM) is outer  # the caller's handler again afterwards
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted by SIGTERM"
    assert not (tmp_path / "run").exists()


def test_a_ctrl_c_while_the_runner_imports_its_libraries_is_one_line_and_exit_130(tmp_path):
    """Found by a journey audit: Ctrl-C in the first seconds of `python -m grade_trl.run` (transformers and TRL being
    imported) ended in an import traceback. The runner's first lines now handle SIGINT/SIGTERM. The signal goes 1 s
    after the start, once they have (the process catches SIGTERM, which Python alone does not), or at 1.5 s: seconds
    before the imports end (without the handling this test ends in the traceback)."""
    start = time.time()
    process = subprocess.Popen([sys.executable, "-m", "grade_trl.run", *shrunk(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    while time.time() < start + 1.5:  # SigCgt: the mask of caught signals; bit 15 - 1 is SIGTERM
        caught = next((line.split()[1] for line in open(f"/proc/{process.pid}/status") if line.startswith("SigCgt:")), "0")
        if int(caught, 16) >> (signal.SIGTERM - 1) & 1 and time.time() > start + 1.0:
            break
        time.sleep(0.01)
    assert process.poll() is None  # still importing
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "interrupted by SIGINT"
    assert not (tmp_path / "run").exists()


SLOW_CLI_IMPORT = """
import importlib.abc, runpy, sys, time
class SlowCli(importlib.abc.MetaPathFinder):  # the command's imports after its first lines, made to take 30 s
    def find_spec(self, name, path, target=None):
        if name == "grade_trl.cli":
            sys.meta_path.remove(self)
            time.sleep(30)
        return None
sys.meta_path.insert(0, SlowCli())
runpy.run_module(sys.argv[1], run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("command", ["run", "probe", "pretrain", "compare", "analysis", "doctor", "train_reward"])
def test_a_signal_while_any_command_imports_is_one_line(command):
    """Every `python -m grade_trl.<command>` handles Ctrl-C and SIGTERM before it imports its libraries (seconds for
    run, probe, pretrain, train_reward and analysis), so a signal then is one line and 128 + its number, not an import traceback.
    Deterministic: the command's import of grade_trl.cli (after its first lines) is held for 30 s, and the signal goes
    once the process catches SIGTERM (which Python alone does not) or at 10 s (without the handling: a traceback)."""
    process = subprocess.Popen([sys.executable, "-c", SLOW_CLI_IMPORT, f"grade_trl.{command}"], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 10
    while time.time() < deadline:  # SigCgt: the mask of caught signals; bit 15 - 1 is SIGTERM
        caught = next((line.split()[1] for line in open(f"/proc/{process.pid}/status") if line.startswith("SigCgt:")), "0")
        if int(caught, 16) >> (signal.SIGTERM - 1) & 1:
            break
        time.sleep(0.01)
    assert process.poll() is None  # still importing
    process.send_signal(signal.SIGTERM if command == "doctor" else signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    name, code = ("SIGTERM", 143) if command == "doctor" else ("SIGINT", 130)
    assert process.returncode == code and "Traceback" not in stderr, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == f"interrupted by {name}"


@pytest.mark.parametrize("when", ["training", "evaluation"])
def test_a_signal_at_an_evaluation_step_stops_there_and_the_resumed_run_equals_one_never_stopped(tmp_path, monkeypatch, when):
    """A SIGTERM during step 4's training (an evaluation step): the run saves checkpoint-4 without evaluating (a
    launcher kills 30 s after its signal), and the resumed run evaluates step 4 first, on the same weights. A SIGTERM
    during step 4's evaluation: the run stops at step 4, not after step 5. Either way the resumed run's history and
    weights equal a run never stopped."""
    from safetensors.torch import load_file

    from grade_trl.evaluation import EvaluationCallback

    from .test_resume import argv, comparable

    assert main(argv("length_grade_ste.yaml", tmp_path / "straight", eval_steps=2, save_steps=100)) == 0
    if when == "training":
        original = NonFiniteGuard.on_pre_optimizer_step

        def signal_in_step_4(self, args, state, control, **kwargs):
            if state.global_step == 3:  # step 4's update, before its end
                os.kill(os.getpid(), signal.SIGTERM)
            return original(self, args, state, control, **kwargs)

        monkeypatch.setattr(NonFiniteGuard, "on_pre_optimizer_step", signal_in_step_4)
    else:
        original = EvaluationCallback.evaluate

        def signal_in_evaluation_4(self, step):
            if step == 4:
                os.kill(os.getpid(), signal.SIGTERM)
            return original(self, step)

        monkeypatch.setattr(EvaluationCallback, "evaluate", signal_in_evaluation_4)
    stopped = tmp_path / "stopped"
    assert main(argv("length_grade_ste.yaml", stopped, eval_steps=2, save_steps=100)) == 143
    monkeypatch.undo()
    results = load_results(stopped / "results.json")
    assert results["status"] == "interrupted" and results["final"]["checkpoint"] == str(stopped / "checkpoint-4")
    evaluated = [row["step"] for row in results["history"] if "eval_reward" in row]
    assert evaluated == ([0, 2] if when == "training" else [0, 2, 4])

    assert main(argv("length_grade_ste.yaml", stopped, eval_steps=2, save_steps=100, resume_from_checkpoint="true")) == 0
    straight, resumed = load_results(tmp_path / "straight" / "results.json"), load_results(stopped / "results.json")
    assert comparable(resumed["history"]) == comparable(straight["history"])
    assert resumed["final"]["test"] == straight["final"]["test"] and resumed["final"]["best_validation_step"] == straight["final"]["best_validation_step"]
    a, b = load_file(str(tmp_path / "straight" / "model" / "model.safetensors")), load_file(str(stopped / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def nan_for_the_second(prompts, completions, **kwargs):
    return [0.5 if i != 1 else float("nan") for i in range(len(completions))]


def raises_on_the_third(prompts, completions, **kwargs):
    if len(completions) > 2:
        raise ZeroDivisionError("boom")
    return [0.0] * len(completions)


async def async_nan_for_the_second(prompts, completions, **kwargs):
    return nan_for_the_second(prompts, completions, **kwargs)


@pytest.mark.parametrize("func,message", [
    (nan_for_the_second, r"reward function 'nan_for_the_second' returned nan for sample 1; rewards must be finite numbers"),
    (raises_on_the_third, r"reward function 'raises_on_the_third' raised on the batch: ZeroDivisionError: boom"),
    # an async reward: TRL awaits our async wrapper (a review: it went to TRL unchecked, whose NaN is a warning)
    (async_nan_for_the_second, r"reward function 'async_nan_for_the_second' returned nan for sample 1; rewards must be finite numbers"),
])
def test_grpo_checks_rewards_as_reinforce_does(tmp_path, tokenizer, func, message):
    """Our GRPOTrainer wraps each plain reward callable: a NaN or an exception stops the run in one line (TRL alone
    warns about NaN and lets an exception out as a traceback)."""
    from grade_trl.rewards.base import RewardFunctionError
    from grade_trl.trainers.grpo import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, num_generations=4, max_completion_length=4,
                      use_cpu=True, bf16=False, report_to="none", disable_tqdm=True, save_strategy="no")
    from grade_trl.models import resolve_model_path

    trainer = GRPOTrainer(model=resolve_model_path("embedded"), reward_funcs=[func], args=args, train_dataset=Dataset.from_dict({"prompt": ["This movie was"] * 8}),
                          processing_class=tokenizer)
    assert trainer.reward_func_names == [func.__name__]  # the wrapper keeps the name TRL logs under
    with pytest.raises(RewardFunctionError, match=message):
        trainer.train()


class RaisingSoftReward(LengthReward):
    def score_soft(self, soft_tokens, attention_mask):
        raise RuntimeError("soft path broken")


def test_a_score_soft_that_raises_is_a_one_line_reward_error(tmp_path, tokenizer):
    from grade_trl.rewards.base import RewardFunctionError

    args = GumbelGRADEConfig(output_dir=str(tmp_path), max_new_tokens=4, min_new_tokens=4, use_cpu=True)
    trainer = GumbelGRADETrainer(model="embedded", reward_funcs=RaisingSoftReward(tokenizer.eos_token_id), args=args,
                                 train_dataset=Dataset.from_dict({"prompt": ["x"]}), processing_class=tokenizer)
    with pytest.raises(RewardFunctionError, match=r"^reward function 'length' raised in score_soft: RuntimeError: soft path broken$"):
        trainer.compute_loss(trainer.model, [{"prompt": "This movie was"}])


# A rank's ending. `cli.exit_process`'s docstring says why a run that completed could abort at exit (SIGABRT,
# "terminate called without an active exception") and what a core dump showed. This script makes that race likely:
# gloo collectives on tensors Python lets go of at once, so gloo's worker thread frees them while the interpreter is
# already finalising, with the group held past destroy_process_group as a run's modules hold theirs.
GLOO_EXIT_RACE = """
import atexit, sys, threading, time, torch, torch.distributed as dist
from grade_trl.cli import close_process_group, exit_process

def main():
    global group
    dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
    group = dist.group.WORLD  # alive until the interpreter's finalisation, as in a run
    for _ in range(50):
        dist.all_gather([torch.empty(1000)], torch.ones(1000), async_op=True)
    close_process_group()
    atexit.register(lambda: print("atexit handler ran"))
    if len(sys.argv) > 3:  # a thread that is not a daemon: waited for, as finalisation would (it also ends the race)
        threading.Thread(target=lambda: time.sleep(0.5) or print("thread done", end=" ")).start()
    print("body done", end=" ")  # unflushed: the ending must flush it
    return 3

exit_process(main) if sys.argv[2] == "exit_process" else sys.exit(main())
"""


def _gloo_exit_race(tmp_path, ending: str, runs: int, thread: bool = False) -> list[subprocess.CompletedProcess]:
    """`runs` processes of GLOO_EXIT_RACE at once, each ending with `ending` (exit_process or sys.exit)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = [ending] + (["thread"] if thread else [])
    procs = [subprocess.Popen([sys.executable, "-c", GLOO_EXIT_RACE, str(tmp_path / f"{ending}{thread}{k}.store"), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for k in range(runs)]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=120), *p.communicate()) for p in procs]


def test_exit_process_survives_collectives_freed_during_exit(tmp_path):
    """With `exit_process`, every run ends with the body's exit code, its output flushed, its non-daemon thread
    finished and then the atexit handlers run. With `sys.exit`, the same script aborts (exit -6) in some runs, which
    shows that the script does reproduce the abort that exit_process prevents: batches of 4 are run until one aborts.
    With the script importing only torch and grade_trl.cli (the package's top level loads nothing else), 6 of 48 runs
    aborted on an idle 2-core machine (13%; with transformers and TRL imported, 31-60%, at 3-4 times the cost a run);
    at 13% all of the at most 64 runs pass 1 time in 7,500."""
    for result in _gloo_exit_race(tmp_path, "exit_process", runs=3) + _gloo_exit_race(tmp_path, "exit_process", runs=1, thread=True):
        assert result.returncode == 3, result.stderr[-2000:]
        expected = "body done thread done atexit handler ran" if "thread" in result.args else "body done atexit handler ran"
        assert result.stdout.splitlines() == [expected] and "terminate called" not in result.stderr
    plain = []
    for _ in range(16):
        plain += _gloo_exit_race(tmp_path, "sys.exit", runs=4)
        if any(r.returncode == -signal.SIGABRT and "terminate called without an active exception" in r.stderr for r in plain):
            return
    pytest.fail(f"the script did not abort in {len(plain)} runs ending with sys.exit: {[(r.returncode, r.stderr[-300:]) for r in plain]}")


# `exit_process` in a rank (WORLD_SIZE=2, no group needed) and outside one ends as `sys.exit(main())` would, code for
# code: (body of main, exit code, text its stderr must hold). Each case runs in a child forked from one process that
# imported grade_trl once (3 s an import), with a ThreadPoolExecutor never shut down, as push_to_hub's uploads leave one.
EXIT_CASES = {
    "return 4": ("return 4", 4, ""),
    "return None": ("return None", 0, ""),
    "sys.exit()": ("sys.exit()", 0, ""),
    "sys.exit(5)": ("sys.exit(5)", 5, ""),
    "sys.exit(message)": ("sys.exit('bad thing')", 1, "bad thing"),
    "exception": ("raise ValueError('boom')", 1, "ValueError: boom"),
    "idle executor": ("pool.submit(int).result(); return 0", 0, ""),
}
EXIT_CASES_DRIVER = """
import concurrent.futures, json, os, sys, tempfile
from grade_trl.cli import exit_process
cases, results = json.loads(sys.argv[1]), {}
for world_size in ("1", "2"):
    for name, (body, _, _) in cases.items():
        err = tempfile.TemporaryFile(mode="w+")
        pid = os.fork()
        if pid == 0:
            os.dup2(err.fileno(), 2)
            os.environ["WORLD_SIZE"] = world_size
            pool = concurrent.futures.ThreadPoolExecutor(1)
            namespace = {"sys": sys, "pool": pool}
            exec("def main():\\n    " + body, namespace)
            exit_process(namespace["main"])
        status = os.waitpid(pid, 0)[1]
        err.seek(0)
        results[world_size + " " + name] = [os.waitstatus_to_exitcode(status), err.read()]
print(json.dumps(results))
"""


def test_exit_process_ends_with_the_code_sys_exit_would_give():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", EXIT_CASES_DRIVER, json.dumps(EXIT_CASES)], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    outcomes = json.loads(result.stdout.splitlines()[-1])
    assert len(outcomes) == 2 * len(EXIT_CASES)
    for key, (code, stderr) in outcomes.items():
        _, expected_code, expected_stderr = EXIT_CASES[key.split(" ", 1)[1]]
        assert code == expected_code and expected_stderr in stderr, (key, code, stderr[-1000:])


def test_a_reader_that_leaves_the_pipe_ends_a_command_without_a_traceback():
    """`python -m grade_trl.doctor RUN | head -2`: the reader closes the pipe; the command ends with 141 (128 + SIGPIPE)
    and no BrokenPipeError traceback, from the body or from the interpreter's last flush."""
    script = "from grade_trl.cli import run_safely\nimport sys\nsys.exit(run_safely(lambda: [print('line', i) for i in range(200_000)] and 0))\n"
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    assert process.stdout.readline() == b"line 0\n"
    process.stdout.close()
    code, err = process.wait(timeout=60), process.stderr.read().decode()
    assert code == 141 and "Traceback" not in err and "BrokenPipeError" not in err, err


def test_a_broken_pipe_that_is_not_stdout_is_an_error_like_any_other():
    from grade_trl.cli import run_safely

    def body():
        raise BrokenPipeError(32, "Broken pipe")  # a worker's or a socket's pipe, while stdout is fine

    with pytest.raises(BrokenPipeError):
        run_safely(body)


@pytest.mark.parametrize("max_grad_norm", [1e-7, 1.0, 0.0])
def test_a_max_grad_norm_that_freezes_adam_is_warned_about_and_does_freeze_it(max_grad_norm):
    """Found by a journey audit: `max_grad_norm: 1e-9` trained without a sign while the policy did not move. The warning's
    rule (the clipped gradient's RMS per parameter below adam_epsilon) is checked against what AdamW does: with the
    warned value 20 steps move the weights by under a tenth of what they move unclipped."""
    from types import SimpleNamespace

    def moved(norm):
        torch.manual_seed(0)
        model = torch.nn.Linear(1000, 100)  # 100,100 parameters: RMS bound 1e-7 / 316 = 3e-10 < 1e-8
        start = [p.detach().clone() for p in model.parameters()]
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-8, weight_decay=0.0)
        for _ in range(20):
            optimizer.zero_grad()
            model(torch.randn(8, 1000)).pow(2).mean().backward()
            if norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), norm)
            optimizer.step()
        return sum((p.detach() - s).abs().sum().item() for p, s in zip(model.parameters(), start))

    warning = clipping_freezes_adam(torch.nn.Linear(1000, 100), SimpleNamespace(max_grad_norm=max_grad_norm, optim="adamw_torch", adam_epsilon=1e-8))
    frozen = moved(max_grad_norm) < 0.1 * moved(0.0)
    assert (warning is not None) == frozen == (max_grad_norm == 1e-7), (warning, frozen)
    if warning:
        assert warning.startswith("max_grad_norm: 1e-07 clips the gradient of 100,100 trainable parameters") and "adam_epsilon 1e-08" in warning
    # Trainer's args hold an OptimizerNames enum: the message names its value
    from transformers.training_args import OptimizerNames

    enum_args = SimpleNamespace(max_grad_norm=1e-7, optim=OptimizerNames.ADAMW_TORCH_FUSED, adam_epsilon=1e-8)
    assert "adamw_torch_fused's updates" in clipping_freezes_adam(torch.nn.Linear(1000, 100), enum_args)
    # an optimizer without Adam's epsilon is not warned about
    assert clipping_freezes_adam(torch.nn.Linear(1000, 100), SimpleNamespace(max_grad_norm=1e-7, optim="sgd", adam_epsilon=1e-8)) is None


SIGNAL_TO_SELF = """
import os, signal, sys
from grade_trl.cli import run_safely

def body():
    os.kill(os.getpid(), signal.SIGTERM)
    import time
    time.sleep(5)
    return 0

sys.exit(run_safely(body))
"""


@pytest.mark.parametrize("launcher", [{}, {"RANK": "1"}, {"RANK": "0", "TORCHELASTIC_RUN_ID": "none"}])
def test_a_signal_during_set_up_is_one_line_alone_and_quiet_under_a_launcher(launcher):
    """Found by a journey audit: under `accelerate launch --num_processes 2`, a bad key stopped one rank in one line and
    torchrun then sent the other SIGTERM, which printed `interrupted by SIGTERM` (and at times, raised inside a
    finaliser, "Exception ignored in: <function Group.__del__ ...>" with a traceback). A command on its own says it
    was interrupted; a launcher's process ends at once and quietly (torchrun reports it)."""
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "TORCHELASTIC_RUN_ID")}
    result = subprocess.run([sys.executable, "-c", SIGNAL_TO_SELF], capture_output=True, text=True, env={**env, "PYTHONPATH": str(REPO), **launcher}, timeout=60)
    assert result.returncode == 143, result.stderr
    assert result.stderr.strip() == ("" if launcher else "interrupted by SIGTERM"), result.stderr


def test_bad_input_under_a_two_process_launch_is_the_one_line_error(tmp_path):
    """The same journey, end to end: the error line, and from the other rank neither `interrupted by` nor a traceback
    of ours (the launcher's own report of the failed rank follows, as the README says)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--config_file", str(REPO / "accelerate_configs" / "cpu.yaml"),
           "-m", "grade_trl.run", str(REPO / "recipes" / "tiny" / "length_reinforce.yaml"), "--max_steps", "abc", "--output_dir", str(tmp_path / "run")]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode != 0 and "error: max_steps: expected an integer, got 'abc'" in result.stderr, result.stderr[-3000:]
    assert "interrupted by" not in result.stderr and "Exception ignored" not in result.stderr and "grade_trl/errors.py" not in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "run").exists()
