"""The gradient-estimator variance probe: statistics against hand computations and numpy, the probe on every
method (independent draws, no trace on training), the callback in a real run, GRADE's score-function reference
against the exact gradient, and the command line.

Shrunk settings: 2 prompts, K = 3 estimates, 4 new tokens, 2-step runs (the tiny recipes: 8 prompts, K = 16, 24 tokens).
"""

import json
import math

import numpy as np
import pytest
import torch
from datasets import Dataset
from torch.testing import assert_close

from grade_trl.core import exact_kl
from grade_trl.core.soft_rollout import forbid_eos
from grade_trl.models import load_causal_lm
from grade_trl.build import build_probe_trainer
from grade_trl.probe import main
from grade_trl.probing import (
    CountSketch,
    GradientProbeCallback,
    compare_means,
    estimator_statistics,
    flat_gradient,
    grade_bias,
    gradient_estimates,
    isolated,
    prompt_rows,
)
from grade_trl.recipe import parse_recipe
from grade_trl.errors import UserError
from grade_trl.results import write_json_atomic

from .conftest import REPO

PROMPTS = ["This movie was", "The acting in this film"]
METHODS = ("grade", "grade_ste", "reinforce", "ppo", "grpo")


# ---------------------------------------------------------------- statistics


def test_statistics_match_a_hand_computation():
    G = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    s = estimator_statistics(G)
    # g_bar = (2/3, 2/3); centred rows (1/3, -2/3), (-2/3, 1/3), (1/3, 1/3): squared norms 5/9, 5/9, 2/9
    assert s["mean_sq_norm"] == pytest.approx(4 / 3)
    assert s["trace_cov"] == pytest.approx((12 / 9) / 2)
    assert s["mean_norm"] == pytest.approx(math.sqrt(8) / 3)
    assert s["snr"] == pytest.approx((8 / 9 - (2 / 3) / 3) / (2 / 3))  # = 1
    assert s["snr_plugin"] == pytest.approx((8 / 9) / (2 / 3))
    assert s["cosine_to_mean"] == pytest.approx((1 / math.sqrt(2) + 1 / math.sqrt(2) + 1) / 3)
    # leave-one-out: g1 vs (0.5, 1), g2 vs (1, 0.5): cos 1/sqrt(5); g3 vs (0.5, 0.5): cos 1
    assert s["cosine_loo"] == pytest.approx((2 / math.sqrt(5) + 1) / 3)


def test_statistics_match_numpy_on_random_data():
    rng = np.random.default_rng(0)
    G = rng.normal(size=(7, 50)) + rng.normal(size=50)  # a shared mean plus noise
    K = G.shape[0]
    g_bar = G.mean(0)
    trace_cov = np.trace(np.cov(G.T))  # np.cov: 1/(K-1), over the columns
    cos = lambda a, b: a @ b / (np.linalg.norm(a) * np.linalg.norm(b))  # noqa: E731
    expected = {
        "mean_sq_norm": np.mean(np.sum(G**2, axis=1)),
        "trace_cov": trace_cov,
        "snr": (g_bar @ g_bar - trace_cov / K) / trace_cov,
        "snr_plugin": g_bar @ g_bar / trace_cov,
        "cosine_to_mean": np.mean([cos(g, g_bar) for g in G]),
        "cosine_loo": np.mean([cos(G[k], np.delete(G, k, axis=0).mean(0)) for k in range(K)]),
        "mean_norm": np.linalg.norm(g_bar),
    }
    for chunk_size in (1 << 20, 8):  # one chunk, and columns split into chunks of 8
        s = estimator_statistics(torch.tensor(G, dtype=torch.float32), chunk_size=chunk_size)
        for key, value in expected.items():
            assert s[key] == pytest.approx(value, rel=1e-5), key
    # identity: mean ||g_k||^2 = ||g_bar||^2 + (K - 1) / K * trace_cov
    assert expected["mean_sq_norm"] == pytest.approx(expected["mean_norm"] ** 2 + (K - 1) / K * trace_cov)


def test_statistics_recover_a_known_distribution():
    # g ~ N(mu, sigma^2 I): trace_cov -> D sigma^2, snr -> ||mu||^2 / (D sigma^2); the plug-in is high by about 1/K.
    K, D, sigma = 400, 2000, 0.5
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(D, generator=gen)
    mu = mu / mu.norm() * math.sqrt(0.05 * D * sigma**2)  # true snr 0.05
    G = mu + sigma * torch.randn(K, D, generator=gen)
    s = estimator_statistics(G)
    assert s["trace_cov"] == pytest.approx(D * sigma**2, rel=0.01)  # relative sd sqrt(2 / ((K-1) D)) = 0.16%
    assert s["snr"] == pytest.approx(0.05, abs=0.004)  # sd of the estimate about 0.0016
    assert s["snr_plugin"] - s["snr"] == pytest.approx(1 / K, rel=0.01)
    assert s["mean_norm"] ** 2 == pytest.approx(0.05 * D * sigma**2 + D * sigma**2 / K, rel=0.05)
    # leave-one-out cosine: <g_k, o_k> ~ ||mu||^2, ||g_k||^2 ~ ||mu||^2 + D s^2, ||o_k||^2 ~ ||mu||^2 + D s^2 / (K-1)
    m2, n2 = 0.05 * D * sigma**2, D * sigma**2
    assert s["cosine_loo"] == pytest.approx(m2 / math.sqrt((m2 + n2) * (m2 + n2 / (K - 1))), rel=0.05)


def test_statistics_of_a_deterministic_estimator():
    s = estimator_statistics(torch.tensor([[3.0, 4.0], [3.0, 4.0]]))
    assert s["trace_cov"] == 0 and s["snr"] == math.inf and s["cosine_loo"] == pytest.approx(1.0) and s["mean_norm"] == pytest.approx(5.0)
    with pytest.raises(ValueError, match="at least 2 estimates"):
        estimator_statistics(torch.zeros(1, 3))


def test_count_sketch_is_one_fixed_linear_map_that_preserves_the_statistics():
    gen = torch.Generator().manual_seed(1)
    parts = lambda v: [v[:300].view(20, 15), v[300:]]  # noqa: E731  (two "parameter tensors")
    G = torch.randn(1, 20000, generator=gen) + 0.3 * torch.randn(12, 20000, generator=gen)
    sketch = CountSketch(4096, seed=3, chunk_size=1000)
    S = torch.stack([sketch(parts(g)) for g in G])
    assert_close(sketch(parts(G[0] + 2 * G[1])), S[0] + 2 * S[1], atol=1e-4, rtol=1e-4)  # linear, and the same map each call
    full, sketched = estimator_statistics(G), estimator_statistics(S)
    for key in ("mean_sq_norm", "trace_cov", "mean_norm"):  # relative error about sqrt(2 / 4096) = 2%
        assert sketched[key] == pytest.approx(full[key], rel=0.08), key
    assert sketched["cosine_loo"] == pytest.approx(full["cosine_loo"], abs=0.05)


# ---------------------------------------------------------------- the probe on every method


def make_trainer(method, reward, tokenizer, tmp_path, **overrides):
    """A tiny trainer of `method`: 2 prompts per step, 4 new tokens, 2 optimizer steps, logging every step."""
    from grade_trl.trainers import GumbelGRADEConfig, GumbelGRADETrainer, PPOConfig, PPOTrainer, REINFORCEConfig, REINFORCETrainer

    dataset = Dataset.from_dict({"prompt": PROMPTS * 8})
    common = dict(output_dir=str(tmp_path), max_steps=2, logging_steps=1, use_cpu=True, disable_tqdm=True, report_to="none", **overrides)
    lengths = dict(max_new_tokens=4, min_new_tokens=1)
    if method == "grpo":
        from grade_trl.trainers.grpo import GRPOConfig, GRPOTrainer

        args = GRPOConfig(**common, per_device_train_batch_size=4, num_generations=2, max_completion_length=4, beta=0.04, bf16=False, gradient_checkpointing=False)
        return GRPOTrainer(model=load_causal_lm("embedded"), reward_funcs=[reward], args=args, train_dataset=dataset, processing_class=tokenizer)
    if method == "ppo":
        args = PPOConfig(**common, **lengths, per_device_train_batch_size=2, num_mini_batches=1)
        return PPOTrainer(model="embedded", reward_funcs=reward, args=args, train_dataset=dataset, processing_class=tokenizer)
    if method == "reinforce":
        args = REINFORCEConfig(**common, **lengths, per_device_train_batch_size=2, gradient_accumulation_steps=1, learning_rate=1e-3)
        return REINFORCETrainer(model="embedded", reward_funcs=reward, args=args, train_dataset=dataset, processing_class=tokenizer)
    estimator = "soft" if method == "grade" else "ste"
    args = GumbelGRADEConfig(**common, **lengths, estimator=estimator, per_device_train_batch_size=2, gradient_accumulation_steps=1)
    return GumbelGRADETrainer(model="embedded", reward_funcs=reward, args=args, train_dataset=dataset, processing_class=tokenizer)


def training_rows(trainer):
    """Logged training rows without wall-clock entries (those differ between two identical runs)."""
    timing = ("time", "runtime", "per_second", "probe_")
    return [{k: v for k, v in h.items() if not any(t in k for t in timing)} for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("method", METHODS)
def test_probe_draws_independent_estimates_and_leaves_training_untouched(method, sentiment_reward, tokenizer, tmp_path):
    trainer = make_trainer(method, sentiment_reward, tokenizer, tmp_path / "probed")
    params_before = [p.detach().clone() for p in trainer.model.parameters()]
    rng_before = torch.get_rng_state()
    G = gradient_estimates(trainer, PROMPTS, num_estimates=3, seed=0)

    assert G.shape == (3, sum(p.numel() for p in trainer.probed_parameters())) and G.dtype == torch.float32
    assert all(not torch.equal(G[i], G[j]) for i, j in ((0, 1), (0, 2), (1, 2)))  # fresh samples / noise each time
    assert all(G[k].norm() > 0 for k in range(3))
    assert all(math.isfinite(v) for v in estimator_statistics(G).values())
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert all(torch.equal(a, b) for a, b in zip(params_before, trainer.model.parameters()))
    assert all(p.grad is None for p in trainer.model.parameters())
    assert torch.equal(G, gradient_estimates(trainer, PROMPTS, num_estimates=3, seed=0))  # reproducible from the seed

    # A 2-step run probed before training and after step 1 logs the same training rows and ends at the same
    # weights as the same run without the probe: RNG stream, metric windows and baselines are untouched.
    callback = GradientProbeCallback(probe_steps=[0, 1], num_estimates=3, prompts=PROMPTS)
    trainer.add_callback(callback)
    callback.trainer = trainer
    trainer.train()
    plain = make_trainer(method, sentiment_reward, tokenizer, tmp_path / "plain")
    plain.train()
    assert training_rows(trainer) == training_rows(plain) and len(training_rows(plain)) == 2
    assert all(torch.equal(a, b) for a, b in zip(trainer.model.parameters(), plain.model.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(params_before, trainer.model.parameters()))  # it did train

    probes = [h for h in trainer.state.log_history if "probe_snr" in h]
    assert [h["step"] for h in probes] == [0, 1]
    for row in probes:
        assert row["probe_num_estimates"] == 3
        assert {"probe_mean_sq_norm", "probe_trace_cov", "probe_snr", "probe_cosine_to_mean", "probe_mean_norm"} <= set(row)
        assert row["probe_trace_cov"] > 0 and math.isfinite(row["probe_snr"]) and -1 <= row["probe_cosine_to_mean"] <= 1


def test_ppo_value_loss_is_optional(sentiment_reward, tokenizer, tmp_path):
    trainer = make_trainer("ppo", sentiment_reward, tokenizer, tmp_path)
    policy_only = gradient_estimates(trainer, PROMPTS, 2, seed=0)
    with_value = gradient_estimates(trainer, PROMPTS, 2, seed=0, include_value_loss=True)
    head = sum(p.numel() for p in trainer.model.value_head.parameters())
    assert with_value.shape[1] == policy_only.shape[1] + head
    assert with_value[:, -head:].abs().sum() > 0  # the value head's own gradient
    # zero-initialised head: the value loss sends nothing into the body yet, so the policy part is the same
    assert_close(with_value[:, : policy_only.shape[1]], policy_only)
    assert trainer.args.vf_coef == 0.1


def test_projected_probe_keeps_the_statistics(sentiment_reward, tokenizer, tmp_path):
    # The same draws (same seed), sketched to 4,096 of 5.3M dimensions: norms within a few percent (about sqrt(2/4096)).
    trainer = make_trainer("grade_ste", sentiment_reward, tokenizer, tmp_path)
    full = estimator_statistics(gradient_estimates(trainer, PROMPTS, 3, seed=0))
    G = gradient_estimates(trainer, PROMPTS, 3, seed=0, project_dim=4096)
    assert G.shape == (3, 4096)
    sketched = estimator_statistics(G)
    for key in ("mean_sq_norm", "trace_cov", "mean_norm"):
        assert sketched[key] == pytest.approx(full[key], rel=0.1), key


def test_isolated_restores_the_trainer_state_it_touches(sentiment_reward, tokenizer, tmp_path):
    trainer = make_trainer("reinforce", sentiment_reward, tokenizer, tmp_path)
    trainer.ema_baseline.value = 0.25
    param = next(trainer.model.parameters())
    param.grad = sentinel = torch.ones_like(param)
    with isolated(trainer, seed=0) as fresh_state:
        fresh_state()
        trainer.compute_loss(trainer.model, [{"prompt": p} for p in PROMPTS])
        assert trainer.ema_baseline.value != 0.25  # the loss did update the baseline ...
    assert trainer.ema_baseline.value == 0.25 and param.grad is sentinel  # ... and it is back
    assert not trainer.metrics.values and not hasattr(trainer, "current_gradient_accumulation_steps")


# ---------------------------------------------------------------- GRADE's bias reference


def test_score_function_reference_is_unbiased_for_the_exact_one_token_gradient(sentiment_reward, tokenizer, tmp_path):
    # One new token with EOS banned: J = mean_x [ sum_v pi(v|x) R(v) - kl_coef KL(pi(.|x) || pi_ref(.|x)) ] is an exact
    # sum over the vocabulary. The policy is moved off the reference so the KL term has a gradient too.
    trainer = make_trainer("grade_ste", sentiment_reward, tokenizer, tmp_path, kl_coef=1.0)
    trainer.args.max_new_tokens = trainer.args.min_new_tokens = 1
    with torch.no_grad():
        trainer.model.transformer.ln_f.weight.mul_(1.5)
    params = trainer.probed_parameters()
    eos, V = tokenizer.eos_token_id, trainer.model.config.vocab_size

    with torch.no_grad():  # R(v) of every one-token completion, through the reward's soft path on one-hot tokens
        one_hot = torch.eye(V).unsqueeze(1)  # (V, 1, V)
        R = torch.cat([sentiment_reward.score_soft(chunk, torch.ones(chunk.shape[:2])) for chunk in one_hot.split(1024)])  # (V,)
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    logits = forbid_eos(trainer.model(**enc, position_ids=position_ids).logits[:, -1], eos)  # (N, V)
    with torch.no_grad():
        ref_logits = forbid_eos(trainer.ref_model(**enc, position_ids=position_ids).logits[:, -1], eos)
    J = (logits.softmax(-1) @ R - exact_kl(logits, ref_logits)).mean()
    exact = flat_gradient(-J, params)  # the loss is -J
    trainer.model.zero_grad(set_to_none=True)

    n = 48
    with isolated(trainer, seed=0) as fresh_state:
        draws = []
        for _ in range(n):
            fresh_state()
            draws.append(flat_gradient(trainer.score_function_loss(prompt_rows(PROMPTS), samples_per_prompt=8), params))
    draws = torch.stack(draws).double()
    error = (draws.mean(0) - exact.double()).norm().item()
    standard_error = math.sqrt(estimator_statistics(draws)["trace_cov"] / n)
    assert standard_error < 0.2 * exact.norm().item()  # the check can tell right from wrong
    assert error < 2.0 * standard_error  # E||mean - exact||^2 = trace_cov / n; about 1 SE in high dimension


def test_compare_means_removes_the_noise_of_both_means():
    # Two Gaussian clouds with known means at 60 degrees and equal norms, sampled so noisily that the plug-in cosine
    # and relative error are far off; the corrected ones recover cos = 0.5 and ||mu_a - mu_b|| / ||mu_b|| = 1.
    D, n_a, n_b, sigma = 5000, 16, 64, 1.0
    gen = torch.Generator().manual_seed(0)
    e1, e2 = torch.zeros(D), torch.zeros(D)
    e1[0], e2[1] = 1.0, 1.0
    scale = math.sqrt(0.02 * D)  # ||mu||^2 = 100, per-draw noise D sigma^2 = 5000: SNR 0.02
    mu_a, mu_b = scale * e1, scale * (0.5 * e1 + math.sqrt(0.75) * e2)
    A, B = mu_a + sigma * torch.randn(n_a, D, generator=gen), mu_b + sigma * torch.randn(n_b, D, generator=gen)
    c = compare_means(A.mean(0), estimator_statistics(A)["trace_cov"], n_a, B.mean(0), estimator_statistics(B)["trace_cov"], n_b)
    assert c["cosine"] < 0.3 and c["relative_error"] > 1.5  # plug-ins swamped by noise
    assert c["cosine_corrected"] == pytest.approx(0.5, abs=0.1)
    assert c["relative_bias"] == pytest.approx(1.0, abs=0.12)
    assert c["reference_relative_se"] == pytest.approx(math.sqrt(D / n_b / (100 + D / n_b)), rel=0.05)
    assert c["noise_floor"] ** 2 == pytest.approx((D / n_a + D / n_b) / (100 + D / n_b), rel=0.05)
    # Where the noise swamps what they measure there is no corrected value (not a bias of 0, not a cosine of 1.6):
    # ||mean_a - mean_b||^2 = 4.25 < trace_a / n_a + trace_b / n_b = 6.25; <a, b> / sqrt(2.75 * 1.25) = 1.62.
    lost = compare_means(torch.tensor([3.0, 0.0]), 100.0, 16, torch.tensor([1.0, 0.5]), 0.01, 100)
    assert math.isnan(lost["relative_bias"]) and math.isnan(lost["cosine_corrected"])
    assert lost["relative_error"] == pytest.approx(math.sqrt(4.25 / 1.25)) and lost["cosine"] == pytest.approx(3 / math.sqrt(9 * 1.25))


def test_grade_bias_reports_the_gap_to_the_reference(sentiment_reward, tokenizer, tmp_path):
    trainer = make_trainer("grade_ste", sentiment_reward, tokenizer, tmp_path)
    bias = grade_bias(trainer, PROMPTS, num_estimates=3, reference_batches=4, samples_per_prompt=2, seed=0)
    assert -1 <= bias["cosine"] <= 1 and bias["relative_error"] > 0 and bias["reference_relative_se"] > 0
    assert bias["noise_floor"] > 0 and bias["reference_samples"] == 4 * 2 * 2
    with pytest.raises(ValueError, match="needs a relaxed method's trainer"):
        grade_bias(make_trainer("reinforce", sentiment_reward, tokenizer, tmp_path), PROMPTS)


# ---------------------------------------------------------------- command line

TINY_LENGTH = [str(REPO / "recipes" / "tiny" / name) for name in ("length_grade_ste.yaml", "length_reinforce.yaml")]
SHRUNK = ["--max_new_tokens", "4", "--policy_split_size", "40", "--validation_split_size", "20", "--test_split_size", "20"]


def test_cli_probes_several_recipes_on_the_same_prompts(tmp_path, capsys):
    output = tmp_path / "probe.json"
    argv = [*TINY_LENGTH, "--num_estimates", "2", "--num_prompts", "2", "--output", str(output), "--output_dir", str(tmp_path / "run"), *SHRUNK]
    argv += ["--bias", "--bias_batches", "2", "--bias_samples_per_prompt", "2"]  # GRADE only: the REINFORCE row gets none
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "length_grade_ste" in table and "length_reinforce" in table and "snr" in table
    results = json.loads(output.read_text())["results"]
    assert [r["method"] for r in results] == ["grade_ste", "reinforce"]
    assert results[0]["prompts"] == results[1]["prompts"] and len(results[0]["prompts"]) == 2
    assert all(r["num_estimates"] == 2 and r["trace_cov"] > 0 and r["completions_per_estimate"] == 2 for r in results)
    assert results[0]["tau"] == pytest.approx(2.0)
    assert results[0]["bias"]["reference_samples"] == 2 * 2 * 2 and "bias" not in results[1] and "bias grade_ste" in table
    assert not (tmp_path / "run").exists()  # the recipe's output_dir: the probe trains and saves nothing (Trainer made it)


def test_a_probe_asked_for_what_it_cannot_measure_says_so_in_one_line(tmp_path, capsys):
    """--bias on recipes none of which is relaxed was ignored; more --num_prompts than the training set holds were cut
    to what it held (another batch than asked, without a word)."""
    cases = [
        ([TINY_LENGTH[1], "--bias"], "error: --bias: the bias is GRADE's, against an unbiased reference, and applies to relaxed methods (grade*); these recipes run reinforce, whose estimators are unbiased"),
        ([TINY_LENGTH[0], "--num_prompts", "41"], f"error: --num_prompts: {TINY_LENGTH[0]} has 40 training prompts, fewer than the 41 asked; give --num_prompts 40 or less"),
        ([TINY_LENGTH[1], "--include_value_loss"], "error: --include_value_loss: only PPO has a value loss (and a value head to probe); these recipes run reinforce"),  # was ignored
    ]
    for extra, line in cases:
        assert main([*extra, "--num_estimates", "2", "--output", str(tmp_path / "p.json"), "--output_dir", str(tmp_path / "run"), *SHRUNK]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [line]
    assert not (tmp_path / "p.json").exists()


def test_the_bias_reference_is_computed_once_for_a_sweep_over_estimators_and_tau(tmp_path):
    """The score-function reference depends on the model, prompts, reward and KL, not on the estimator or tau: within one
    command the recipes share it, and --bias_reference keeps it for later commands unless those settings change."""
    recipes = [TINY_LENGTH[0], str(REPO / "recipes" / "tiny" / "length_grade.yaml")]  # grade_ste and grade (soft)
    reference = tmp_path / "reference.pt"
    common = ["--num_estimates", "2", "--num_prompts", "2", "--output_dir", str(tmp_path / "run"), *SHRUNK, "--tau_start", "1.0", "--learning_rate", "1e-4",
              "--kl_coef", "0.1", "--bias", "--bias_batches", "2", "--bias_samples_per_prompt", "2", "--bias_reference", str(reference)]
    first = tmp_path / "first.json"
    assert main([*recipes, *common, "--output", str(first)]) == 0
    rows = json.loads(first.read_text())["results"]
    assert [r["bias"]["reference_reused"] for r in rows] == [False, True] and reference.is_file()
    again = tmp_path / "again.json"
    assert main([TINY_LENGTH[0], *common, "--tau_start", "0.5", "--relax_top_k", "16", "--output", str(again)]) == 0
    row = json.loads(again.read_text())["results"][0]
    assert row["bias"]["reference_reused"] and row["tau"] == 0.5 and row["relax_top_k"] == 16
    other = tmp_path / "other.json"
    assert main([TINY_LENGTH[0], *common, "--kl_coef", "0.5", "--output", str(other)]) == 0  # another objective: recomputed
    assert not json.loads(other.read_text())["results"][0]["bias"]["reference_reused"]


def test_checkpoint_weights_are_loaded_into_the_policy_not_the_reference(tmp_path):
    recipe = parse_recipe([TINY_LENGTH[0], "--output_dir", str(tmp_path / "run"), *SHRUNK])
    trainer, _ = build_probe_trainer(recipe)
    with torch.no_grad():
        trainer.model.transformer.ln_f.bias.add_(0.5)
    trainer.save_model(str(tmp_path / "run" / "model"))
    loaded, _ = build_probe_trainer(recipe, checkpoint=str(tmp_path / "run"), step=40)
    assert torch.equal(loaded.model.transformer.ln_f.bias, trainer.model.transformer.ln_f.bias)
    assert not torch.equal(loaded.ref_model.transformer.ln_f.bias, loaded.model.transformer.ln_f.bias)
    assert loaded.state.global_step == 40 and loaded.tau == pytest.approx(2.0 - 1.5 * 40 / 100)
    # without --step, a run's model/ (no trainer_state.json) is probed at its run's last step, best_model/ at its best
    # step, as results.json says (a journey audit: it was step 0, tau 2.0, without a word)
    write_json_atomic(tmp_path / "run" / "results.json", {"status": "completed", "config": {}, "history": [], "final": {"steps": 30, "best_validation_step": 20}})
    assert build_probe_trainer(recipe, checkpoint=str(tmp_path / "run" / "model"))[0].state.global_step == 30
    trainer.save_model(str(tmp_path / "run" / "best_model"))
    assert build_probe_trainer(recipe, checkpoint=str(tmp_path / "run" / "best_model"))[0].state.global_step == 20


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num_estimates", "1"], "--num_estimates must be >= 2"),
        (["--checkpoint", "/no/such/dir"], "--checkpoint: no such folder"),
        (["--num_estimates", "many"], "--num_estimates: expected an integer"),
        (["--learnig_rate", "1"], "unknown recipe key 'learnig_rate'"),
        (["--bias", "--bias_batches", "1"], "--bias_batches must be >= 2"),  # were a ZeroDivisionError and a TypeError
        (["--bias", "--bias_batches", "0"], "--bias_batches must be >= 2"),
        (["--project_dim", "-3"], "--project_dim must be >= 1"),  # was a RuntimeError
        (["--project_dim", "0"], "--project_dim must be >= 1"),  # was taken as None
        (["--step", "-5"], "--step must be >= 0"),
        (["--num_prompts", "0"], "--num_prompts must be >= 1, got 0"),  # named --num_estimates first
        (["--probe_seed", "-1"], "--probe_seed must be an integer from 0 to 2^32 - 1"),  # was accepted
    ],
)
def test_cli_bad_input_is_one_line_and_exit_code_2(extra, message, tmp_path, capsys):
    assert main([TINY_LENGTH[0], "--output", str(tmp_path / "p.json"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert main(["missing.yaml"]) == 2


def test_files_the_probe_writes_are_checked_before_its_work(tmp_path, capsys):
    """An --output or --bias_reference it cannot write was a traceback after every estimate had been drawn; a
    --bias_reference that is not one it wrote was a torch.load traceback."""
    (tmp_path / "a_file").write_text("not a reference")
    cases = [
        (["--output", str(tmp_path)], f"error: --output: {str(tmp_path)!r} is a folder; give a file path"),
        (["--output", str(tmp_path / "a_file" / "p.json")], f"error: --output: cannot write into {str(tmp_path / 'a_file')!r}"),
        (["--bias", "--bias_reference", str(tmp_path / "a_file" / "r.pt")], f"error: --bias_reference: cannot write into {str(tmp_path / 'a_file')!r}"),
        (["--bias", "--bias_batches", "2", "--bias_samples_per_prompt", "2", "--bias_reference", str(tmp_path / "a_file"), "--output", str(tmp_path / "p.json")],
         f"error: --bias_reference: {str(tmp_path / 'a_file')!r} is not a reference this probe wrote"),
    ]
    for extra, start in cases:
        assert main([TINY_LENGTH[0], "--num_estimates", "2", "--num_prompts", "2", "--output_dir", str(tmp_path / "run"), *SHRUNK, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(start), err
    assert not (tmp_path / "p.json").exists()


def test_a_sentiment_checkpoint_is_scored_by_its_runs_own_reward_head(tmp_path, reward_model, monkeypatch):
    """Probing `--checkpoint RUN` of an IMDB-sentiment run scores it with the head that run trained: RUN/reward_model
    when its recipe named none, else the recipe's reward_model_path; a head missing there is refused in one line. It
    was trained anew at the path relative to where the probe runs (another head; a journey audit)."""
    monkeypatch.chdir(tmp_path)  # the quickstart's reward_model_path, outputs/reward_models/tiny-imdb, is relative
    run, argv = tmp_path / "run", [str(REPO / "recipes" / "quickstart.yaml"), "--output_dir", str(tmp_path / "elsewhere"), *SHRUNK, "--min_new_tokens", "2"]
    reward_model.save(run / "reward_model", {"note": "the run's own head"})
    recipe = parse_recipe([*argv, "--reward_model_path", str(run / "reward_model")])
    build_probe_trainer(recipe)[0].save_model(str(run / "model"))  # the policy the run left in model/
    for checkpoint in (run, run / "model"):
        recipe = parse_recipe([*argv, "--reward_model_path", "null"])  # the default: {output_dir}/reward_model
        _, task = build_probe_trainer(recipe, checkpoint=str(checkpoint))
        assert recipe.run.reward_model_path == str(run / "reward_model")
        assert task.reward_funcs[0].model.metadata["note"] == "the run's own head"
        assert not (tmp_path / "elsewhere" / "reward_model").exists()  # no head trained where the probe runs
    write_json_atomic(run / "results.json", {"status": "completed", "config": {"run": {"reward_model_path": "outputs/reward_models/tiny-imdb"}}, "history": [], "final": {}})
    with pytest.raises(UserError) as error:
        build_probe_trainer(parse_recipe(argv), checkpoint=str(run))
    assert str(error.value).startswith("reward_model_path: no trained reward head at 'outputs/reward_models/tiny-imdb' (relative to this folder)")
    assert "its results.json says" in str(error.value) and not (tmp_path / "outputs").exists()
    # an absolute path the run recorded, where its head still is: used
    write_json_atomic(run / "results.json", {"status": "completed", "config": {"run": {"reward_model_path": str(run / "reward_model")}}, "history": [], "final": {}})
    recipe = parse_recipe(argv)
    build_probe_trainer(recipe, checkpoint=str(run))
    assert recipe.run.reward_model_path == str(run / "reward_model") and not (tmp_path / "outputs").exists()
