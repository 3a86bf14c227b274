"""Cost of ONE optimizer step of each method's real trainer: GRADE, GRADE-STE, REINFORCE, PPO and TRL's GRPO.

What it measures
    Wall-clock time and peak memory of one update step (one optimizer step = one batch generated,
    scored and trained on) of the package's own trainers, built the way `grade_trl.run.build_trainer`
    builds them, on the same policy, batch, prompt length, generated length and reward:

    * GRADE (soft)  - `GumbelGRADETrainer`, estimator `soft`: relaxed rollout with Gumbel-softmax (the
      next input is the soft token times the embedding matrix), reference logits on the same soft inputs,
      exact KL summed over the completion, the differentiable sentiment reward on the soft tokens
      (`score_soft`), loss = -mean(R - beta * KL), backward through all of it, clip, AdamW step;
    * GRADE-STE     - the same trainer with estimator `ste` (straight-through Gumbel: one-hot forward,
      Gumbel-softmax backward);
    * REINFORCE     - `REINFORCETrainer`: sampling under no_grad, reward on the decoded text, one policy
      forward with grad and one reference forward without on prompt + completion, k3 KL estimate,
      EMA baseline, loss = -mean(A * mean token log-prob), backward, clip, AdamW step;
    * PPO           - `PPOTrainer` with `ppo_epochs=1, num_mini_batches=1`, so one optimizer step is one
      whole rollout: sampling, reward on the text, one no-grad forward of policy + value head (old
      log-probs and values) and one of the reference, GAE, then one forward with grad of policy + value
      head, clipped surrogate + value loss, backward, clip, AdamW step;
    * TRL GRPO      - `grade_trl.trainers.grpo.GRPOTrainer` (TRL's `GRPOTrainer` as it is) with
      `num_generations=4`, so the batch is batch/4 prompts x 4 completions (the other rows use batch
      prompts x 1 completion): `model.generate`, reward on the text, group-relative advantages, one
      reference forward (beta 0.1 > 0) and one policy forward with grad, DAPO loss, backward, clip, AdamW step.

    Everything that can be made equal is: the model (each trainer loads its own policy and frozen
    reference from the same path), `--batch_size` completions per step, prompts of exactly
    `--prompt_length` tokens (no padding), exactly `--max_new_tokens` generated tokens (min = max: EOS
    is banned until the last token; TRL GRPO gets `generation_kwargs={"min_new_tokens": ...}`), the
    reward object (one `SentimentReward` on an untrained head over the same backbone; the head's weights
    do not change the cost), sampling (temperature 1, top-p `--top_p`, no top-k), KL coefficient 0.1
    (PPO: its own `init_kl_coef`), float32, no dropout, no gradient checkpointing,
    `gradient_accumulation_steps=1`, AdamW (Trainer's default), `max_grad_norm` 1.0.

    Each trainer runs `--warmup + --repeats` optimizer steps through `trainer.train()`; a TrainerCallback
    times every step from `on_step_begin` to `on_step_end` (which brackets the generation, which all these
    trainers do inside the step, the loss, backward, clipping, optimizer step and zero_grad) and records
    its peak memory. The median over the `--repeats` steps after the warm-up is reported.

    Peak memory: on CUDA, torch.cuda.max_memory_allocated over the step (reset before each step; it
    includes the resident weights of the trainer's policy, reference and reward model, its gradients and
    AdamW state). On CPU, the growth of the process RSS over its value at the start of the step, sampled
    every 2 ms by a background thread (freed heap is returned to the OS with malloc_trim before each step
    so the growth is not hidden by the allocator's cache). Trainers run one after another in this process
    and each is deleted before the next is built.

How to run
    CPU, the bundled 5.3M-parameter model (several minutes on 2 cores; on a machine shared with other
    jobs pass --threads 1, since oversubscribed OpenMP threads make CPU timings meaningless):
        python benchmarks/step_cost.py --device cpu --threads 1 --repeats 2
    GPU, a randomly initialised gpt2-medium shape (no download: the GPT-2 tokenizer is read from
    ../shared/tokenizers/gpt2 or --tokenizer):
        python benchmarks/step_cost.py --model gpt2-shaped-random --n_layer 24 --n_embd 1024 --n_head 16 --device cuda
    Any hub id or local path of a causal LM works as --model; --json PATH also writes the numbers.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import logging
import os
import platform
import random
import statistics
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch
import transformers
import trl
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast, PrinterCallback, TrainerCallback

from grade_trl.methods import METHODS, get_method
from grade_trl.models import load_tokenizer, resolve_model_path
from grade_trl.rewards.sentiment import SentimentReward, SentimentRewardModel

RANDOM_GPT2 = "gpt2-shaped-random"
DEFAULT_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "gpt2"
BETA, LR, NUM_GENERATIONS = 0.1, 1e-5, 4  # values do not change the cost; GRPO's group size is the project's recipe's
BASELINE = "reinforce"

# Words that are one token each (with their leading space) in GPT-2-style byte-level BPE vocabularies.
WORDS = (
    "the movie was a film and it is of to in that this with for as on but not you he his they one all at by an be "
    "have from are like just so story time good very out some about more when what there can up only which even "
    "great really well much bad no would also see people first been how love other life best made make way could "
    "than will most after two do think never then"
).split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help=f"`embedded`, a hub id, a local path, or `{RANDOM_GPT2}` (random GPT-2 of --n_layer/--n_embd/--n_head, vocab 50257)")
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help=f"folder with the GPT-2 tokenizer files (vocab.json, merges.txt) for {RANDOM_GPT2}")
    parser.add_argument("--n_layer", type=int, default=24, help=f"layers of {RANDOM_GPT2}")
    parser.add_argument("--n_embd", type=int, default=1024, help=f"hidden size of {RANDOM_GPT2}")
    parser.add_argument("--n_head", type=int, default=16, help=f"attention heads of {RANDOM_GPT2}")
    parser.add_argument("--batch_size", type=int, default=16, help=f"completions per step (TRL GRPO: batch/{NUM_GENERATIONS} prompts x {NUM_GENERATIONS})")
    parser.add_argument("--max_new_tokens", type=int, default=48, help="tokens generated per completion (min = max: every row generates all of them)")
    parser.add_argument("--prompt_length", type=int, default=32, help="tokens per prompt (single-token words, no padding)")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling of REINFORCE, PPO and TRL GRPO (GRADE has none)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first (kernels, allocator, AdamW state)")
    parser.add_argument("--repeats", type=int, default=3, help="timed optimizer steps per method (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype every trainer loads its models in")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (torch.set_num_threads; default: torch's). Use fewer than the "
                        "free cores on a shared machine: oversubscribed OpenMP threads can slow CPU steps down by 10x or more")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="registry methods to measure (default: every one)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts, the random model and every trainer")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    if args.batch_size % NUM_GENERATIONS:
        parser.error(f"--batch_size must be a multiple of {NUM_GENERATIONS} (TRL GRPO's num_generations)")
    return args


# Model, tokenizer, prompts, reward -------------------------------------------------------------------------
def prepare_model(args, workdir: str) -> str:
    """A path every trainer (and TRL, which loads from a path) can load the policy and its tokenizer from."""
    if args.model != RANDOM_GPT2:
        return resolve_model_path(args.model)
    tokenizer = GPT2TokenizerFast.from_pretrained(args.tokenizer)  # a folder with vocab.json and merges.txt
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=1024, n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(args.seed)
    path = os.path.join(workdir, RANDOM_GPT2)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_prompts(tokenizer, n: int, length: int, seed: int) -> list[str]:
    """n prompts of exactly `length` tokens: random single-token words (checked against this tokenizer)."""
    words = [" " + w for w in WORDS]
    words = [w for w in words if len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1]
    rng = random.Random(seed)
    return ["".join(rng.choice(words) for _ in range(length)) for _ in range(n)]


def model_shape(path: str, args) -> str:
    config = transformers.AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(config).parameters())
    return f"{args.model}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size}, {params / 1e6:.1f}M params, {args.dtype}"


# Measurement ----------------------------------------------------------------------------------------------
class RssPeak:
    """Peak RSS (bytes) since `start()`, sampled by a background thread."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s, self.process = interval_s, psutil.Process()

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval_s)

    def start(self):
        self.start_rss = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        return self.peak - self.start_rss


def release_memory(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif platform.system() == "Linux":
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass


class StepCost(TrainerCallback):
    """Seconds and peak memory of every optimizer step, from on_step_begin to on_step_end."""

    def __init__(self, device: torch.device):
        self.device, self.steps, self.rss = device, [], RssPeak()

    def on_step_begin(self, args, state, control, **kwargs):
        release_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start_bytes = torch.cuda.memory_allocated()
        else:
            self.rss.start()
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            seconds = time.perf_counter() - self.t0
            peak = torch.cuda.max_memory_allocated()
            self.steps.append({"seconds": seconds, "peak_mib": peak / 2**20, "step_growth_mib": (peak - self.start_bytes) / 2**20})
        else:
            seconds = time.perf_counter() - self.t0
            growth = self.rss.stop()
            self.steps.append({"seconds": seconds, "peak_mib": growth / 2**20, "step_growth_mib": growth / 2**20, "peak_rss_mib": self.rss.peak / 2**20})


# The trainers ---------------------------------------------------------------------------------------------
def common_args(args, output_dir: str, steps: int) -> dict:
    """TrainingArguments every trainer gets alike."""
    return dict(
        output_dir=output_dir, max_steps=steps, gradient_accumulation_steps=1, learning_rate=LR, max_grad_norm=1.0,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=args.seed,
        use_cpu=args.device == "cpu", bf16=False, gradient_checkpointing=False, model_init_kwargs={"dtype": args.dtype},
    )


# One optimizer step = one fresh batch, generated, scored and trained on once. Each method's config takes the keys it has.
ONE_UPDATE_PER_BATCH = {"ppo_epochs": 1, "num_mini_batches": 1, "num_iterations": 1}


def build(method_name: str, args, path: str, reward, tokenizer, dataset, output_dir: str, callback):
    """The method's trainer from its registry entry (as `grade_trl.build.build_trainer` builds it), set to the benchmark's shape."""
    method = get_method(method_name)
    config_cls = method.config_class
    fields = {f.name for f in dataclasses.fields(config_cls)}
    wanted = {
        **common_args(args, output_dir, args.warmup + args.repeats),
        **config_cls.exact_length_settings(args.max_new_tokens),
        **ONE_UPDATE_PER_BATCH,
        "per_device_train_batch_size": args.batch_size,  # completions: the methods that sample groups take NUM_GENERATIONS per prompt
        "num_generations": NUM_GENERATIONS,
        "max_prompt_length": args.prompt_length,
        method.kl_coefficient: BETA,
        "temperature": 1.0, "top_p": args.top_p, "top_k": 0,  # the sampled methods (GRADE relaxes the full softmax)
        "disable_dropout": True,
        **method.implied,
    }
    config = config_cls(**{key: value for key, value in wanted.items() if key in fields})
    return method.trainer_class(model=path, reward_funcs=[reward], args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[callback])


def benchmark(method: str, args, path, reward, tokenizer, dataset, device, workdir) -> dict:
    callback = StepCost(device)
    release_memory(device)
    # on CUDA, what earlier trainers left allocated (should be only the shared reward model)
    resident_before = torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else None
    trainer = build(method, args, path, reward, tokenizer, dataset, os.path.join(workdir, method.replace(" ", "_")), callback)
    trainer.remove_callback(PrinterCallback)  # logs are kept in state.log_history, not printed
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    del trainer
    release_memory(device)
    runs = callback.steps[args.warmup :]
    result = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    result["mean_completion_length"] = statistics.mean(lengths) if lengths else float("nan")
    if resident_before is not None:
        result["allocated_before_build_mib"] = resident_before
    print(f"  {method}: {result['seconds']:.3f} s, {result['peak_mib']:.0f} MiB", flush=True)
    return {"method": method, **result, "runs": runs, "warmup_runs": callback.steps[: args.warmup]}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU ({os.cpu_count()} cores)"


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


@contextmanager
def quiet_and_threads(threads: int | None):
    """Library logs and warnings off, `threads` intra-op threads; both restored afterwards (main() may run inside a test)."""
    verbosity, saved_threads = transformers.utils.logging.get_verbosity(), torch.get_num_threads()
    progress_bar = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    loggers = {name: logging.getLogger(name).level for name in ("trl", "grade_trl")}
    transformers.utils.logging.set_verbosity_error()
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    if threads:
        torch.set_num_threads(threads)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
        if progress_bar:
            transformers.utils.logging.enable_progress_bar()
        for name, level in loggers.items():
            logging.getLogger(name).setLevel(level)
        torch.set_num_threads(saved_threads)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the header and table, and return the numbers (as written by --json)."""
    args = parse_args(argv)
    with quiet_and_threads(args.threads):
        return run(args)


def run(args) -> dict:
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="step_cost_") as workdir:
        path = prepare_model(args, workdir)
        tokenizer = load_tokenizer(path)
        steps = args.warmup + args.repeats
        prompts = make_prompts(tokenizer, args.batch_size * (steps + 1), args.prompt_length, args.seed)
        prompt_tokens = sorted({len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts})
        dataset = Dataset.from_dict({"prompt": prompts})
        torch.manual_seed(args.seed)
        reward_model = SentimentRewardModel.from_backbone(path, dtype=getattr(torch, args.dtype))
        reward = SentimentReward(reward_model, tokenizer).to(device)  # one object, shared by every method

        n, b, shape = args.max_new_tokens, args.batch_size, model_shape(path, args)
        header = (
            f"device: {device_name(device)}, {torch.get_num_threads()} threads | model: {shape} | "
            f"batch {b} completions (TRL GRPO: {b // NUM_GENERATIONS} prompts x {NUM_GENERATIONS}), prompt "
            f"{'/'.join(map(str, prompt_tokens))} tokens, {n} new tokens | torch {torch.__version__}, transformers "
            f"{transformers.__version__}, trl {trl.__version__} | median of {args.repeats} steps after {args.warmup} warm-up"
        )
        print(header, flush=True)
        results = [benchmark(m, args, path, reward, tokenizer, dataset, device, workdir) for m in args.methods]

    base = next((r for r in results if r["method"] == BASELINE), results[0])
    for r in results:
        r["time_vs_reinforce"] = ratio(r["seconds"], base["seconds"])
        r["memory_vs_reinforce"] = ratio(r["peak_mib"], base["peak_mib"])
    memory_note = (
        "peak memory: torch.cuda.max_memory_allocated during the step (includes the trainer's weights, gradients and AdamW state)"
        if device.type == "cuda"
        else "peak memory: peak RSS growth over the step's start (sampled every 2 ms)"
    )
    lines = [
        "",
        header,
        "",
        "| method | step time (s) | peak memory (MiB) | time vs REINFORCE | memory vs REINFORCE |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['method']} | {r['seconds']:.3f} | {r['peak_mib']:.0f} | {r['time_vs_reinforce']:.2f} | {r['memory_vs_reinforce']:.2f} |")
    lines.append("")
    if device.type == "cuda":
        lines.append("memory above the step's start (MiB): " + ", ".join(f"{r['method']} {r['step_growth_mib']:.0f}" for r in results))
    lines += [
        memory_note,
        "generated tokens per completion (mean over logged steps): " + ", ".join(f"{r['method']} {r['mean_completion_length']:.1f}" for r in results),
        f"REINFORCE, PPO, GRADE: {b} prompts x 1 completion; TRL GRPO: {b // NUM_GENERATIONS} prompts x {NUM_GENERATIONS} completions. "
        "PPO adds a value head and one extra no-grad forward (old log-probs and values).",
    ]
    print("\n".join(lines), flush=True)

    payload = {
        "device": device_name(device), "threads": torch.get_num_threads(), "model": shape, "batch_size": b,
        "prompt_length": args.prompt_length, "max_new_tokens": n, "warmup": args.warmup, "repeats": args.repeats, "dtype": args.dtype,
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        "memory_measure": memory_note, "header": header, "table": "\n".join(lines), "results": results,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2, default=str)
    return payload


if __name__ == "__main__":
    main()
