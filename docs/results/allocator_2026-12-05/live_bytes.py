"""Per step: resident memory and live tensors' bytes (each storage once), for one method, over several steps.

Run from the repository root: python docs/results/allocator_2026-12-05/live_bytes.py METHOD T STEPS N_LAYER N_EMBD
(tokenizer: ../shared/tokenizers/gpt2, a folder with GPT-2's vocab.json and merges.txt)."""
import sys, gc, os, torch, resource
sys.path.insert(0, "benchmarks")
import step_cost as sc
from transformers import TrainerCallback
def rss_mib():
    with open("/proc/self/statm") as f: return int(f.read().split()[1]) * 4096 / 2**20
def live_tensor_mib():
    seen, total = set(), 0
    for o in gc.get_objects():
        try:
            if isinstance(o, torch.Tensor) and not o.is_meta:
                s = o.untyped_storage(); k = s.data_ptr()
                if k not in seen: seen.add(k); total += s.nbytes()
        except Exception: pass
    return total / 2**20
class Watch(TrainerCallback):
    def __init__(self): self.rows = []
    def on_step_end(self, args, state, control, **kw):
        gc.collect(); self.rows.append((round(rss_mib()), round(live_tensor_mib())))
method = sys.argv[1]; T = int(sys.argv[2]); steps = int(sys.argv[3])
argv = ["--model", "gpt2-shaped-random", "--tokenizer", "../shared/tokenizers/gpt2", "--n_layer", sys.argv[4], "--n_embd", sys.argv[5], "--n_head", "4", "--batch_size", "8", "--threads", "2", "--device", "cpu", "--repeats", str(steps), "--warmup", "0"]
trainer, tok = sc.one_trainer(method, argv, T)
w = Watch(); trainer.add_callback(w)
trainer.args.max_steps = steps
trainer.train()
print(method, "rss/live MiB per step:", w.rows, flush=True)
