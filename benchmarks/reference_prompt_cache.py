"""Time of GRADE's reference over the cached prompt against one forward over the whole sequence, side by side.

One process, the gpt2-small shape (random weights, batch 8, 32-token prompts, T new tokens, 2 threads). Each round
makes a fresh relaxed rollout, then times the reference's logits, the exact KL and the backward of the KL (which
includes the rollout's backward, the same for both), alternating the two implementations. The one-forward path is
written out here as it was before the change, with `recompute_reference_and_reward`'s checkpoint.

    python benchmarks/reference_prompt_cache.py --new_tokens 24 --tokenizer PATH/TO/gpt2
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from grade_trl.core.kl import exact_kl
from grade_trl.core.soft_rollout import forbid_eos, last_positions, position_ids_from_mask, reference_logits, soft_rollout

_spec = importlib.util.spec_from_file_location("step_cost", Path(__file__).resolve().parent / "step_cost.py")
step_cost = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_cost)


def one_forward_reference_logits(ref_model, rollout, min_new_tokens, eos_token_id, recompute=True):
    """Before the change: one forward (with gradient) over [prompt; y_1 .. y_{T-1}], recomputed in backward."""
    num_generated = rollout.tokens.shape[1]
    inputs_embeds = rollout.soft_tokens.drop_last().with_prefix(rollout.prompt_ids).embed(ref_model.get_input_embeddings().weight)
    ones = rollout.prompt_mask.new_ones(rollout.prompt_mask.shape[0], num_generated - 1).long()
    attention_mask = torch.cat([rollout.prompt_mask.long(), ones], dim=1)
    position_ids = position_ids_from_mask(attention_mask)

    def forward(inputs_embeds):
        keep = last_positions(num_generated, inputs_embeds.shape[1], inputs_embeds.device)
        return ref_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=keep).logits

    logits = checkpoint(forward, inputs_embeds, use_reentrant=False) if recompute else forward(inputs_embeds)
    return torch.cat([forbid_eos(logits[:, :min_new_tokens], eos_token_id), logits[:, min_new_tokens:]], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new_tokens", type=int, default=24)
    parser.add_argument("--tokenizer", default="gpt2", help="the GPT-2 tokenizer: a folder with vocab.json and merges.txt, or a hub id")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of (old, new); the median leaves out the first")
    args = parser.parse_args()
    torch.set_num_threads(2)
    shape = ["--model", step_cost.RANDOM_GPT2, "--tokenizer", args.tokenizer, "--n_layer", "12", "--n_embd", "768", "--n_head", "12",
             "--batch_size", "8", "--new_tokens", str(args.new_tokens), "--warmup", "0", "--repeats", "1"]
    trainer, tokenizer = step_cost.one_trainer("grade_ste", shape, args.new_tokens)
    batch = next(iter(trainer.get_train_dataloader()))
    model, config, eos = trainer.model, trainer.args, tokenizer.eos_token_id
    model.train()
    ref_model, _ = trainer.reference_context(model)
    seconds = {"one forward": [], "cached prompt": []}
    for _ in range(args.rounds):
        for name, reference in (("one forward", one_forward_reference_logits), ("cached prompt", reference_logits)):
            enc = trainer.tokenize_prompts(batch)
            rollout = soft_rollout(model, enc["input_ids"], enc["attention_mask"], relax=lambda logits, step: trainer.relaxation(logits, 1.0),
                                   max_new_tokens=config.max_new_tokens, min_new_tokens=config.min_new_tokens, eos_token_id=eos)
            start = time.perf_counter()
            ref_logits = reference(ref_model, rollout, config.min_new_tokens, eos, recompute=config.recompute_reference_and_reward)
            (exact_kl(rollout.logits, ref_logits) * rollout.mask).sum().backward()
            seconds[name].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    medians = {name: statistics.median(values[1:]) for name, values in seconds.items()}
    print(f"T={args.new_tokens}: reference + exact KL + backward, seconds per round {({k: [round(x, 2) for x in v] for k, v in seconds.items()})}; "
          f"median after the first: {({k: round(v, 2) for k, v in medians.items()})}")


if __name__ == "__main__":
    main()
