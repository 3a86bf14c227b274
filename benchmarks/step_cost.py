"""Cost of ONE optimizer step: GRADE (soft and straight-through) vs a sampled policy gradient.

What it measures
    Wall-clock time and peak memory of a single update step on the same policy, batch,
    prompt length and number of generated tokens, for:

    * GRADE (soft)  - relaxed rollout with Gumbel-softmax (`soft_rollout`), reference logits on
      the same soft inputs (`reference_logits`), exact KL summed over the completion, the
      differentiable sentiment reward (`score_soft` on `soft_reward_inputs`), `grade_loss`,
      backward through all of it, AdamW step, zero_grad;
    * GRADE-STE     - the same with the straight-through Gumbel estimator;
    * PG            - a REINFORCE-style step: `model.generate` under no_grad (pure sampling),
      one policy forward with grad and one reference forward without on prompt + completion,
      hard reward (`score_ids`) minus beta * k3 KL estimate, batch-mean baseline,
      loss = -mean(advantage * mean token log-prob), backward, AdamW step, zero_grad.

    Every row generates exactly `--max_new_tokens` tokens (min_new_tokens = max_new_tokens), so
    the three methods do the same amount of generation. Each method gets its own fresh copy of
    the policy and its own AdamW; the frozen reference and the reward model (an untrained head on
    a backbone of the same shape; the head's weights do not change the cost) are shared. One
    warm-up step (which also allocates AdamW's state) is followed by `--repeats` timed steps;
    the median is reported.

    Peak memory: on CUDA, torch.cuda.max_memory_allocated over the step (reset before each step;
    it includes the resident weights, gradients and optimizer state, which are the same for all
    methods). On CPU, the growth of the process RSS over its value at the start of the step,
    sampled every 2 ms by a background thread (freed heap is returned to the OS with
    malloc_trim before each step so the growth is not hidden by the allocator's cache).

How to run
    CPU, the bundled 5.3M-parameter model (a few minutes on 2 cores; on a machine shared with other
    jobs pass --threads 1, since oversubscribed OpenMP threads make CPU timings meaningless):
        python benchmarks/step_cost.py --device cpu --repeats 2 --threads 1
    GPU, a randomly initialised gpt2-medium shape (no download needed):
        python benchmarks/step_cost.py --model gpt2-shaped-random --n_layer 24 --n_embd 1024 --n_head 16 --device cuda
    Any hub id or local path of a causal LM works as --model; --json PATH also writes the numbers.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import platform
import statistics
import threading
import time

import psutil
import torch
from transformers import AutoModel, GPT2Config, GPT2LMHeadModel

from grade_trl.core import exact_kl, masked_sum, reference_logits, soft_rollout
from grade_trl.models import load_causal_lm
from grade_trl.rewards.sentiment import SentimentReward, SentimentRewardModel
from grade_trl.trainers.grade import grade_loss, soft_reward_inputs
from grade_trl.trainers.relaxations import RELAXATIONS

RANDOM_GPT2 = "gpt2-shaped-random"
BETA, TAU, LR = 0.1, 2.0, 1e-5  # GRADE experiment's beta and starting temperature; values do not change the cost


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help=f"`embedded`, a hub id, a local path, or `{RANDOM_GPT2}` (random GPT-2 of --n_layer/--n_embd/--n_head, vocab 50257)")
    parser.add_argument("--n_layer", type=int, default=24, help=f"layers of {RANDOM_GPT2}")
    parser.add_argument("--n_embd", type=int, default=1024, help=f"hidden size of {RANDOM_GPT2}")
    parser.add_argument("--n_head", type=int, default=16, help=f"attention heads of {RANDOM_GPT2}")
    parser.add_argument("--batch_size", type=int, default=16, help="prompts per step")
    parser.add_argument("--max_new_tokens", type=int, default=48, help="tokens generated per prompt (every row generates all of them)")
    parser.add_argument("--prompt_length", type=int, default=32, help="tokens per prompt (random ids, no padding)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per method (median reported), after 1 warm-up step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype of all models")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (torch.set_num_threads; default: torch's). Use fewer than the "
                        "free cores on a shared machine: oversubscribed OpenMP threads can slow CPU steps down by 10x or more")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and of the random model")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the numbers to this JSON file")
    return parser.parse_args()


# Models ---------------------------------------------------------------------------------------------------
def build_models(args, dtype):
    """(policy on CPU, frozen reference on device, reward model on device, eos id, shape string)."""
    if args.model == RANDOM_GPT2:
        config = GPT2Config(
            vocab_size=50257, n_positions=1024, n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
        policy = GPT2LMHeadModel(config).to(dtype)
        reward_model = SentimentRewardModel(AutoModel.from_config(config).to(dtype), RANDOM_GPT2)
    else:
        policy = load_causal_lm(args.model, dtype=dtype)
        reward_model = SentimentRewardModel.from_backbone(args.model, dtype=dtype)
    reward_model = reward_model.to(args.device)
    ref_model = copy.deepcopy(policy).requires_grad_(False).eval().to(args.device)
    c = policy.config
    params = sum(p.numel() for p in policy.parameters())
    shape = f"{args.model}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, vocab {c.vocab_size}, {params / 1e6:.1f}M params, {args.dtype}"
    return policy, ref_model, reward_model, c.eos_token_id, shape


# The two update steps -------------------------------------------------------------------------------------
def grade_step(policy, ref_model, reward, optimizer, prompt_ids, prompt_mask, relax, new_tokens, eos):
    rollout = soft_rollout(
        policy, prompt_ids, prompt_mask, relax=lambda logits, step: relax(logits, TAU),
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=eos,
    )
    ref_logits = reference_logits(ref_model, rollout, new_tokens, eos)  # (B, T, V)
    kl = masked_sum(exact_kl(rollout.logits, ref_logits), rollout.mask, dim=1)  # (B,)
    soft, mask = soft_reward_inputs(reward, rollout, eos)
    loss = grade_loss(reward.score_soft(soft, mask).float(), kl, BETA)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def token_logprobs(model, sequences, prompt_length):
    """log pi(token) of each generated token, (B, T)."""
    logits = model(input_ids=sequences, attention_mask=torch.ones_like(sequences)).logits[:, prompt_length - 1 : -1]
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, sequences[:, prompt_length:, None]).squeeze(-1)


def pg_step(policy, ref_model, reward_model, optimizer, prompt_ids, prompt_mask, new_tokens, eos):
    prompt_length = prompt_ids.shape[1]
    with torch.no_grad():
        sequences = policy.generate(
            input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True, top_p=1.0, top_k=0, temperature=1.0,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=eos,
        )  # (B, P + T)
    logp = token_logprobs(policy, sequences, prompt_length)  # (B, T), with grad
    with torch.no_grad():
        ref_logp = token_logprobs(ref_model, sequences, prompt_length)
        completion = sequences[:, prompt_length:]
        scores = reward_model.score_ids(completion, torch.ones_like(completion)).float()  # (B,)
        log_ratio = ref_logp - logp
        kl = (log_ratio.exp() - 1 - log_ratio).sum(-1)  # k3 estimator, summed over the completion
        shaped = scores - BETA * kl
        advantage = shaped - shaped.mean()
    loss = -(advantage * logp.mean(-1)).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# Measurement ----------------------------------------------------------------------------------------------
class RssPeak:
    """Peak RSS growth (bytes) over the block, sampled by a background thread."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s, self.process = interval_s, psutil.Process()

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        self.growth = self.peak - self.start


def release_memory(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif platform.system() == "Linux":
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass


def measure(step, device: torch.device) -> dict:
    """Run `step()` once; seconds, peak MiB (see module docstring) and MiB above the step's start."""
    release_memory(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_bytes = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated()
        return {"seconds": seconds, "peak_mib": peak / 2**20, "step_growth_mib": (peak - start_bytes) / 2**20}
    with RssPeak() as rss:
        t0 = time.perf_counter()
        step()
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_mib": rss.growth / 2**20, "step_growth_mib": rss.growth / 2**20, "peak_rss_mib": rss.peak / 2**20}


def benchmark(name, make_step, base_policy, args, device) -> dict:
    """Fresh policy copy + AdamW, 1 warm-up step, `repeats` measured steps; medians."""
    policy = copy.deepcopy(base_policy).to(device).train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR)
    step = make_step(policy, optimizer)
    step()  # warm-up: kernels, allocator, AdamW state
    runs = [measure(step, device) for _ in range(args.repeats)]
    del policy, optimizer, step
    release_memory(device)
    result = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    print(f"  {name}: {result['seconds']:.3f} s, {result['peak_mib']:.0f} MiB", flush=True)
    return {"method": name, **result, "runs": runs}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def main():
    args = parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    base_policy, ref_model, reward_model, eos, shape = build_models(args, dtype)
    reward = SentimentReward(reward_model, tokenizer=None)  # only score_soft / include_prompt are used

    generator = torch.Generator().manual_seed(args.seed)
    vocab = base_policy.config.vocab_size
    prompt_ids = torch.randint(0, vocab, (args.batch_size, args.prompt_length), generator=generator)
    if eos is not None:
        prompt_ids[prompt_ids == eos] = (eos + 1) % vocab  # real text, no EOS inside the prompt
    prompt_ids = prompt_ids.to(device)
    prompt_mask = torch.ones_like(prompt_ids)  # no padding
    n = args.max_new_tokens

    def grade(estimator):
        relax = RELAXATIONS[estimator]()
        return lambda policy, opt: lambda: grade_step(policy, ref_model, reward, opt, prompt_ids, prompt_mask, relax, n, eos)

    methods = {
        "GRADE (soft)": grade("soft"),
        "GRADE-STE": grade("ste"),
        "PG (REINFORCE-style)": lambda policy, opt: lambda: pg_step(policy, ref_model, reward_model, opt, prompt_ids, prompt_mask, n, eos),
    }
    header = (
        f"device: {device_name(device)} | model: {shape} | batch {args.batch_size}, prompt {args.prompt_length} tokens, "
        f"{n} new tokens | torch {torch.__version__} | median of {args.repeats} after 1 warm-up"
    )
    print(header, flush=True)
    results = [benchmark(name, make_step, base_policy, args, device) for name, make_step in methods.items()]

    pg = results[-1]
    memory_note = (
        "peak memory: torch.cuda.max_memory_allocated during the step (includes weights, grads, AdamW state)"
        if device.type == "cuda"
        else "peak memory: peak RSS growth over the step's start (sampled every 2 ms)"
    )
    lines = [
        "",
        header,
        "",
        "| method | step time (s) | peak memory (MiB) | time ratio vs PG | memory ratio vs PG |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        r["time_ratio_vs_pg"] = r["seconds"] / pg["seconds"]
        r["memory_ratio_vs_pg"] = r["peak_mib"] / pg["peak_mib"] if pg["peak_mib"] > 0 else float("nan")
        lines.append(
            f"| {r['method']} | {r['seconds']:.3f} | {r['peak_mib']:.0f} | {r['time_ratio_vs_pg']:.2f} | {r['memory_ratio_vs_pg']:.2f} |"
        )
    if device.type == "cuda":
        lines.append("")
        lines.append("memory above the step's start (MiB): " + ", ".join(f"{r['method']} {r['step_growth_mib']:.0f}" for r in results))
    lines += ["", memory_note]
    print("\n".join(lines))

    if args.json:
        payload = {
            "device": device_name(device), "model": shape, "batch_size": args.batch_size, "prompt_length": args.prompt_length,
            "max_new_tokens": n, "repeats": args.repeats, "dtype": args.dtype, "torch": torch.__version__,
            "memory_measure": memory_note, "results": results,
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)


if __name__ == "__main__":
    main()
