"""What CUDA graphs would take off GRADE's decode loop: GPT-2 decode steps eager against captured, on one GPU.

Why: on a GPU GRADE-STE's step is bound by the host's per-operation cost (README, GRADE's cost: the same time at
batch 16 and 64 on an H200), about 12 launching operations forward and 20 backward per layer and decode step
(`core/gpt2_decode_block.py`), against 12-15 for sampling. Trimming operations cannot bring that near the 1.5x target;
capturing the decode step as CUDA graphs could. Before building that into the rollout (its Python bookkeeping, the
deferred weight records and the cache's step order, stays outside any graph), this measures what it can give.

What: the arithmetic of the one-node decode step for all layers of a GPT-2 shape, T steps forward (layer norm, the
fused q k v projection, the key and value rows written into a per-layer buffer, sdpa over the rows so far, the output
projection, layer norm, MLP with the tanh GELU, residuals), then T steps backward in reverse with the step's
written-out backward (the MLP's and the norms' input gradients, `chunked_cache._sdpa_decode_grads` for the attention,
the keys' and values' gradients accumulated in a per-layer buffer, the [q k v] gradient as one cat). Each step's input
and the gradient into each step's output are fixed random tensors (the LM head, the relaxation and the deferred weight
products, one large product per weight at the end, are left out: they are not per layer and step). Run two ways:
eagerly, as the rollout runs now, and as 2 T CUDA graphs (one per step forward, one per step backward, all layers,
sharing one memory pool, captured once and replayed in capture order). Prints the seconds of each, the ratio, and the largest difference
between the two runs' input gradients (the captured run must compute the same thing).

    python benchmarks/gpu_lease/decode_graph_probe.py --device cuda          # gpt2-medium shape, batch 16 and 64, T = 48
    python benchmarks/gpu_lease/decode_graph_probe.py --device cpu --n_layer 2 --n_embd 32 --n_head 4 --batch_sizes 3 --new_tokens 5 --check

`--check` also differentiates the same forward with autograd (keys and values concatenated, transformers' sdpa
attention) and compares the written-out backward's input gradients with it (small shapes; it keeps every step's graph).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from grade_trl.core.chunked_cache import SdpaDecode, _sdpa_decode_grads

EPS = 1e-5


def make_weights(n_layer: int, hidden: int, device, generator) -> list[dict]:
    def rand(*shape, scale=0.02):
        return (torch.randn(*shape, generator=generator) * scale).to(device)

    return [{"ln1_w": 1 + rand(hidden), "ln1_b": rand(hidden), "w_attn": rand(hidden, 3 * hidden), "b_attn": rand(3 * hidden),
             "w_proj": rand(hidden, hidden), "b_proj": rand(hidden), "ln2_w": 1 + rand(hidden), "ln2_b": rand(hidden),
             "w_fc": rand(hidden, 4 * hidden), "b_fc": rand(4 * hidden), "w_out": rand(4 * hidden, hidden), "b_out": rand(hidden)}
            for _ in range(n_layer)]


class DecodeLoop:
    """The per-layer state of one rollout: key/value buffers (B, n, P + T, d), their gradient buffers, and what each
    (step, layer) keeps for backward."""

    def __init__(self, weights, batch: int, heads: int, prompt: int, new_tokens: int, device, generator):
        self.weights, self.batch, self.heads, self.prompt = weights, batch, heads, prompt
        hidden = weights[0]["b_proj"].shape[0]
        self.hidden, self.size = hidden, hidden // heads
        shape = (batch, heads, prompt + new_tokens, self.size)
        # the prompt's keys and values, as the prompt's forward leaves them
        self.keys = [torch.randn(shape, generator=generator).to(device) for _ in weights]
        self.values = [torch.randn(shape, generator=generator).to(device) for _ in weights]
        self.grad_keys = [torch.zeros(shape, device=device) for _ in weights]
        self.grad_values = [torch.zeros(shape, device=device) for _ in weights]
        self.inputs = [torch.randn(batch, hidden, generator=generator).to(device) for _ in range(new_tokens)]
        self.output_grads = [torch.randn(batch, hidden, generator=generator).to(device) for _ in range(new_tokens)]
        self.saved: dict[tuple[int, int], tuple] = {}
        self.input_grads: dict[int, torch.Tensor] = {}

    def forward_step(self, t: int) -> torch.Tensor:
        batch, hidden, heads, size, row = self.batch, self.hidden, self.heads, self.size, self.prompt + t
        x = self.inputs[t]
        for layer, w in enumerate(self.weights):
            h, mean1, rstd1 = torch.native_layer_norm(x, (hidden,), w["ln1_w"], w["ln1_b"], EPS)
            query, key, value = torch.addmm(w["b_attn"], h, w["w_attn"]).split(hidden, dim=1)
            query = query.view(batch, heads, 1, size)
            self.keys[layer][:, :, row : row + 1].copy_(key.view(batch, heads, 1, size))
            self.values[layer][:, :, row : row + 1].copy_(value.view(batch, heads, 1, size))
            out = F.scaled_dot_product_attention(query, self.keys[layer][:, :, : row + 1], self.values[layer][:, :, : row + 1])
            o = out.transpose(1, 2).reshape(batch, hidden)
            x1 = torch.addmm(w["b_proj"], o, w["w_proj"]) + x
            c, mean2, rstd2 = torch.native_layer_norm(x1, (hidden,), w["ln2_w"], w["ln2_b"], EPS)
            f = torch.addmm(w["b_fc"], c, w["w_fc"])
            g = F.gelu(f, approximate="tanh")
            self.saved[t, layer] = (x, h, mean1, rstd1, query, o, x1, c, mean2, rstd2, f)
            x = x1 + torch.addmm(w["b_out"], g, w["w_out"])
        return x

    def backward_step(self, t: int) -> torch.Tensor:
        batch, hidden, heads, size, row = self.batch, self.hidden, self.heads, self.size, self.prompt + t
        grad_x2 = self.output_grads[t]
        for layer in reversed(range(len(self.weights))):
            w = self.weights[layer]
            x, h, mean1, rstd1, query, o, x1, c, mean2, rstd2, f = self.saved[t, layer]
            grad_f = torch.ops.aten.gelu_backward(F.linear(grad_x2, w["w_out"]), f, approximate="tanh")
            grad_c = F.linear(grad_f, w["w_fc"])
            grad_x1 = grad_x2 + torch.ops.aten.native_layer_norm_backward(grad_c, x1, (hidden,), mean2, rstd2, w["ln2_w"], w["ln2_b"], (True, False, False))[0]
            grad_out = F.linear(grad_x1, w["w_proj"]).view(batch, 1, heads, size)
            keys, values = self.keys[layer][:, :, : row + 1], self.values[layer][:, :, : row + 1]
            grad_query, grad_keys, grad_values = _sdpa_decode_grads(SdpaDecode(None, None), query, keys, values, grad_out)
            self.grad_keys[layer][:, :, : row + 1].add_(grad_keys)
            self.grad_values[layer][:, :, : row + 1].add_(grad_values)
            grad_key, grad_value = self.grad_keys[layer][:, :, row : row + 1], self.grad_values[layer][:, :, row : row + 1]
            grad_qkv = torch.cat([grad_query, grad_key, grad_value], dim=1).view(batch, 3 * hidden)
            grad_h = F.linear(grad_qkv, w["w_attn"])
            grad_x2 = grad_x1 + torch.ops.aten.native_layer_norm_backward(grad_h, x, (hidden,), mean1, rstd1, w["ln1_w"], w["ln1_b"], (True, False, False))[0]
        self.input_grads[t] = grad_x2
        return grad_x2

    def eager(self, steps: int) -> tuple[float, float]:
        """One rollout's forward and backward, eagerly: (forward seconds, backward seconds)."""
        for buffer in (*self.grad_keys, *self.grad_values):
            buffer.zero_()
        synchronize(self.inputs[0].device)
        start = time.perf_counter()
        for t in range(steps):
            self.forward_step(t)
        synchronize(self.inputs[0].device)
        middle = time.perf_counter()
        for t in reversed(range(steps)):
            self.backward_step(t)
        synchronize(self.inputs[0].device)
        return middle - start, time.perf_counter() - middle


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def captured(loop: DecodeLoop, steps: int, rounds: int) -> dict:
    """Capture every step's forward and backward as CUDA graphs in one pool (once), then replay them as a rollout runs
    them, `rounds` times: capture seconds, median forward and backward seconds, and the replay's input gradients."""
    device = loop.inputs[0].device
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up off the capture (cuBLAS handles and workspaces), as torch.cuda.graph asks
        loop.eager(steps)
    torch.cuda.current_stream(device).wait_stream(side)
    pool, graphs = torch.cuda.graph_pool_handle(), []
    start = time.perf_counter()
    for t in range(steps):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            loop.forward_step(t)
        graphs.append(graph)
    for t in reversed(range(steps)):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            loop.backward_step(t)
        graphs.append(graph)
    capture = time.perf_counter() - start
    runs = []
    for _ in range(rounds):
        for buffer in (*loop.grad_keys, *loop.grad_values):
            buffer.zero_()
        synchronize(device)
        begin = time.perf_counter()
        for graph in graphs[:steps]:
            graph.replay()
        synchronize(device)
        middle = time.perf_counter()
        for graph in graphs[steps:]:  # in capture order: the pool's memory is reused in that order
            graph.replay()
        synchronize(device)
        runs.append((middle - begin, time.perf_counter() - middle))
    return {"capture": capture, "captured_forward": statistics.median(f for f, _ in runs), "captured_backward": statistics.median(b for _, b in runs),
            "grads": {t: g.clone() for t, g in loop.input_grads.items()}}


def autograd_check(weights, batch: int, heads: int, prompt: int, steps: int, device, seed: int) -> float:
    """Largest relative difference between the written-out backward's input gradients and autograd's through the same
    forward (keys and values concatenated per step, transformers' sdpa attention)."""
    loop = DecodeLoop(weights, batch, heads, prompt, steps, device, torch.Generator().manual_seed(seed))
    prompt_keys = [k[:, :, :prompt].clone() for k in loop.keys]
    prompt_values = [v[:, :, :prompt].clone() for v in loop.values]
    loop.eager(steps)
    written = [loop.input_grads[t] for t in range(steps)]
    hidden, size = loop.hidden, loop.size
    inputs = [x.clone().requires_grad_(True) for x in loop.inputs]
    keys, values, outputs = [[k] for k in prompt_keys], [[v] for v in prompt_values], []
    for t in range(steps):
        x = inputs[t]
        for layer, w in enumerate(weights):
            h = F.layer_norm(x, (hidden,), w["ln1_w"], w["ln1_b"], EPS)
            query, key, value = (h @ w["w_attn"] + w["b_attn"]).split(hidden, dim=1)
            keys[layer].append(key.view(batch, heads, 1, size))
            values[layer].append(value.view(batch, heads, 1, size))
            out = F.scaled_dot_product_attention(query.view(batch, heads, 1, size), torch.cat(keys[layer], 2), torch.cat(values[layer], 2))
            x1 = x + out.transpose(1, 2).reshape(batch, hidden) @ w["w_proj"] + w["b_proj"]
            c = F.layer_norm(x1, (hidden,), w["ln2_w"], w["ln2_b"], EPS)
            x = x1 + F.gelu(c @ w["w_fc"] + w["b_fc"], approximate="tanh") @ w["w_out"] + w["b_out"]
        outputs.append(x)
    reference = torch.autograd.grad(sum((o * g).sum() for o, g in zip(outputs, loop.output_grads)), inputs)
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(written, reference))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--n_layer", type=int, default=24, help="gpt2-medium: 24 layers, 1024 wide, 16 heads")
    parser.add_argument("--n_embd", type=int, default=1024)
    parser.add_argument("--n_head", type=int, default=16)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--prompt_length", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3, help="timed rollouts of each kind (median), after one untimed")
    parser.add_argument("--check", action="store_true", help="also compare the written-out backward with autograd (small shapes)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    device = torch.device(args.device)
    weights = make_weights(args.n_layer, args.n_embd, device, torch.Generator().manual_seed(args.seed))
    print(f"GPT-2 decode steps: {args.n_layer} layers x {args.n_embd} wide, {args.n_head} heads, prompt {args.prompt_length}, "
          f"{args.new_tokens} new tokens, float32, {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}")
    error = None
    if args.check:
        error = autograd_check(weights, args.batch_sizes[0], args.n_head, args.prompt_length, args.new_tokens, device, args.seed)
        print(f"written-out backward against autograd: largest relative difference of the input gradients {error:.1e}")
    print("| batch | eager forward s | eager backward s | captured forward s | captured backward s | captured / eager | capture s | largest |captured - eager| / |eager| |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for batch in args.batch_sizes:
        loop = DecodeLoop(weights, batch, args.n_head, args.prompt_length, args.new_tokens, device, torch.Generator().manual_seed(args.seed))
        runs = [loop.eager(args.new_tokens) for _ in range(args.rounds + 1)][1:]
        row = {"batch": batch, "eager_forward": statistics.median(f for f, _ in runs), "eager_backward": statistics.median(b for _, b in runs)}
        eager_grads = {t: g.clone() for t, g in loop.input_grads.items()}
        if device.type == "cuda":
            replay = captured(loop, args.new_tokens, args.rounds)
            grads = replay.pop("grads")
            row.update(replay)
            row["difference"] = max(((grads[t] - eager_grads[t]).abs().max() / eager_grads[t].abs().max()).item() for t in eager_grads)
            eager_total, captured_total = row["eager_forward"] + row["eager_backward"], row["captured_forward"] + row["captured_backward"]
            print(f"| {batch} | {row['eager_forward']:.3f} | {row['eager_backward']:.3f} | {row['captured_forward']:.3f} | "
                  f"{row['captured_backward']:.3f} | {captured_total / eager_total:.2f}x | {row['capture']:.1f} | {row['difference']:.1e} |")
        else:
            print(f"| {batch} | {row['eager_forward']:.3f} | {row['eager_backward']:.3f} | - | - | - | - | - (CUDA graphs need CUDA) |")
        rows.append(row)
    return {"check_error": error, "rows": rows}


if __name__ == "__main__":
    main()
