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
