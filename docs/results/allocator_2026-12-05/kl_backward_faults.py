"""The exact KL's backward inside GRADE-STE steps, timed with its page faults: a wrapper around `_ExactKL.backward`
that first times one extra exp of the saved log p (a probe), then the backward itself. gpt2-small shape, B 8, T 48.

Run from the repository root: MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=1073741824 \
    python docs/results/allocator_2026-12-05/kl_backward_faults.py 48   (tokenizer: ../shared/tokenizers/gpt2)"""
import sys, time, torch, resource
sys.path.insert(0, "benchmarks")
import step_cost as sc
from grade_trl.core import kl as klmod
def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
orig = klmod._ExactKL.backward
def timed(ctx, grad, eg):
    f0 = faults(); t0 = time.perf_counter()
    logp = ctx.saved_tensors[0]
    t_a = time.perf_counter(); p = logp.exp(); t_b = time.perf_counter(); f_b = faults()
    out = orig(ctx, grad, eg)
    print(f"   KL backward {1e3*(time.perf_counter()-t0):.0f} ms, {faults()-f0} faults; logp {tuple(logp.shape)} {logp.stride()} {logp.dtype} contiguous={logp.is_contiguous()}; a probe exp {1e3*(t_b-t_a):.0f} ms {f_b-f0} faults", flush=True)
    return out
klmod._ExactKL.backward = staticmethod(timed)
T = int(sys.argv[1]); torch.set_num_threads(2)
argv = ["--model", "gpt2-shaped-random", "--tokenizer", "../shared/tokenizers/gpt2", "--n_layer", "12", "--n_embd", "768", "--n_head", "12", "--batch_size", "8", "--threads", "2", "--device", "cpu"]
trainer, tok = sc.one_trainer("grade_ste", argv, T)
batch = next(iter(trainer.get_train_dataloader())); trainer.model.train()
for i in range(3):
    f0 = faults(); t0 = time.perf_counter(); loss = sc.training_loss(trainer, batch); t1 = time.perf_counter(); f1 = faults()
    trainer.accelerator.backward(loss); t2 = time.perf_counter(); f2 = faults()
    trainer.model.zero_grad(set_to_none=True)
    with open("/proc/self/statm") as f: rss = int(f.read().split()[1]) * 4096 >> 20
    print(f"fwd {t1-t0:.3f} ({f1-f0} faults) bwd {t2-t1:.3f} ({f2-f1} faults) rss {rss} MiB", flush=True)
