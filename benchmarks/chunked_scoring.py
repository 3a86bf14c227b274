"""What `chunked_scoring` saves and costs: the policy's scoring of a sampled batch with its gradient (REINFORCE's and PPO's
loss), inside the LM head a chunk of positions at a time against the whole logits, side by side in one process.

Each repeat runs both variants, alternating which goes first: the forward of the policy on prompt + completion, the
log-probs of the completion under the processed distribution, the entropy metric (detached, as REINFORCE logs it), and
the backward of the summed log-probs. Reported per variant: the median wall time, the allocator peak above the start
(`grade_trl.memory.peak_allocated` on CPU, `torch.cuda.max_memory_allocated` on CUDA), the bytes autograd saves for
backward, and the ratios chunked / whole. The model is a random Qwen2 of the given shape (no tokenizer: random token
ids; the cost depends on the shape and the sampling settings, not on the values); defaults: a small Qwen2 with
Qwen2.5's vocabulary at the GSM8K recipes' settings (temperature 1, no top-p, no EOS ban).

    python benchmarks/chunked_scoring.py --threads 2
    python benchmarks/chunked_scoring.py --threads 2 --bf16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grade_trl.core import SampledBatch, SamplingSettings, completion_scores, head_scoring, token_logprobs  # noqa: E402
from grade_trl.core.sampling import entropy_from_logits  # noqa: E402
from grade_trl.memory import peak_allocated  # noqa: E402

MIB = 2**20


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv_heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151936, help="embedding rows (Qwen2.5's 151,936)")
    parser.add_argument("--batch", type=int, default=8, help="completions")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new_tokens", type=int, default=128, help="completion tokens")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--min_new_tokens", type=int, default=0, help="EOS banned before this many tokens (token 0 is EOS here)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast, float32 weights (the GSM8K recipes')")
    parser.add_argument("--chunk_elements", type=int, default=None, help="logits per chunk (default: grade_trl's, 2^26)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def random_batch(args, device) -> SampledBatch:
    generator = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(1, args.vocab, (args.batch, args.prompt), generator=generator)
    completion = torch.randint(1, args.vocab, (args.batch, args.new_tokens), generator=generator)
    return SampledBatch(prompt_ids=prompt.to(device), prompt_mask=torch.ones_like(prompt).to(device), completion_ids=completion.to(device),
                        completion_mask=torch.ones(args.batch, args.new_tokens, device=device), logprobs=torch.zeros(args.batch, args.new_tokens, device=device),
                        eos_token_id=0, pad_token_id=0)


def scoring_step(model, batch, settings, chunked: bool) -> None:
    """The loss's scoring as REINFORCE runs it, and its backward."""
    if chunked:
        logps, _ = completion_scores(model, batch, settings, with_grad=True, entropy="detached")
    else:
        logps, logits = token_logprobs(model, batch, settings, with_grad=True)
        entropy_from_logits(logits.detach(), batch.completion_mask)
        del logits
    logps.sum().backward()


def measure(model, batch, settings, chunked: bool, device, autocast) -> dict:
    saved = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    begin = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        if device.type == "cuda":
            scoring_step(model, batch, settings, chunked)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - start
        else:
            with peak_allocated(device) as result:
                scoring_step(model, batch, settings, chunked)
            peak = result["peak_bytes"]
    return {"seconds": time.perf_counter() - begin, "peak_mib": peak / MIB, "saved_mib": sum(saved.values()) / MIB}


def main(argv=None) -> dict:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    args = parse_args(argv)
    if args.chunk_elements:
        head_scoring.CHUNK_ELEMENTS = args.chunk_elements  # read at each scoring
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, tie_word_embeddings=True, attention_dropout=0.0)
    model = Qwen2ForCausalLM(config).to(device).train()
    batch = random_batch(args, device)
    settings = SamplingSettings(temperature=args.temperature, top_p=args.top_p, min_new_tokens=args.min_new_tokens, max_new_tokens=args.new_tokens)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    runs = {"whole": [], "chunked": []}
    measure(model, batch, settings, True, device, autocast)  # warm-up
    for repeat in range(args.repeats):
        order = ("chunked", "whole") if repeat % 2 == 0 else ("whole", "chunked")
        for name in order:
            runs[name].append(measure(model, batch, settings, name == "chunked", device, autocast))
    summary = {name: {key: statistics.median(r[key] for r in rows) for key in ("seconds", "peak_mib", "saved_mib")} for name, rows in runs.items()}
    logits = args.batch * args.new_tokens * args.vocab
    print(f"device: {device.type} ({torch.get_num_threads()} threads) | random Qwen2: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab:,} | "
          f"batch {args.batch}, prompt {args.prompt}, new tokens {args.new_tokens} ({logits:,} logits) | {'bf16 autocast' if args.bf16 else 'float32'} | "
          f"temperature {args.temperature}, top_p {args.top_p}, min_new_tokens {args.min_new_tokens} | chunks of {head_scoring.CHUNK_ELEMENTS:,} logits | median of {args.repeats}, interleaved | torch {torch.__version__}")
    print("\n| scoring | time (s) | peak (MiB) | saved for backward (MiB) |\n|---|---:|---:|---:|")
    for name, row in summary.items():
        print(f"| {name} | {row['seconds']:.3f} | {row['peak_mib']:.0f} | {row['saved_mib']:.0f} |")
    ratios = {key: summary["chunked"][key] / summary["whole"][key] for key in ("seconds", "peak_mib", "saved_mib")}
    print(f"\nchunked / whole: time {ratios['seconds']:.2f}x, peak {ratios['peak_mib']:.2f}x, saved {ratios['saved_mib']:.2f}x")
    return {"args": vars(args), "summary": summary, "ratios": ratios}


if __name__ == "__main__":
    main()
