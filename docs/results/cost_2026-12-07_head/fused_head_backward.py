import torch, time, statistics
torch.set_num_threads(2)
B,V,H=8,50257,768
E=torch.randn(V,H)*0.02
g_emb=torch.randn(B,H); g_y=torch.randn(B,V); p=torch.softmax(torch.randn(B,V),-1); gk=torch.randn(B,V)*1e-3
tau=0.7
def current():
    v = g_y + (E @ g_emb.T).T            # few-row layout of the ST embedding's gradient
    s = (p*v).sum(-1,keepdim=True)
    gl = p*(v-s)/tau + gk
    return gl @ E, gl
def fused(C):
    acc = torch.zeros(2*B,H); s = torch.zeros(B,1); gls=[]
    w = torch.empty(2*B, C)
    for a in range(0,V,C):
        Ec = E[a:a+C]
        vc = g_y[:,a:a+C] + (Ec @ g_emb.T).T
        pc = p[:,a:a+C]
        wc = pc*vc
        s += wc.sum(-1,keepdim=True)
        n = Ec.shape[0]
        ww = w[:, :n]
        torch.add(wc/tau, gk[:,a:a+C], out=ww[:B]); ww[B:].copy_(pc)
        acc.addmm_(ww, Ec)
        gls.append(vc)
    gh = acc[:B] - (s/tau)*acc[B:]
    v = torch.cat(gls,1)
    gl = p*(v-s)/tau + gk
    return gh, gl
r0 = current(); 
for C in (1024,2048,4096,8192):
    r1 = fused(C); print(C, (r0[0]-r1[0]).abs().max().item(), r0[0].abs().max().item(), (r0[1]-r1[1]).abs().max().item())
def t(f,n=20):
    for _ in range(3): f()
    ts=[]
    for _ in range(n):
        s=time.perf_counter(); f(); ts.append(time.perf_counter()-s)
    return statistics.median(ts)*1e3
for rnd in range(2):
    print("current", t(current))
    for C in (1024,2048,4096,8192): print("fused", C, t(lambda: fused(C)))
    print("gl@E only", t(lambda: r0[1] @ E), "few-row only", t(lambda: (E @ g_emb.T).T))
