"""Gradient-estimator variance probe: how noisy is each method's gradient, measured the right way.

Every method trains on a stochastic estimate g of the gradient of its own objective J(theta): the
estimate depends on the sampled completions (REINFORCE, PPO, GRPO) or the Gumbel noise of the relaxed
rollout (GRADE). The probe fixes the parameters and ONE prompt batch, draws K independent estimates
g_1..g_K (fresh samples / noise each time, no optimizer step), and reports

    mean_sq_norm   = (1/K) sum_k ||g_k||^2                                   estimates E||g||^2
    trace_cov      = 1/(K-1) sum_k ||g_k - g_bar||^2                          total variance tr Cov[g], unbiased
    snr            = (||g_bar||^2 - trace_cov / K) / trace_cov               ||E g||^2 / E||g - E g||^2, signal term unbiased
    snr_plugin     = ||g_bar||^2 / trace_cov                                 biased upwards by 1/K
    cosine_to_mean = (1/K) sum_k cos(g_k, g_bar)                             g_k counts in g_bar: biased upwards at small K
    cosine_loo     = (1/K) sum_k cos(g_k, mean of the other K-1)             leave-one-out: both sides independent
    mean_norm      = ||g_bar||

with g_bar = (1/K) sum_k g_k. Note E||g_bar||^2 = ||E g||^2 + tr Cov[g] / K, hence the corrected signal.

What the published "gradient variance" measured instead (BACKGROUND.md section 1): the spread of the
per-parameter gradient norms within ONE step, i.e. how different the gradient's size is across weight
matrices. That is a property of one gradient vector (dominated by the layer shapes and scales), not of
the estimator: a deterministic, exact gradient has a large "spread" and zero estimator variance.
Likewise `grad_norm_std` in the logs is a spread over optimizer steps, where the parameters and the
prompts change too. Only repeated draws at fixed parameters on the same prompts isolate the noise.

Comparing methods: every method is probed on the same prompts with the same K, but the objectives
differ in scale (GRADE's loss is -(reward - beta KL), PPO whitens its advantages, GRPO averages over
tokens), so `mean_sq_norm`, `trace_cov` and `mean_norm` compare only within a method (over training,
over tau); `snr` and the cosines are scale-free and compare across methods. The number of completions
per estimate differs by design too (GRPO samples `num_generations` per prompt): it is reported, and since
the mean of m independent estimates has m times the SNR, `snr / completions` compares per sampled completion.

Each estimate is the gradient of the trainer's own `compute_loss` (GRADE, REINFORCE), of its rollout
followed by `compute_loss` on the whole rollout (PPO, at the rollout's parameters, where the ratio is 1),
or of TRL's `_generate_and_score_completions` then `compute_loss` (GRPO/CISPO). Nothing is re-implemented.

Legend: K estimates, D probed parameters (or sketch dimensions), N prompts, r samples per prompt.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import sys
import time
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

PROBE_KEYS = ("mean_sq_norm", "trace_cov", "snr", "snr_plugin", "cosine_to_mean", "cosine_loo", "mean_norm")

# ---------------------------------------------------------------- statistics


def estimator_statistics(G: torch.Tensor, chunk_size: int = 1 << 20) -> dict[str, float]:
    """Statistics of K gradient estimates G (K, D) of one expected gradient (module docstring for the formulas).

    Everything is computed in float64 from two K x K Gram matrices (raw and column-centred), accumulated
    over column chunks, so a (16, 355M) G needs no second copy. A zero estimate has cosine 0 with anything.
    trace_cov = 0 (a deterministic estimator) gives snr = inf. Needs K >= 2.
    """
    K = G.shape[0]
    if K < 2:
        raise ValueError(f"estimator_statistics needs at least 2 estimates, got {K}")
    gram = torch.zeros(K, K, dtype=torch.float64)
    centred_gram = torch.zeros(K, K, dtype=torch.float64)
    for chunk in G.split(chunk_size, dim=1):
        c = chunk.to(torch.float64)  # (K, d)
        gram += (c @ c.T).cpu()
        c = c - c.mean(0, keepdim=True)
        centred_gram += (c @ c.T).cpu()

    sq_norms = gram.diagonal()  # (K,) ||g_k||^2
    row_sums = gram.sum(1)  # (K,) <g_k, sum_j g_j>
    total = gram.sum()  # ||sum_k g_k||^2
    mean_sq = total / K**2  # ||g_bar||^2
    trace_cov = centred_gram.trace() / (K - 1)
    signal = mean_sq - trace_cov / K  # unbiased for ||E g||^2 (may come out < 0 when the noise dominates)

    def cosines(dots, norms_a, norms_b):
        denom = norms_a * norms_b
        return torch.where(denom > 0, dots / denom.clamp(min=1e-300), torch.zeros_like(dots))

    to_mean = cosines(row_sums / K, sq_norms.sqrt(), mean_sq.sqrt().expand(K))
    # the mean of the others: o_k = (sum - g_k) / (K - 1)
    loo_dots = (row_sums - sq_norms) / (K - 1)
    loo_norms = ((total - 2 * row_sums + sq_norms).clamp(min=0) / (K - 1) ** 2).sqrt()
    loo = cosines(loo_dots, sq_norms.sqrt(), loo_norms)
    return {
        "mean_sq_norm": sq_norms.mean().item(),
        "trace_cov": trace_cov.item(),
        "snr": (signal / trace_cov).item() if trace_cov > 0 else math.inf,
        "snr_plugin": (mean_sq / trace_cov).item() if trace_cov > 0 else math.inf,
        "cosine_to_mean": to_mean.mean().item(),
        "cosine_loo": loo.mean().item(),
        "mean_norm": mean_sq.sqrt().item(),
    }


# ---------------------------------------------------------------- one estimate per method family


def _prompt_rows(prompts: list) -> list[dict]:
    """Dataset rows as the trainers receive them: `{"prompt": text}` for a string, a row (prompt plus the columns the
    rewards take as keywords, e.g. GSM8K's `answer`) as it is."""
    return [dict(p) if isinstance(p, dict) else {"prompt": p} for p in prompts]


def _prompt_text(prompt) -> str:
    return prompt["prompt"] if isinstance(prompt, dict) else prompt


def _is_ppo(trainer) -> bool:
    from .trainers.ppo import PPOTrainer

    return isinstance(trainer, PPOTrainer)


def _is_trl_grpo(trainer) -> bool:
    from trl import GRPOTrainer

    return isinstance(trainer, GRPOTrainer)


def estimator_loss(trainer, prompts: list[str | dict], include_value_loss: bool = False) -> torch.Tensor:
    """The scalar whose gradient is ONE draw of the method's gradient estimate on `prompts` (fresh noise per call).

    * GRADE, REINFORCE: `trainer.compute_loss` on the prompts (it samples / relaxes, scores and builds the loss).
    * PPO: a fresh rollout (`_generate_rollout`), then `compute_loss` on all of its rows as one mini-batch, at the
      rollout's parameters (ratio 1, nothing clipped: the policy-gradient estimate with GAE advantages). The value
      loss is left out unless `include_value_loss` (vf_coef is set to 0 for the call); the entropy bonus is in.
    * TRL GRPO/CISPO: `_generate_and_score_completions` on each prompt repeated `num_generations` times, then
      `compute_loss` (ratio 1 as well). TRL divides its loss for gradient accumulation; the probe runs it with
      `current_gradient_accumulation_steps = 1`, i.e. as one micro-batch holding the whole probe batch.
    """
    model = trainer.model
    if _is_ppo(trainer):
        rollout = trainer._generate_rollout(_prompt_rows(prompts))
        rows = torch.arange(rollout["b_mask"].shape[0], device=rollout["b_mask"].device)
        vf_coef = trainer.args.vf_coef
        trainer.args.vf_coef = vf_coef if include_value_loss else 0.0
        try:
            return trainer.compute_loss(model, {"rollout": rollout, "rows": rows, "last": False})
        finally:
            trainer.args.vf_coef = vf_coef
    if _is_trl_grpo(trainer):
        batch = trainer._generate_and_score_completions([row for row in _prompt_rows(prompts) for _ in range(trainer.num_generations)])
        return trainer.compute_loss(model, batch)
    return trainer.compute_loss(model, _prompt_rows(prompts))


def first_rows(dataset, n: int) -> list[dict]:
    """The first `n` rows of a training set (the probe's fixed batch): the same prompts for every method of a task."""
    return [dataset[i] for i in range(min(n, len(dataset)))]


def completions_per_estimate(trainer, num_prompts: int) -> int:
    """Completions sampled for one estimate: GRPO samples `num_generations` per prompt, REINFORCE `num_samples_per_prompt`."""
    if _is_trl_grpo(trainer):
        return num_prompts * trainer.num_generations
    return num_prompts * getattr(trainer.args, "num_samples_per_prompt", 1)


def probed_parameters(trainer, include_value_loss: bool = False) -> list[torch.nn.Parameter]:
    """The trainable parameters of the policy (PPO: plus the value head when the value loss is included)."""
    module = trainer.model
    if _is_ppo(trainer) and not include_value_loss:
        module = module.policy
    return [p for p in module.parameters() if p.requires_grad]


# ---------------------------------------------------------------- leaving no trace on training

TRAINER_STATE = ("_metrics", "_logs", "_pending_metrics", "ema_baseline", "kl_ctl")
"""Trainer attributes a loss call may update: metric windows (ours and TRL's), TRL's completion logs, REINFORCE's
EMA baseline, PPO's KL controller. Each estimate starts from a copy of them; the originals are put back."""


@contextmanager
def isolated(trainer, seed: int):
    """Run probe code at the trainer's current state without leaving a trace on training.

    Inside: the global RNGs (torch CPU and CUDA, python, numpy) are forked and seeded with `seed`; the model is in
    train mode (dropout as the trainer set it: 0 for ours, TRL's `disable_dropout` for GRPO); every parameter's
    `.grad` is set aside. Yields `fresh_state()`, which resets the trainer's mutable state (TRAINER_STATE) to what
    it was on entry, so each estimate sees the baseline / KL coefficient a real step would. On exit everything
    (RNG streams, train/eval mode, `.grad` buffers, trainer state) is as it was.
    """
    model = trainer.model
    was_training = model.training
    saved_grads = [(p, p.grad) for p in model.parameters()]
    saved_state = {name: getattr(trainer, name) for name in TRAINER_STATE if hasattr(trainer, name)}
    tokens_seen = trainer.state.num_input_tokens_seen
    ga_missing = "current_gradient_accumulation_steps" not in vars(trainer)
    ga = getattr(trainer, "current_gradient_accumulation_steps", None)
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []

    def fresh_state() -> None:
        for name, value in saved_state.items():
            setattr(trainer, name, copy.deepcopy(value))

    with torch.random.fork_rng(devices=devices):
        try:
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            model.train()
            trainer.current_gradient_accumulation_steps = 1
            yield fresh_state
        finally:
            for p, grad in saved_grads:
                p.grad = grad
            for name, value in saved_state.items():
                setattr(trainer, name, value)
            trainer.state.num_input_tokens_seen = tokens_seen
            if ga_missing:
                del trainer.current_gradient_accumulation_steps
            else:
                trainer.current_gradient_accumulation_steps = ga
            model.train(was_training)
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class CountSketch:
    """A fixed random linear map R^D -> R^d (Charikar et al. 2002): coordinate i is added, with a random sign, to
    a random bucket. E[<Sx, Sy>] = <x, y>, so the sketched norms, trace_cov and signal are unbiased estimates of
    the full-dimensional ones (relative error about sqrt(2 / d) for a norm), and the map costs O(D) per estimate
    with no D x d matrix. The hash is re-drawn from `seed` on every call (its own generator, not the global RNG), so
    every estimate gets the same map.
    For models too large to hold K x D floats (gpt2-medium: 355M parameters, 1.4 GB per estimate)."""

    def __init__(self, dim: int, seed: int = 0, chunk_size: int = 1 << 22):
        self.dim, self.seed, self.chunk_size = dim, seed, chunk_size

    def __call__(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        device = tensors[0].device
        generator = torch.Generator(device=device).manual_seed(self.seed)
        out = torch.zeros(self.dim, dtype=torch.float32, device=device)
        for tensor in tensors:
            for chunk in tensor.detach().reshape(-1).float().split(self.chunk_size):
                buckets = torch.randint(self.dim, chunk.shape, generator=generator, device=device)
                signs = torch.randint(2, chunk.shape, generator=generator, device=device).float() * 2 - 1
                out.index_add_(0, buckets, chunk * signs)
        return out


def flat_gradient(loss: torch.Tensor, params: list[torch.nn.Parameter], sketch: CountSketch | None = None) -> torch.Tensor:
    """d loss / d params as one float32 CPU vector (D,), or its sketch (d,). `.grad` buffers are overwritten: call
    inside `isolated`. backward() rather than autograd.grad, which reentrant gradient checkpointing does not support."""
    for p in params:
        p.grad = None
    loss.backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = sketch(grads) if sketch is not None else torch.cat([g.detach().reshape(-1).float() for g in grads])
    for p in params:
        p.grad = None
    return flat.cpu()


def gradient_estimates(
    trainer, prompts: list[str | dict], num_estimates: int, seed: int = 0, include_value_loss: bool = False, project_dim: int | None = None
) -> torch.Tensor:
    """K = `num_estimates` independent gradient estimates of the method's training objective on the SAME `prompts`
    (prompt strings, or training-set rows when the rewards take extra columns as keywords).

    Parameters stay fixed (no optimizer step); each estimate draws fresh samples / Gumbel noise from one RNG stream
    seeded with `seed`, and starts from the trainer's state at this step (`isolated`). Afterwards the RNG streams,
    parameters, `.grad` buffers, metric windows and baselines are as before, so training is unaffected.

    include_value_loss: PPO only, also differentiate the value loss (and probe the value head's parameters).
    project_dim: None returns the full gradients (K, D) float32 on CPU (D = trainable policy parameters: 5.3M for
    the embedded model, 21 MB per estimate); an int returns a fixed count sketch (K, project_dim) instead.
    """
    if num_estimates < 2:
        raise ValueError(f"num_estimates must be >= 2 for a variance, got {num_estimates}")
    params = probed_parameters(trainer, include_value_loss)
    sketch = CountSketch(project_dim) if project_dim else None  # one fixed map, whatever the probe's seed
    estimates = []
    with isolated(trainer, seed) as fresh_state:
        for _ in range(num_estimates):
            fresh_state()
            estimates.append(flat_gradient(estimator_loss(trainer, prompts, include_value_loss), params, sketch))
    return torch.stack(estimates)  # (K, D)


# ---------------------------------------------------------------- GRADE's bias


def soft_rewards(trainer, rollout) -> torch.Tensor:
    """Weighted differentiable reward of each rollout row, as GRADE's step 4 computes it. (B,)"""
    return trainer.soft_reward_scores(rollout) @ trainer.reward_weights.to(rollout.logits.device)


def score_function_loss(trainer, prompts: list[str | dict], samples_per_prompt: int = 4) -> torch.Tensor:
    """A surrogate whose gradient is an UNBIASED estimate of the gradient of GRADE's hard objective

        J(theta) = E_{y ~ pi_theta}[ f(y; theta) ],   f = R(y) - beta * sum_t KL(pi_theta(.|y<t) || pi_ref(.|y<t))

    (real tokens, the trainer's reward, beta and reference, the same EOS ban), by the score function:

        grad J = E[ (f(y) - b) grad log pi(y) + grad_theta f(y; theta) ],   loss = -mean_i [A_i log pi(y_i) + f_i]

    with A_i = f_i - b_i (stop-gradient), b_i the leave-one-out mean over the r samples of the same prompt (unbiased,
    Kool et al. 2019), and grad_theta f = -beta grad KL at fixed tokens (the reward of fixed tokens has no theta path).
    Built from GRADE's own rollout, reference, exact KL and reward, with the relaxation replaced by an exact,
    non-differentiable Gumbel-max sample.
    """
    from .core import exact_kl, leave_one_out_baseline, masked_sum, reference_logits, soft_rollout
    from .trainers.relaxations import StraightThroughGumbel

    args, eos, model = trainer.args, trainer.processing_class.eos_token_id, trainer.model
    enc = trainer.tokenize_prompts([row for row in _prompt_rows(prompts) for _ in range(samples_per_prompt)])
    gumbel_max = StraightThroughGumbel()
    rollout = soft_rollout(
        model, enc["input_ids"], enc["attention_mask"], relax=lambda logits, step: gumbel_max(logits.detach(), 1.0),  # one-hot, no gradient
        max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens, eos_token_id=eos,
    )
    ref_model, ref_context = trainer.reference_context(model)
    with ref_context:
        ref_logits = reference_logits(ref_model, rollout, args.min_new_tokens, eos)  # (B, T, V)
    kl = masked_sum(exact_kl(rollout.logits, ref_logits), rollout.mask, dim=1)  # (B,) with its pathwise gradient
    f = soft_rewards(trainer, rollout) - args.beta * kl  # (B,)
    token_logps = F.log_softmax(rollout.logits, dim=-1).gather(-1, rollout.tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)
    logp = masked_sum(token_logps, rollout.mask, dim=1)  # (B,) log pi(y) up to and including the first EOS
    advantages = f.detach() - leave_one_out_baseline(f.detach(), samples_per_prompt)  # (B,)
    return -(advantages * logp + f).mean()


def grade_bias(
    trainer,
    prompts: list[str | dict],
    num_estimates: int = 16,
    reference_batches: int = 32,
    samples_per_prompt: int = 4,
    seed: int = 0,
    estimates: torch.Tensor | None = None,
    project_dim: int | None = None,
) -> dict[str, float]:
    """GRADE's mean gradient against a high-sample score-function estimate of the gradient of the SAME hard objective.

    g_grade = mean of `num_estimates` GRADE estimates (or the given `estimates`, drawn with the same `project_dim`);
    g_ref = mean of `reference_batches` estimates of `score_function_loss` (each: the N prompts x r samples). Returns
    `compare_means(g_grade, g_ref)` (plug-in and noise-corrected cosine, relative error, its noise floor, the
    noise-corrected relative bias, the reference's relative standard error) and `reference_samples`.

    When it is meaningful: for `grade_ste` the forward pass IS the hard objective (real tokens, exact KL along the
    sampled prefix), so the gap is the straight-through estimator's bias; it does not vanish as tau -> 0 (the STE is
    biased at every tau, and its variance grows like 1/tau). For `grade` (soft Gumbel-softmax) the reward scores
    relaxed tokens and the KL is taken on relaxed prefixes: the estimator is unbiased for its own relaxed objective,
    which differs from the hard one by design; the gap then says how far GRADE's update direction is from the
    gradient of what is evaluated (the reward of real text). The reference scores its hard samples through the same
    `score_soft` on one-hot tokens, so both sides differentiate the same function; that it is the text reward is the
    reward's own property (the sentiment reward: yes; the length reward's surrogate counts tokens, not words).
    The score-function reference is noisy (its SNR per completion is REINFORCE's): read the noise-corrected values,
    and raise `reference_batches` until reference_relative_se is small (a relative SE s costs about 1/s^2 batches).
    """
    from .trainers.grade import GumbelGRADETrainer

    if not isinstance(trainer, GumbelGRADETrainer):
        raise ValueError(f"grade_bias needs a GumbelGRADETrainer (method grade or grade_ste), got {type(trainer).__name__}")
    if estimates is None:
        estimates = gradient_estimates(trainer, prompts, num_estimates, seed, project_dim=project_dim)
    params = probed_parameters(trainer)
    sketch = CountSketch(project_dim) if project_dim else None  # the same map as the estimates'
    total, total_sq_norm = None, 0.0
    with isolated(trainer, seed + 1) as fresh_state:
        for _ in range(reference_batches):
            fresh_state()
            g = flat_gradient(score_function_loss(trainer, prompts, samples_per_prompt), params, sketch).double()
            total = g if total is None else total + g
            total_sq_norm += g.dot(g).item()
    n = reference_batches
    g_ref = total / n
    trace_ref = max(total_sq_norm - n * g_ref.dot(g_ref).item(), 0.0) / (n - 1)
    result = compare_means(estimates.double().mean(0), estimator_statistics(estimates)["trace_cov"], estimates.shape[0], g_ref, trace_ref, n)
    return {**result, "reference_samples": n * len(prompts) * samples_per_prompt}


def compare_means(mean_a: torch.Tensor, trace_a: float, n_a: int, mean_b: torch.Tensor, trace_b: float, n_b: int) -> dict[str, float]:
    """How far the expectation of estimator a lies from that of b (the reference), from two independent sample means.

    mean_x: the mean of n_x draws; trace_x: their total variance (estimator_statistics' trace_cov). The noise terms
    come from E||mean_x||^2 = ||mu_x||^2 + trace_x / n_x and E<mean_a, mean_b> = <mu_a, mu_b> (independent):
        cosine, relative_error      plug-in: cos(mean_a, mean_b), ||mean_a - mean_b|| / ||mean_b||
        noise_floor                 sqrt(trace_a / n_a + trace_b / n_b) / ||mean_b||: relative_error's size when mu_a = mu_b
        cosine_corrected            <mean_a, mean_b> / sqrt((||mean_a||^2 - trace_a/n_a)(||mean_b||^2 - trace_b/n_b))
        relative_bias               sqrt(||mean_a - mean_b||^2 - trace_a/n_a - trace_b/n_b) / sqrt(||mean_b||^2 - trace_b/n_b)
        reference_relative_se       sqrt(trace_b / n_b) / ||mean_b||
    The corrected ones estimate cos(mu_a, mu_b) and ||mu_a - mu_b|| / ||mu_b|| (consistent; NaN when a signal
    estimate comes out <= 0, i.e. the noise swamps it).
    """
    mean_a, mean_b = mean_a.double(), mean_b.double()
    noise_a, noise_b = trace_a / n_a, trace_b / n_b
    sq_a, sq_b, cross = mean_a.dot(mean_a).item(), mean_b.dot(mean_b).item(), mean_a.dot(mean_b).item()
    gap_sq = sq_a - 2 * cross + sq_b
    signal_a, signal_b = sq_a - noise_a, sq_b - noise_b
    return {
        "cosine": cross / math.sqrt(sq_a * sq_b),
        "relative_error": math.sqrt(gap_sq / sq_b),
        "noise_floor": math.sqrt((noise_a + noise_b) / sq_b),
        "cosine_corrected": cross / math.sqrt(signal_a * signal_b) if signal_a > 0 and signal_b > 0 else math.nan,
        "relative_bias": math.sqrt(max(0.0, gap_sq - noise_a - noise_b) / signal_b) if signal_b > 0 else math.nan,
        "reference_relative_se": math.sqrt(noise_b / sq_b),
    }


# ---------------------------------------------------------------- during training


class GradientProbeCallback(TrainerCallback):
    """Probes the gradient estimator at chosen optimizer steps (0 = before training) on a FIXED prompt batch.

    Each probe appends `{"step", "probe_mean_sq_norm", "probe_trace_cov", "probe_snr", "probe_snr_plugin",
    "probe_cosine_to_mean", "probe_cosine_loo", "probe_mean_norm", "probe_num_estimates", "probe_seconds"}` to
    `state.log_history` and sends it to the reporters. The prompts are `prompts`, or the first `num_prompts` of the
    trainer's training set. Attach the trainer (`callback.trainer = trainer`), as for the evaluation callback.
    Cost per probe: `num_estimates` forward+backward passes of one batch of `num_prompts` prompts. Under several
    processes each one computes the same probe locally (same prompts and seed, no gradient all-reduce).
    """

    def __init__(self, probe_steps, num_estimates: int = 16, num_prompts: int = 8, seed: int = 0, include_value_loss: bool = False, project_dim: int | None = None, prompts=None):
        self.probe_steps = sorted({int(s) for s in probe_steps or []})
        self.num_estimates, self.num_prompts, self.seed = num_estimates, num_prompts, seed
        self.include_value_loss, self.project_dim = include_value_loss, project_dim
        self.prompts = list(prompts) if prompts is not None else None
        self.trainer = None

    def probe(self, state) -> dict:
        trainer = self.trainer
        if self.prompts is None:
            self.prompts = first_rows(trainer.train_dataset, self.num_prompts)
        start = time.time()
        G = gradient_estimates(trainer, self.prompts, self.num_estimates, self.seed + state.global_step, self.include_value_loss, self.project_dim)
        stats = estimator_statistics(G)
        row = {f"probe_{key}": stats[key] for key in PROBE_KEYS}
        row.update(probe_num_estimates=self.num_estimates, probe_seconds=time.time() - start)
        self._log(state, row)
        return row

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer is not None and state.global_step == 0 and 0 in self.probe_steps:
            self.probe(state)

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer is not None and state.global_step in self.probe_steps:
            self.probe(state)

    def _log(self, state, metrics: dict) -> None:
        # As EvaluationCallback._log: straight to the history and the reporters, not through trainer.log,
        # which may flush the trainer's own metric window (TRL's GRPOTrainer does).
        trainer = self.trainer
        state.log_history.append({**metrics, "epoch": state.epoch, "step": state.global_step})
        should_log = trainer.control.should_log  # on_log resets it; this step's training log must still happen
        trainer.control = trainer.callback_handler.on_log(trainer.args, state, trainer.control, dict(metrics))
        trainer.control.should_log = should_log


# ---------------------------------------------------------------- command line

USAGE = (
    "usage: python -m grade_trl.probe RECIPE.yaml [RECIPE.yaml ...] [--checkpoint DIR] [--step N] [--num_estimates 16] "
    "[--num_prompts 8] [--probe_seed 0] [--include_value_loss] [--project_dim D] [--bias] [--bias_batches 32] "
    "[--bias_samples_per_prompt 4] [--output probe.json] [--key value ...]"
)
CLI_OPTIONS = {  # option: (type, default); every other --key value is a recipe override applied to every recipe
    "checkpoint": (str, None),
    "step": (int, None),
    "num_estimates": (int, 16),
    "num_prompts": (int, 8),
    "probe_seed": (int, 0),
    "include_value_loss": (bool, False),
    "project_dim": (int, None),
    "bias": (bool, False),
    "bias_batches": (int, 32),
    "bias_samples_per_prompt": (int, 4),
    "output": (str, "probe.json"),
}


def build_recipe_trainer(recipe, checkpoint: str | None = None, step: int | None = None):
    """The recipe's trainer and task, built with the runner's own functions (no training, no evaluation callback).

    checkpoint: a folder saved by a run (`{output_dir}/model`, a `checkpoint-N` folder, or an `output_dir` holding
    `model/`): its policy weights (PPO: and value head) are loaded into the trainer; the reference stays the recipe's
    model. step: the optimizer step the probe stands for (GRADE's tau depends on it); default the checkpoint's
    `trainer_state.json` global_step, else 0.
    """
    from accelerate import PartialState
    from transformers import set_seed

    from .recipe import RecipeError
    from .run import build_task, build_trainer, loading

    run_args, config = recipe.run, recipe.config
    if checkpoint is not None:
        if os.path.isdir(os.path.join(checkpoint, "model")):
            checkpoint = os.path.join(checkpoint, "model")
        if not os.path.isdir(checkpoint):
            raise RecipeError(f"--checkpoint: no such folder {checkpoint!r} (give a run's output_dir, its model/ folder or a checkpoint-N folder)")
    PartialState(cpu=config.use_cpu)
    set_seed(config.seed)
    run_args.gold_judge = "none"  # the probe does not evaluate: no judge to fit
    tokenizer, task = build_task(recipe)
    with loading("model_name_or_path", run_args.model_name_or_path):
        trainer = build_trainer(run_args, config, task, tokenizer, [])
    if checkpoint is not None:
        with loading("--checkpoint", checkpoint):
            trainer._load_from_checkpoint(checkpoint)
        state_file = os.path.join(checkpoint, "trainer_state.json")
        if step is None and os.path.isfile(state_file):
            with open(state_file) as f:
                step = json.load(f).get("global_step")
    trainer.state.global_step = int(step or 0)
    return trainer, task


def probe_recipe(recipe, path: str, options: dict) -> dict:
    """Build one recipe's trainer, probe it on its first `num_prompts` training prompts, return one result row."""
    trainer, task = build_recipe_trainer(recipe, options["checkpoint"], options["step"])
    prompts = first_rows(task.train_dataset, options["num_prompts"])
    start = time.time()
    G = gradient_estimates(trainer, prompts, options["num_estimates"], options["probe_seed"], options["include_value_loss"], options["project_dim"])
    row = {
        "recipe": path,
        "method": recipe.run.method,
        "task": recipe.run.task,
        "step": trainer.state.global_step,
        "checkpoint": options["checkpoint"],
        "num_params": sum(p.numel() for p in probed_parameters(trainer, options["include_value_loss"])),
        "dimensions": G.shape[1],
        "num_estimates": G.shape[0],
        "completions_per_estimate": completions_per_estimate(trainer, len(prompts)),
        **estimator_statistics(G),
        "seconds": time.time() - start,
        "prompts": [_prompt_text(p) for p in prompts],
    }
    if hasattr(trainer, "tau"):
        row["tau"] = trainer.tau
    if options["bias"] and recipe.run.method in ("grade", "grade_ste"):
        start = time.time()
        row["bias"] = grade_bias(
            trainer, prompts, reference_batches=options["bias_batches"], samples_per_prompt=options["bias_samples_per_prompt"],
            seed=options["probe_seed"], estimates=G, project_dim=options["project_dim"],
        )
        row["bias"]["seconds"] = time.time() - start
    return row


def format_table(rows: list[dict]) -> str:
    """One line per recipe: the scale-dependent statistics, then the scale-free ones."""
    header = f"{'recipe':<28} {'method':<10} {'compl.':>6} {'mean_sq_norm':>12} {'trace_cov':>11} {'mean_norm':>9} {'snr':>8} {'snr/compl':>9} {'snr_plugin':>10} {'cos_mean':>8} {'cos_loo':>8} {'sec':>6}"
    lines = [header]
    for r in rows:
        lines.append(
            f"{os.path.splitext(os.path.basename(r['recipe']))[0]:<28} {r['method']:<10} {r['completions_per_estimate']:>6} {r['mean_sq_norm']:>12.4g} "
            f"{r['trace_cov']:>11.4g} {r['mean_norm']:>9.4g} {r['snr']:>8.4f} {r['snr'] / r['completions_per_estimate']:>9.5f} {r['snr_plugin']:>10.4f} {r['cosine_to_mean']:>8.4f} {r['cosine_loo']:>8.4f} {r['seconds']:>6.0f}"
        )
    for r in rows:
        if "bias" in r:
            b = r["bias"]
            lines.append(
                f"bias {r['method']}: vs the score-function reference ({b['reference_samples']} samples, relative SE {b['reference_relative_se']:.3f}): "
                f"cosine {b['cosine']:.3f} (noise-corrected {b['cosine_corrected']:.3f}), relative error {b['relative_error']:.3f} "
                f"(noise floor {b['noise_floor']:.3f}; noise-corrected bias {b['relative_bias']:.3f})"
            )
    return "\n".join(lines)


def parse_cli(argv: list[str]) -> tuple[list[str], dict, dict]:
    """(recipe paths, probe options, recipe overrides)."""
    from .recipe import RecipeError, coerce, parse_overrides

    paths = []
    while argv and not argv[0].startswith("--"):
        paths.append(argv.pop(0))
    if not paths:
        raise RecipeError(USAGE)
    overrides = parse_overrides(argv)
    options = {key: coerce(f"--{key}", overrides.pop(key, default), tp | None) for key, (tp, default) in CLI_OPTIONS.items()}
    if options["num_estimates"] < 2 or options["num_prompts"] < 1:
        raise RecipeError(f"--num_estimates must be >= 2 and --num_prompts >= 1, got {options['num_estimates']} and {options['num_prompts']}")
    if options["checkpoint"] is not None and len(paths) > 1:
        raise RecipeError(f"--checkpoint holds one run's weights: give one recipe with it, not {len(paths)}")
    if options["bias"] and options["bias_samples_per_prompt"] < 2:
        raise RecipeError(f"--bias_samples_per_prompt must be >= 2 (leave-one-out baseline), got {options['bias_samples_per_prompt']}")
    return paths, options, overrides


def main(argv: list[str] | None = None) -> int:
    """`python -m grade_trl.probe RECIPE [RECIPE ...] [options] [--key value overrides]`: table on stdout, JSON file."""
    from .recipe import RecipeError, build_recipe, load_recipe_file
    from .results import write_json_atomic
    from .rewards.base import RewardFunctionError
    from .run import close_process_group, quiet_libraries

    argv = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["python -m grade_trl.probe", *argv])
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\n\n" + __doc__)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        paths, options, overrides = parse_cli(list(argv))
        recipes = [build_recipe({**load_recipe_file(path), **overrides}) for path in paths]  # validate all before any work
        quiet_libraries()
        rows = []
        for path, recipe in zip(paths, recipes):
            logger.info("probing %s (%s): %d estimates on %d prompts", path, recipe.run.method, options["num_estimates"], options["num_prompts"])
            rows.append(probe_recipe(recipe, path, options))
            write_json_atomic(options["output"], {"command": command, "options": options, "overrides": overrides, "results": rows})
        print(format_table(rows))
        print(f"\nresults: {options['output']}")
        return 0
    except (RecipeError, RewardFunctionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        close_process_group()


if __name__ == "__main__":
    sys.exit(main())
