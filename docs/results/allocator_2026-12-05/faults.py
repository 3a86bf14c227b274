"""Page faults of a repeated large temporary under the host allocator this process was started with.

Allocates the exact KL's (B, T, V) = (8, 48, 50,257) float32 shape of the gpt2-small benchmark (77 MB) as
`torch.exp`'s output and frees it, four times, printing each round's minor page faults (fresh 4 KiB pages mapped
on first touch) and milliseconds. Run it several times under each allocator (see README.md here): glibc's heap
sometimes reuses the freed block and sometimes maps fresh pages, from one process to the next.
"""

import resource
import time

import torch

torch.set_num_threads(2)
x = torch.randn(8, 48, 50257)
rounds = []
for _ in range(4):
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    y = torch.exp(x)
    del y
    rounds.append(f"{resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before} faults {1e3 * (time.perf_counter() - start):.0f} ms")
print(" | ".join(rounds))
