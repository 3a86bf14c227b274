"""The gradient-estimator probe (library; the command is `python -m grade_trl.probe`): how noisy, and for GRADE
how biased, is each method's gradient, measured the right way.

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

What the published "gradient variance" measured instead (docs/background.md section 1): the spread of the
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

Each estimate is the gradient of the trainer's public `estimate_loss(rows)` (the method registry's hook, see
`grade_trl.methods`): the training loss itself for GRADE and REINFORCE, a fresh rollout then the loss on all
of it for PPO (at the rollout's parameters, where the ratio is 1), TRL's generation, scoring and loss for
GRPO/CISPO. Nothing is re-implemented, and the probe knows no method by name.

Legend: K estimates, D probed parameters (or sketch dimensions), N prompts, r samples per prompt.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from contextlib import contextmanager

import numpy as np
import torch
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


def prompt_rows(prompts: list) -> list[dict]:
    """Dataset rows as the trainers receive them: `{"prompt": text}` for a string, a row (prompt plus the columns the
    rewards take as keywords, e.g. GSM8K's `answer`) as it is."""
    return [dict(p) if isinstance(p, dict) else {"prompt": p} for p in prompts]


def prompt_text(prompt) -> str:
    return prompt["prompt"] if isinstance(prompt, dict) else prompt


def first_rows(dataset, n: int) -> list[dict]:
    """The first `n` rows of a training set (the probe's fixed batch): the same prompts for every method of a task."""
    return [dataset[i] for i in range(min(n, len(dataset)))]


def completions_per_estimate(trainer, num_prompts: int) -> int:
    """Completions sampled for one estimate: `completions_per_prompt` of the method's config for each prompt."""
    return num_prompts * trainer.args.completions_per_prompt


# ---------------------------------------------------------------- leaving no trace on training


@contextmanager
def isolated(trainer, seed: int):
    """Run probe code at the trainer's current state without leaving a trace on training.

    Inside: the global RNGs (torch CPU and CUDA, python, numpy) are forked and seeded with `seed`; the model is in
    train mode (dropout as the trainer set it: 0 for ours, TRL's `disable_dropout` for GRPO); every parameter's
    `.grad` is set aside. Yields `fresh_state()`, which resets the trainer's `training_state()` (metric windows,
    baselines, KL controllers: whatever the method declares) to what it was on entry, so each estimate sees what a
    real step would. On exit everything (RNG streams, train/eval mode, `.grad` buffers, trainer state) is as it was.
    """
    model = trainer.model
    was_training = model.training
    saved_grads = [(p, p.grad) for p in model.parameters()]
    saved_state = trainer.training_state()
    tokens_seen = trainer.state.num_input_tokens_seen
    ga_missing = "current_gradient_accumulation_steps" not in vars(trainer)
    ga = getattr(trainer, "current_gradient_accumulation_steps", None)
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []

    def fresh_state() -> None:
        trainer.load_training_state(copy.deepcopy(saved_state))

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
            trainer.load_training_state(saved_state)
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
    the full-dimensional ones (relative error about sqrt(2 / d) for a squared norm, sqrt(1 / (2 d)) for a norm, where
    the vector's mass is spread over many coordinates), and the map costs O(D) per estimate
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
    params = trainer.probed_parameters(include_value_loss)
    sketch = CountSketch(project_dim) if project_dim else None  # one fixed map, whatever the probe's seed
    rows = prompt_rows(prompts)
    estimates = []
    with isolated(trainer, seed) as fresh_state:
        for _ in range(num_estimates):
            fresh_state()
            estimates.append(flat_gradient(trainer.estimate_loss(rows, include_value_loss), params, sketch))
    return torch.stack(estimates)  # (K, D)


# ---------------------------------------------------------------- GRADE's bias


def grade_bias(
    trainer,
    prompts: list[str | dict],
    num_estimates: int = 16,
    reference_batches: int = 32,
    samples_per_prompt: int = 4,
    seed: int = 0,
    estimates: torch.Tensor | None = None,
    project_dim: int | None = None,
    reference: dict | None = None,
) -> dict[str, float]:
    """GRADE's mean gradient against a high-sample score-function estimate of the gradient of the SAME hard objective.

    g_grade = mean of `num_estimates` GRADE estimates (or the given `estimates`, drawn with the same `project_dim`);
    g_ref = mean of `reference_batches` estimates of the trainer's `score_function_loss` (each: the N prompts x r samples;
    or the given `reference`, from `score_function_reference` with the same settings). Returns
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
    if not hasattr(trainer, "score_function_loss"):
        raise ValueError(f"grade_bias needs a relaxed method's trainer (grade*: `score_function_loss`), got {type(trainer).__name__}")
    if estimates is None:
        estimates = gradient_estimates(trainer, prompts, num_estimates, seed, project_dim=project_dim)
    if reference is None:
        reference = score_function_reference(trainer, prompts, reference_batches, samples_per_prompt, seed, project_dim)
    n = reference["batches"]
    result = compare_means(estimates.double().mean(0), estimator_statistics(estimates)["trace_cov"], estimates.shape[0], reference["mean"], reference["trace_cov"], n)
    return {**result, "reference_samples": n * len(prompts) * reference["samples_per_prompt"]}


def score_function_reference(trainer, prompts: list, reference_batches: int = 32, samples_per_prompt: int = 4, seed: int = 0,
                             project_dim: int | None = None) -> dict:
    """The mean and total variance of `reference_batches` estimates of the trainer's `score_function_loss` gradient.

    It depends on the parameters, prompts, reward, kl_coef and lengths, not on the estimator or tau: a sweep over
    those computes it once (`python -m grade_trl.probe --bias_reference FILE`). Returns {mean (P,) float64,
    trace_cov, batches, samples_per_prompt}."""
    params = trainer.probed_parameters()
    sketch = CountSketch(project_dim) if project_dim else None  # the same map as the estimates'
    rows = prompt_rows(prompts)
    total, total_sq_norm = None, 0.0
    with isolated(trainer, seed + 1) as fresh_state:
        for _ in range(reference_batches):
            fresh_state()
            g = flat_gradient(trainer.score_function_loss(rows, samples_per_prompt), params, sketch).double()
            total = g if total is None else total + g
            total_sq_norm += g.dot(g).item()
    n = reference_batches
    g_ref = total / n
    trace_ref = max(total_sq_norm - n * g_ref.dot(g_ref).item(), 0.0) / (n - 1)
    return {"mean": g_ref, "trace_cov": trace_ref, "batches": n, "samples_per_prompt": samples_per_prompt}


def compare_means(mean_a: torch.Tensor, trace_a: float, n_a: int, mean_b: torch.Tensor, trace_b: float, n_b: int) -> dict[str, float]:
    """How far the expectation of estimator a lies from that of b (the reference), from two independent sample means.

    mean_x: the mean of n_x draws; trace_x: their total variance (estimator_statistics' trace_cov). The noise terms
    come from E||mean_x||^2 = ||mu_x||^2 + trace_x / n_x and E<mean_a, mean_b> = <mu_a, mu_b> (independent):
        cosine, relative_error      plug-in: cos(mean_a, mean_b), ||mean_a - mean_b|| / ||mean_b||
        noise_floor                 sqrt(trace_a / n_a + trace_b / n_b) / ||mean_b||: relative_error's size when mu_a = mu_b
        cosine_corrected            <mean_a, mean_b> / sqrt((||mean_a||^2 - trace_a/n_a)(||mean_b||^2 - trace_b/n_b))
        relative_bias               sqrt(||mean_a - mean_b||^2 - trace_a/n_a - trace_b/n_b) / sqrt(||mean_b||^2 - trace_b/n_b)
        reference_relative_se       sqrt(trace_b / n_b) / ||mean_b||
    The corrected ones estimate cos(mu_a, mu_b) and ||mu_a - mu_b|| / ||mu_b|| (consistent). They are NaN where the
    noise swamps what they measure: a signal estimate (||mean_x||^2 - trace_x / n_x, or the gap's) comes out <= 0, or
    the corrected cosine falls outside [-1, 1]. A bias of 0 is not reported for a gap lost in the noise: it would read
    as "unbiased" where the probe cannot tell.
    """
    mean_a, mean_b = mean_a.double(), mean_b.double()
    noise_a, noise_b = trace_a / n_a, trace_b / n_b
    sq_a, sq_b, cross = mean_a.dot(mean_a).item(), mean_b.dot(mean_b).item(), mean_a.dot(mean_b).item()
    gap_sq = sq_a - 2 * cross + sq_b
    signal_a, signal_b, signal_gap = sq_a - noise_a, sq_b - noise_b, gap_sq - noise_a - noise_b
    cosine_corrected = cross / math.sqrt(signal_a * signal_b) if signal_a > 0 and signal_b > 0 else math.nan
    return {
        "cosine": cross / math.sqrt(sq_a * sq_b),
        "relative_error": math.sqrt(gap_sq / sq_b),
        "noise_floor": math.sqrt((noise_a + noise_b) / sq_b),
        "cosine_corrected": cosine_corrected if abs(cosine_corrected) <= 1 else math.nan,
        "relative_bias": math.sqrt(signal_gap / signal_b) if signal_b > 0 and signal_gap > 0 else math.nan,
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


