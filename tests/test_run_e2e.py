"""End-to-end runs of the recipe runner on the embedded model, shrunk to seconds.

Shrunk settings (each is the quickstart's value cut down so a run takes seconds on 2 cores):
4 optimizer steps, 8 new tokens, 60-200 reviews per split, 6 evaluation prompts, 2 head epochs.
"""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grade_trl.models import resolve_model_path
from grade_trl.rewards.sentiment import SentimentReward
from grade_trl.run import main

from .conftest import REPO

QUICKSTART = str(REPO / "recipes" / "quickstart.yaml")


def shared_reward_head() -> Path:
    """The sentiment reward head of every `shrunk` run that names none: trained by the first such run on this pytest
    worker (about 5 s), reused by the others (the runner reuses any head trained on the backbone). One per xdist
    worker, so that two workers never train into one folder at once; in the session's cache folder (conftest.py).
    Until 2026-12-07 each test trained its own in its tmp_path, 20-odd times a suite."""
    return Path(os.environ["GRADE_TRL_CACHE"]) / f"reward_model_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"


def shrunk(tmp_path, name="run", recipe=QUICKSTART, **extra):
    trl_method = "grpo" in recipe or "cispo" in recipe
    lengths = {"max_completion_length": 8} if trl_method else {"max_new_tokens": 8, "min_new_tokens": 2}
    overrides = {
        "output_dir": tmp_path / name,
        "reward_model_path": shared_reward_head(),
        "max_steps": 4,
        "eval_steps": 2,
        "logging_steps": 2,
        "eval_num_prompts": 6,
        "test_num_prompts": 6,
        "reward_split_size": 200,
        "policy_split_size": 100,
        "validation_split_size": 60,
        "reward_epochs": 2,
        "disable_tqdm": "true",
        **lengths,
        **extra,
    }
    return [recipe] + [item for key, value in overrides.items() for item in (f"--{key}", str(value))]


def load_results(path):
    with open(path) as f:
        return json.load(f)


def test_quickstart_end_to_end_is_reproducible_and_changes_the_policy(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="grade_trl")
    assert main(shrunk(tmp_path, "a", reward_model_path=tmp_path / "reward_model")) == 0  # a head of its own: its training's log line
    # the long silent phases say what they do, and how much of it
    for line in ("sentiment reward head: backbone features of 200 + 60 held-out reviews (up to 128 tokens), then 2 epochs ...",
                 "validation at step 0: 6 prompts x 4 samples (best-of-4), scored by the reward and the gold judge ...",
                 "validation at step 4: 6 prompts", "test of the final checkpoint: 6 prompts x 4 samples"):
        assert line in caplog.text, line
    results = load_results(tmp_path / "a" / "results.json")
    assert results["status"] == "completed" and set(results) >= {"config", "history", "final"}
    train_logs = [h for h in results["history"] if "kl" in h]
    assert [h["step"] for h in train_logs] == [2, 4]
    for h in train_logs:
        assert h["kl"] >= 0 and {"reward", "reward_std", "loss", "tau", "grad_norm", "grad_norm_mean", "grad_norm_std", "completions/mean_length", "entropy"} <= set(h)
    assert [h["step"] for h in results["history"] if "eval_reward" in h] == [0, 2, 4]
    final = results["final"]
    assert final["steps"] == 4 and len(final["test"]["final"]["rewards"]) == 6 and len(final["samples"]) == 3
    assert 0 <= final["validation_after"]["reward"] <= 1 and final["validation_metric"] == "eval_reward"
    assert not {"val_reward_before", "val_reward_after", "best_val_reward", "test_reward"} & set(final)  # no legacy aliases
    assert results["config"]["run"]["method"] == "grade_ste" and results["config"]["trainer"]["estimator"] == "ste"
    # what the evaluation generated with (a comparison warns where methods differ: analysis.generation_lines)
    assert final["task"]["evaluation_generation"] == {"max_new_tokens": 8, "min_new_tokens": 2, "temperature": 1.0, "top_p": 0.9}

    trained = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    base = load_file(os.path.join(resolve_model_path("embedded"), "model.safetensors"))
    key = "transformer.h.0.attn.c_attn.weight"
    assert not torch.allclose(trained[key].float(), base[key].float())

    # Same seed, reward head reused from the first run: the same numbers.
    assert main(shrunk(tmp_path, "b", reward_model_path=tmp_path / "reward_model")) == 0
    again = load_results(tmp_path / "b" / "results.json")
    assert [h.get("loss") for h in again["history"]] == [h.get("loss") for h in results["history"]]
    assert again["final"]["test"]["final"]["rewards"] == final["test"]["final"]["rewards"]


def test_gumbel_softmax_method_with_lora_runs(tmp_path):
    assert main(shrunk(tmp_path, method="grade", use_peft="true", max_steps=2)) == 0
    results = load_results(tmp_path / "run" / "results.json")
    assert results["config"]["trainer"]["estimator"] == "soft"
    assert all(h["kl"] >= 0 for h in results["history"] if "kl" in h)
    assert (tmp_path / "run" / "model" / "adapter_model.safetensors").exists()
    for folder in ("model", "best_model"):  # the base named portably, as the recipe names it (not this machine's path)
        assert load_results(tmp_path / "run" / folder / "adapter_config.json")["base_model_name_or_path"] == "embedded"
        card = (tmp_path / "run" / folder / "README.md").read_text()  # PEFT's model card: no absolute path of this machine
        assert "base_model: embedded" in card and "assets" not in card, card[:300]


@pytest.mark.parametrize("recipe", ["length_reinforce.yaml", "length_grpo.yaml"])
def test_the_steps_after_the_last_log_are_logged_at_the_end(tmp_path, capsys, recwarn, recipe):
    """logging_steps above max_steps (a quick trial of a full recipe): Trainer logged no training row at all, so the
    history had no reward, KL or loss and the summary's KL was "-". The last steps are one row at max_steps, for our
    trainers' windows and TRL's GRPO alike (a run whose max_steps logging_steps divides gets no extra row: the
    quickstart test's [2, 4])."""
    assert main(shrunk(tmp_path, recipe=str(REPO / "recipes" / "tiny" / recipe), max_steps=2, logging_steps=10, eval_steps=100, eval_num_prompts=2,
                       test_num_prompts=2)) == 0
    rows = [h for h in load_results(tmp_path / "run" / "results.json")["history"] if "loss" in h]
    assert [h["step"] for h in rows] == [2] and all("reward" in h and "kl" in h for h in rows), rows
    kl_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("KL to reference (last log)"))
    assert kl_line.split()[-1] != "-", kl_line
    # transformers' FutureWarnings for the gradient_checkpointing methods TRL's GRPO calls (6 lines a step) are off
    assert not [w for w in recwarn if "gradient_checkpointing" in str(w.message)], [str(w.message) for w in recwarn]


def test_reward_returning_nan_stops_the_run_after_saving_history(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    original = SentimentReward.score_soft

    def nan_on_third_step(self, soft_tokens, attention_mask):
        calls["n"] += 1
        scores = original(self, soft_tokens, attention_mask)
        return scores if calls["n"] < 3 else scores.index_fill(0, torch.tensor([1]), float("nan"))

    monkeypatch.setattr(SentimentReward, "score_soft", nan_on_third_step)
    # recompute off: score_soft is then called once per step (recomputation would call it again in backward)
    assert main(shrunk(tmp_path, logging_steps=1, recompute_reference_and_reward="false")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: reward function 'sentiment' returned nan from score_soft for sample 1; rewards must be finite numbers"]
    results = load_results(tmp_path / "run" / "results.json")
    assert results["status"] == "failed" and "sample 1" in results["error"]
    assert [h["step"] for h in results["history"] if "kl" in h] == [1, 2]
    # what is known of `final` when a run fails: the steps it made, its minutes, the guard's skips and the doctor's findings
    assert results["final"]["steps"] == 2 and results["final"]["train_minutes"] > 0
    assert results["final"]["nonfinite_skipped_steps"] == [] and isinstance(results["final"]["doctor"], list)


def test_a_run_failing_in_a_steps_validation_keeps_that_steps_training_window(tmp_path, monkeypatch, capsys):
    """Trainer evaluates (our callback's on_step_end) before it logs the step's training row: a reward raising in step
    2's validation lost the metrics of steps 1-2 (logging_steps 2). results.json's final keeps that window's means."""
    from grade_trl.rewards import LengthReward

    original = LengthReward.__call__

    def raises_in_the_second_validation(self, prompts, completions, **kwargs):
        state = kwargs.get("trainer_state")
        if state is not None and state.global_step == 2:  # GRADE trains through score_soft: only validation calls this
            raise RuntimeError("the judge went away")
        return original(self, prompts, completions, **kwargs)

    monkeypatch.setattr(LengthReward, "__call__", raises_in_the_second_validation)
    assert main(shrunk(tmp_path, recipe=str(REPO / "recipes" / "tiny" / "length_grade_ste.yaml"))) == 2
    assert "the judge went away" in capsys.readouterr().err
    results = load_results(tmp_path / "run" / "results.json")
    assert results["status"] == "failed" and not [h for h in results["history"] if "loss" in h]
    window = results["final"]["unlogged_training_window"]
    assert window["first_step"] == 1 and window["last_step"] == 2 and {"reward", "kl", "entropy"} <= set(window), window
    assert all(isinstance(v, (int, float)) for v in window.values())


def test_two_machines_of_one_cpu_process_each_with_a_static_rendezvous(tmp_path):
    """The README's multi-node launch (`--num_machines 2 --machine_rank R --main_process_ip --main_process_port
    --rdzv_backend static`) of the quickstart, played on one machine as 2 "machines" of 1 CPU process each on
    localhost with the CPU config: one gloo DDP run of 2 processes (not 2 runs of 1), rank 0 writing results.json and
    the progress lines. The one-machine `--num_processes 2` launch of every method is the DDP half of
    tests/test_sharded.py's FSDP2 cases (`_two_process_run`); it was also a test of its own here, on the quickstart,
    until 2026-12-07 (the suite had grown past 15 minutes)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = shrunk(tmp_path, max_steps=2, save_strategy="no")

    def machine(rank):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_configs" / "cpu.yaml"), "--num_machines", "2",
               "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
               "--rdzv_backend", "static", "-m", "grade_trl.run"]
        return subprocess.Popen(cmd + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)

    machines = [machine(1), machine(0)]
    outputs = [m.communicate(timeout=600) for m in machines]
    assert all(m.returncode == 0 for m in machines), [err[-2000:] for _, err in outputs]
    stderr = outputs[0][1] + outputs[1][1]
    # defaults that fit the machine: no DDP search for unused parameters (each method uses them all), no pinned memory on the CPU
    assert "find_unused_parameters" not in stderr and "pin_memory" not in stderr, stderr[-3000:]
    for line in ("validation at step 0: ", "test of the final checkpoint: "):  # rank 0's, on machine 0
        assert outputs[1][1].count(line) == 1 and outputs[0][1].count(line) == 0, line
    results = load_results(tmp_path / "run" / "results.json")
    assert results["status"] == "completed" and results["final"]["num_processes"] == 2 and results["final"]["steps"] == 2
    assert results["config"]["run"]["method"] == "grade_ste" and all(h["kl"] >= 0 for h in results["history"] if "kl" in h)


def test_train_reward_command_trains_then_reuses(tmp_path, capsys):
    from grade_trl.train_reward import main as train_reward

    args = [QUICKSTART, "--reward_model_path", str(tmp_path / "rm"), "--reward_split_size", "200", "--policy_split_size", "50", "--validation_split_size", "60", "--reward_epochs", "2"]
    assert train_reward(args) == 0
    first = capsys.readouterr().out
    assert (tmp_path / "rm" / "head.safetensors").exists() and "held-out accuracy" in first
    mtime = (tmp_path / "rm" / "head.safetensors").stat().st_mtime_ns
    assert train_reward(args) == 0 and capsys.readouterr().out == first  # reused, same accuracy
    assert (tmp_path / "rm" / "head.safetensors").stat().st_mtime_ns == mtime
    assert train_reward(args + ["--force"]) == 0
    assert (tmp_path / "rm" / "head.safetensors").stat().st_mtime_ns != mtime
    # --force with data that cannot train a head: one line, and the head there is kept (it was deleted first before)
    mtime = (tmp_path / "rm" / "head.safetensors").stat().st_mtime_ns
    one_label = tmp_path / "one_label"
    one_label.mkdir()
    (one_label / "train.jsonl").write_text("".join(json.dumps({"text": f"review {i}", "label": 1}) + "\n" for i in range(400)))
    (one_label / "test.jsonl").write_text("".join(json.dumps({"text": f"other {i}", "label": 1}) + "\n" for i in range(100)))
    assert train_reward(args + ["--force", "--dataset_name", str(one_label)]) == 2
    assert "has only label 1" in capsys.readouterr().err
    assert (tmp_path / "rm" / "head.safetensors").stat().st_mtime_ns == mtime


def test_train_reward_refuses_what_would_train_a_wrong_or_broken_head(tmp_path, capsys):
    """A task without a sentiment head, a backbone rebuilt in its folder since its head was trained (its contents, not
    its name, changed), a backbone folder without tokenizer files, a reward_max_length past its positions, and no
    review to train on: each one line naming the key, exit 2."""
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    from grade_trl.train_reward import main as train_reward

    def narrow_model(folder, seed):
        torch.manual_seed(seed)
        GPT2LMHeadModel(GPT2Config(vocab_size=8192, n_positions=256, n_embd=32, n_layer=1, n_head=2)).save_pretrained(folder)

    backbone = tmp_path / "backbone"
    narrow_model(backbone, 0)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(resolve_model_path("embedded"), name), backbone / name)
    sizes = ["--reward_split_size", "100", "--policy_split_size", "50", "--validation_split_size", "40", "--reward_epochs", "1"]
    args = [QUICKSTART, "--model_name_or_path", str(backbone), "--reward_model_path", str(tmp_path / "rm"), *sizes]
    assert train_reward(args) == 0
    capsys.readouterr()
    narrow_model(backbone, 1)  # the same folder, other weights
    cases = [
        (args, "reward_model_path: "),  # the head at rm was trained on the backbone before it was rebuilt
        ([str(REPO / "recipes" / "tiny" / "gsm8k_grpo.yaml")], "task: 'gsm8k' has no sentiment reward head to train"),
        (args + ["--reward_model_path", str(tmp_path / "rm2"), "--reward_max_length", "300"], "reward_max_length: 300 tokens, but the reward backbone"),
        (args + ["--reward_model_path", str(tmp_path / "rm3"), "--reward_split_size", "0"], "reward_split_size: 0 reviews"),
    ]
    no_tokenizer = tmp_path / "no_tokenizer"
    narrow_model(no_tokenizer, 0)
    cases.append((args + ["--model_name_or_path", str(no_tokenizer), "--reward_model_path", str(tmp_path / "rm4")], "model_name_or_path: "))
    for argv, message in cases:
        assert train_reward(argv) == 2, message
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"error: {message}") and "Traceback" not in "\n".join(err), err[-1]
        if argv is args:
            assert "holds a head trained on an earlier" in err[-1]
    assert not any((tmp_path / name).exists() for name in ("rm2", "rm3", "rm4"))  # nothing written


def test_a_backbone_fingerprint_follows_the_weights_not_the_folder_or_the_saving_version(tmp_path):
    """What the reward head's reuse check compares (grade_trl.models.fingerprint): a byte-identical copy elsewhere and a
    config re-saved by another transformers version keep it; other weights in the same folder change it."""
    import shutil

    from grade_trl.models import fingerprint

    original = fingerprint("embedded")
    copy = tmp_path / "copy"
    shutil.copytree(resolve_model_path("embedded"), copy)
    assert fingerprint(str(copy)) == original
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "transformers_version": "9.9.9", "dtype": "float32"}))
    assert fingerprint(str(copy)) == original
    weights = load_file(str(copy / "model.safetensors"))
    from safetensors.torch import save_file

    save_file({k: v + 1e-3 if k.endswith("ln_f.weight") else v for k, v in weights.items()}, str(copy / "model.safetensors"))
    assert fingerprint(str(copy)) != original
    assert fingerprint(str(tmp_path / "not_there")) is None and fingerprint("openai-community/gpt2") is None
