"""GRADE's estimators against an exact gradient: a toy autoregressive model whose expectation can be enumerated.

Model: V tokens, L positions. The first token's logits are theta_0 (V,); each next token's logits are y_{t-1} @ W
(W: V x V), y the relaxed (or one-hot) previous token, so the gradient flows through the generated inputs as in
GRADE's rollout. Reward: a random table R[y_1, ..., y_L], extended to relaxed inputs multilinearly,
R(y) = sum R[i_1..i_L] y_1[i_1] ... y_L[i_L], which equals the table on one-hot inputs (as the sentiment reward does
on real tokens). The exact gradient of E_{y ~ p}[R(y)] sums over all V^L sequences.

Each estimator is run on N independent samples with per-sample parameter copies, so every sample's gradient is
its own row: mean, bias against the exact gradient (relative, with the Monte-Carlo noise removed), cosine and
total variance (relative to |grad|^2) across temperatures. The score-function estimator R(y) grad log p(y) is the
unbiased reference.

    python benchmarks/estimator_toy.py                          # V=4, L=3, tau 0.25 .. 2, N = 50,000
    python benchmarks/estimator_toy.py --output docs/results/estimator_toy.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grade_trl.trainers.relaxations import build_relaxation

ESTIMATORS = ("soft", "ste", "reinmax", "rao", "gapped")


def toy_problem(vocab: int = 4, length: int = 3, seed: int = 0, scale: float = 1.0) -> dict:
    """Random logits theta_0 (V,), transition logits W (V, V) and reward table (V,)*L in [0, 1], float64."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "theta0": scale * torch.randn(vocab, generator=gen, dtype=torch.float64),
        "W": scale * torch.randn(vocab, vocab, generator=gen, dtype=torch.float64),
        "table": torch.rand((vocab,) * length, generator=gen, dtype=torch.float64),
    }


def multilinear_reward(table: torch.Tensor, tokens: list[torch.Tensor]) -> torch.Tensor:
    """R(y) = sum_{i_1..i_L} table[i_1..i_L] prod_t y_t[i_t] for a batch of relaxed tokens y_t (N, V). (N,)"""
    value = table.unsqueeze(0).expand(tokens[0].shape[0], *table.shape)
    for y in tokens:
        value = (y.view(*y.shape, *([1] * (value.dim() - 2))) * value).sum(1)
    return value


def exact_gradient(problem: dict) -> tuple[float, torch.Tensor]:
    """E[R] and its gradient (flattened theta_0, W) by enumerating every sequence."""
    theta0 = problem["theta0"].clone().requires_grad_(True)
    W = problem["W"].clone().requires_grad_(True)
    vocab, length = theta0.shape[0], problem["table"].dim()
    expected = theta0.new_zeros(())
    for sequence in itertools.product(range(vocab), repeat=length):
        log_p, logits = theta0.new_zeros(()), theta0
        for token in sequence:
            log_p = log_p + F.log_softmax(logits, -1)[token]
            logits = W[token]
        expected = expected + log_p.exp() * problem["table"][sequence]
    grad = torch.autograd.grad(expected, [theta0, W], allow_unused=True, materialize_grads=True)  # W unused when L = 1
    return expected.item(), torch.cat([g.flatten() for g in grad])


def sample_gradients(problem: dict, estimator: str, tau: float, samples: int, seed: int = 0, **options) -> torch.Tensor:
    """(samples, P) per-sample gradient estimates of E[R]: `estimator` one of ESTIMATORS or `score` (R grad log p)."""
    torch.manual_seed(seed)
    theta0 = problem["theta0"].expand(samples, -1).clone().requires_grad_(True)  # a copy per sample: per-sample grads
    W = problem["W"].expand(samples, -1, -1).clone().requires_grad_(True)
    vocab, length = theta0.shape[1], problem["table"].dim()
    relaxation = None if estimator == "score" else build_relaxation(estimator, **options)
    tokens, log_p, logits = [], theta0.new_zeros(samples), theta0
    for _ in range(length):
        if relaxation is None:
            hard = torch.distributions.Categorical(logits=logits.detach()).sample()
            log_p = log_p + F.log_softmax(logits, -1).gather(1, hard.unsqueeze(1)).squeeze(1)
            y = F.one_hot(hard, vocab).to(logits.dtype)
        else:
            y = relaxation(logits, tau).forward_value(vocab)
        tokens.append(y)
        logits = torch.einsum("nv,nvw->nw", y, W)
    reward = multilinear_reward(problem["table"], tokens)
    objective = reward.detach() * log_p if relaxation is None else reward
    grads = torch.autograd.grad(objective.sum(), [theta0, W], allow_unused=True, materialize_grads=True)
    return torch.cat([g.reshape(samples, -1) for g in grads], dim=1)


def summarise(grads: torch.Tensor, exact: torch.Tensor) -> dict:
    """Relative bias (Monte-Carlo noise removed: |mean - g|^2 - tr(Cov)/N), cosine, relative total variance."""
    n = grads.shape[0]
    mean = grads.mean(0)
    total_variance = grads.var(0).sum().item()
    norm2 = exact.pow(2).sum().item()
    bias2 = max((mean - exact).pow(2).sum().item() - total_variance / n, 0.0)
    return {
        "relative_bias": math.sqrt(bias2 / norm2),
        "relative_bias_noise_floor": math.sqrt(total_variance / n / norm2),
        "cosine": F.cosine_similarity(mean, exact, dim=0).item(),
        "relative_variance": total_variance / norm2,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=4)
    parser.add_argument("--length", type=int, default=3)
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--taus", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    parser.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=ESTIMATORS)
    parser.add_argument("--rao_samples", type=int, default=8)
    parser.add_argument("--problems", type=int, default=5, help="random problems (seeds) averaged over")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    problems = [toy_problem(args.vocab, args.length, seed) for seed in range(args.problems)]
    exact = [exact_gradient(p)[1] for p in problems]
    rows = []

    def run(name, estimator, tau, **options):
        stats = [summarise(sample_gradients(p, estimator, tau, args.samples, seed=i, **options), g) for i, (p, g) in enumerate(zip(problems, exact))]
        row = {"estimator": name, "tau": tau, **{k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}}
        rows.append(row)
        print(f"{name:<10} tau={tau if tau is not None else '-':<5} bias {row['relative_bias']:.3f} (floor {row['relative_bias_noise_floor']:.3f})  "
              f"cos {row['cosine']:.3f}  rel. variance {row['relative_variance']:.3g}", flush=True)

    run("score", "score", None)
    for estimator in args.estimators:
        for tau in args.taus:
            run(estimator, estimator, tau, **({"rao_samples": args.rao_samples} if estimator == "rao" else {}))
    result = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "rows": rows}
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
