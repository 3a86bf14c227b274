"""Two paths of GRADE's step, side by side in one process: aten calls (what a GPU launches or dispatches) and CPU time.

On a GPU, GRADE's step is bound by the count of operations (the H200 check: the same 4-5 s at batch 16 and 64), so
this counts them, device-independently: aten calls in one GRADE-STE forward + backward (rollout, reference, exact KL,
reward, backward) under torch.profiler, and times the same on CPU, alternating the two paths in one process, with
the step's peak memory. `--compare` picks the pair:

  * `attention_buffer` (default): `core/chunked_cache.py` hands autograd, per decode step and layer, only the gradient
    of the step's own new chunk (the earlier positions' gradient goes through one buffer per layer), against the
    path before it, one gradient edge per cached chunk: O(T^2) edges per layer;
  * `deferred_biases`: `core/deferred_grads.py` defers the biases' gradients with their weights', one sum at the end
    of backward, against deferring the weight matrices only (before): a reduction and an accumulation into `.grad`
    per decode step for each bias;
  * `decode_backward`: `core/chunked_cache.py` differentiates each decode step's sdpa attention by its written-out
    gradient, against recomputing sdpa under autograd and differentiating that (before): a nested `autograd.grad`
    per step and layer;
  * `one_kernel_gelu`: `core/soft_rollout.py` runs GPT-2's `gelu_new` as torch's one-kernel tanh GELU in the rollout,
    against the model's own eight-operation `gelu_new` (before);
  * `kv_buffer`: `core/chunked_cache.py`'s layers write each chunk's keys and values once into a buffer that attention
    reads as a view, against concatenating every chunk at every step and layer, forward and backward (before);
  * `decode_block`: `core/gpt2_decode_block.py` runs each GPT-2 block's decode step as one autograd node with its
    backward written out, against the block's modules one by one (before): about 28 nodes per layer and step.

    python benchmarks/attention_grad_buffer.py --new_tokens 24 48 --tokenizer PATH/TO/gpt2            # gpt2-small shape
    python benchmarks/attention_grad_buffer.py --compare deferred_biases --new_tokens 24 48 --tokenizer PATH/TO/gpt2 --n_layer 24 --n_embd 64 --n_head 4 --batch_size 4
    python benchmarks/attention_grad_buffer.py --compare decode_backward --new_tokens 24 48 --tokenizer PATH/TO/gpt2 --n_layer 24 --n_embd 64 --n_head 4 --batch_size 4
    python benchmarks/attention_grad_buffer.py --compare one_kernel_gelu --new_tokens 24 48 --tokenizer PATH/TO/gpt2 --n_layer 24 --n_embd 64 --n_head 4 --batch_size 4
    python benchmarks/attention_grad_buffer.py --compare kv_buffer --new_tokens 24 48 --tokenizer PATH/TO/gpt2
    python benchmarks/attention_grad_buffer.py --compare kv_buffer --new_tokens 128 256 --tokenizer PATH/TO/gpt2 --n_layer 24 --n_embd 64 --n_head 4 --batch_size 4 --skip_calls
    python benchmarks/attention_grad_buffer.py --compare decode_block --new_tokens 48 --tokenizer PATH/TO/gpt2 --n_layer 24 --n_embd 64 --n_head 4 --batch_size 4 --threads 1
    python benchmarks/attention_grad_buffer.py --compare decode_block --new_tokens 24 48 --tokenizer PATH/TO/gpt2
    python benchmarks/attention_grad_buffer.py --compare decode_block --device cuda --new_tokens 48 --tokenizer PATH/TO/gpt2 --n_layer 24 --n_embd 1024 --n_head 16 --batch_size 16 --skip_calls
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import statistics
import time
from pathlib import Path

import torch

from grade_trl.core import chunked_cache, deferred_grads
from grade_trl.memory import peak_allocated

_spec = importlib.util.spec_from_file_location("step_cost", Path(__file__).resolve().parent / "step_cost.py")
step_cost = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_cost)

_init = chunked_cache.ChunkedLayer.__init__


def explicit_edges(on: bool) -> None:
    """Every ChunkedLayer made from now on hands autograd one gradient per chunk (the path before the buffer)."""

    def init(self, **kwargs):
        _init(self, **kwargs)
        self.accumulate_grads = not on

    chunked_cache.ChunkedLayer.__init__ = init


_bias = deferred_grads._bias


def weights_only(on: bool) -> None:
    """Every deferral from now on leaves the biases out: their gradient per step, as before they were deferred."""
    deferred_grads._bias = (lambda store, bias: (bias, None)) if on else _bias


_sdpa_decode = chunked_cache.sdpa_decode


def recompute_attention(on: bool) -> None:
    """Every decode step's attention from now on is recomputed in backward and differentiated by autograd (before)."""
    chunked_cache.sdpa_decode = (lambda *args: None) if on else _sdpa_decode


rollout_module = importlib.import_module("grade_trl.core.soft_rollout")  # the module (grade_trl.core.soft_rollout is also its function's name)
_tanh_gelu_modules = rollout_module.tanh_gelu_modules


def models_own_gelu(on: bool) -> None:
    """Every rollout from now on runs the model's own activation modules (before)."""
    rollout_module.tanh_gelu_modules = (lambda model: []) if on else _tanh_gelu_modules


_append = chunked_cache.ChunkedLayer.append


def concatenated_chunks(on: bool) -> None:
    """Every ChunkedLayer from now on keeps no buffer of its keys and values: attention concatenates the chunks at every
    step, forward and backward (before)."""

    def append(self, key_states, value_states, buffered=True):  # ChunkedLayer.append's signature; never buffers
        self.key_chunks.append(key_states)
        self.value_chunks.append(value_states)

    chunked_cache.ChunkedLayer.append = append if on else _append


_gpt2_decode_blocks = rollout_module.gpt2_decode_blocks


def per_module_blocks(on: bool) -> None:
    """Every rollout from now on runs GPT-2's decode steps module by module (before)."""
    rollout_module.gpt2_decode_blocks = (lambda model, store: []) if on else _gpt2_decode_blocks


COMPARISONS = {  # name -> (the new path, the old path): (label, switch of the old path, its argument)
    "attention_buffer": (("buffer", explicit_edges, False), ("explicit edges", explicit_edges, True)),
    "deferred_biases": (("biases deferred", weights_only, False), ("weights only", weights_only, True)),
    "decode_backward": (("written out", recompute_attention, False), ("recomputed", recompute_attention, True)),
    "one_kernel_gelu": (("one-kernel gelu", models_own_gelu, False), ("gelu_new", models_own_gelu, True)),
    "kv_buffer": (("buffered keys and values", concatenated_chunks, False), ("concatenated chunks", concatenated_chunks, True)),
    "decode_block": (("one node per block and step", per_module_blocks, False), ("per module", per_module_blocks, True)),
}


def forward_backward(trainer, batch) -> None:
    step_cost.training_loss(trainer, batch).backward()
    trainer.model.zero_grad(set_to_none=True)
    step_cost.synchronize(trainer.args.device)  # CUDA: the queued kernels count in the time


VIEWS = {"aten::as_strided", "aten::slice", "aten::narrow", "aten::view", "aten::transpose", "aten::reshape", "aten::detach",
         "aten::resolve_conj", "aten::expand", "aten::t", "aten::unsqueeze", "aten::squeeze", "aten::select", "aten::permute",
         "aten::alias", "aten::unbind", "aten::split", "aten::_reshape_alias", "aten::lift_fresh", "aten::resolve_neg"}


def aten_calls(trainer, batch) -> tuple[int, int]:
    """(aten calls, of which not views): the second is what would launch kernels on a GPU (views only dispatch)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        forward_backward(trainer, batch)
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    return sum(e.count for e in events), sum(e.count for e in events if e.key not in VIEWS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", default="attention_buffer", choices=list(COMPARISONS), help="which two paths (module docstring)")
    parser.add_argument("--new_tokens", type=int, nargs="+", default=[24, 48])
    parser.add_argument("--tokenizer", default="gpt2", help="the GPT-2 tokenizer: a folder with vocab.json and merges.txt, or a hub id")
    parser.add_argument("--n_layer", type=int, default=12)
    parser.add_argument("--n_embd", type=int, default=768)
    parser.add_argument("--n_head", type=int, default=12)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds of (new path, old path); the median leaves out the first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip_calls", action="store_true", help="time and peak only: no profiled run to count aten calls (slow at long T)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (a lent GPU: the same comparison where per-operation costs bind)")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error(f"--rounds must be >= 2 (the median leaves out the first round), got {args.rounds}")
    torch.set_num_threads(args.threads)
    for new_tokens in args.new_tokens:
        shape = ["--model", step_cost.RANDOM_GPT2, "--tokenizer", args.tokenizer, "--n_layer", str(args.n_layer), "--n_embd", str(args.n_embd),
                 "--n_head", str(args.n_head), "--batch_size", str(args.batch_size), "--new_tokens", str(new_tokens), "--warmup", "0", "--repeats", "1",
                 "--device", args.device]
        trainer, _ = step_cost.one_trainer("grade_ste", shape, new_tokens)
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.model.train()
        paths = COMPARISONS[args.compare]
        calls, peaks, seconds = {}, {}, {name: [] for name, _, _ in paths}
        for name, switch, old in paths:
            switch(old)
            calls[name] = (0, 0) if args.skip_calls else aten_calls(trainer, batch)
            with peak_allocated(args.device) as peak:
                forward_backward(trainer, batch)
            peaks[name] = peak["peak_bytes"] / 2**20
        for _ in range(args.rounds):
            for name, switch, old in paths:
                switch(old)
                start = time.perf_counter()
                forward_backward(trainer, batch)
                seconds[name].append(time.perf_counter() - start)
        paths[0][1](False)  # the new path again
        medians = {name: statistics.median(values[1:]) for name, values in seconds.items()}
        new, old = paths[0][0], paths[1][0]

        def describe(name: str) -> str:
            counted = "" if args.skip_calls else f"{calls[name][0]:,} aten calls ({calls[name][1]:,} not views), "
            return f"{name}: {counted}{medians[name]:.2f} s (rounds {[round(x, 2) for x in seconds[name]]}), peak {peaks[name]:.0f} MiB"

        print(f"T={new_tokens} ({args.n_layer} layers x {args.n_embd}, batch {args.batch_size}, {args.device}, {args.threads} threads): "
              + "; ".join(describe(name) for name, _, _ in paths)
              + ("" if args.skip_calls else f"; calls {calls[new][0] / calls[old][0]:.2f}x ({calls[new][1] / calls[old][1]:.2f}x not views)")
              + f", time {medians[new] / medians[old]:.2f}x", flush=True)


if __name__ == "__main__":
    main()
