"""`report_to` sends the same metrics to W&B (offline mode), TensorBoard and trackio (local) as results.json holds,
validation under `eval/`, the final test under `test/`, training under `train/`, all in ONE tracker run.

Each is read back from the files it writes; nothing is mocked. W&B 0.19+ writes only its binary
run file offline, so `wandb_history` decodes it: a LevelDB-style log of protobuf records. trackio
writes a SQLite database in TRACKIO_DIR (read at its import, so its run is a subprocess).
"""

import glob
import json
import math
import os
import sqlite3
import struct
import subprocess
import sys

import pytest

from grade_trl.run import main

from .test_run_e2e import load_results, shrunk


def wandb_history(run_file: str) -> list[dict]:
    """The `history` records of an offline .wandb file: a 7-byte header, then 32 KiB blocks of chunks
    (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last) holding protobuf `Record`s."""
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item} for record in wandb_records(run_file, "history")]


def wandb_records(run_file: str, kind_name: str) -> list:
    """The protobuf `Record`s of one type (`history`, `exit`, ...) of an offline .wandb file (layout: wandb_history)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B"
    rows, pos, block, pending = [], 7, 32768, b""
    while pos + 7 <= len(data):
        room = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if room < 7 or (kind == 0 and length == 0):  # block trailer / padding
            pos += room
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == kind_name:
                rows.append(record)
    return rows


def reporter_key(key: str) -> str:
    """transformers' W&B/TensorBoard callbacks file `eval_*` under eval/, `test_*` under test/, the rest under train/."""
    for prefix in ("eval_", "test_"):
        if key.startswith(prefix):
            return f"{prefix[:-1]}/{key[len(prefix):]}"
    return f"train/{key}"


def test_wandb_offline_and_tensorboard_receive_the_logged_metrics(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="W&B is an optional extra: pip install -e '.[wandb]'")
    pytest.importorskip("tensorboard", reason="TensorBoard is an optional extra: pip install -e '.[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # no stream wrapping under pytest's capture
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    assert main(shrunk(tmp_path, report_to="[wandb, tensorboard]")) == 0
    wandb.teardown()  # stop W&B's service process so the run file is flushed
    history = load_results(tmp_path / "run" / "results.json")["history"]
    expected = {(row["step"], reporter_key(k)): v for row in history for k, v in row.items() if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool) and "runtime" not in k and "per_second" not in k}
    # validation under eval/, the final test under test/, training under train/
    assert any(k == "eval/reward" for _, k in expected) and any(k == "test/reward" for _, k in expected) and any(k == "train/kl" for _, k in expected)

    [run_file] = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    wandb_rows = wandb_history(run_file)
    received = {(row["train/global_step"], k): v for row in wandb_rows for k, v in row.items() if "train/global_step" in row}
    for (step, key), value in expected.items():
        if key.startswith("train/train_") or key in ("train/total_flos",):
            continue  # the end-of-training summary goes to the run summary, not the history
        assert (step, key) in received, (step, key)
        assert received[(step, key)] == pytest.approx(value, rel=1e-6), (step, key)

    # one event file: the writer that training opened also received the final test (not closed at the end of training)
    [event_file] = glob.glob(str(tmp_path / "tb" / "**" / "events.out.tfevents.*"), recursive=True)
    events = EventAccumulator(event_file)
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {tag.split("/")[0] for tag in tags} == {"train", "eval", "test"}, tags
    assert {"eval/reward", "eval/best_reward", "test/reward", "test/best_ckpt_reward", "train/kl"} <= set(tags)
    assert not [tag for tag in tags if tag.startswith(("train/eval", "train/test", "train/val"))], tags
    scalars = {(e.step, tag): e.value for tag in tags for e in events.Scalars(tag)}
    for (step, key), value in expected.items():
        if key.startswith("train/train_") or key in ("train/total_flos",) or not math.isfinite(value):
            continue
        assert scalars[(step, key)] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, key)
    # the runner's settings beside the trainer config: the trackers can tell runs apart by method, task, data, reward
    # (a journey audit found only TrainingArguments and the model config there)
    config = {item.key: json.loads(item.value_json) for record in wandb_records(run_file, "config") for item in record.config.update}
    assert config["grade_trl/method"] == "grade_ste" and config["grade_trl/task"] == "imdb_sentiment", config
    text = events.Tags().get("tensors", [])
    assert any(tag.startswith("grade_trl/settings") for tag in text), text


def test_wandb_records_a_failed_run_with_the_exit_code_of_the_command(tmp_path, monkeypatch):
    """A rank of `accelerate launch` ends by os._exit, which W&B's exit hook never sees: the runner finishes the W&B run
    itself with the command's exit code (here a diverged run: the one-line error's 2), not as a success."""
    wandb = pytest.importorskip("wandb", reason="W&B is an optional extra: pip install -e '.[wandb]'")
    for key, value in (("WANDB_MODE", "offline"), ("WANDB_DIR", str(tmp_path)), ("WANDB_SILENT", "true"), ("WANDB_CONSOLE", "off")):
        monkeypatch.setenv(key, value)
    code = main(shrunk(tmp_path, report_to="wandb", learning_rate=1e30, max_steps=4))
    wandb.teardown()
    assert code == 2 and load_results(tmp_path / "run" / "results.json")["status"] == "failed"
    [run_file] = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert [record.exit.exit_code for record in wandb_records(run_file, "exit")] == [2]


def test_a_tracker_that_cannot_start_its_run_is_one_line_and_nothing_is_written(tmp_path):
    """Found by a journey audit: `report_to: wandb` without a login (and mlflow 3's refused file store) failed in the
    tracker's start with a 30-line traceback, exit 1 and a `failed` results.json. It is one line naming report_to, what
    the tracker said and what would start it; exit 2; nothing written, and a finished run in the folder stays as it was
    (a review: its model/ was deleted before the tracker refused). W&B's own start decides (its credentials may come
    from the environment, a netrc or its settings), here with none of them, in a process of its own (W&B keeps its
    mode per process, and this file's other tests run it offline)."""
    pytest.importorskip("wandb", reason="W&B is an optional extra: pip install -e '.[wandb]'")
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE")}
    env.update(HOME=str(tmp_path), NETRC=str(tmp_path / ".netrc"), WANDB_CONFIG_DIR=str(tmp_path / "config"), WANDB_DIR=str(tmp_path), WANDB_SILENT="true")

    from .test_resume import argv as length_argv  # the length task: no reward head to train

    def run_without_login():
        command = [sys.executable, "-m", "grade_trl.run", *length_argv("length_reinforce.yaml", tmp_path / "run", max_steps=2, report_to="wandb")]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)

    assert main(length_argv("length_reinforce.yaml", tmp_path / "run", max_steps=1, save_strategy="no")) == 0  # a finished run in the folder (an empty one: the lock removes what it made)
    finished, files = (tmp_path / "run" / "results.json").read_text(), sorted(p.name for p in (tmp_path / "run").iterdir())
    refused = run_without_login()
    last = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 2 and last.startswith("error: report_to: wandb could not start its run (") and "WANDB_MODE=offline" in last, refused.stderr[-2000:]
    assert (tmp_path / "run" / "results.json").read_text() == finished and sorted(p.name for p in (tmp_path / "run").iterdir()) == files
    assert (tmp_path / "run" / "model").is_dir()


def stop_at_step(monkeypatch, step: int) -> None:
    """A SIGTERM to this process during optimizer step `step` (the run finishes it, saves checkpoint-`step`, stops)."""
    import signal

    from grade_trl.safety import NonFiniteGuard

    original = NonFiniteGuard.on_pre_optimizer_step

    def signal_then_step(self, args, state, control, **kwargs):
        if state.global_step == step - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(NonFiniteGuard, "on_pre_optimizer_step", signal_then_step)


def test_a_resumed_run_continues_its_wandb_run_and_tensorboard_folder(tmp_path, monkeypatch):
    """Stopped at step 2 by SIGTERM and resumed (in one process, as a notebook would): W&B continues the same run id and TensorBoard
    writes into the same folder (one run in its UI); between them every value of the history is there once."""
    wandb = pytest.importorskip("wandb", reason="W&B is an optional extra: pip install -e '.[wandb]'")
    pytest.importorskip("tensorboard", reason="TensorBoard is an optional extra: pip install -e '.[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for key, value in (("WANDB_MODE", "offline"), ("WANDB_DIR", str(tmp_path)), ("WANDB_SILENT", "true"), ("WANDB_CONSOLE", "off")):
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    argv = shrunk(tmp_path, report_to="[wandb, tensorboard]", max_steps=4, eval_steps=2, logging_steps=1)
    with monkeypatch.context() as patched:
        stop_at_step(patched, 2)
        assert main(argv) == 143
    # resumed without a W&B login: one line, exit 2, the stopped run's results.json as it was (a review: the resumed
    # run's own W&B start raised a traceback and wrote `failed` with an empty history over the stopped run's)
    stopped = (tmp_path / "run" / "results.json").read_text()
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}  # a process of its own: W&B keeps its mode per process
    env.update(HOME=str(tmp_path), NETRC=str(tmp_path / ".netrc"), WANDB_CONFIG_DIR=str(tmp_path / "config"))
    refused = subprocess.run([sys.executable, "-m", "grade_trl.run", *argv, "--resume_from_checkpoint", "true"], env=env, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].startswith("error: report_to: wandb could not start its run ("), refused.stderr[-2000:]
    assert (tmp_path / "run" / "results.json").read_text() == stopped
    assert main(argv + ["--resume_from_checkpoint", "true"]) == 0
    wandb.teardown()

    results = load_results(tmp_path / "run" / "results.json")
    run_name = results["config"]["trainer"]["run_name"]
    assert run_name.startswith(f"{tmp_path.name}-run-")  # <parent>-<folder>-<date>-<time>, the stopped run's
    run_files = sorted(glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(run_files) == 2 and len({os.path.basename(f) for f in run_files}) == 1  # run-<id>.wandb twice: one id
    [run_record] = wandb_records(run_files[0], "run")
    assert run_record.run.display_name == run_name
    expected = {(row["step"], reporter_key(k)) for row in results["history"] for k, v in row.items()
                if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                and "runtime" not in k and "per_second" not in k and not k.startswith("train_") and k != "total_flos"}
    received = [(row["train/global_step"], k) for f in run_files for row in wandb_history(f) for k in row if "train/global_step" in row and k != "train/global_step"]
    assert expected <= set(received)
    assert [key for key in received if key in expected and received.count(key) > 1] == []

    folders = {os.path.dirname(f) for f in glob.glob(str(tmp_path / "run" / "runs" / "**" / "events.out.tfevents.*"), recursive=True)}
    assert len(folders) == 1  # both event files in the stopped run's folder
    events = EventAccumulator(folders.pop())
    events.Reload()
    steps = sorted(e.step for e in events.Scalars("train/loss"))
    assert steps == [1, 2, 3, 4]


def test_a_resumed_run_continues_its_trackio_run(tmp_path):
    """trackio continues the run of the same name (transformers' callback: resume="allow"); the run gets a name of its
    own (reporting.default_run_name) and keeps it when resumed, so a stop and resume is one trackio run, and another
    run of the same folder name is not merged into it. The run receives training, validation and the final test
    (the test did not open a second run), the test's numbers as results.json has them (a test of its own until
    2026-12-07)."""
    import signal

    pytest.importorskip("trackio", reason="trackio is an optional extra: pip install -e '.[trackio]'")
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}  # each logging row as it is printed
    argv = shrunk(tmp_path, report_to="trackio", max_steps=400, logging_steps=1, eval_steps=1000)
    with open(tmp_path / "stderr.txt", "w") as stderr_file:  # not a pipe: nobody reads it while stdout is read
        process = subprocess.Popen([sys.executable, "-m", "grade_trl.run", *argv], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=stderr_file, text=True)
        for line in process.stdout:  # training has started once a loss shows
            if "'loss'" in line:
                break
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=300)
    assert process.returncode == 143, (tmp_path / "stderr.txt").read_text()[-3000:]
    stopped = load_results(tmp_path / "run" / "results.json")
    resumed = subprocess.run([sys.executable, "-m", "grade_trl.run", *argv, "--resume_from_checkpoint", "true", "--max_steps", str(stopped["final"]["steps"] + 2)],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    [database] = glob.glob(str(tmp_path / "trackio" / "*.db"))
    with sqlite3.connect(database) as db:
        rows = [(run, json.loads(values)) for run, values in db.execute("SELECT run_name, metrics FROM metrics ORDER BY id")]
    assert {run for run, _ in rows} == {load_results(tmp_path / "run" / "results.json")["config"]["trainer"]["run_name"]}
    steps = [values["train/global_step"] for _, values in rows if "train/loss" in values]
    assert steps == list(range(1, stopped["final"]["steps"] + 3))  # every step once, across the stop
    logged = {key: values[key] for _, values in rows for key in values}
    assert {"train/kl", "eval/reward", "test/reward", "test/best_ckpt_reward"} <= set(logged)
    history = load_results(tmp_path / "run" / "results.json")["history"]
    assert logged["test/reward"] == pytest.approx(history[-1]["test_reward"]) and logged["train/global_step"] == stopped["final"]["steps"] + 2


@pytest.mark.parametrize("kl,shown", [(0.0, "0.000"), (1.575, "1.575"), (None, "-")])
def test_the_summary_table_shows_a_kl_of_zero_as_zero_and_no_kl_as_a_dash(kl, shown):
    """A KL of exactly 0.0 was printed as nan (`or`), and so was a run with no training window logged."""
    from grade_trl.report import summary_table

    metrics = {"reward": 0.5, "completion_length": 8.0}
    final = {"validation_before": metrics, "validation_after": metrics, "validation_metric": "eval_reward", "kl": kl, "steps": 3, "train_minutes": 0.1,
             "test": {"final": {"metrics": metrics}, "best": {"metrics": metrics}}, "best_validation_step": 3}
    line = next(line for line in summary_table(final).splitlines() if line.startswith("KL to reference"))
    assert line.split() == ["KL", "to", "reference", "(last", "log)", "0.000", shown]


def test_the_summary_table_shows_the_test_format_reward_of_a_gsm8k_run():
    from grade_trl.report import summary_table

    validation = {"accuracy": 0.1, "format_reward": 0.5}
    test = {"final": {"metrics": {"accuracy": 0.25, "format_reward": 0.75}}, "best": {"metrics": {"accuracy": 0.5, "format_reward": 1.0}}}
    final = {"validation_before": validation, "validation_after": validation, "validation_metric": "eval_accuracy", "kl": 0.1, "steps": 3,
             "train_minutes": 0.1, "test": test, "best_validation_step": 2}
    lines = [line.split() for line in summary_table(final).splitlines() if line.startswith("test ")]
    assert lines == [["test", "accuracy", "(final", "ckpt)", "0.250"], ["test", "format_reward", "(final", "ckpt)", "0.750"],
                     ["test", "accuracy", "(best,", "step", "2)", "0.500"], ["test", "format_reward", "(best,", "step", "2)", "1.000"]]


def test_only_a_runs_own_checkpoint_continues_its_tracker_runs(tmp_path):
    from grade_trl.reporting import continues_the_run

    assert continues_the_run(str(tmp_path / "run" / "checkpoint-4"), str(tmp_path / "run"))
    assert continues_the_run(str(tmp_path / "run" / "checkpoint-4") + "/", str(tmp_path / "run") + "/")
    assert not continues_the_run(str(tmp_path / "old" / "checkpoint-4"), str(tmp_path / "new"))  # a fork: tracker runs of its own
