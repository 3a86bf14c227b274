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
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
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


def test_trackio_receives_training_validation_and_test_in_one_run(tmp_path):
    pytest.importorskip("trackio", reason="trackio is an optional extra: pip install -e '.[trackio]'")
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    argv = shrunk(tmp_path, report_to="trackio", max_steps=2)
    result = subprocess.run([sys.executable, "-m", "grade_trl.run", *argv], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    [database] = glob.glob(str(tmp_path / "trackio" / "*.db"))
    with sqlite3.connect(database) as db:
        rows = [(run, json.loads(values)) for run, values in db.execute("SELECT run_name, metrics FROM metrics ORDER BY id")]
    assert len({run for run, _ in rows}) == 1, sorted({run for run, _ in rows})  # the final test did not open a second run
    logged = {key: values[key] for _, values in rows for key in values}
    assert {"train/kl", "eval/reward", "test/reward", "test/best_ckpt_reward"} <= set(logged)
    history = load_results(tmp_path / "run" / "results.json")["history"]
    assert logged["test/reward"] == pytest.approx(history[-1]["test_reward"]) and logged["train/global_step"] == 2


@pytest.mark.parametrize("kl,shown", [(0.0, "0.000"), (1.575, "1.575"), (None, "-")])
def test_the_summary_table_shows_a_kl_of_zero_as_zero_and_no_kl_as_a_dash(kl, shown):
    """A KL of exactly 0.0 was printed as nan (`or`), and so was a run with no training window logged."""
    from grade_trl.report import summary_table

    metrics = {"reward": 0.5, "completion_length": 8.0}
    final = {"validation_before": metrics, "validation_after": metrics, "validation_metric": "eval_reward", "kl": kl, "steps": 3, "train_minutes": 0.1,
             "test": {"final": {"metrics": metrics}, "best": {"metrics": metrics}}, "best_validation_step": 3}
    line = next(line for line in summary_table(final).splitlines() if line.startswith("KL to reference"))
    assert line.split() == ["KL", "to", "reference", "(last", "log)", "0.000", shown]
