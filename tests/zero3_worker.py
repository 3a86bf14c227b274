"""Worker of tests/test_sharded.py, run by torchrun with 2 CPU processes (gloo, DeepSpeed's CPU accelerator):
GRADE's soft rollout on the tiny model partitioned by DeepSpeed ZeRO-3, against the same rollout of an unsharded
copy on the whole global batch. Writes {case: {...}} as JSON to argv[1].

The same set-up as tests/sharded_worker.py (FSDP2): each rank takes half of the global batch's rows with the
Gumbel noise of its own rows, the loss is the mean over the rank's rows, and ZeRO averages the ranks' gradients, so
the partitioned gradient should be the unsharded gradient of the mean over the global batch. The policy is
partitioned by `deepspeed.initialize` (as the Trainer does under zero3.yaml: grade_trl loads it whole, see
`whole_weights`), every parameter included (`stage3_param_persistence_threshold: 0`).
"""

from __future__ import annotations

import copy
import sys

import deepspeed
import torch
from deepspeed.utils import safe_get_full_grad

from grade_trl.cli import exit_process
from grade_trl.core.sharding import input_embedding_matrix, is_sharded
from grade_trl.models import load_causal_lm, resolve_model_path
from sharded_worker import (GLOBAL_BATCH, comparison, head_scoring_comparison, local_relax, lora_copy, lora_objective, objective, setup, unsharded_run,
                            untied_copy, write_results)

CONFIG = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // 2, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "fp16": {"enabled": False}, "bf16": {"enabled": False}}


def partitioned_copy(base, lr: float = 0.0, stage: int = 3):
    model = copy.deepcopy(base).train()
    config = {**CONFIG, "zero_optimization": {**CONFIG["zero_optimization"], "stage": stage}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr), config=config)
    return engine


def nonfinite_guard_case(base, enc, stage: int) -> dict:
    """The non-finite guard under DeepSpeed, as the Trainer calls it: after `accelerator.backward`, where Accelerate's
    wrapper has run the engine's backward and step, with Accelerate's optimizer wrapper. A finite step passes and is
    applied; a NaN loss's step is discarded by ZeRO, and the guard stops the run (`stop`) or counts it (`skip`). Stage 0
    (DeepSpeed without ZeRO) steps the plain optimizer, which applies it: the guard must then stop on the weights."""
    from types import SimpleNamespace

    from accelerate import Accelerator
    from accelerate.utils.deepspeed import DeepSpeedEngineWrapper, DeepSpeedOptimizerWrapper

    from grade_trl.safety import NonFiniteGradientError, NonFiniteGuard

    Accelerator(cpu=True)  # the optimizer wrapper reads its state; on the process group DeepSpeed started
    engine = partitioned_copy(base, lr=0.5, stage=stage)
    wrapped, optimizer = DeepSpeedEngineWrapper(engine), DeepSpeedOptimizerWrapper(engine.optimizer)
    stop, skip = NonFiniteGuard("stop"), NonFiniteGuard("skip", max_skips=1)

    def logits():
        with torch.no_grad():
            return engine.module(**enc).logits.clone()

    def guarded_step(scale: float, guard, step) -> str:  # scale nan: a NaN loss
        wrapped.backward(engine.module(**enc).logits.float().pow(2).mean() * scale)
        try:
            guard.on_pre_optimizer_step(None, SimpleNamespace(global_step=step), None, model=engine.module, optimizer=optimizer)
        except NonFiniteGradientError as error:
            return str(error)
        return ""

    before = logits()
    finite = guarded_step(1.0, stop, 0)
    after_finite = logits()
    nan_stop = guarded_step(float("nan"), stop, 1)
    after_nan = logits()
    nan_skip = guarded_step(float("nan"), skip, 2)
    nan_past_limit = guarded_step(float("nan"), skip, 3)
    engine.destroy()
    return {"finite_error": finite, "finite_step_changed_logits": (after_finite - before).abs().max().item(),
            "nan_stop_error": nan_stop, "nan_step_changed_logits": (after_nan - after_finite).abs().max().item(),
            "nan_skip_error": nan_skip, "skipped_steps": skip.skipped_steps, "nan_past_limit_error": nan_past_limit}


def best_checkpoint_case(base, enc) -> dict:
    """The evaluation protocol's best checkpoint under ZeRO-3: kept before an optimizer step, swapped in for the test
    of the best checkpoint, then restored. The policy's logits must be those of the kept step, then the latest again
    (the partitioned parameters are empty tensors: copying into them failed on an H200 under zero3.yaml)."""
    from types import SimpleNamespace

    from grade_trl.evaluation import EvaluationCallback

    engine = partitioned_copy(base, lr=0.5)
    model = engine.module
    callback = EvaluationCallback(evaluator=None, eval_steps=0)
    callback.trainer = SimpleNamespace(accelerator=SimpleNamespace(unwrap_model=lambda m: m), model=model)

    def logits():
        with torch.no_grad():
            return model(**enc).logits.clone()

    kept = logits()
    callback._keep_best()
    engine.backward(model(**enc).logits.float().pow(2).mean())
    engine.step()
    latest = logits()
    saved = callback.swap_in_best()
    swapped = logits()
    callback.restore(saved)
    restored = logits()
    engine.destroy()
    return {"step_changed_logits": (latest - kept).abs().max().item(), "swapped_vs_kept": (swapped - kept).abs().max().item(),
            "restored_vs_latest": (restored - latest).abs().max().item()}


def loading_case() -> dict:
    """Under a registered ZeRO-3 config (what TrainingArguments does under zero3.yaml), transformers partitions a
    model as it loads; `load_causal_lm` (the policy, whose copy is the reference) loads it whole."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    registered = HfDeepSpeedConfig({**CONFIG, "train_batch_size": GLOBAL_BATCH})  # noqa: F841 - the weak reference needs it alive
    plain = AutoModelForCausalLM.from_pretrained(resolve_model_path("embedded"), use_kernels=False)
    whole = load_causal_lm("embedded")
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    still_registered = is_deepspeed_zero3_enabled()
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    return {"plain_partitioned": is_sharded(plain), "whole_partitioned": is_sharded(whole),
            "whole_matches_file": whole.get_input_embeddings().weight.shape[0] == whole.config.vocab_size, "config_restored": still_registered}


def head_scoring_case(base, tokenizer, rank: int, world: int, entropy: str) -> dict:
    """`sharded_worker.head_scoring_comparison` under ZeRO-3: the head's weight is an empty tensor outside its module's
    forward, gathered again by the hook DeepSpeed puts on the module's output (the scores) before the chunks' recompute."""
    engines = []

    def shard(model):
        engines.append(partitioned_copy(model))
        module = engines[0].module
        gradients = lambda: {n: g for n, p in module.named_parameters() if (g := safe_get_full_grad(p)) is not None and g.abs().max() > 0}  # noqa: E731
        return module, engines[0].backward, gradients, lambda: module.get_output_embeddings().weight.numel() == 0

    result, module = head_scoring_comparison(base, tokenizer, rank, world, entropy, shard)
    result["head_partitioned_after"] = module.get_output_embeddings().weight.numel() == 0
    engines[0].destroy()
    return result


def main(out_path: str) -> None:
    # DeepSpeed's CPU accelerator would JIT-compile its shared-memory all-reduce (a C++ build of about 40 s on a fresh
    # install, and a compiler needed); gloo alone does what the test needs
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world, tokenizer, base, enc_all, rows, enc, noise_all, eos = setup()
    soft_rollout_module = sys.modules["grade_trl.core.soft_rollout"]
    results = {"loading": loading_case(), "best_checkpoint": best_checkpoint_case(base, enc)}

    def detached_gather(module):  # the control: E gathered whole but without autograd, as GatheredParameters gives it
        weight = module.get_input_embeddings().weight
        if not is_sharded(module):  # the unsharded reference reads its parameter as always
            return weight
        with deepspeed.zero.GatheredParameters([weight]):
            return weight.detach().clone()

    cases = [("straight_through", True, []), ("gumbel_softmax", False, []), ("one_rank_finishes_early", True, [0, 1]), ("lora", True, []),
             ("control_detached_gather", True, [])]
    for case, straight_through, force in cases:
        soft_rollout_module.input_embedding_matrix = detached_gather if case.startswith("control") else input_embedding_matrix
        # lora: a LoRA policy partitioned whole (adapters and frozen base), its reference the same model with the
        # adapters disabled (grade_trl's reference under use_peft), the exact KL between them in the loss
        model_of_case, objective_of_case = (lora_copy(base), lora_objective) if case == "lora" else (base, objective)
        reference = unsharded_run(model_of_case, enc_all, noise_all, straight_through, eos, force, objective_of_case)
        engine = partitioned_copy(model_of_case)
        model = engine.module  # as the trainers do: the rollout calls the unwrapped model, whose modules carry ZeRO's hooks
        partitioned = model.get_input_embeddings().weight.numel() == 0
        loss_local, steps_local = objective_of_case(model, enc, local_relax(noise_all, rows, straight_through, eos, force))
        engine.backward(loss_local)
        grads_sharded = {n: safe_get_full_grad(p) for n, p in model.named_parameters()}
        grads_sharded = {n: g for n, g in grads_sharded.items() if g is not None and g.abs().max() > 0}
        results[case] = comparison(reference, loss_local, steps_local, grads_sharded, world) | {"embedding_partitioned": partitioned}
        engine.destroy()
    soft_rollout_module.input_embedding_matrix = input_embedding_matrix
    results |= {f"nonfinite_guard_zero{stage}": nonfinite_guard_case(base, enc, stage) for stage in (3, 2, 0)}
    for name, model, entropy in (("tied", base, "grad"), ("untied", untied_copy(base), "detached")):
        results[f"head_scoring_{name}"] = head_scoring_case(model, tokenizer, rank, world, entropy)
    write_results(results, out_path, rank)


if __name__ == "__main__":
    exit_process(lambda: main(sys.argv[1]))  # without the interpreter's teardown (cli.exit_process)
