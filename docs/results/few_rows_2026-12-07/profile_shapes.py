"""torch.profiler of one forward and one backward of METHOD at T new tokens (gpt2-small shape, batch 8, 2 threads),
operators grouped by their input shapes: the time of each product with the (V, H) LM head, per call.

    python docs/results/few_rows_2026-12-07/profile_shapes.py grade_ste 16 PATH/TO/gpt2-tokenizer [linear]
`linear`: every product as F.linear (`few_rows.FEW_ROWS = 0`), as before the few-row layout.
"""
import pathlib, sys, time, torch
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3] / "benchmarks"))
import step_cost
from torch.profiler import profile, ProfilerActivity
from grade_trl.core import few_rows
method = sys.argv[1]; T = int(sys.argv[2])
if sys.argv[4:] == ["linear"]:
    few_rows.FEW_ROWS = 0
torch.set_num_threads(2)
argv = ["--model", "gpt2-shaped-random", "--tokenizer", sys.argv[3], "--n_layer", "12", "--n_embd", "768", "--n_head", "12", "--batch_size", "8", "--device", "cpu"]
trainer, tok = step_cost.one_trainer(method, argv, T)
batch = next(iter(trainer.get_train_dataloader()))
trainer.model.train()
for i in range(2):
    t = time.perf_counter()
    loss = step_cost.training_loss(trainer, batch); t1 = time.perf_counter()
    trainer.accelerator.backward(loss); t2 = time.perf_counter()
    trainer.model.zero_grad(set_to_none=True)
    print(f"{method} fwd {t1-t:.2f} bwd {t2-t1:.2f}", flush=True)
for phase in ("forward", "backward"):
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        if phase == "forward":
            loss = step_cost.training_loss(trainer, batch)
        else:
            trainer.accelerator.backward(loss)
    print("==", phase)
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=30, max_shapes_column_width=70))
