"""grade_trl.pretrain: a tiny from-scratch run on the embedded IMDB sample (a few seconds on CPU)."""

import json
import math

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


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(step, warmup=10, max_steps=100, min_ratio=0.1) for step in range(100)]
    assert factors[0] == 0.1 and factors[9] == 1.0
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert math.isclose(lr_factor(100, 10, 100, 0.1), 0.1)
