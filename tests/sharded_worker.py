"""Worker of tests/test_sharded.py, run by torchrun with 2 CPU processes (gloo): GRADE's soft rollout on the tiny
model sharded with FSDP2 (`fully_shard`: each GPT2Block a unit, the root holding the tied E), against the same
rollout of an unsharded copy on the whole global batch (rank 0). Writes {case: {...}} as JSON to argv[1].

Each rank takes half of the global batch's rows, with the Gumbel noise of its own rows (drawn for the whole batch
from one seed), so the sharded and unsharded rollouts make the same draws. The loss is the mean over the rank's
rows of a differentiable function of the rollout (the soft tokens embedded with E, so the gradient flows through
every relaxed step into E and the blocks); FSDP averages the ranks' gradients, so the sharded gradient should be
the unsharded gradient of the mean over the global batch. The same comparison for REINFORCE's and PPO's scoring
inside the LM head (`head_scoring_case`) and for GRADE's exact KL to a sharded frozen reference
(`grade_sharded_reference_case`); the frozen reference's resharding after use, and the evaluation's generation and the
rewards' metric log under sharding.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from accelerate import PartialState
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from grade_trl.cli import exit_process
from grade_trl.core.sharding import input_embedding_matrix, resharded
from grade_trl.core.soft_rollout import soft_rollout
from grade_trl.core.soft_tokens import Relaxed
from grade_trl.models import load_causal_lm, load_tokenizer, prepare_tokenizer

GLOBAL_BATCH, NEW_TOKENS = 4, 6  # 2 rows per rank; 6 relaxed steps: enough to cross several FSDP forwards
PROMPTS = ["This movie was", "I did not expect the", "Worst film I have", "The acting"]


def relax_fn(noise, straight_through, eos, force_eos_rows):
    """Gumbel-softmax at tau 1 with the rows' own noise (B, T, V); rows in `force_eos_rows` (local indices) emit EOS
    from step 1 on, so that one rank's rows all finish early and the other's do not."""

    def relax(logits, step):
        z = logits + noise[:, step, : logits.shape[-1]]
        if force_eos_rows:
            bias = torch.zeros_like(z)
            if step >= 1:
                bias[force_eos_rows, eos] = 1e4
            z = z + bias
        values = torch.softmax(z, dim=-1)
        return Relaxed(values, z.argmax(-1), straight_through)

    return relax


def objective(model, enc, relax):
    rollout = soft_rollout(model, enc["input_ids"], enc["attention_mask"], relax, NEW_TOKENS, 0, relax.eos, cache="chunked")
    embeds = rollout.soft_tokens.embed(input_embedding_matrix(model))  # (B, T, H): as a reward's score_soft would read them
    # mean over rows of a smooth function of what was generated: the logits (through every forward) and the embedded soft tokens
    per_row = rollout.logits.float().logsumexp(-1).mean(-1) + embeds.float().pow(2).mean((1, 2))
    return per_row.mean(), int(rollout.tokens.shape[1])


def lora_objective(model, enc, relax):
    """GRADE's LoRA case: the rollout of the policy (adapters on), the reference as the same model with its adapters
    disabled (grade_trl's reference under `use_peft`, recomputed in backward as the trainer does by default), the exact
    KL between them, and the embedded soft tokens."""
    from grade_trl.trainers.base import adapters_disabled

    return grade_objective(model, lambda: adapters_disabled(model))(model, enc, relax)


def grade_objective(reference, context, recompute=True):
    """GRADE's objective on the rollout: the exact KL to `reference` (a frozen copy, or the policy itself with its
    adapters disabled by `context`; its forward on the soft tokens recomputed in backward, the trainer's default, whole
    or block by block as `recompute` says), entered through `context` as the trainer's `reference_context` gives it,
    plus the logits and the soft tokens embedded with the policy's E (a reward's soft path)."""
    from grade_trl.core.kl import exact_kl
    from grade_trl.core.soft_rollout import reference_logits

    def grade(model, enc, relax):
        rollout = soft_rollout(model, enc["input_ids"], enc["attention_mask"], relax, NEW_TOKENS, 0, relax.eos, cache="chunked")
        kl = exact_kl(rollout.logits, reference_logits(reference, rollout, 0, relax.eos, recompute=recompute, context=context)).sum(-1)  # (B,)
        embeds = rollout.soft_tokens.embed(input_embedding_matrix(model))
        grade.kl = kl.detach()
        return (rollout.logits.float().logsumexp(-1).mean(-1) + kl + embeds.float().pow(2).mean((1, 2))).mean(), int(rollout.tokens.shape[1])

    return grade


def lora_copy(base):
    """`base` with LoRA adapters on its attention and MLP (r 4), B initialised non-zero so every adapter weight has a
    gradient, the same on every rank (seeded)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], task_type="CAUSAL_LM"))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    return model


def unsharded_run(base, enc_all, noise_all, straight_through: bool, eos: int, force: list[int], objective=objective):
    """The reference: an unsharded copy on the whole global batch (every rank computes it). (loss, steps, gradients)."""
    full = copy.deepcopy(base)
    relax = relax_fn(noise_all, straight_through, eos, force)
    relax.eos = eos
    loss, steps = objective(full, enc_all, relax)
    loss.backward()
    return loss, steps, {n: p.grad.clone() for n, p in full.named_parameters() if p.grad is not None}


def local_relax(noise_all, rows: slice, straight_through: bool, eos: int, force: list[int]):
    """This rank's relaxation: its rows' noise, EOS forced in its rows among the global rows `force`."""
    local_force = [i for i in range(rows.stop - rows.start) if rows.start + i in force]
    relax = relax_fn(noise_all[rows], straight_through, eos, local_force)
    relax.eos = eos
    return relax


def comparison(reference, loss_local, steps_local, grads_sharded: dict, world: int) -> dict:
    """The sharded run against the reference: the ranks' mean loss, the largest gradient difference and where."""
    loss_full, steps_full, grads_full = reference
    loss_mean = loss_local.detach().clone()
    dist.all_reduce(loss_mean)
    loss_mean /= world
    diffs = {n: (grads_sharded[n] - g).abs().max().item() if n in grads_sharded else g.abs().max().item() for n, g in grads_full.items()}
    return {
        "loss_single": loss_full.item(),
        "loss_sharded": loss_mean.item(),
        "steps_single": steps_full,
        "steps_local": steps_local,
        "same_parameters_have_gradients": sorted(grads_full) == sorted(grads_sharded),
        "max_grad_diff": max(diffs.values()),
        "worst_param": max(diffs, key=diffs.get),
        "grad_scale": max(g.abs().max().item() for g in grads_full.values()),
    }


def setup():
    """What every case of a worker shares: (rank, world, tokenizer, the tiny model, the global batch, this rank's
    rows and their encoding, the Gumbel noise of the global batch (B, T, V), EOS)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    tokenizer = prepare_tokenizer(load_tokenizer("embedded"))
    base = load_causal_lm("embedded").eval()
    enc_all = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    enc = {k: v[rows] for k, v in enc_all.items()}
    generator = torch.Generator().manual_seed(0)
    noise_all = -torch.log(-torch.log(torch.rand(GLOBAL_BATCH, NEW_TOKENS, base.config.vocab_size, generator=generator).clamp_min(1e-10)))
    return rank, world, tokenizer, base, enc_all, rows, enc, noise_all, tokenizer.eos_token_id


def write_results(results: dict, out_path: str, rank: int) -> None:
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def sharded_copy(base, world: int):
    """A copy of `base` sharded as the FSDP2 config does it: every GPT2Block a unit, the root (with the tied E) the last."""
    sharded = copy.deepcopy(base)
    mesh = init_device_mesh("cpu", (world,))
    for block in sharded.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    return sharded


def accelerate_sharded_copy(base, world: int):
    """A copy of `base` sharded by Accelerate's own `fsdp2_prepare_model`, as `accelerate_configs/fsdp2.yaml` does it:
    every GPT2Block a unit, and (tied weights) E in a unit of its own with the final norm and the LM head, sharded
    with `reshard_after_forward=False`, so that E stays unsharded between forwards; then the root."""
    from types import SimpleNamespace

    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
                                            cpu_ram_efficient_loading=False, state_dict_type="FULL_STATE_DICT")
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard",))
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=mesh, parallelism_config=SimpleNamespace(fsdp_dim_names=("dp_shard",)),
                                  mixed_precision="no", device=torch.device("cpu"), is_main_process=dist.get_rank() == 0)
    return fsdp2_prepare_model(accelerator, copy.deepcopy(base))


def evaluation_case(base, tokenizer, rank: int, world: int) -> dict:
    """Evaluation's generation on the sharded model with shares that cross a batch boundary on rank 0 only (3 prompts
    in batches of 2 against 1 prompt): without matching calls and synced decoding the processes' collectives would
    no longer pair up and the run would hang. Greedy, so each rank's completions can be compared with the unsharded
    model's on the same prompts."""
    from grade_trl.evaluation import GenerationSettings, generate_completions

    settings = GenerationSettings(max_new_tokens=5, min_new_tokens=0, batch_size=2, do_sample=False)
    mine = ["This movie was", "I did not expect the", "Worst film I have"] if rank == 0 else ["The acting"]
    sharded = sharded_copy(base, world)
    completions, lengths, _ = generate_completions(sharded, tokenizer, mine, settings, seed=0)
    expected, expected_lengths, _ = generate_completions(copy.deepcopy(base), tokenizer, mine, settings, seed=0)
    same = torch.tensor([int(completions == expected and lengths == expected_lengths)])
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return {"returned": True, "all_ranks_match_unsharded": bool(same.item()), "rank0_completions": len(completions) if rank == 0 else None}


def evaluation_fewer_prompts_than_processes(base, tokenizer, rank: int, world: int) -> dict:
    """The whole validation protocol (RewardEvaluator, best-of-2) with 1 prompt for 2 processes: rank 1's shard is
    empty, yet its `generate` calls are collectives rank 0 waits for. Before, rank 1 skipped its work and the run hung."""
    from types import SimpleNamespace

    from grade_trl.evaluation import GenerationSettings, RewardEvaluator
    from grade_trl.rewards.length import LengthReward

    settings = GenerationSettings(max_new_tokens=5, min_new_tokens=0, batch_size=2, do_sample=False)
    evaluator = RewardEvaluator({"validation": ["This movie was"]}, [LengthReward(tokenizer.eos_token_id)], settings, best_of_n=2)
    accelerator = SimpleNamespace(process_index=rank, num_processes=world)
    sharded = evaluator.evaluate(sharded_copy(base, world), tokenizer, "validation", accelerator=accelerator)
    single = evaluator.evaluate(copy.deepcopy(base), tokenizer, "validation")
    return {"returned": True, "rank": rank, "reward_sharded": sharded["metrics"]["reward"], "reward_single": single["metrics"]["reward"]}


def untied_copy(base):
    """`base` with an LM head of its own (Qwen2.5-7B's layout; the tiny model, as Qwen2.5-0.5B to 3B, ties it to E)."""
    untied = copy.deepcopy(base)
    untied.config.tie_word_embeddings = False
    generator = torch.Generator().manual_seed(1)
    weight = base.lm_head.weight.detach()
    untied.lm_head.weight = torch.nn.Parameter(weight + 0.02 * torch.randn(weight.shape, generator=generator))
    return untied


def sampled_global_batch(base, tokenizer, settings):
    """The global batch's prompts sampled by the unsharded `base` from seed 0: the same completions on every rank."""
    from grade_trl.core import sample

    enc_all = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    return sample(base, enc_all["input_ids"], enc_all["attention_mask"], settings, tokenizer.eos_token_id, tokenizer.pad_token_id)


def head_scoring_comparison(base, tokenizer, rank: int, world: int, entropy: str, shard) -> tuple[dict, object]:
    """REINFORCE's and PPO's scoring inside the LM head (core/head_scoring.py) on a sharded copy of `base`, 2 positions a
    chunk, each chunk's logits recomputed in backward, where the sharding's hooks have gathered the head's weight again:
    against the whole logits (sampling.token_logprobs) of an unsharded copy on the global batch. The loss is the mean
    over rows of the summed log-probs (+ the mean entropy: PPO's bonus, entropy "grad"). shard: base -> (the sharded
    model to call, backward(loss), gradients() -> {name: the whole gradient}, head_is_shard() -> whether the head's
    weight is a shard now, read between the forward and the backward). `chunks_scored` counts the chunks' computations:
    3 in the forward and 3 recomputed in backward. (The comparison, the sharded model.)"""
    from grade_trl.core import SamplingSettings, completion_scores, head_scoring, token_logprobs
    from grade_trl.core.masks import masked_mean
    from grade_trl.core.sampling import token_entropy

    settings = SamplingSettings(temperature=0.7, top_p=0.9, top_k=50, min_new_tokens=3, max_new_tokens=NEW_TOKENS)
    batch = sampled_global_batch(base, tokenizer, settings)

    def loss_of(logps, entropy_values, rows):
        bonus = masked_mean(entropy_values, batch.completion_mask[rows]) if entropy == "grad" else 0.0
        return logps.sum() / logps.shape[0] + bonus

    full = copy.deepcopy(base)  # the reference: the whole logits of the global batch
    logps, processed = token_logprobs(full, batch, settings, with_grad=True)
    loss_full = loss_of(logps, token_entropy(processed), slice(None))
    loss_full.backward()
    reference = (loss_full, NEW_TOKENS, {n: p.grad for n, p in full.named_parameters() if p.grad is not None})

    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    local = dataclasses.replace(batch, **{name: getattr(batch, name)[rows] for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "logprobs")})
    sharded, backward, gradients, head_is_shard = shard(base)
    chunk_scores, scored = head_scoring._chunk_scores, []

    def counted_chunk_scores(*args, **kwargs):
        scored.append(args[-1])  # the chunk's first position
        return chunk_scores(*args, **kwargs)

    chunk_elements, head_scoring.CHUNK_ELEMENTS = head_scoring.CHUNK_ELEMENTS, local.completion_ids.shape[0] * 2 * base.config.vocab_size
    head_scoring._chunk_scores = counted_chunk_scores
    try:
        head_applies = head_scoring.output_head(sharded) is not None
        logps, entropy_values = completion_scores(sharded, local, settings, with_grad=True, entropy=entropy)
        loss_local = loss_of(logps, entropy_values, rows)
        shard_before_backward = head_is_shard()
        backward(loss_local)
    finally:
        head_scoring.CHUNK_ELEMENTS, head_scoring._chunk_scores = chunk_elements, chunk_scores
    result = comparison(reference, loss_local, NEW_TOKENS, gradients(), world)
    return {**result, "head_applies": head_applies, "chunks_scored": len(scored), "head_shard_before_backward": shard_before_backward}, sharded


def head_scoring_case(base, tokenizer, rank: int, world: int, layout: str, entropy: str) -> dict:
    """`head_scoring_comparison` under FSDP2, where the head's unit's pre-backward hook gathers its weight again. Layouts:
    Accelerate's (`fsdp2_prepare_model`: the head in the tail unit, not resharded after forward) and, for an untied head,
    the head a unit of its own resharded after forward (`own`), whose weight is a shard between its forward and its
    backward."""
    def shard(model):
        if layout == "accelerate":
            sharded = accelerate_sharded_copy(model, world)
        else:
            sharded = copy.deepcopy(model)
            mesh = init_device_mesh("cpu", (world,))
            for block in sharded.transformer.h:
                fully_shard(block, mesh=mesh)
            fully_shard(sharded.lm_head, mesh=mesh, reshard_after_forward=True)
            fully_shard(sharded, mesh=mesh)
        gradients = lambda: {n: p.grad.full_tensor() for n, p in sharded.named_parameters() if p.grad is not None}  # noqa: E731
        return sharded, torch.Tensor.backward, gradients, lambda: isinstance(sharded.lm_head.weight, DTensor)

    result, sharded = head_scoring_comparison(base, tokenizer, rank, world, entropy, shard)
    return {**result, "tied": sharded.lm_head.weight is sharded.transformer.wte.weight}


def reference_reshard_case(base, tokenizer, world: int) -> dict:
    """The frozen reference of REINFORCE and PPO, sharded by Accelerate's layout (trainers.base `prepared_reference`),
    after a no-grad scoring of a batch: the parameters left gathered, without and with `resharded_on_exit` (the
    reference's context). FSDP2 leaves a root unit gathered after a forward, for a backward a frozen model never runs."""
    from grade_trl.core import SamplingSettings, completion_scores
    from grade_trl.core.sharding import resharded_on_exit

    settings = SamplingSettings(max_new_tokens=NEW_TOKENS)
    batch = sampled_global_batch(base, tokenizer, settings)
    reference = accelerate_sharded_copy(base, world).eval()
    with torch.no_grad():
        completion_scores(reference, batch, settings, with_grad=False, truncate=False)
    left = sum(not isinstance(p, DTensor) for p in reference.parameters())
    with resharded_on_exit(reference), torch.no_grad():
        completion_scores(reference, batch, settings, with_grad=False, truncate=False)
    return {"gathered_left": left, "gathered_left_resharded_on_exit": sum(not isinstance(p, DTensor) for p in reference.parameters())}


def perturbed_reference(base):
    """A frozen copy of `base` moved off it (every weight plus 0.05 N(0, 1), seeded: the same on every rank), so that
    the exact KL and its gradient through the reference's forward are not 0, as they are at the first step."""
    frozen = copy.deepcopy(base).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in frozen.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return frozen


@contextmanager
def resharded_even_in_backward(module):
    """The control's context: `resharded_on_exit` without its guard, every unit resharded on exit, in backward too."""
    try:
        yield module
    finally:
        resharded(module)


@contextmanager
def gathered_elements_counted(model):
    """Within: the most of `model`'s parameter elements that its FSDP2 units held gathered (whole) at once, counted at
    each unit's gather and reshard (`FSDPParamGroup._to_unsharded` / `_to_sharded`), in `counted["most"]`."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    elements = {}  # the model's units' param groups -> their whole parameters' elements
    for module in model.modules():
        if isinstance(module, FSDPModule):
            for group in module._get_fsdp_state()._fsdp_param_groups:
                elements[group] = sum(fsdp_param._orig_size.numel() for fsdp_param in group.fsdp_params)
    gathered, counted = set(), {"most": 0}
    original_unsharded, original_sharded = FSDPParamGroup._to_unsharded, FSDPParamGroup._to_sharded

    def to_unsharded(group):
        original_unsharded(group)
        if group in elements:
            gathered.add(group)
            counted["most"] = max(counted["most"], sum(elements[g] for g in gathered))

    def to_sharded(group):
        original_sharded(group)
        gathered.discard(group)

    FSDPParamGroup._to_unsharded, FSDPParamGroup._to_sharded = to_unsharded, to_sharded
    try:
        yield counted
    finally:
        FSDPParamGroup._to_unsharded, FSDPParamGroup._to_sharded = original_unsharded, original_sharded


def grade_sharded_reference_case(base, enc_all, enc, rows, noise_all, eos: int, world: int, recompute=True, control: bool = False) -> dict:
    """GRADE's frozen reference sharded as the trainer shards it (`prepared_reference`: Accelerate's layout) beside the
    sharded policy, in its context (`resharded_on_exit`), its forward recomputed in backward whole or block by block
    (`recompute`), against one process's unsharded policy and reference on the global batch, and the most reference
    elements gathered at once in the backward. The control reshards on exit inside the backward too, where the
    reference's forward is recomputed: it must fail (the weights of the unit that holds E freed before the recomputed
    graph's backward reads them)."""
    from grade_trl.core.sharding import resharded_on_exit

    frozen = perturbed_reference(base)
    reference = unsharded_run(base, enc_all, noise_all, True, eos, [], grade_objective(frozen, nullcontext))
    sharded, sharded_reference = accelerate_sharded_copy(base, world), accelerate_sharded_copy(frozen, world).eval()
    context = resharded_even_in_backward if control else resharded_on_exit
    objective = grade_objective(sharded_reference, lambda: context(sharded_reference), recompute)
    loss_local, steps_local = objective(sharded, enc, local_relax(noise_all, rows, True, eos, []))
    try:
        with gathered_elements_counted(sharded_reference) as gathered:
            loss_local.backward()
    except RuntimeError as error:
        if not control:
            raise
        return {"error": str(error)[:300]}
    grads_sharded = {n: p.grad.full_tensor() for n, p in sharded.named_parameters() if p.grad is not None}
    return {
        **comparison(reference, loss_local, steps_local, grads_sharded, world),
        "reference_elements": sum(p.numel() for p in frozen.parameters()),
        "reference_elements_gathered_in_backward": gathered["most"],
        "reference_block_elements": sum(p.numel() for p in frozen.transformer.h[0].parameters()),
        "kl_mean": objective.kl.mean().item(),
        "reference_parameters_sharded": sum(isinstance(p, DTensor) for p in sharded_reference.parameters()),
        "reference_parameters": sum(1 for _ in sharded_reference.parameters()),
        "error": None,
    }


def reward_metric_log_case(rank: int, world: int) -> dict:
    """TRL's `log_metric` for rewards, averaged over every process's calls (`rewards.base.RewardMetricLog`): rank 0
    logs `a` twice and `b` once, rank 1 logs `a` once; then a flush with nothing pending anywhere."""
    from types import SimpleNamespace

    from accelerate.utils import gather

    from grade_trl.rewards.base import RewardMetricLog

    accelerator = SimpleNamespace(num_processes=world, device=torch.device("cpu"), gather=gather)
    log = RewardMetricLog()
    for name, value in ([("a", 1.0), ("a", 3.0), ("b", 5.0)] if rank == 0 else [("a", 8.0)]):
        log(name, value)
    return {"first": log.flush(accelerator), "second": log.flush(accelerator)}


def main(out_path: str) -> None:
    PartialState(cpu=True)  # starts the gloo group, as Accelerate's MULTI_CPU: evaluation gathers its rows with gather_object
    rank, world, tokenizer, base, enc_all, rows, enc, noise_all, eos = setup()
    results = {}
    soft_rollout_module = sys.modules["grade_trl.core.soft_rollout"]  # the package rebinds the name `soft_rollout` to the function

    cases = [("straight_through", True, []), ("gumbel_softmax", False, []), ("one_rank_finishes_early", True, [0, 1]),
             ("after_no_grad_forward", True, []), ("accelerate_layout", True, []), ("accelerate_layout_after_no_grad_forward", True, []),
             ("lora_accelerate_layout", True, []), ("control_replicated_grad", True, [])]
    for case, straight_through, force in cases:
        # the control gathers E with full_tensor()'s default gradient layout (Replicate): each rank keeps its own
        # slice of its own gradient, not the average; the test checks that this differs, i.e. that it can fail
        soft_rollout_module.input_embedding_matrix = (lambda m: m.get_input_embeddings().weight.full_tensor() if isinstance(m.get_input_embeddings().weight, DTensor) else m.get_input_embeddings().weight) if case.startswith("control") else input_embedding_matrix
        lora = case.startswith("lora")
        model_of_case, objective_of_case = (lora_copy(base), lora_objective) if lora else (base, objective)
        reference = unsharded_run(model_of_case, enc_all, noise_all, straight_through, eos, force, objective_of_case)
        sharded = accelerate_sharded_copy(model_of_case, world) if "accelerate_layout" in case else sharded_copy(base, world)
        if case.endswith("after_no_grad_forward"):
            # as a validation before a training step does: FSDP2 keeps the root unit (E) unsharded after a forward
            # (it expects the backward next), so E is then a plain tensor whose storage the next backward frees
            with torch.no_grad():
                sharded(**enc)
        # force EOS in every row of rank 0 only (global rows 0 and 1): its rows finish at step 1, rank 1's do not
        loss_local, steps_local = objective_of_case(sharded, enc, local_relax(noise_all, rows, straight_through, eos, force))
        loss_local.backward()
        grads_sharded = {n: p.grad.full_tensor() for n, p in sharded.named_parameters() if p.grad is not None}
        results[case] = comparison(reference, loss_local, steps_local, grads_sharded, world)
        results[case]["embedding_is_dtensor"] = isinstance(sharded.get_input_embeddings().weight, DTensor)  # after the step: resharded
    soft_rollout_module.input_embedding_matrix = input_embedding_matrix  # the control's gather undone
    untied = untied_copy(base)
    for model_name, model, layout, entropy in (("tied", base, "accelerate", "grad"), ("untied", untied, "accelerate", "detached"), ("untied", untied, "own", "grad")):
        results[f"head_scoring_{model_name}_{layout}"] = head_scoring_case(model, tokenizer, rank, world, layout, entropy)
    results["reference_reshard"] = reference_reshard_case(base, tokenizer, world)
    results["grade_sharded_reference"] = grade_sharded_reference_case(base, enc_all, enc, rows, noise_all, eos, world)
    results["grade_sharded_reference_blocks"] = grade_sharded_reference_case(base, enc_all, enc, rows, noise_all, eos, world, recompute="blocks")
    results["evaluation_unequal_shares"] = evaluation_case(base, tokenizer, rank, world)
    results["evaluation_fewer_prompts_than_processes"] = [None] * world
    dist.all_gather_object(results["evaluation_fewer_prompts_than_processes"], evaluation_fewer_prompts_than_processes(base, tokenizer, rank, world))
    results["reward_metric_log"] = [None] * world
    dist.all_gather_object(results["reward_metric_log"], reward_metric_log_case(rank, world))
    # last: a backward that fails midway leaves the processes' FSDP2 states as they were then
    results["control_grade_reference_resharded_in_backward"] = grade_sharded_reference_case(base, enc_all, enc, rows, noise_all, eos, world, control=True)
    write_results(results, out_path, rank)


if __name__ == "__main__":
    exit_process(lambda: main(sys.argv[1]))  # without the interpreter's teardown (cli.exit_process)
