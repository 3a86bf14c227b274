"""Where GRADE-STE's backward goes by autograd node: the operators each named node runs inside (torch.profiler's event tree),
gpt2-small shape, batch 8, T new tokens, 2 threads, one backward after two untimed steps.

    python docs/results/cost_2026-12-07/backward_children.py grade_ste 48 NODE[,NODE...] PATH/TO/gpt2-tokenizer

A non-reentrant checkpoint recomputes its forward inside the first backward node that needs a saved tensor of it:
the reward's `score_soft` under SoftmaxBackward0 and the reference's forward under MmBackward0 here."""
import pathlib, sys, time, torch, collections
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3] / "benchmarks"))
import step_cost
from torch.profiler import profile, ProfilerActivity
torch.set_num_threads(2)
argv = ["--model", "gpt2-shaped-random", "--tokenizer", sys.argv[4], "--n_layer", "12", "--n_embd", "768", "--n_head", "12", "--batch_size", "8", "--device", "cpu"]
trainer, tok = step_cost.one_trainer(sys.argv[1], argv, int(sys.argv[2]))
batch = next(iter(trainer.get_train_dataloader()))
trainer.model.train()
for i in range(2):
    loss = step_cost.training_loss(trainer, batch); trainer.accelerator.backward(loss); trainer.model.zero_grad(set_to_none=True)
loss = step_cost.training_loss(trainer, batch)
with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
    trainer.accelerator.backward(loss)
names = sys.argv[3].split(",")
agg = collections.defaultdict(lambda: [0.0, 0])
for ev in prof.events():
    if ev.name in names:
        for ch in ev.cpu_children:
            k = (ev.name, ch.name, str(ch.input_shapes)[:90])
            agg[k][0] += ch.cpu_time_total / 1e3; agg[k][1] += 1
for k, (t, n) in sorted(agg.items(), key=lambda kv: -kv[1][0])[:40]:
    print(f"{t:9.1f} ms {n:5d}  {k}")
