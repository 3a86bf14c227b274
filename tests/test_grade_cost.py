"""GRADE's memory and speed switches through the trainer and the runner: what each one changes, and that a run with
all of them on still learns. (The exactness of the rollout's options is tests/test_soft_rollout.py's.)

Shrunk: the embedded model, 4 prompts per step, 6-8 new tokens."""

import math

import pytest
import torch
from datasets import Dataset

from grade_trl.memory import SavedTensorAccount
from grade_trl.trainers import GumbelGRADEConfig, GumbelGRADETrainer

from .test_run_e2e import load_results, shrunk

PROMPTS = ["This movie was", "The acting in this film", "I expected", "Worst"]


def trainer(tmp_path, sentiment_reward, tokenizer, **overrides):
    args = GumbelGRADEConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=1, max_new_tokens=6, min_new_tokens=6,
        logging_steps=1, use_cpu=True, disable_tqdm=True, report_to="none", save_strategy="no", **overrides,
    )
    return GumbelGRADETrainer(model="embedded", reward_funcs=sentiment_reward, args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}), processing_class=tokenizer)


def gradient_and_saved_bytes(trainer_, seed=0):
    torch.manual_seed(seed)
    trainer_.model.zero_grad(set_to_none=True)
    account = SavedTensorAccount({"policy": trainer_.model})
    with account:
        loss = trainer_.compute_loss(trainer_.model, [{"prompt": p} for p in PROMPTS])
    loss.backward()
    grad = torch.cat([p.grad.reshape(-1).float() for p in trainer_.model.parameters()])
    return loss.detach(), grad, account.total


def test_gradient_checkpointing_means_checkpointed_rollout_steps_with_the_cache(tmp_path, sentiment_reward, tokenizer, caplog):
    config = GumbelGRADEConfig(output_dir=str(tmp_path), gradient_checkpointing=True, use_cpu=True)
    # transformers' own checkpointing would turn the KV cache off; for GRADE the switch means checkpointed decode steps
    assert config.rollout_checkpointing and not config.gradient_checkpointing and not config.activation_checkpointing
    # with the dynamic cache it is refused naming the switch the user gave (it named only rollout_checkpointing)
    with pytest.raises(ValueError, match=r"rollout_checkpointing needs rollout_cache: chunked .*\(gradient_checkpointing \(activation_checkpointing\): true means rollout_checkpointing for GRADE\)"):
        GumbelGRADEConfig(output_dir=str(tmp_path), gradient_checkpointing=True, rollout_cache="dynamic", use_cpu=True)
    plain = trainer(tmp_path / "plain", sentiment_reward, tokenizer)
    with caplog.at_level("INFO", logger="grade_trl.trainers.grade"):
        checkpointed = trainer(tmp_path / "ckpt", sentiment_reward, tokenizer, gradient_checkpointing=True)
    assert "gradient_checkpointing (activation_checkpointing): true means rollout_checkpointing for GRADE" in caplog.text  # results.json shows it False
    loss_a, grad_a, saved_a = gradient_and_saved_bytes(plain)
    loss_b, grad_b, saved_b = gradient_and_saved_bytes(checkpointed)
    assert loss_a == loss_b and torch.allclose(grad_a, grad_b, rtol=1e-4, atol=1e-6)  # exact: the same gradient
    assert saved_b < 0.8 * saved_a
    checkpointed.train()  # and a training run goes through Trainer with it
    assert checkpointed.state.global_step == 2


def test_recomputing_reference_and_reward_is_exact_and_saves_memory(tmp_path, sentiment_reward, tokenizer):
    stored = trainer(tmp_path / "a", sentiment_reward, tokenizer, recompute_reference_and_reward=False)
    recomputed = trainer(tmp_path / "b", sentiment_reward, tokenizer, recompute_reference_and_reward=True)
    loss_a, grad_a, saved_a = gradient_and_saved_bytes(stored)
    loss_b, grad_b, saved_b = gradient_and_saved_bytes(recomputed)
    assert loss_a == loss_b and torch.allclose(grad_a, grad_b, rtol=1e-4, atol=1e-6)
    assert saved_b < saved_a


def test_bf16_autocast_keeps_the_kl_in_float32_and_the_gradient_direction(tmp_path, sentiment_reward, tokenizer):
    full = trainer(tmp_path / "fp32", sentiment_reward, tokenizer)
    mixed = trainer(tmp_path / "bf16", sentiment_reward, tokenizer, bf16=True)
    assert mixed.accelerator.mixed_precision == "bf16"
    loss_a, grad_a, saved_a = gradient_and_saved_bytes(full)
    loss_b, grad_b, saved_b = gradient_and_saved_bytes(mixed)
    assert math.isfinite(loss_b.item()) and abs(loss_b.item() - loss_a.item()) < 0.05
    cosine = torch.nn.functional.cosine_similarity(grad_a, grad_b, dim=0).item()
    assert cosine > 0.95, cosine  # bf16 products, the same sampled tokens (same noise): nearly the same direction
    assert saved_b < saved_a  # activations kept in bf16
    assert all(p.dtype == torch.float32 for p in mixed.model.parameters())  # float32 master weights
    mixed.train()
    kl_logs = [h for h in mixed.state.log_history if "kl" in h]
    assert kl_logs and all(h["kl"] >= 0 and math.isfinite(h["kl"]) for h in kl_logs)


def test_top_k_relaxation_keeps_k_columns_per_step(tmp_path, sentiment_reward, tokenizer):
    full = trainer(tmp_path / "full", sentiment_reward, tokenizer)
    top = trainer(tmp_path / "top", sentiment_reward, tokenizer, relax_top_k=16)
    _, grad_full, saved_full = gradient_and_saved_bytes(full)
    loss, grad_top, saved_top = gradient_and_saved_bytes(top)
    assert math.isfinite(loss.item()) and grad_top.abs().sum() > 0
    assert saved_top < saved_full  # the per-step (B, V) tensors became (B, 16)
    with pytest.raises(ValueError, match="relax_top_k must be >= 0"):
        GumbelGRADEConfig(output_dir=str(tmp_path), relax_top_k=-1, use_cpu=True)


@pytest.mark.slow
def test_a_run_with_every_switch_on_learns(tmp_path):
    """The quickstart recipe, shrunk, with checkpointed steps, a top-256 relaxation and bf16 autocast: the held-out
    validation reward (fixed prompts, fixed sampling seed) rises over 16 steps and every logged training reward is
    finite. (The training reward of a 10-step window is too noisy to rank: bf16 rounds differently across CPUs, and
    CI once saw 0.515 -> 0.497 on a run whose validation reward rose 0.447 -> 0.495.)"""
    argv = shrunk(tmp_path, max_steps=16, logging_steps=4, eval_steps=100, rollout_checkpointing="true", relax_top_k=256, bf16="true", learning_rate=7.5e-4,
                  per_device_train_batch_size=4, gold_judge="none", eval_best_of_n=1, test_num_prompts=2)  # the validation is what is checked
    from grade_trl.run import main

    # one torch thread, as under the README's `-n 2` (conftest): bf16 sums in another order with 2 threads, and run on
    # its own with 2 (40 steps at 3e-4, as before 2026-12-07) the 6-prompt validation reward rose 0.447 -> 0.452 only.
    # 24 steps at 5e-4: 0.447 -> 0.568 (gold 0.414 -> 0.646), 195 s on a CPU without AVX-512 (288 s for the 40 steps);
    # since 2026-12-07 16 steps of 4 completions at 7.5e-4, no gold judge, no best-of-n, 2 test prompts: 0.447 -> 0.600
    # in 78 s there (the worker's reward head included). bf16's products took 7.5 s of each 8-completion step against
    # 0.8 s in float32 on that CPU; 16 steps of 8 at 7.5e-4 rose to 0.557 in 128 s, 12 of 8 at 1e-3 to 0.495 only
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    results = load_results(tmp_path / "run" / "results.json")
    rewards = [h["reward"] for h in results["history"] if "reward" in h and "loss" in h]
    assert len(rewards) == 4 and all(math.isfinite(r) for r in rewards), rewards
    before, after = results["final"]["validation_before"]["reward"], results["final"]["validation_after"]["reward"]
    assert after > before + 0.02, (before, after)


def test_relax_top_k_at_the_vocabulary_is_refused_and_near_it_warned(caplog):
    """A journey audit: relax_top_k 8,192 of the embedded model's 8,192 tokens saved 2.0x the bytes of the full
    vocabulary, and 4,096 1.3x, without a word (the sparse path keeps indices and gathered rows beside the values)."""
    import logging

    from grade_trl.build import check_relax_top_k
    from grade_trl.errors import UserError

    with pytest.raises(UserError, match=r"^relax_top_k: 8192 is not below the vocabulary's 8,192 tokens; give 0"):
        check_relax_top_k(8192, 8192)
    with caplog.at_level(logging.WARNING, logger="grade_trl.build"):
        check_relax_top_k(4096, 8192)
        check_relax_top_k(256, 50257)
        check_relax_top_k(0, 8192)
    assert [r.getMessage() for r in caplog.records] == [
        "relax_top_k 4096 is a quarter or more of the 8192-token vocabulary: the sparse relaxation likely saves no memory there (it keeps "
        "indices and gathered rows beside the values); 0 relaxes the whole vocabulary"]
