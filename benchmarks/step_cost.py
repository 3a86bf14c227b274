"""Cost of ONE optimizer step of every registry method's real trainer, side by side in one process.

What it measures, per method and per number of new tokens (`--new_tokens 8 16 24 48` sweeps):
  * time: wall-clock of each training step from on_step_begin to on_step_end (generation, scoring, loss,
    backward, clipping, optimizer step), median over `--repeats` steps after `--warmup`;
  * peak memory above the step's start, over forward + backward (the method's own cost; the optimizer step
    is the same for every method and reported apart): on CUDA `torch.cuda.max_memory_allocated`, on CPU the
    PyTorch profiler's allocator events (`grade_trl.memory.peak_allocated`: deterministic, no RSS noise);
  * saved bytes: what autograd keeps for backward (`grade_trl.memory.SavedTensorAccount`), the same number on
    every machine; `--account` prints it by model and component (attention with its KV cache, MLP, norms,
    LM head, embeddings; outside the models: relaxation, KL, ...).
With several `--new_tokens` it prints the curves and fits each method's saved bytes and peak with
a + b T + c T^2 (the growth law: c ~ 0 is linear), and `--plot PATH` draws them.

Everything that can be made equal is: the model (each trainer loads its own policy and frozen reference from
the same path), `--batch_size` completions per step (TRL GRPO: batch/4 prompts x 4), prompts of exactly
`--prompt_length` tokens, exactly T new tokens (EOS banned before the last), one reward object (a
`SentimentReward` on an untrained head over the same backbone; `--reward rule`: GSM8K's format check of the text,
no model, as the GSM8K recipes' rewards), temperature 1, top-p `--top_p`, KL coefficient
0.1, no dropout, no gradient accumulation, one fresh batch per optimizer step (PPO: one rollout, one epoch,
one mini-batch), AdamW, clip 1.0. GRADE's memory switches are flags (`--rollout_checkpointing`,
`--relax_top_k`, `--rollout_cache dynamic`, `--no_recompute`); `--bf16` / `--fp16` run every method in
mixed precision (autocast, float32 master weights).

How to run (CPU timings are noisy: compare the ratios of one run, with --threads set):
    python benchmarks/step_cost.py --model gpt2-shaped-random --tokenizer gpt2 \\
        --n_layer 12 --n_embd 768 --n_head 12 --batch_size 8 --new_tokens 24 48 --threads 2
    python benchmarks/step_cost.py --model gpt2-shaped-random --n_layer 24 --n_embd 1024 --n_head 16 --device cuda   # gpt2-medium shape
    python benchmarks/step_cost.py --model qwen2-shaped-random --tokenizer embedded --n_layer 4 --n_embd 256 --n_head 4 --n_kv_head 1 \\
        --intermediate_size 1376 --vocab_size 32768 --reward rule --methods reinforce ppo grpo cispo   # a small Qwen2, the GSM8K methods
`--tokenizer` is the GPT-2 tokenizer for `gpt2-shaped-random` (a hub id or a folder with vocab.json and
merges.txt); any hub id or local path of a causal LM works as `--model`. `--json PATH` writes every number.
On CPU the host allocator's page faults can tilt the comparison (a fresh 4 KiB page cost ~16 us inside a step on the
development VM, and methods free and allocate different amounts): the table prints each step's faults, and a run
under jemalloc with purging off (`LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2
MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1`, Debian's libjemalloc2, with `--warmup 2`) faulted least
(docs/results/allocator_2026-12-05/).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import logging
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
import trl
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast, PrinterCallback, TrainerCallback

from grade_trl.memory import SavedTensorAccount, peak_allocated
from grade_trl.methods import METHODS, get_method
from grade_trl.models import load_tokenizer, resolve_model_path
from grade_trl.rewards.gsm8k import GSM8KFormat
from grade_trl.rewards.sentiment import SentimentReward, SentimentRewardModel

RANDOM_GPT2 = "gpt2-shaped-random"
RANDOM_QWEN2 = "qwen2-shaped-random"  # Qwen2's block (RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP): the GSM8K models
BETA, LR, NUM_GENERATIONS = 0.1, 1e-5, 4  # values do not change the cost; GRPO's group size is the project's recipes'
BASELINE = "reinforce"
MIB = 2**20
# One optimizer step = one fresh batch, generated, scored and trained on once. Each method's config takes the keys it has.
ONE_UPDATE_PER_BATCH = {"ppo_epochs": 1, "num_mini_batches": 1, "num_iterations": 1}

# Words that are one token each (with their leading space) in GPT-2-style byte-level BPE vocabularies.
WORDS = (
    "the movie was a film and it is of to in that this with for as on but not you he his they one all at by an be "
    "have from are like just so story time good very out some about more when what there can up only which even "
    "great really well much bad no would also see people first been how love other life best made make way could "
    "than will most after two do think never then"
).split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help=f"`embedded`, a hub id, a local path, `{RANDOM_GPT2}` (random GPT-2 of --n_layer/--n_embd/--n_head) "
                        f"or `{RANDOM_QWEN2}` (random Qwen2 of those and --intermediate_size, --n_kv_head, --vocab_size)")
    parser.add_argument("--tokenizer", default="gpt2", help="tokenizer of the random models: `embedded`, a hub id or a folder with vocab.json and merges.txt")
    parser.add_argument("--n_layer", type=int, default=24, help="layers of the random model")
    parser.add_argument("--n_embd", type=int, default=1024, help="hidden size of the random model")
    parser.add_argument("--n_head", type=int, default=16, help="attention heads of the random model")
    parser.add_argument("--n_kv_head", type=int, default=None, help=f"key-value heads of {RANDOM_QWEN2} (grouped-query attention; default --n_head)")
    parser.add_argument("--intermediate_size", type=int, default=None, help=f"MLP width of {RANDOM_QWEN2} (default 4 x --n_embd)")
    parser.add_argument("--vocab_size", type=int, default=None, help=f"embedding rows of {RANDOM_QWEN2}, at least the tokenizer's (Qwen2.5 pads its 151,665 "
                        "tokens to 151,936; the default: the tokenizer's). Ids past the tokenizer's decode to nothing: a cost measurement only")
    parser.add_argument("--reward", default="sentiment", choices=["sentiment", "rule"], help="sentiment: a SentimentReward on an untrained head over the "
                        "policy's backbone (differentiable, every method); rule: GSM8K's format check of the text, a plain callable with no model (the "
                        "GSM8K recipes' kind of reward; not for GRADE, which needs a differentiable one)")
    parser.add_argument("--batch_size", type=int, default=16, help=f"completions per step (TRL GRPO: batch/{NUM_GENERATIONS} prompts x {NUM_GENERATIONS})")
    parser.add_argument("--new_tokens", type=int, nargs="+", default=[48], help="tokens generated per completion (min = max); several values sweep")
    parser.add_argument("--prompt_length", type=int, default=32, help="tokens per prompt (single-token words, no padding)")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling of REINFORCE, PPO and TRL GRPO (GRADE has none)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="registry methods to measure (default: every one)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first (kernels, allocator, AdamW state)")
    parser.add_argument("--repeats", type=int, default=3, help="timed optimizer steps per method (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype every trainer loads its models in")
    parser.add_argument("--bf16", action="store_true", help="mixed precision: bf16 autocast with float32 master weights, every method")
    parser.add_argument("--fp16", action="store_true", help="mixed precision: fp16 autocast with a gradient scaler, every method (CUDA)")
    parser.add_argument("--rollout_cache", default="chunked", choices=["chunked", "dynamic"], help="GRADE: KV cache of the relaxed rollout")
    parser.add_argument("--rollout_checkpointing", action="store_true", help="GRADE: checkpoint the rollout's decode steps (cache kept)")
    parser.add_argument("--relax_top_k", type=int, default=0, help="GRADE: relax over the k largest logits (0: the whole vocabulary)")
    parser.add_argument("--no_recompute", action="store_true", help="GRADE: keep the reference's and the reward's activations instead of recomputing them")
    parser.add_argument("--whole_logits", action="store_true", help="REINFORCE, PPO: chunked_scoring false (score from the whole B x T x V logits, "
                        "not inside the LM head a chunk at a time)")
    parser.add_argument("--account", action="store_true", help="also print the saved bytes by model and component")
    parser.add_argument("--profile", action="store_true", help="also profile one more forward + backward (torch.profiler): how busy the device "
                        "is (its kernels' time over the wall time: low means the step waits on Python and kernel launches) and the top operators")
    parser.add_argument("--phases", action="store_true", help="also time one more step by phase (sampling or rollout, scoring, reward, "
                        "reference, backward, optimizer), the device synchronised around each: where a method's step goes, cheaply enough for a GPU")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (torch.set_num_threads); fewer than the free cores on a shared machine")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts, the random model and every trainer")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write every number to this JSON file")
    parser.add_argument("--plot", default=None, metavar="PATH", help="with several --new_tokens: draw saved bytes and peak memory against T (PNG)")
    args = parser.parse_args(argv)
    if args.batch_size % NUM_GENERATIONS and any(method in ("grpo", "cispo") for method in args.methods):
        parser.error(f"--batch_size must be a multiple of {NUM_GENERATIONS} (TRL GRPO's num_generations) when --methods has grpo or cispo")
    if args.reward == "rule" and any(method.startswith("grade") for method in args.methods):
        parser.error("--reward rule: GRADE's methods need a differentiable reward; give --reward sentiment or leave GRADE out of --methods")
    if args.model != RANDOM_QWEN2 and (args.n_kv_head or args.intermediate_size or args.vocab_size):
        parser.error(f"--n_kv_head, --intermediate_size and --vocab_size shape --model {RANDOM_QWEN2} only")
    return args


# Model, prompts ---------------------------------------------------------------------------------------------
def prepare_model(args, workdir: str) -> str:
    """A path every trainer (and TRL, which loads from a path) can load the policy and its tokenizer from."""
    if args.model == RANDOM_QWEN2:
        return random_qwen2(args, workdir)
    if args.model != RANDOM_GPT2:
        return resolve_model_path(args.model)
    tokenizer = GPT2TokenizerFast.from_pretrained(resolve_model_path(args.tokenizer))
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


def random_qwen2(args, workdir: str) -> str:
    """A random Qwen2ForCausalLM of the arguments' shape with `--tokenizer`'s vocabulary (padded to `--vocab_size`), saved
    with that tokenizer. Embeddings tied as Qwen2.5 up to 3B ties them; untied 7B adds V H untrained weights (its
    memory, not its activations)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = load_tokenizer(args.tokenizer)  # a bare vocab.json + merges.txt folder (GPT-2's) too
    vocab = args.vocab_size or len(tokenizer)
    if vocab < len(tokenizer):
        raise SystemExit(f"error: --vocab_size {vocab} is smaller than the tokenizer's {len(tokenizer)} tokens: give at least {len(tokenizer)}")
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=args.n_embd, intermediate_size=args.intermediate_size or 4 * args.n_embd, num_hidden_layers=args.n_layer,
        num_attention_heads=args.n_head, num_key_value_heads=args.n_kv_head or args.n_head, max_position_embeddings=2048, tie_word_embeddings=True,
        attention_dropout=0.0, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(args.seed)
    path = os.path.join(workdir, RANDOM_QWEN2)
    Qwen2ForCausalLM(config).save_pretrained(path)
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
    precision = "bf16 autocast" if args.bf16 else "fp16 autocast" if args.fp16 else args.dtype
    return f"{args.model}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size}, {params / 1e6:.1f}M params, {precision}"


# Measurement ----------------------------------------------------------------------------------------------
def release_memory(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so a wall-clock time counts it; nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def minor_faults() -> int:
    """The process's minor page faults so far: fresh memory the kernel mapped on first touch. On the 2-core development
    VM each cost 2-4 microseconds in a plain mmap test and about 17 within a training step (docs/grade_cost_log.md), so a step that allocates and frees large tensors pays for it
    in time there. The `MALLOC_*` settings of the README's commands reduce that but do not avoid it reliably (glibc reused a
    freed 77 MB block in 3 of 15 rounds under them; jemalloc with purging off in 15 of 15: docs/results/allocator_2026-12-05/)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class StepTime(TrainerCallback):
    """Seconds and minor page faults of every optimizer step, from on_step_begin to on_step_end."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self.faults = device, [], []

    def on_step_begin(self, args, state, control, **kwargs):
        synchronize(self.device)
        self.t0, self.faults0 = time.perf_counter(), minor_faults()

    def on_step_end(self, args, state, control, **kwargs):
        synchronize(self.device)
        self.seconds.append(time.perf_counter() - self.t0)
        self.faults.append(minor_faults() - self.faults0)


def common_args(args, output_dir: str, steps: int) -> dict:
    """TrainingArguments every trainer gets alike."""
    return dict(
        output_dir=output_dir, max_steps=steps, gradient_accumulation_steps=1, learning_rate=LR, max_grad_norm=1.0,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=args.seed,
        use_cpu=args.device == "cpu", bf16=args.bf16, fp16=args.fp16, gradient_checkpointing=False, model_init_kwargs={"dtype": args.dtype},
    )


def build(method_name: str, args, new_tokens: int, path: str, reward, tokenizer, dataset, output_dir: str, callback):
    """The method's trainer from its registry entry (as `grade_trl.build.build_trainer` builds it), set to the benchmark's shape."""
    method = get_method(method_name)
    config_cls = method.config_class
    fields = {f.name for f in dataclasses.fields(config_cls)}
    wanted = {
        **common_args(args, output_dir, args.warmup + args.repeats),
        **config_cls.exact_length_settings(new_tokens),
        **ONE_UPDATE_PER_BATCH,
        "per_device_train_batch_size": args.batch_size,  # completions: the methods that sample groups take NUM_GENERATIONS per prompt
        "num_generations": NUM_GENERATIONS,
        "max_prompt_length": args.prompt_length,
        method.kl_coefficient: BETA,
        "temperature": 1.0, "top_p": args.top_p, "top_k": 0,  # the sampled methods (GRADE relaxes the full softmax)
        "disable_dropout": True,
        "rollout_cache": args.rollout_cache, "rollout_checkpointing": args.rollout_checkpointing,  # GRADE's switches
        "relax_top_k": args.relax_top_k, "recompute_reference_and_reward": not args.no_recompute,
        "chunked_scoring": not args.whole_logits,  # REINFORCE's and PPO's
        **method.implied,
    }
    config = config_cls(**{key: value for key, value in wanted.items() if key in fields})
    return method.trainer_class(model=path, reward_funcs=[reward], args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[callback])


def make_reward(args, path: str, tokenizer, device: torch.device):
    """The one reward object every method of a run shares (`--reward`)."""
    if args.reward == "rule":
        return GSM8KFormat(tokenizer)
    return SentimentReward(SentimentRewardModel.from_backbone(path, dtype=getattr(torch, args.dtype)), tokenizer).to(device)


def measured_models(trainer, reward) -> dict[str, torch.nn.Module]:
    models = {"policy": trainer.accelerator.unwrap_model(trainer.model)}
    if getattr(reward, "model", None) is not None:
        models["reward"] = reward.model.backbone
    if getattr(trainer, "ref_model", None) is not None:
        models["reference"] = trainer.ref_model
    return models


def training_loss(trainer, batch) -> torch.Tensor:
    """A training step's forward as Trainer's `training_step` runs it: inputs prepared (PPO and GRPO sample here,
    GRADE runs its relaxed rollout in the loss), then the loss."""
    inputs = trainer._prepare_inputs(batch)
    with trainer.compute_loss_context_manager():
        return trainer.compute_loss(trainer.model, inputs)


def one_trainer(method: str, argv: list[str], new_tokens: int):
    """(trainer, tokenizer) of `method` on the shape `argv` describes (this script's arguments), on CPU, for the
    side-by-side benchmarks that time one part of a step (`reference_prompt_cache.py`, `attention_grad_buffer.py`)."""
    bench = parse_args(argv)
    workdir = tempfile.mkdtemp()
    path = prepare_model(bench, workdir)
    tokenizer = load_tokenizer(path)
    dataset = Dataset.from_dict({"prompt": make_prompts(tokenizer, 64, bench.prompt_length, 0)})
    torch.manual_seed(bench.seed)  # the reward head's initialisation, as `run` seeds it: the same trainer in every process
    reward = make_reward(bench, path, tokenizer, torch.device("cpu"))
    return build(method, bench, new_tokens, path, reward, tokenizer, dataset, f"{workdir}/run", StepTime(torch.device("cpu"))), tokenizer


def memory_step(trainer, reward, device: torch.device) -> dict:
    """One more step's forward + backward (no optimizer step), as Trainer's `training_step` does it, under the memory
    probes: the peak over both, the saved bytes over the forward (generation included: PPO and GRPO sample there)."""
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    release_memory(device)
    account = SavedTensorAccount(measured_models(trainer, reward))

    def forward_backward():
        with account:
            loss = training_loss(trainer, batch)
        trainer.accelerator.backward(loss)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        forward_backward()
        torch.cuda.synchronize()
        peak, absolute = torch.cuda.max_memory_allocated() - start, torch.cuda.max_memory_allocated()
    else:
        with peak_allocated(device) as result:
            forward_backward()
        peak, absolute = result["peak_bytes"], None
    trainer.model.zero_grad(set_to_none=True)
    return {"peak_mib": peak / MIB, "absolute_peak_mib": absolute / MIB if absolute is not None else None,
            "saved_mib": account.total / MIB, "saved_by_component_mib": {k: v / MIB for k, v in sorted(account.bytes.items(), key=lambda kv: -kv[1])}}


def profile_step(trainer, device: torch.device, top: int = 8) -> dict:
    """One more forward + backward, each under its own torch.profiler: wall seconds, the summed self time of the
    device's kernels (CUDA) or of every operator (CPU), the aten calls (what a GPU dispatches), and the operators
    that take most of the time. Earlier measurements' garbage is collected first (see `phases_step`)."""
    from torch.profiler import ProfilerActivity, profile

    release_memory(device)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    on_device = device.type == "cuda"
    by = (lambda e: e.self_device_time_total) if on_device else (lambda e: e.self_cpu_time_total)
    result, loss = {}, None
    for phase in ("forward", "backward"):
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            if phase == "forward":
                loss = training_loss(trainer, batch)
            else:
                trainer.accelerator.backward(loss)
            synchronize(device)
            wall = time.perf_counter() - start
        events = prof.key_averages()
        busy = sum(by(e) for e in events) / 1e6
        result[phase] = {"wall_seconds": wall, "busy_seconds": busy, "device_busy_fraction": busy / wall if on_device else None,
                         "aten_calls": sum(e.count for e in events if e.key.startswith("aten::")),
                         "kernel_launches": sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")),
                         "top_ops": [{"op": e.key, "seconds": by(e) / 1e6, "calls": e.count} for e in sorted(events, key=by, reverse=True)[:top]]}
    trainer.model.zero_grad(set_to_none=True)
    return result


# The call sites that make a step, by phase: (module, attribute) of the name a trainer calls, or ("trainer", method)
# for TRL's GRPOTrainer. Timed inclusively (a phase that calls another counts it too).
PHASES = {
    "sample": [("grade_trl.trainers.reinforce", "sample"), ("grade_trl.trainers.ppo", "sample")],
    "score (policy and reference)": [("grade_trl.trainers.reinforce", "completion_scores"), ("grade_trl.trainers.ppo", "completion_scores"),
                                     ("grade_trl.trainers.ppo", "scores_and_values")],
    "reward": [("grade_trl.trainers.reinforce", "compute_rewards"), ("grade_trl.trainers.ppo", "compute_rewards"), ("trainer", "_calculate_rewards")],
    "soft rollout": [("grade_trl.trainers.grade", "soft_rollout")],
    "reference": [("grade_trl.trainers.grade", "reference_logits")],
    "soft reward": [("grade_trl.trainers.grade", "soft_scores")],
    "generate (TRL)": [("trainer", "_generate")],
    "score (TRL: policy, old, reference)": [("trainer", "_get_per_token_logps_and_entropies")],
}


@contextmanager
def phase_timers(trainer, device: torch.device):
    """Within the block, every call site of PHASES that `trainer` uses is timed (the device synchronised before and
    after, so its work is counted where it was queued); yields {phase: seconds}, filled as the calls return."""
    totals: dict[str, float] = {}
    patched = []

    def timed(name, function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            synchronize(device)
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                synchronize(device)
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - start
        return wrapper

    for name, sites in PHASES.items():
        for owner, attribute in sites:
            target = trainer if owner == "trainer" else sys.modules.get(owner)
            if target is not None and callable(getattr(target, attribute, None)):
                original = getattr(target, attribute)
                setattr(target, attribute, timed(name, original))
                patched.append((target, attribute, original, owner == "trainer"))
    try:
        yield totals
    finally:
        for target, attribute, original, on_instance in reversed(patched):
            if on_instance:
                delattr(target, attribute)  # the class's method again
            else:
                setattr(target, attribute, original)


def phases_step(trainer, device: torch.device) -> dict:
    """One more optimizer step, as the Trainer runs it (inputs prepared, loss, backward, clipping, optimizer step), by
    phase (PHASES, plus forward, backward and optimizer): seconds each, and the step's total. The synchronisations
    remove the overlap of host and device between phases, so the phases add up to a little more than a plain step.
    The garbage of the measurements before it is collected first: the profiler's event lists of `memory_step` took
    0.6 s of collection, which fell inside the next step (GRADE-STE's on the narrow proxy, 24 x 64, T = 48: 3.9 s
    by phase against 1.2 s timed)."""
    release_memory(device)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    with phase_timers(trainer, device) as inner:
        synchronize(device)
        start = time.perf_counter()
        loss = training_loss(trainer, batch)
        synchronize(device)
        forward = time.perf_counter()
        trainer.accelerator.backward(loss)
        synchronize(device)
        backward = time.perf_counter()
        trainer.accelerator.clip_grad_norm_(trainer.model.parameters(), trainer.args.max_grad_norm)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        end = time.perf_counter()
    return {"total": end - start, "forward": forward - start, "backward": backward - forward, "clip and optimizer": end - backward, **inner}


def benchmark(method: str, args, new_tokens: int, path, reward, tokenizer, dataset, device, workdir) -> dict:
    callback = StepTime(device)
    release_memory(device)
    trainer = build(method, args, new_tokens, path, reward, tokenizer, dataset, os.path.join(workdir, f"{method}_{new_tokens}"), callback)
    trainer.remove_callback(PrinterCallback)  # logs are kept in state.log_history, not printed
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    memory = memory_step(trainer, reward, device)
    profiled = profile_step(trainer, device) if args.profile else None
    phases = phases_step(trainer, device) if args.phases else None
    del trainer
    release_memory(device)
    timed = callback.seconds[args.warmup :]
    faults = callback.faults[args.warmup :]
    result = {"method": method, "new_tokens": new_tokens, "seconds": statistics.median(timed), "step_seconds": timed,
              "minor_faults": statistics.median(faults), "step_minor_faults": faults,
              "mean_completion_length": statistics.mean(lengths) if lengths else float("nan"), **memory}
    print(f"  {method:<10} T={new_tokens:<3} {result['seconds']:.3f} s, peak {result['peak_mib']:.0f} MiB, saved {result['saved_mib']:.0f} MiB, "
          f"{result['minor_faults']:,.0f} minor page faults", flush=True)
    if phases:
        result["phases"] = phases
        print("    phases (s): " + ", ".join(f"{name} {seconds:.3f}" for name, seconds in phases.items()), flush=True)
    if profiled:
        result["profile"] = profiled
        for phase, p in profiled.items():
            busy = f"device busy {p['busy_seconds']:.3f} s ({p['device_busy_fraction']:.0%}), {p['kernel_launches']} kernel launches" if p["device_busy_fraction"] is not None else f"operators' self time {p['busy_seconds']:.3f} s"
            print(f"    {phase}: {p['wall_seconds']:.3f} s, {busy}, {p['aten_calls']:,} aten calls; top: "
                  + "; ".join(f"{o['op']} {o['seconds']:.3f} s x{o['calls']}" for o in p["top_ops"][:5]), flush=True)
    return result


def growth_law(points: list[tuple[int, float]]) -> dict | None:
    """Least-squares a + b T + c T^2 through (T, y); None with fewer than 3 points."""
    if len(points) < 3:
        return None
    import numpy as np

    T = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    a, b, c = np.linalg.lstsq(np.stack([np.ones_like(T), T, T**2], 1), y, rcond=None)[0]
    t_max = T.max()
    return {"a": a, "b": b, "c": c, "quadratic_share_at_max": c * t_max**2 / (a + b * t_max + c * t_max**2) if (a + b * t_max + c * t_max**2) else float("nan")}


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
    """Run the benchmark, print the header and tables, and return the numbers (as written by --json)."""
    args = parse_args(argv)
    with quiet_and_threads(args.threads):
        return run(args)


def switches(args) -> str:
    parts = [f"rollout_cache {args.rollout_cache}", f"recompute_reference_and_reward {not args.no_recompute}"]
    if args.rollout_checkpointing:
        parts.append("rollout_checkpointing")
    if args.relax_top_k:
        parts.append(f"relax_top_k {args.relax_top_k}")
    scoring = "whole logits" if args.whole_logits else "chunked_scoring"
    return "GRADE: " + ", ".join(parts) + f"; REINFORCE, PPO: {scoring}"


def run(args) -> dict:
    device = torch.device(args.device)
    results = []
    with tempfile.TemporaryDirectory(prefix="step_cost_") as workdir:
        path = prepare_model(args, workdir)
        tokenizer = load_tokenizer(path)
        steps = args.warmup + args.repeats + 1
        prompts = make_prompts(tokenizer, args.batch_size * (steps + 1), args.prompt_length, args.seed)
        prompt_tokens = sorted({len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts})
        dataset = Dataset.from_dict({"prompt": prompts})
        torch.manual_seed(args.seed)
        reward = make_reward(args, path, tokenizer, device)  # one object, shared by every method

        b, shape = args.batch_size, model_shape(path, args)
        header = (
            f"device: {device_name(device)}, {torch.get_num_threads()} threads | model: {shape} | batch {b} completions (TRL GRPO: "
            f"{b // NUM_GENERATIONS} prompts x {NUM_GENERATIONS}), prompt {'/'.join(map(str, prompt_tokens))} tokens | {switches(args)} | torch "
            f"{torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__} | median of {args.repeats} steps after {args.warmup} warm-up"
        )
        print(header, flush=True)
        for new_tokens in args.new_tokens:
            results += [benchmark(m, args, new_tokens, path, reward, tokenizer, dataset, device, workdir) for m in args.methods]

    lines = ["", header]
    for new_tokens in args.new_tokens:
        rows = [r for r in results if r["new_tokens"] == new_tokens]
        base = next((r for r in rows if r["method"] == BASELINE), rows[0])
        for r in rows:
            r["time_vs_reinforce"] = ratio(r["seconds"], base["seconds"])
            r["memory_vs_reinforce"] = ratio(r["peak_mib"], base["peak_mib"])
            r["saved_vs_reinforce"] = ratio(r["saved_mib"], base["saved_mib"])
        lines += ["", f"{new_tokens} new tokens:", "",
                  "| method | step time (s) | peak memory (MiB) | saved for backward (MiB) | time vs REINFORCE | memory vs REINFORCE | saved vs REINFORCE |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['method']} | {r['seconds']:.3f} | {r['peak_mib']:.0f} | {r['saved_mib']:.0f} | {r['time_vs_reinforce']:.2f} | {r['memory_vs_reinforce']:.2f} | "
                  f"{r['saved_vs_reinforce']:.2f} |" for r in rows]
    laws = {}
    if len(args.new_tokens) > 1:
        lines += ["", "curves (saved for backward / peak, MiB) against new tokens T, and the least-squares fit a + b T + c T^2 of the saved bytes:", "",
                  "| method | " + " | ".join(f"T={t}" for t in args.new_tokens) + " | a (MiB) | b (MiB/token) | c (MiB/token^2) | quadratic share at max T |",
                  "|---|" + "---:|" * (len(args.new_tokens) + 4)]
        for method in args.methods:
            rows = [r for r in results if r["method"] == method]
            law = laws[method] = growth_law([(r["new_tokens"], r["saved_mib"]) for r in rows])
            cells = " | ".join(f"{r['saved_mib']:.0f} / {r['peak_mib']:.0f}" for r in rows)
            fit = f"{law['a']:.0f} | {law['b']:.2f} | {law['c']:.4f} | {law['quadratic_share_at_max']:.0%}" if law else "– | – | – | –"
            lines.append(f"| {method} | {cells} | {fit} |")
    if args.account:
        for r in results:
            lines += ["", f"saved for backward by component, {r['method']}, T={r['new_tokens']} (MiB): "
                      + ", ".join(f"{k} {v:.1f}" for k, v in r["saved_by_component_mib"].items() if v >= 0.05)]
    memory_note = ("peak memory: torch.cuda.max_memory_allocated above the step's start, forward + backward" if device.type == "cuda"
                   else "peak memory: allocator peak above the step's start over forward + backward (profiler memory events)")
    lines += ["", memory_note + "; parameter gradients included, optimizer step excluded",
              "generated tokens per completion (mean over logged steps): " + ", ".join(f"{r['method']} T={r['new_tokens']} {r['mean_completion_length']:.1f}" for r in results),
              "minor page faults per step (median; host memory mapped on first touch, `minor_faults`): "
              + ", ".join(f"{r['method']} T={r['new_tokens']} {r['minor_faults']:,.0f}" for r in results)]
    print("\n".join(lines), flush=True)
    if args.plot and len(args.new_tokens) > 1:
        plot(results, args, args.plot, header)

    payload = {
        "device": device_name(device), "threads": torch.get_num_threads(), "model": shape, "batch_size": b, "prompt_length": args.prompt_length,
        "new_tokens": args.new_tokens, "warmup": args.warmup, "repeats": args.repeats, "dtype": args.dtype, "bf16": args.bf16, "fp16": args.fp16,
        "switches": switches(args), "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        "memory_measure": memory_note, "header": header, "table": "\n".join(lines), "results": results, "growth_laws": laws,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2, default=str)
    return payload


def plot(results: list[dict], args, path: str, header: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for method in args.methods:
        rows = [r for r in results if r["method"] == method]
        for ax, key in zip(axes, ("saved_mib", "peak_mib")):
            ax.plot([r["new_tokens"] for r in rows], [r[key] for r in rows], marker="o", label=method)
    for ax, title in zip(axes, ("saved for backward (MiB)", "peak above the step's start (MiB)")):
        ax.set_xlabel("new tokens T")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(header.split(" | ")[1], fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
