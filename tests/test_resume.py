"""Exact resume: a run killed with SIGKILL after a checkpoint and resumed ends where a run never stopped ends.

For each method the same shrunk length recipe runs three times: uninterrupted (in this process); as a subprocess
killed with SIGKILL as soon as its checkpoint is complete; then resumed from that checkpoint (in this process).
The resumed run's weights must equal the uninterrupted run's bitwise, and its history (every logged loss, reward,
KL, grad norm and evaluation; not the wall-clock columns) and final test must be the same numbers.
"""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from grade_trl.resume import is_complete, resolve_checkpoint
from grade_trl.errors import UserError
from grade_trl.run import main

from .conftest import REPO, write_intact

RECIPES = REPO / "recipes" / "tiny"
CLOCK_KEYS = {"eval_wall_seconds", "eval_train_seconds", "step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second",
              "total_flos", "train_loss"}  # train_loss: Trainer's mean over this process's steps only


def argv(recipe: str, output_dir, **extra) -> list[str]:
    trl_method = "grpo" in recipe
    overrides = {
        "output_dir": output_dir,
        "max_steps": 8,
        "save_strategy": "steps",
        "save_steps": 5,
        "eval_steps": 2,
        "logging_steps": 2,
        "eval_num_prompts": 4,
        "test_num_prompts": 4,
        "eval_best_of_n": 1,
        "policy_split_size": 16,
        "validation_split_size": 8,
        "disable_tqdm": "true",
        **({"max_completion_length": 6, "per_device_train_batch_size": 4, "num_generations": 2} if trl_method else {"max_new_tokens": 6, "min_new_tokens": 2, "per_device_train_batch_size": 4}),
        **extra,
    }
    return [str(RECIPES / recipe)] + [item for key, value in overrides.items() for item in (f"--{key}", str(value))]


def comparable(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in CLOCK_KEYS} for row in history]


def kill_after_checkpoint(args: list[str], checkpoint) -> None:
    """Start the run as a subprocess and SIGKILL it the moment `checkpoint` is complete."""
    process = subprocess.Popen([sys.executable, "-m", "grade_trl.run", *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not is_complete(str(checkpoint)) and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {stderr[-2000:]}"


@pytest.mark.parametrize("recipe,extra", [
    ("length_grade_ste.yaml", {}),
    ("length_reinforce.yaml", {"baseline": "ema"}),  # the EMA baseline is state a resume must restore
    ("length_ppo.yaml", {"num_mini_batches": 4}),  # step 5 is inside a rollout's block of 4 mini-batch steps, in the 2nd pass over the prompts
    ("length_grpo.yaml", {}),
])
def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_weights_and_history(tmp_path, recipe, extra):
    if recipe == "length_ppo.yaml":
        extra = {**extra, "policy_split_size": 4}  # one rollout (4 steps) per pass: step 5 is in the second pass
    assert main(argv(recipe, tmp_path / "straight", **extra)) == 0
    killed = tmp_path / "killed"
    kill_after_checkpoint(argv(recipe, killed, **extra), killed / "checkpoint-5")
    assert not (killed / "checkpoint-8").exists()
    # what the killed run left: its last results.json snapshot, status running, with the history up to then (a log at
    # most once a minute, and each checkpoint): before snapshots a SIGKILLed run left no results.json at all
    snapshot = json.loads((killed / "results.json").read_text())
    assert snapshot["status"] == "running" and snapshot["history"] and max(row["step"] for row in snapshot["history"]) <= 5
    assert any("eval_reward" in row for row in snapshot["history"]) and snapshot["final"]["steps"] <= 5

    assert main(argv(recipe, killed, resume_from_checkpoint="true", **extra)) == 0
    straight = json.loads((tmp_path / "straight" / "results.json").read_text())
    resumed = json.loads((killed / "results.json").read_text())
    assert resumed["status"] == "completed" and resumed["final"]["resumed_from"] == str(killed / "checkpoint-5")
    assert comparable(resumed["history"]) == comparable(straight["history"])
    for key in ("validation_before", "validation_after", "best_validation", "best_validation_step", "kl", "steps"):
        assert resumed["final"][key] == straight["final"][key], key
    assert resumed["final"]["test"] == straight["final"]["test"]
    a, b = load_file(str(tmp_path / "straight" / "model" / "model.safetensors")), load_file(str(killed / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_from_checkpoint_errors_name_the_key(tmp_path):
    with pytest.raises(UserError, match=r"^resume_from_checkpoint: no complete checkpoint-N folder in output_dir"):
        resolve_checkpoint(True, str(tmp_path))
    (tmp_path / "checkpoint-3").mkdir()  # a run killed while saving leaves its checkpoint incomplete
    with pytest.raises(UserError, match=r"not a complete grade_trl checkpoint"):
        resolve_checkpoint(str(tmp_path / "checkpoint-3"), str(tmp_path))
    with pytest.raises(UserError, match=r"^resume_from_checkpoint: no such folder"):
        resolve_checkpoint(str(tmp_path / "checkpoint-9"), str(tmp_path))
    assert resolve_checkpoint(None, str(tmp_path)) is None and resolve_checkpoint(False, str(tmp_path)) is None


def test_resume_with_nothing_to_resume_from_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(argv("length_reinforce.yaml", out, resume_from_checkpoint="true")) == 2
    assert capsys.readouterr().err.strip().startswith("error: resume_from_checkpoint: no complete checkpoint-N folder")
    assert not out.exists()


CHECKPOINT_FILES = ("config.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin",
                    "grade_trl_state_rank0.pt")  # what a one-process checkpoint of ours holds


def test_a_damaged_checkpoint_is_refused_in_one_line_before_anything_is_written(tmp_path, capsys):
    """Found by a bad-input trial (2026-12-07): a checkpoint with a file cut short (a full disk, a copy in part) passed
    the check for its files, then failed inside Trainer's load with a traceback, after the run had rewritten the
    finished run's results.json as `failed` with a shorter history. Each kind of file is read back now: the resume is
    refused in one line naming the file, exit 2, results.json as it was; `true` skips such a checkpoint with a warning,
    as one killed while saving."""
    out = tmp_path / "run"
    assert main(argv("length_reinforce.yaml", out, max_steps=4, save_steps=2)) == 0
    before = (out / "results.json").read_text()
    capsys.readouterr()
    for name, cut in (("optimizer.pt", 100), ("grade_trl_state_rank0.pt", 10), ("model.safetensors", 1000), ("trainer_state.json", 20), ("rng_state.pth", 0)):
        damaged = out / "checkpoint-4" / name
        intact = damaged.read_bytes()
        damaged.write_bytes(intact[:cut])
        assert main(argv("length_reinforce.yaml", out, max_steps=6, save_steps=2, resume_from_checkpoint=str(out / "checkpoint-4"))) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: resume_from_checkpoint: {str(out / 'checkpoint-4')!r} is not a complete grade_trl checkpoint "
                                                   f"(missing: an intact {name} ("), err
        assert (out / "results.json").read_text() == before
        # true: the damaged checkpoint-4 is skipped; checkpoint-2 lies behind the completed run's step 4, which is refused
        assert main(argv("length_reinforce.yaml", out, max_steps=6, save_steps=2, resume_from_checkpoint="true")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: resume_from_checkpoint: the run in output_dir") and "its latest complete checkpoint is checkpoint-2" in err[-1], err
        assert (out / "results.json").read_text() == before
        damaged.write_bytes(intact)
    assert main(argv("length_reinforce.yaml", out, max_steps=6, save_steps=2, resume_from_checkpoint="true")) == 0  # intact again: it resumes


def test_a_checkpoint_overwritten_in_place_is_named_not_the_learning_rate(tmp_path, capsys):
    """Found by a fresh-clone trial (2026-12-07): a weights file overwritten in place keeps its size and header, which is
    all the resume's checks read; the first step after the resume then found the logits not finite and said "lower
    learning_rate", which no update of this run could have caused. Now it names the checkpoint (exit 2, results.json
    `failed`). A NaN written over the final norm's weight, which every forward reads."""
    out = tmp_path / "run"
    assert main(argv("length_reinforce.yaml", out, max_steps=2, save_steps=1)) == 0
    weights = out / "checkpoint-2" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    header_size = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8:8 + header_size])["transformer.ln_f.weight"]["data_offsets"]
    data[8 + header_size + start:8 + header_size + end] = b"\xff" * (end - start)  # float32 0xffffffff: NaN
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(argv("length_reinforce.yaml", out, max_steps=3, save_steps=1, resume_from_checkpoint="true")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: step 3: the policy's logits are not finite at the first step after resuming from {out / 'checkpoint-2'}, "
                              "before any update of this run: its weights file is damaged or was saved not finite; resume from an earlier checkpoint"), err
    assert json.loads((out / "results.json").read_text())["status"] == "failed"


def test_damage_reads_what_a_checkpoint_holds_and_passes_what_it_cannot_judge(tmp_path):
    """resume.damage against files written by the libraries themselves: intact ones pass, each cut short is named; a
    torch file in torch.save's legacy (non-zip) format and a hidden file a macOS copy leaves (`._model.safetensors`)
    pass (the second made a good checkpoint refused; an audit, 2026-12-07)."""
    from safetensors.torch import save_file

    from grade_trl.resume import damage

    torch.save({"step": 3}, tmp_path / "optimizer.pt")
    torch.save({"step": 3}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    save_file({"w": torch.ones(3)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "trainer_state.json").write_text('{"global_step": 3}')
    (tmp_path / "._model.safetensors").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    for name in ("optimizer.pt", "legacy.pt", "model.safetensors", "trainer_state.json", "._model.safetensors"):
        assert damage(str(tmp_path / name)) is None, name
    for name in ("optimizer.pt", "model.safetensors", "trainer_state.json"):
        whole = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(whole[: len(whole) // 2])
        assert damage(str(tmp_path / name)), name


def test_true_does_not_go_back_behind_a_completed_run(tmp_path):
    """Found by a journey audit: a run stopped at step 3 (its signal saved checkpoint-3), resumed and completed at step 8
    without a checkpoint there (save_strategy no); extended with --max_steps 10 --resume_from_checkpoint true it went
    back to checkpoint-3 without a word, trained steps 4-8 again and replaced the finished history. Now one line;
    the path, given on purpose, still resumes."""
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    for name in CHECKPOINT_FILES:
        write_intact(folder / name)
    (tmp_path / "results.json").write_text(json.dumps({"status": "completed", "config": {}, "history": [], "final": {"steps": 8}}))
    with pytest.raises(UserError, match=r"^resume_from_checkpoint: the run in output_dir .* completed at step 8 \(results.json\), but its latest complete "
                                        r"checkpoint is checkpoint-3: resuming would train steps 4-8 again"):
        resolve_checkpoint(True, str(tmp_path))
    assert resolve_checkpoint(str(folder), str(tmp_path)) == str(folder)
    (tmp_path / "results.json").write_text(json.dumps({"status": "interrupted", "config": {}, "history": [], "final": {"steps": 3}}))
    assert resolve_checkpoint(True, str(tmp_path)) == str(folder)  # the usual resume after a signal


def test_the_latest_complete_checkpoint_is_chosen(tmp_path):
    # 7: killed while saving (no state file, written last); 9: copied in part (its optimizer state and weights missing:
    # Trainer would start AdamW afresh without a word, and fail with a traceback without the weights)
    for step, missing in ((3, ()), (5, ()), (7, ("grade_trl_state_rank0.pt",)), (9, ("optimizer.pt", "model.safetensors"))):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        for name in CHECKPOINT_FILES:
            if name not in missing:
                write_intact(folder / name)
    assert resolve_checkpoint("true", str(tmp_path)) == os.path.join(str(tmp_path), "checkpoint-5")
    with pytest.raises(UserError, match=r"^resume_from_checkpoint: .*checkpoint-9' is not a complete grade_trl checkpoint \(missing: the weights "
                                        r"\(model.safetensors\), the optimizer state \(optimizer.pt\)\)"):
        resolve_checkpoint(str(tmp_path / "checkpoint-9"), str(tmp_path))
    assert resolve_checkpoint(str(tmp_path / "checkpoint-3"), str(tmp_path)) == str(tmp_path / "checkpoint-3")
    only_model = tmp_path / "checkpoint-11"  # what save_only_model: true writes
    only_model.mkdir()
    for name in ("config.json", "model.safetensors", "trainer_state.json", "grade_trl_state_rank0.pt"):
        write_intact(only_model / name)
    with pytest.raises(UserError, match=r"\(missing: the optimizer state \(optimizer.pt\), scheduler.pt, the random generators' state \(rng_state.pth\), as a run with save_only_model: true saves it\)"):
        resolve_checkpoint(str(only_model), str(tmp_path))


def test_a_resume_does_not_warn_of_a_missing_head_tied_to_the_embedding():
    """Trainer warns "There were missing keys in the checkpoint model loaded: ['lm_head.weight']" at every resume of a
    GPT-2 (its head is the embedding, saved once); our trainers drop that key only where it is tied to a loaded one."""
    from torch.nn.modules.module import _IncompatibleKeys

    from grade_trl.models import load_causal_lm
    from grade_trl.trainers.base import TiedWeightsLoadMixin, tied_to_loaded

    class Recorded:
        def _issue_warnings_after_load(self, load_result):
            self.warned = list(load_result.missing_keys)

    class Trainer(TiedWeightsLoadMixin, Recorded):
        def __init__(self, model):
            self.model = model

    tied = load_causal_lm("embedded")
    assert tied_to_loaded(tied, ["lm_head.weight"]) and not tied_to_loaded(tied, ["lm_head.weight", "transformer.wte.weight"])
    assert not tied_to_loaded(tied, ["transformer.h.0.ln_1.weight"])  # missing and tied to nothing
    trainer = Trainer(tied)
    trainer._issue_warnings_after_load(_IncompatibleKeys(["lm_head.weight"], []))
    assert trainer.warned == []
    trainer._issue_warnings_after_load(_IncompatibleKeys(["lm_head.weight", "transformer.h.0.ln_1.weight"], []))
    assert trainer.warned == ["lm_head.weight", "transformer.h.0.ln_1.weight"]  # a real loss still warns, in full
    untied = load_causal_lm("embedded", tie_word_embeddings=False)
    assert untied.lm_head.weight is not untied.transformer.wte.weight and not tied_to_loaded(untied, ["lm_head.weight"])
    # PPO loads its wrapper's policy: the keys are the policy's, the trainer's model the wrapper (a journey audit saw the
    # warning at every PPO resume)
    wrapper = torch.nn.ModuleDict({"policy": tied, "value_head": torch.nn.Linear(2, 1)})
    assert tied_to_loaded(wrapper, ["lm_head.weight"]) and not tied_to_loaded(wrapper, ["lm_head.weight", "transformer.wte.weight"])
    assert not tied_to_loaded(wrapper, ["transformer.h.0.ln_1.weight"])


def test_a_new_run_over_an_earlier_runs_checkpoints_is_refused_unless_it_starts_over(tmp_path, capsys, caplog):
    """A new run's checkpoints among an earlier run's would make `--resume_from_checkpoint true` pick the earlier
    run's last one: such a run is refused (nothing written) unless --overwrite_output_dir true, which deletes them once
    the set-up has checked the input. An earlier run's model/ and best_model/ go with its results.json either way."""
    out = tmp_path / "run"
    assert main(argv("length_reinforce.yaml", out, max_steps=3, save_steps=2)) == 0  # checkpoint-2, checkpoint-3 (the last step), model/
    before = (out / "results.json").read_text()
    # compare resumes a run it started only while that run is not completed (an edited recipe file reruns it from scratch)
    from grade_trl.compare import RUN_INFO, resumable_checkpoint

    (out / RUN_INFO).write_text(json.dumps({"command": "the command"}))
    assert resumable_checkpoint(out, "the command") is None
    (out / "results.json").write_text(before.replace('"status": "completed"', '"status": "interrupted"'))
    assert resumable_checkpoint(out, "the command") == str(out / "checkpoint-3")
    (out / "results.json").write_text(before)
    assert main(argv("length_reinforce.yaml", out, max_steps=2)) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: output_dir: {str(out)!r} holds an earlier run's checkpoint-3 and 1 more; resume it with --resume_from_checkpoint true, start over with "
        "--overwrite_output_dir true (deletes them), or give another output_dir")
    assert (out / "results.json").read_text() == before and (out / "checkpoint-3").is_dir()
    assert main(argv("length_reinforce.yaml", out, max_steps=2, save_strategy="no", overwrite_output_dir="true")) == 0
    assert not (out / "checkpoint-3").exists() and json.loads((out / "results.json").read_text())["final"]["steps"] == 2
    # no checkpoints: the earlier run's model/ is replaced with its results.json, even when the new run fails, and a
    # warning says so (it was an info line: a finished run was replaced without a word, a journey audit)
    (out / "model" / "earlier.txt").write_text("from the earlier run")
    # diverged weights: one line, exit 2, after results.json (before 2026-12-06 torch's traceback)
    with caplog.at_level(logging.WARNING, logger="grade_trl"):
        assert main(argv("length_reinforce.yaml", out, max_steps=2, save_strategy="no", learning_rate=1e30)) == 2
    assert f"starting over in {out}: this run replaces the earlier run's results.json (status completed) and deleted its model, best_model" in caplog.text
    failed = json.loads((out / "results.json").read_text())
    assert failed["status"] == "failed" and "the policy's logits are not finite" in failed["error"] and not (out / "model").exists()
    # a fork (another folder's checkpoint) into it is a new run there too: refused over checkpoints, clears an earlier model/
    source = tmp_path / "source"
    assert main(argv("length_reinforce.yaml", source, max_steps=2, save_steps=1)) == 0
    (out / "model").mkdir()
    (out / "model" / "earlier.txt").write_text("from the earlier run")
    assert main(argv("length_reinforce.yaml", out, max_steps=2, save_strategy="no", resume_from_checkpoint=str(source / "checkpoint-1"))) == 0
    assert not (out / "model" / "earlier.txt").exists() and json.loads((out / "results.json").read_text())["status"] == "completed"


def test_a_finished_run_extended_follows_the_new_schedule_and_one_with_nothing_left_is_refused(tmp_path, capsys, caplog):
    """Found by a GSM8K journey audit: a 2-step run resumed with max_steps 3 trained its third step at learning rate 0
    (Trainer restores the optimizer's rate, which the old linear schedule had ended at 0, before the scheduler holding the
    new max_steps takes over), and one resumed with max_steps at or below its checkpoint's step trained a step past it."""
    out = tmp_path / "run"
    short = dict(save_steps=1, logging_steps=1, eval_steps=100, lr_scheduler_type="linear")
    assert main(argv("length_reinforce.yaml", out, max_steps=2, **short)) == 0
    before = (out / "results.json").read_text()
    assert main(argv("length_reinforce.yaml", out, max_steps=2, resume_from_checkpoint="true", **short)) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == ("error: max_steps: 2 leaves nothing to train after checkpoint-2, which is at step 2; give "
                                                                 "max_steps above 2, or evaluate that checkpoint's model instead")
    assert (out / "results.json").read_text() == before and not (out / "checkpoint-3").exists()
    with caplog.at_level("WARNING", logger="grade_trl.resume"):
        assert main(argv("length_reinforce.yaml", out, max_steps=4, resume_from_checkpoint="true", eval_num_prompts=2, **short)) == 0
    rates = [h["learning_rate"] for h in json.loads((out / "results.json").read_text())["history"] if "loss" in h]
    # linear decay: step k trains at 1e-4 (N - k + 1) / N, with N = 2 for the first run's steps and N = 4 from step 3 on (was 0.0 at step 3)
    assert rates == pytest.approx([1e-4, 5e-5, 5e-5, 2.5e-5], rel=1e-6), rates
    assert not torch.equal(load_file(out / "checkpoint-2" / "model.safetensors")["transformer.h.0.attn.c_attn.weight"],
                           load_file(out / "checkpoint-3" / "model.safetensors")["transformer.h.0.attn.c_attn.weight"])
    assert "resume: max_steps 4, where the run that saved checkpoint-2 had 2: the learning-rate schedule is the new one from here on (the next step trains at 5e-05" in caplog.text
    assert "resume: eval_num_prompts differs from the run that saved checkpoint-2 (eval_num_prompts 4 -> 2)" in caplog.text


def test_a_run_resumed_with_a_new_learning_rate_trains_at_it(tmp_path, caplog):
    """Trainer restores the scheduler's base rate from the checkpoint: a run resumed with another learning_rate kept
    training at the old one (only the warning named the change). Constant schedule: the resumed steps train at the new rate."""
    out = tmp_path / "run"
    short = dict(save_steps=1, logging_steps=1, eval_steps=100, lr_scheduler_type="constant", eval_num_prompts=2)
    assert main(argv("length_reinforce.yaml", out, max_steps=2, learning_rate=1e-4, **short)) == 0
    with caplog.at_level("WARNING", logger="grade_trl.resume"):
        assert main(argv("length_reinforce.yaml", out, max_steps=4, learning_rate=3e-4, resume_from_checkpoint="true", **short)) == 0
    rates = [h["learning_rate"] for h in json.loads((out / "results.json").read_text())["history"] if "loss" in h]
    assert rates == pytest.approx([1e-4, 1e-4, 3e-4, 3e-4], rel=1e-6), rates
    assert ("resume: max_steps 4, where the run that saved checkpoint-2 had 2; learning_rate 0.0003, where the run that saved checkpoint-2 had "
            "0.0001: the learning-rate schedule is the new one from here on (the next step trains at 0.0003") in caplog.text


def test_a_refused_resume_writes_nothing_and_names_the_setting(tmp_path, capsys):
    """Found by a journey audit: a resume refused for its process count came after the set-up (reward head, judge) and
    rewrote the folder's results.json as `failed`, losing a completed run's test; a resume under another method was only
    warned about, then failed in the optimizer's load with a traceback on every process. Both are refused while the
    recipe is read now, in one line, exit 2, with results.json as it was."""
    out = tmp_path / "run"
    assert main(argv("length_reinforce.yaml", out, max_steps=2, save_steps=1)) == 0
    before = (out / "results.json").read_text()
    capsys.readouterr()
    assert main(argv("length_ppo.yaml", out, max_steps=3, save_steps=1, resume_from_checkpoint="true", num_mini_batches=1)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: method: 'ppo', but checkpoint-2 continues a 'reinforce' run"), err
    # read from the checkpoint itself, not from the folder's results.json (another run's, after a start-over that was killed);
    # the LoRA keys only where a run trains adapters (a review)
    from grade_trl.resume import check_resumed_settings

    (out / "results.json").write_text(before.replace('"method": "reinforce"', '"method": "grade_ste"'))
    run_args = {"method": "reinforce", "use_peft": False, "lora_r": 8, "lora_target_modules": None}
    check_resumed_settings(str(out / "checkpoint-2"), 3, {}, run_args)  # a lora_r without LoRA: no refusal
    with pytest.raises(UserError, match=r"^use_peft: True, but checkpoint-2 was saved by a run with use_peft False, which trains other parameters"):
        check_resumed_settings(str(out / "checkpoint-2"), 3, {}, {**run_args, "use_peft": True})
    (out / "results.json").write_text(before)
    shutil.copy(out / "checkpoint-2" / "grade_trl_state_rank0.pt", out / "checkpoint-2" / "grade_trl_state_rank1.pt")  # as 2 processes save it
    assert main(argv("length_reinforce.yaml", out, max_steps=3, save_steps=1, resume_from_checkpoint="true")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: resume_from_checkpoint: {str(out / 'checkpoint-2')!r} was saved by 2 processes, this run has 1; resume with as many "
                   "processes as the run that saved it"], err
    assert (out / "results.json").read_text() == before
