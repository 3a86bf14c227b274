"""grade_trl.pretrain: a tiny from-scratch run on the embedded IMDB sample (a few seconds on CPU)."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grade_trl.pretrain import lr_factor, main

TINY = [
    "--imdb", "embedded", "--max_documents", "200", "--eval_documents", "20",
    "--vocab_size", "512", "--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--context", "64",
    "--batch_size", "8", "--max_steps", "10", "--warmup_steps", "2", "--learning_rate", "1e-2", "--log_every", "5",
]  # fmt: skip


def test_tiny_pretraining_run_saves_a_loadable_model_and_the_loss_falls(tmp_path):
    main([*TINY, "--output_dir", str(tmp_path)])
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == (tmp_path / "config.json").stat().st_mode & 0o777  # not safetensors' 0600

    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == tokenizer.bos_token_id == 0
    assert tokenizer.convert_ids_to_tokens(0) == "<|endoftext|>"
    assert model.config.eos_token_id == 0 and model.config.vocab_size == len(tokenizer) <= 512
    text = "This movie was great."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    with torch.no_grad():
        logits = model(**tokenizer(text, return_tensors="pt")).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()

    log = json.loads((tmp_path / "training_log.json").read_text())
    assert [entry["step"] for entry in log] == [1, 5, 10]
    assert all(math.isfinite(entry["train_loss"]) and math.isfinite(entry["val_loss"]) for entry in log)
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    assert log[-1]["tokens"] == 10 * 8 * 64
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert "--max_steps 10" in card and f"{log[-1]['val_loss']:.4f}" in card


def test_a_warm_up_longer_than_the_run_is_said(tmp_path, caplog):
    """--warmup_steps 200 (the default) with --max_steps 10: allowed (a short trial), but the learning rate never reaches
    its peak, and the run says so with the rate it ends at."""
    args = [a if a != "2" or i == 0 or TINY[i - 1] != "--warmup_steps" else "20" for i, a in enumerate(TINY)]
    with caplog.at_level("WARNING", logger="grade_trl.pretrain"):
        assert main([*args, "--output_dir", str(tmp_path)]) == 0
    assert "--warmup_steps 20 > --max_steps 10: the learning rate rises for the whole run and ends at 0.005, never at its peak --learning_rate 0.01" in caplog.text


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(step, warmup=10, max_steps=100, min_ratio=0.1) for step in range(100)]
    assert factors[0] == 0.1 and factors[9] == 1.0
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert math.isclose(lr_factor(100, 10, 100, 0.1), 0.1)


def test_the_tokenizer_knows_the_models_positions_and_gsm8k_takes_the_embedded_sample(tmp_path):
    assert main([*TINY, "--gsm8k", "embedded", "--max_steps", "2", "--output_dir", str(tmp_path)]) == 0
    assert AutoTokenizer.from_pretrained(tmp_path).model_max_length == 64  # --context, not transformers' 1e30



@pytest.mark.parametrize("extra,message", [
    (["--max_steps", "0"], "--max_steps: expected an integer >= 1, got 0"),
    (["--eval_documents", "-5"], "--eval_documents: expected an integer >= 1"),  # swapped the splits silently before
    (["--min_lr_ratio", "5"], "--min_lr_ratio: expected a number in [0, 1]"),
    (["--n_embd", "30", "--n_head", "4"], "--n_head: 4 heads do not divide --n_embd 30"),
    (["--eval_documents", "400"], "--eval_documents: 400 leaves none of the 200 documents to train on"),
    (["--context", "100000"], "less than one --context 100000 block"),
    (["--imdb", "/nonexistent/imdb"], "--imdb: cannot load '/nonexistent/imdb'"),
    (["--gsm8k", "/nonexistent/gsm8k"], "--gsm8k: cannot load '/nonexistent/gsm8k'"),
])
def test_bad_options_and_data_are_one_line_and_write_nothing(tmp_path, capsys, extra, message):
    assert main([*TINY, "--output_dir", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "out").exists()


def test_a_folder_that_holds_files_is_refused_unless_overwrite(tmp_path, capsys):
    (tmp_path / "old.txt").write_text("an earlier model")
    assert main([*TINY, "--output_dir", str(tmp_path)]) == 2
    assert "--output_dir: " in capsys.readouterr().err and sorted(p.name for p in tmp_path.iterdir()) == ["old.txt"]
    assert main([*TINY, "--max_steps", "1", "--output_dir", str(tmp_path), "--overwrite"]) == 0
    assert (tmp_path / "model.safetensors").exists()


def test_a_sigterm_saves_the_model_after_the_last_finished_step(tmp_path):
    """The first SIGTERM finishes the step, logs it, saves the model, tokenizer and a card that says so, exit 143."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from .conftest import REPO

    argv = [*TINY, "--max_documents", "2000", "--max_steps", "100000", "--log_every", "1", "--output_dir", str(tmp_path / "out")]
    process = subprocess.Popen([sys.executable, "-m", "grade_trl.pretrain", *argv], cwd=REPO, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    for line in process.stderr:  # the log line of a finished step
        if " step 3 " in f"{line} " or time.time() > deadline:
            break
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted by SIGTERM at step ") and "saved in" in last
    step = int(last.split(" at step ")[1].split(" ")[0])
    log = json.loads((tmp_path / "out" / "training_log.json").read_text())
    assert log[-1]["step"] == step  # the stopping step is logged
    card = (tmp_path / "out" / "MODEL_CARD.md").read_text()
    assert f"Stopped by SIGTERM after step {step} of 100000" in card
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")
