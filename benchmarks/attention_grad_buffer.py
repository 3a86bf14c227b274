"""GRADE's chunked attention with the per-layer gradient buffer against explicit edges to every chunk, side by side.

`core/chunked_cache.py` hands autograd, per decode step and layer, only the gradient of the step's own new chunk
(the gradient of the earlier positions goes through one buffer per layer); before, each step handed back one
gradient per cached chunk, O(T^2) gradient edges per layer. On a GPU, GRADE's step is bound by the count of
operations (the H200 check: the same 4-5 s at batch 16 and 64), so this counts them, device-independently:
aten calls in one GRADE-STE forward + backward (rollout, reference, exact KL, reward, backward) under
torch.profiler, and times the same on CPU, alternating the two paths in one process, with the step's peak memory.

    python benchmarks/attention_grad_buffer.py --new_tokens 24 48 --tokenizer PATH/TO/gpt2            # gpt2-small shape
    python benchmarks/attention_grad_buffer.py --new_tokens 24 48 --tokenizer PATH/TO/gpt2 --n_layer 24 --n_embd 1024 --n_head 16 --batch_size 2
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import torch

from grade_trl.core import chunked_cache
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


def forward_backward(trainer, batch) -> None:
    step_cost.training_loss(trainer, batch).backward()
    trainer.model.zero_grad(set_to_none=True)


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
    parser.add_argument("--new_tokens", type=int, nargs="+", default=[24, 48])
    parser.add_argument("--tokenizer", default="gpt2", help="the GPT-2 tokenizer: a folder with vocab.json and merges.txt, or a hub id")
    parser.add_argument("--n_layer", type=int, default=12)
    parser.add_argument("--n_embd", type=int, default=768)
    parser.add_argument("--n_head", type=int, default=12)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds of (buffer, explicit edges); the median leaves out the first")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for new_tokens in args.new_tokens:
        shape = ["--model", step_cost.RANDOM_GPT2, "--tokenizer", args.tokenizer, "--n_layer", str(args.n_layer), "--n_embd", str(args.n_embd),
                 "--n_head", str(args.n_head), "--batch_size", str(args.batch_size), "--new_tokens", str(new_tokens), "--warmup", "0", "--repeats", "1"]
        trainer, _ = step_cost.one_trainer("grade_ste", shape, new_tokens)
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.model.train()
        paths = (("buffer", False), ("explicit edges", True))
        calls, peaks, seconds = {}, {}, {name: [] for name, _ in paths}
        for name, explicit in paths:
            explicit_edges(explicit)
            calls[name] = aten_calls(trainer, batch)
            with peak_allocated("cpu") as peak:
                forward_backward(trainer, batch)
            peaks[name] = peak["peak_bytes"] / 2**20
        for _ in range(args.rounds):
            for name, explicit in paths:
                explicit_edges(explicit)
                start = time.perf_counter()
                forward_backward(trainer, batch)
                seconds[name].append(time.perf_counter() - start)
        explicit_edges(False)
        medians = {name: statistics.median(values[1:]) for name, values in seconds.items()}
        print(f"T={new_tokens} ({args.n_layer} layers x {args.n_embd}, batch {args.batch_size}, {args.threads} threads): "
              + "; ".join(f"{name}: {calls[name][0]:,} aten calls ({calls[name][1]:,} not views), {medians[name]:.2f} s (rounds {[round(x, 2) for x in seconds[name]]}), peak {peaks[name]:.0f} MiB"
                          for name, _ in paths)
              + f"; calls {calls['buffer'][0] / calls['explicit edges'][0]:.2f}x ({calls['buffer'][1] / calls['explicit edges'][1]:.2f}x not views), time {medians['buffer'] / medians['explicit edges']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
