"""A decode step's four input-gradient products of every GPT-2 block (grad @ W^T for Conv1D's (in, out) weights),
F.linear(grad, W) against few_rows.times_transposed(grad, W), all layers in turn (the weights stream from memory as in
a rollout's backward), interleaved, median of 9 rounds after 2.

    python docs/results/block_backward_layout_2026-12-07/block_backward_layout.py THREADS"""
import pathlib, sys, time, statistics, torch
import torch.nn.functional as F
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3]))
from grade_trl.core.few_rows import times_transposed
threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
torch.set_num_threads(threads)
print(f"threads {threads}, torch {torch.__version__}")
print("| shape | rows | F.linear ms per step | times_transposed ms per step | ratio |")
print("|---|---:|---:|---:|---:|")
for name, H, L in (("embedded (256 x 4)", 256, 4), ("gpt2-small (768 x 12)", 768, 12), ("gpt2-medium (1024 x 24)", 1024, 24)):
    layers = [[torch.randn(i, o) for (i, o) in ((H, 3 * H), (H, H), (H, 4 * H), (4 * H, H))] for _ in range(L)]
    for rows in (1, 8, 16, 32):
        grads = {o: torch.randn(rows, o) for o in (H, 3 * H, 4 * H)}
        def run(fn):
            s = time.perf_counter()
            for Ws in layers:
                for W in Ws:
                    fn(grads[W.shape[1]], W)
            return (time.perf_counter() - s) * 1e3
        t = {"linear": [], "transposed": []}
        for r in range(11):
            for k, fn in (("linear", F.linear), ("transposed", times_transposed)):
                dt = run(fn)
                if r >= 2: t[k].append(dt)
        a, b = statistics.median(t["linear"]), statistics.median(t["transposed"])
        print(f"| {name} | {rows} | {a:.2f} | {b:.2f} | {b / a:.2f} |", flush=True)
