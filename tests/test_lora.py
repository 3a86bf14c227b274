"""LoRA (`use_peft: true`) for every method: a few steps change only the adapter weights, and the saved adapter
loaded onto the base model reproduces the trained policy's logits. The reference of every method with a KL term is
the same model with its adapters disabled (ours: RolloutTrainer.reference_context; TRL GRPO: its own)."""

import pytest
import torch
from peft import PeftModel

from grade_trl.build import build_task, build_trainer
from grade_trl.models import load_causal_lm
from grade_trl.recipe import build_recipe, load_recipe_file

from .conftest import REPO

SHRUNK = {
    "max_steps": 2, "logging_steps": 1, "eval_num_prompts": 2, "test_num_prompts": 2, "policy_split_size": 16, "validation_split_size": 8,
    "disable_tqdm": True, "report_to": "none", "use_peft": True, "learning_rate": 1e-3,  # the adapters move visibly in 2 steps
}
TRL_LENGTHS = {"max_completion_length": 6, "per_device_train_batch_size": 4, "num_generations": 2}
OUR_LENGTHS = {"max_new_tokens": 6, "min_new_tokens": 2, "per_device_train_batch_size": 4}


@pytest.mark.parametrize("recipe", ["length_grade_ste.yaml", "length_reinforce.yaml", "length_ppo.yaml", "length_grpo.yaml", "length_grpo.yaml+cispo"])
def test_lora_trains_only_adapters_and_the_saved_adapter_reproduces_the_policy(tmp_path, recipe):
    name, _, method = recipe.partition("+")
    values = {**load_recipe_file(str(REPO / "recipes" / "tiny" / name)), **SHRUNK, "output_dir": str(tmp_path)}
    values |= TRL_LENGTHS if "grpo" in name else OUR_LENGTHS
    if method:
        values |= {"method": method, "epsilon_high": 5.0}
    recipe = build_recipe(values)
    tokenizer, task = build_task(recipe, gold_judge=False)
    trainer = build_trainer(recipe, task, tokenizer)
    module = trainer.accelerator.unwrap_model(trainer.model)
    policy = getattr(module, "policy", module)  # PPO: the causal LM inside the value-head wrapper
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    # no dropout left in the policy, LoRA's own (lora_dropout 0.05 in the recipe) included: scored = sampled log-probs
    assert [m.p for m in policy.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0] == []
    trainer.train()

    changed = {n for n, p in policy.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all("lora_" in n for n in changed), sorted(changed)[:5]
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == {n for n in before if "lora_" in n}

    trainer.save_model(str(tmp_path / "model"))
    loaded = PeftModel.from_pretrained(load_causal_lm("embedded"), str(tmp_path / "model")).eval()
    batch = tokenizer(["This movie was", "I expected"], return_tensors="pt", padding=True)
    policy.eval()
    with torch.no_grad():
        expected = policy(**batch).logits
        got = loaded(**batch).logits
        with policy.disable_adapter():  # the reference the methods' KL is taken against: the base model itself
            reference = policy(**batch).logits
        base = load_causal_lm("embedded")(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reference, base, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, base, atol=1e-4)


# LoRA under 2 DDP processes (gloo): the DDP halves of tests/test_sharded.py's FSDP2 cases with `use_peft` (GRADE-STE,
# PPO with its value head, TRL's GRPO) check that each trains, saves an adapter naming its base and loads onto it.


def test_adapters_disabled_computes_the_base_model_and_leaves_requires_grad_alone():
    """Our trainers' LoRA reference (`trainers.base.adapters_disabled`): within the block the model computes the base
    model's logits (as PEFT's `disable_adapter` does), and no parameter's `requires_grad` changes, inside or after;
    afterwards the adapters act again, and a block inside another leaves them off until the outer one ends. PEFT's own
    context flips `requires_grad` on whatever parameter objects the modules hold at entry and exit, which under FSDP2,
    re-entered in GRADE's recomputation inside backward, left the sharded adapters frozen after the first step (the
    FSDP2 test in tests/test_sharded.py). A model with merged adapters takes PEFT's own context."""
    from peft import LoraConfig, get_peft_model

    from grade_trl.models import load_tokenizer
    from grade_trl.trainers.base import adapters_disabled

    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm("embedded"), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], task_type="CAUSAL_LM"))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)  # B = 0 at initialisation would make the adapters a no-op
    model.eval()
    tokenizer = load_tokenizer("embedded")
    batch = tokenizer(["This movie was", "I expected"], return_tensors="pt", padding=True)
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        adapted = model(**batch).logits
        base = load_causal_lm("embedded")(**batch).logits
        assert not torch.allclose(adapted, base, atol=1e-4)
        with adapters_disabled(model):
            assert {n: p.requires_grad for n, p in model.named_parameters()} == trainable
            torch.testing.assert_close(model(**batch).logits, base, rtol=1e-5, atol=1e-5)
            with adapters_disabled(model):
                pass
            torch.testing.assert_close(model(**batch).logits, base, rtol=1e-5, atol=1e-5)  # still off after the inner block
        assert {n: p.requires_grad for n, p in model.named_parameters()} == trainable
        torch.testing.assert_close(model(**batch).logits, adapted)

        model.merge_adapter()  # the base weights hold the adapters: only PEFT's context (which unmerges) gives the base
        with adapters_disabled(model):
            torch.testing.assert_close(model(**batch).logits, base, rtol=1e-5, atol=1e-5)

    from peft import PrefixTuningConfig  # no adapter layer to switch off (PEFT swaps the forward): PEFT's context

    prefix = get_peft_model(load_causal_lm("embedded"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    with torch.no_grad():
        for parameter in prefix.parameters():
            if parameter.requires_grad:
                parameter.normal_(std=1.0)
        assert not torch.allclose(prefix(**batch).logits, base, atol=1e-4)
        with adapters_disabled(prefix):
            torch.testing.assert_close(prefix(**batch).logits, base, rtol=1e-5, atol=1e-5)
