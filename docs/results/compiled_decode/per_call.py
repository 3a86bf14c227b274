"""One call of each compiled piece of the decode step against the eager one (needs prototype.diff applied; README here).

    python docs/results/compiled_decode/per_call.py [cpp]
"""
import sys, time

import torch
from grade_trl.core import gpt2_decode_block as g
torch.set_num_threads(1)
if len(sys.argv) > 1 and sys.argv[1] == "cpp":
    import torch._inductor.config as c; c.cpp_wrapper = True
B,H,n,P = 4,64,4,80
d=H//n
x=torch.randn(B,H); w=lambda *s: torch.randn(*s)*0.02
ln1w,ln1b=torch.ones(H),torch.zeros(H); wa,ba=w(H,3*H),w(3*H)
wp,bp=w(H,H),w(H); wf,bf=w(H,4*H),w(4*H); wo,bo=w(4*H,H),w(H)
q=torch.randn(B,n,1,d); K=torch.randn(B,n,P,d); V=torch.randn(B,n,P,d)
mask=torch.ones(B,1,1,P,dtype=torch.bool)
comp = g.compiled_arithmetic()
def bench(fn, args, N=2000):
    for _ in range(20): fn(*args)
    t=time.perf_counter()
    for _ in range(N): fn(*args)
    return (time.perf_counter()-t)/N*1e6
for name, fn, args in [("block_in", "block_in", (x,ln1w,ln1b,wa,ba,1e-5)),
                       ("block_out", "block_out", (q,K,V,mask,x,wp,bp,ln1w,ln1b,wf,bf,wo,bo,1e-5,None,"tanh"))]:
    with torch.no_grad():
        # warm dynamic
        getattr(comp, fn)(*args)
        if name=="block_out":
            getattr(comp, fn)(q,K[:,:,:P-1],V[:,:,:P-1],mask[...,:P-1],*args[4:])
        e=bench(getattr(g.EAGER, fn), args); cc=bench(getattr(comp, fn), args)
    print(name, f"eager {e:.1f} us, compiled {cc:.1f} us")
