"""Interleaved A/B of the few-row layout: one forward+backward per (method, layout), round-robin (round 0 untimed).

    python docs/results/few_rows_2026-12-07/ab.py T ROUNDS grade_ste,reinforce PATH/TO/gpt2-tokenizer
The layout is switched off by setting `few_rows.FEW_ROWS = 0` (no input then has few enough rows)."""
import pathlib, sys, time, statistics, torch
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3] / "benchmarks"))
import step_cost
from grade_trl.core import few_rows
T = int(sys.argv[1]); rounds = int(sys.argv[2]); methods = sys.argv[3].split(",")
torch.set_num_threads(2)
argv = ["--model", "gpt2-shaped-random", "--tokenizer", sys.argv[4], "--n_layer", "12", "--n_embd", "768", "--n_head", "12", "--batch_size", "8", "--device", "cpu"]
trainers = {m: step_cost.one_trainer(m, argv, T)[0] for m in methods}
batches = {m: next(iter(t.get_train_dataloader())) for m, t in trainers.items()}
def step(m):
    t = trainers[m]; t.model.train()
    torch.manual_seed(0)
    start = time.perf_counter()
    loss = step_cost.training_loss(t, batches[m]); t.accelerator.backward(loss)
    t.model.zero_grad(set_to_none=True)
    return time.perf_counter() - start
times = {}
for r in range(rounds + 1):
    for layout, rows in (("transposed", 32), ("linear", 0)):
        few_rows.FEW_ROWS = rows
        for m in methods:
            dt = step(m)
            if r: times.setdefault((m, layout), []).append(dt)
            print(r, m, layout, f"{dt:.2f}", flush=True)
med = {k: statistics.median(v) for k, v in times.items()}
for k, v in med.items(): print(k, f"median {v:.2f}", [round(x, 2) for x in times[k]])
for layout in ("transposed", "linear"):
    print(layout, "grade_ste/reinforce", f"{med[('grade_ste', layout)] / med[('reinforce', layout)]:.3f}")
# per-round paired ratios
for m in methods:
    print(m, "transposed/linear per round", [round(a / b, 3) for a, b in zip(times[(m, 'transposed')], times[(m, 'linear')])])
