"""GRADE's exact KL and its entropy metric: one pass against the two passes they were, side by side in one process.

Before: the KL's forward wrote p, log p - log q and their product, three (B, T, V) temporaries, and summed the
product; the step's entropy metric then ran a log-softmax of its own over the policy's logits, its exp and a
product (three more). After (`core.kl.exact_kl_and_entropy`): the product written over log p - log q, and the
entropy from the KL's own p (written over) and log p: two temporaries in all, the same values bit for bit. Prints
the median time of each, alternating, and the minor page faults (fresh memory the kernel had to map: on the 2-core
development VM each costs microseconds, README "GRADE's cost").

    python benchmarks/kl_entropy_pass.py --batch_size 8 --new_tokens 48 --vocab 50257 --threads 2
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from grade_trl.core import exact_kl_and_entropy, masked_mean


def before(policy_logits, ref_logits, mask):
    """The two passes as they were: the KL's forward (`(p * (log p - log q)).sum(-1)`) and the separate entropy."""
    logp, logq = F.log_softmax(policy_logits, dim=-1), F.log_softmax(ref_logits, dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    entropy_logp = F.log_softmax(policy_logits, dim=-1)
    entropy = -(entropy_logp.exp() * entropy_logp).sum(-1)
    return masked_mean(kl, mask), masked_mean(entropy, mask)


def after(policy_logits, ref_logits, mask):
    kl, entropy = exact_kl_and_entropy(policy_logits, ref_logits)
    return masked_mean(kl, mask), masked_mean(entropy, mask)


def measure(function, *args) -> tuple[float, int]:
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=48)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds of each, alternating, after one untimed")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch_size, args.new_tokens, args.vocab)
    policy_logits, ref_logits = torch.randn(shape, generator=generator) * 3, torch.randn(shape, generator=generator) * 3
    mask = torch.ones(shape[:2])
    kl_before, entropy_before = before(policy_logits, ref_logits, mask)
    kl_after, entropy_after = after(policy_logits, ref_logits, mask)
    print(f"KL {kl_before.item():.6f} -> {kl_after.item():.6f}, entropy {entropy_before.item():.6f} -> {entropy_after.item():.6f}"
          f" (bit for bit the same: {torch.equal(kl_before, kl_after) and torch.equal(entropy_before, entropy_after)})")
    runs = {"before": [], "after": []}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, function in (("before", before), ("after", after)):
                runs[name].append(measure(function, policy_logits, ref_logits, mask))
    result = {name: {"seconds": statistics.median(t for t, _ in r), "minor_faults": statistics.median(f for _, f in r)} for name, r in runs.items()}
    print(f"(B, T, V) = {shape}, {args.threads} threads, median of {args.rounds} rounds")
    for name, r in result.items():
        print(f"  {name:<6} {r['seconds'] * 1e3:8.1f} ms  {r['minor_faults']:>8.0f} minor faults")
    print(f"  after / before: {result['after']['seconds'] / result['before']['seconds']:.2f}x time")
    return result


if __name__ == "__main__":
    main()
