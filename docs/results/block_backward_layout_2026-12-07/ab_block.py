"""Interleaved A/B of the decode block's backward input products: times_transposed (the few-row layout) against
F.linear, GRADE-STE forward+backward, REINFORCE beside (unaffected), round-robin, round 0 untimed.

    python docs/results/block_backward_layout_2026-12-07/ab_block.py T ROUNDS PATH/TO/gpt2-tokenizer
Run on the tree with the change applied (the decode block's backward calling times_transposed), not kept since."""
import pathlib, sys, time, statistics, torch
import torch.nn.functional as F
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3] / "benchmarks"))
import step_cost
from grade_trl.core import gpt2_decode_block, few_rows
T = int(sys.argv[1]); rounds = int(sys.argv[2])
torch.set_num_threads(2)
argv = ["--model", "gpt2-shaped-random", "--tokenizer", sys.argv[3], "--n_layer", "12", "--n_embd", "768", "--n_head", "12", "--batch_size", "8", "--device", "cpu"]
trainers = {m: step_cost.one_trainer(m, argv, T)[0] for m in ("grade_ste", "reinforce")}
batches = {m: next(iter(t.get_train_dataloader())) for m, t in trainers.items()}
def step(m):
    t = trainers[m]; t.model.train()
    torch.manual_seed(0)
    start = time.perf_counter()
    loss = step_cost.training_loss(t, batches[m]); t.accelerator.backward(loss)
    t.model.zero_grad(set_to_none=True)
    return time.perf_counter() - start
variants = {"transposed": few_rows.times_transposed, "linear": F.linear}
times = {}
for r in range(rounds + 1):
    for name, fn in variants.items():
        gpt2_decode_block.times_transposed = fn
        dt = step("grade_ste")
        if r: times.setdefault(name, []).append(dt)
        print(r, "grade_ste", name, f"{dt:.2f}", flush=True)
    dt = step("reinforce")
    if r: times.setdefault("reinforce", []).append(dt)
    print(r, "reinforce", f"{dt:.2f}", flush=True)
med = {k: statistics.median(v) for k, v in times.items()}
for k, v in med.items(): print(k, f"median {v:.2f}", [round(x, 2) for x in times[k]])
print("transposed/linear per round", [round(a / b, 3) for a, b in zip(times["transposed"], times["linear"])])
for name in variants: print(name, "grade_ste/reinforce", f"{med[name] / med['reinforce']:.3f}")
