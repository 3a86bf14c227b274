"""What every grade_trl trainer shares: construction like `trl.GRPOTrainer`, the frozen reference,
prompt tokenization, metric windows and logging. Each method subclasses it and writes `compute_loss`."""

from __future__ import annotations

import copy
import logging
import os
from contextlib import contextmanager, nullcontext

import torch
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint
from trl.data_utils import is_conversational

from ..core.sharding import is_sharded, resharded_on_exit
from ..models import give_safetensors_umask_modes, learned_positions, load_causal_lm, load_tokenizer, positions_problem, prepare_tokenizer
from ..resume import ResumeCallback
from ..rewards.base import NOT_PASSED_COLUMNS, RewardMetricLog, assistant_messages, bad_prompt_column, compute_rewards, not_kept, render_chat, reward_name
from .metrics import GradNormWindowMixin, LogTheLastWindow, MetricWindow

logger = logging.getLogger(__name__)


def check_reward_types(reward_funcs: list) -> None:
    """Refuse, at construction, what TRL's GRPOTrainer takes as a reward but these trainers do not call (a hub id, a
    sequence-classification model) and what is no reward at all: each would fail at the first step, named oddly."""
    from transformers import PreTrainedModel

    if not reward_funcs or reward_funcs == [None]:
        raise ValueError("reward_funcs: give at least one reward function `reward(prompts, completions, **kwargs) -> list[float]`")
    for index, func in enumerate(reward_funcs):
        if isinstance(func, (str, PreTrainedModel)):
            what = f"the hub id or path {func!r}" if isinstance(func, str) else f"a {type(func).__name__}"
            raise ValueError(
                f"reward_funcs[{index}]: {what} is TRL GRPOTrainer's way to name a reward model; these trainers call reward functions "
                "`reward(prompts, completions, **kwargs) -> list[float]`: wrap the model in one (grade_trl.rewards.SentimentReward does for a sentiment head)"
            )
        if not callable(func):
            raise ValueError(f"reward_funcs[{index}]: {type(func).__name__} {func!r} is not callable; give `reward(prompts, completions, **kwargs) -> list[float]`")
        if isinstance(func, type):  # `reward_funcs=LengthReward`: calling it would build an instance, not score
            raise ValueError(f"reward_funcs[{index}]: the class {func.__name__} itself; pass an instance of it, {func.__name__}(...)")


def check_prompt_column(name: str, dataset) -> None:
    """A data set (with named columns) has the `prompt` column every trainer reads, as TRL's GRPOTrainer does, and (one
    that can be read whole: not a stream) no null or empty prompt, which the policy cannot continue (a batch of empty
    ones failed deep in the model's forward)."""
    if isinstance(dataset, dict) or type(dataset).__name__ == "DataFrame":  # failed at the first step with KeyError: '0' (a user trial)
        raise ValueError(f"{name}: a {type(dataset).__name__}; pass a datasets.Dataset (Dataset.from_dict, Dataset.from_pandas), as TRL's trainers take")
    columns = getattr(dataset, "column_names", None)
    if columns is not None and hasattr(dataset, "__len__") and len(dataset) == 0:
        raise ValueError(f"{name}: the data set has no rows")
    if columns is not None and "prompt" not in columns:
        raise ValueError(f"{name}: no `prompt` column (it has {', '.join(map(str, columns)) or 'none'}); the prompts are read from `prompt`, as TRL's GRPOTrainer reads them")
    if columns is not None and hasattr(dataset, "__len__") and (what := bad_prompt_column(dataset)):
        raise ValueError(f"{name}: `prompt` has {what} in its {len(dataset)} rows; every prompt must be non-empty text or chat messages (drop or fill those rows)")


def use_undispatched_batches_for_iterable_datasets(args, train_dataset, eval_dataset) -> None:
    """A streamed data set (`datasets.IterableDataset`) needs Accelerate's `dispatch_batches=False`, as TRL's
    GRPOTrainer sets it: by default the main process reads every batch and Accelerate concatenates the batch's
    columns to send them, which fails on text ("Can only find the batch size of tensors but got <class 'str'>")."""
    from datasets import IterableDataset

    evals = eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset]
    if not any(isinstance(dataset, IterableDataset) for dataset in [train_dataset, *evals]):
        return
    if args.accelerator_config.dispatch_batches:
        raise ValueError("accelerator_config.dispatch_batches: a streamed (iterable) data set needs it False (Accelerate cannot "
                         "dispatch batches of text); leave it unset")
    args.accelerator_config.dispatch_batches = False


def check_positions(args, model) -> None:
    """A prompt and a completion fit the model's learned positions (GPT-2's `n_positions`; no limit for rotary ones), as
    the runner checks before loading (`build.check_model_fits`): past them the first step failed in torch's embedding
    with "IndexError: index out of range in self" (a user trial: max_new_tokens 300 on the embedded model's 256)."""
    limit = learned_positions(getattr(model, "config", None))
    if problem := positions_problem(args.max_prompt_length, args.new_token_limit_key, args.new_token_limits[0], limit, "the model"):
        raise ValueError(problem)


def check_checkpoint_method(checkpoint: str, args) -> None:
    """A checkpoint saved by another method's trainer is refused in one line, as the runner refuses it
    (`resume.check_resumed_settings`): resumed by a trainer used on its own, a REINFORCE checkpoint went on silently
    as GRADE, and into PPO it failed in torch's optimizer load ("parameter group that doesn't match the size"; a user
    trial). The method is the class of the arguments Trainer saved with it (`training_args.bin`)."""
    from transformers.trainer import TRAINING_ARGS_NAME

    path = os.path.join(checkpoint, TRAINING_ARGS_NAME)
    try:
        saved = type(torch.load(path, weights_only=False)).__name__  # Trainer's own pickle of the arguments it saved
    except Exception:  # noqa: BLE001 - absent or unreadable: Trainer's own load reports what it lacks
        return
    if saved != type(args).__name__:
        raise ValueError(f"resume_from_checkpoint: {checkpoint!r} was saved by a run with {saved}, not this trainer's {type(args).__name__}; resume "
                         "it with its own method, or start from its weights (model=<the checkpoint>) without resuming")


def check_vocabulary(tokenizer, model) -> None:
    """A tokenizer with more tokens than the model has embedding rows (another model's tokenizer) is refused: its ids
    past the table failed deep in the sampler (`index 50256 is out of bounds for dimension 0 with size 8192`). The
    model may have more rows than the tokenizer has tokens (Qwen's padded table)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is not None and len(tokenizer) > rows:
        raise ValueError(f"processing_class: the tokenizer has {len(tokenizer):,} tokens but the model's input embedding has {rows:,} rows; "
                         "pass the model's own tokenizer (or resize the model's embeddings: model.resize_token_embeddings(len(tokenizer)))")


def identity(features):
    """No collation: the trainer tokenizes prompts itself (as TRL's GRPOTrainer does)."""
    return features


@contextmanager
def adapters_disabled(peft_model):
    """Within the block, a PEFT (LoRA) model computes its base model: the reference of a policy trained with `use_peft`.

    PEFT's own `peft_model.disable_adapter()` does that and also sets `requires_grad` False on every adapter parameter,
    and True again on exit, on whatever parameter objects the modules hold at that moment. Under FSDP2 a unit holds its
    sharded parameters between forwards and the gathered ones while it runs, backward included, and GRADE recomputes
    the reference inside backward (`recompute_reference_and_reward`): the flag set back on exit went to the gathered
    copies, the shards stayed frozen, and the next step's loss had no gradient at all (found with fsdp2.yaml on 2
    CPU processes, `tests/test_sharded.py`). Here only the switch that every adapter layer's forward reads (PEFT's
    `BaseTunerLayer` and `AuxiliaryTrainingWrapper`: `disable_adapters`, the `_disable_adapters` it returns) is flipped
    and put back; `requires_grad` is never touched. A model with merged adapters (whose base weights hold them) takes
    PEFT's own context, which unmerges, and so does one with no such layer (prompt learning, adaption prompts: PEFT
    swaps their forward instead)."""
    layers = [module for module in peft_model.modules() if hasattr(module, "_disable_adapters") and callable(getattr(module, "enable_adapters", None))]
    if not layers or any(getattr(layer, "merged", False) for layer in layers):
        with peft_model.disable_adapter():
            yield
        return
    before = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, disabled in zip(layers, before):
            layer._disable_adapters = disabled


def tied_to_loaded(model: torch.nn.Module, missing: list[str]) -> bool:
    """Whether every key a checkpoint load missed names a parameter tied to one it loaded (GPT-2's `lm_head.weight`
    is `transformer.wte.weight`, saved once under that name). The keys may be those of a submodule of `model` (PPO
    loads its wrapper's `policy`: `lm_head.weight` is the wrapper's `policy.lm_head.weight`)."""
    parameters = dict(model.named_parameters(remove_duplicate=False))

    def tied(name: str) -> bool:
        full = name if name in parameters else next((key for key in parameters if key.endswith("." + name)), None)
        missing_here = {full} | {key for key in parameters if any(key == m or key.endswith("." + m) for m in missing)}
        return full is not None and any(other is parameters[full] for key, other in parameters.items() if key not in missing_here)

    return bool(missing) and all(tied(name) for name in missing)


class TiedWeightsLoadMixin:
    """For any `transformers.Trainer` subclass: resuming from a checkpoint does not warn "There were missing keys in
    the checkpoint model loaded: ['lm_head.weight']" for a head tied to the input embedding, which the checkpoint
    holds once under the embedding's name (Trainer only knows `_keys_to_ignore_on_save`, which transformers 5's GPT-2
    leaves empty). A key that is missing and tied to nothing still warns."""

    def _issue_warnings_after_load(self, load_result):
        missing = list(getattr(load_result, "missing_keys", []) or [])
        if missing and hasattr(load_result, "_replace") and tied_to_loaded(self.model, missing):
            load_result = load_result._replace(missing_keys=[])
        return super()._issue_warnings_after_load(load_result)


class ReadableSavesMixin:
    """For any `transformers.Trainer` subclass: every model it saves (model/, best_model/, each checkpoint) has its
    weight files readable as the umask allows, not 0600 (`models.give_safetensors_umask_modes`)."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            give_safetensors_umask_modes(output_dir or self.args.output_dir)


def load_policy(model: str, args):
    """The policy a trainer loads from a hub id, a local path or `"embedded"`: `args.model_init_kwargs` passed to
    `from_pretrained` (as TRL does), in float32 unless they name another dtype."""
    return load_causal_lm(model, **{"dtype": torch.float32, **(args.model_init_kwargs or {})})


class RolloutTrainer(ReadableSavesMixin, TiedWeightsLoadMixin, GradNormWindowMixin, Trainer):
    """Base of the GRADE, REINFORCE and PPO trainers.

    Args:
        model: hub id, local path, `"embedded"`, or a `PreTrainedModel` (causal LM).
        reward_funcs: a reward callable or a list of them (TRL's signature).
        args: the method's config (a `RolloutConfig`).
        train_dataset / eval_dataset: datasets with a `prompt` column.
        processing_class: the tokenizer (loaded from the model when None).
        peft_config: a `peft.LoraConfig` to train adapters; the reference is then the model with adapters disabled.
    """

    config_class: type = None  # set by each method

    def __init__(self, model, reward_funcs, args=None, train_dataset=None, eval_dataset=None, processing_class=None, callbacks=None, optimizers=(None, None), peft_config=None):
        args = args or self.config_class(output_dir=f"{type(self).__name__}_output")
        if not isinstance(args, self.config_class):
            raise TypeError(f"args: {type(self).__name__} takes a {self.config_class.__name__} (its fields are read at every step), got a {type(args).__name__}")
        check_prompt_column("train_dataset", train_dataset)
        for key, dataset in eval_dataset.items() if isinstance(eval_dataset, dict) else [(None, eval_dataset)]:
            check_prompt_column("eval_dataset" if key is None else f"eval_dataset[{key!r}]", dataset)
        use_undispatched_batches_for_iterable_datasets(args, train_dataset, eval_dataset)
        if isinstance(model, str):
            model = load_policy(model, args)
        # the caller's tokenizer stays as it was (TRL's GRPOTrainer pads on the left per call, leaving its padding_side alone):
        # ours is a copy, padded on the left for generation, with a pad token
        processing_class = prepare_tokenizer(copy.deepcopy(processing_class)) if processing_class is not None else load_tokenizer(model.config._name_or_path)
        check_vocabulary(processing_class, model)
        check_positions(args, model)
        self.reward_funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        check_reward_types(self.reward_funcs)
        weights = args.reward_weights or [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(weights)} entries for {len(self.reward_funcs)} reward functions")
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        self.check_rewards(self.reward_funcs)

        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        # As TRL (`disable_dropout`, after its own `get_peft_model`): dropout would make the scored log-probs differ from
        # the sampled ones (PPO's first ratio, REINFORCE's and GRADE's KL), LoRA's `lora_dropout` included, which the
        # adapters bring in after the base model's dropout is off
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        # the reference: under LoRA the same model with its adapters disabled (`reference_context`), else a frozen copy
        ref_model = None if peft_config is not None else copy.deepcopy(model).requires_grad_(False).eval()
        model = self.wrap_model(model)

        super().__init__(
            model=model,
            args=args,
            data_collator=identity,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self.ref_model = None if ref_model is None else self.prepared_reference(ref_model)
        for func in self.reward_funcs:
            if hasattr(func, "to"):
                func.to(self.accelerator.device)
        self._metrics = {"train": MetricWindow(), "eval": MetricWindow()}
        self.reward_metric_log = RewardMetricLog()  # TRL's `log_metric` for the rewards, flushed by `log_reward_metrics`
        # What Trainer's checkpoints lack (EMA baseline, PPO's rollout buffer and KL controller, metric windows) is saved
        # and restored by a ResumeCallback; the runner brings its own (with its evaluation's state), a trainer used on
        # its own gets one here, so `train(resume_from_checkpoint=...)` resumes exactly either way.
        # the steps after the last `logging_steps` multiple get their training row at max_steps (the runner adds the same)
        if not any(isinstance(callback, LogTheLastWindow) for callback in self.callback_handler.callbacks):
            self.add_callback(LogTheLastWindow())
        self._own_resume = None
        if not any(isinstance(callback, ResumeCallback) for callback in self.callback_handler.callbacks):
            self._own_resume = ResumeCallback(require_state=False)
            self._own_resume.trainer = self
            self.add_callback(self._own_resume)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        if self._own_resume is not None:
            checkpoint = resume_from_checkpoint
            if checkpoint is True:  # Trainer's own rule: the output_dir's last checkpoint (Trainer raises if there is none)
                checkpoint = get_last_checkpoint(self.args.output_dir)
            self._own_resume.resume_from = checkpoint or None
            if checkpoint:
                check_checkpoint_method(checkpoint, self.args)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)

    # Hooks for the methods ------------------------------------------------------------------------------------
    def check_rewards(self, reward_funcs) -> None:
        """Refuse, at start-up, rewards the method cannot use."""

    def wrap_model(self, model):
        """The module the Trainer optimizes (PPO adds a value head here)."""
        return model

    # The method registry's public hooks (grade_trl.methods) ---------------------------------------------------
    def estimate_loss(self, rows: list[dict], include_value_loss: bool = False) -> torch.Tensor:
        """The scalar whose gradient is ONE draw of the method's gradient estimate on `rows` (dataset rows:
        `prompt` plus the columns the rewards take), with fresh samples / noise: here the training loss itself."""
        return self.compute_loss(self.model, rows)

    def probed_parameters(self, include_value_loss: bool = False) -> list[torch.nn.Parameter]:
        """The parameters the method's gradient estimate is taken with respect to: the policy's trainable ones."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def training_state(self) -> dict:
        """Everything besides parameters and optimizer that a loss call may change (metric windows, baselines,
        controllers), by attribute name. The probe restores it after drawing estimates; ResumeCallback saves and restores
        it with each checkpoint."""
        return {"_metrics": self._metrics, **super().training_state()}

    def load_training_state(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value)

    # Shared plumbing ------------------------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt"]

    def reward_kwargs(self, inputs, repeat: int = 1) -> dict:
        """What TRL's GRPOTrainer passes its reward functions as keywords: every dataset column except `prompt`, one
        entry per completion, and `trainer_state` (Trainer's state: a reward may shape by `global_step`), `log_metric`
        (name, value: averaged over every process's calls of the step, as TRL does, then over the logging window beside
        the method's metrics; `log_reward_metrics`) and `log_extra` (column, values: TRL adds them to its completions table; these trainers keep no such table, so the
        values are accepted and not kept)."""
        keys = [key for key in inputs[0] if key not in NOT_PASSED_COLUMNS]
        columns = {key: [example[key] for example in inputs for _ in range(repeat)] for key in keys}
        return {**columns, "trainer_state": self.state, "log_metric": self.reward_metric_log, "log_extra": not_kept}

    def sampled_text_scores(self, inputs, batch, repeat: int = 1) -> torch.Tensor:
        """Each reward function's score of each sampled completion (`core.sampling.SampledBatch`), decoded and handed over
        as TRL hands them (text, or one assistant message for chat prompts; completion_ids up to and including EOS; TRL's
        keywords): (B, F) on the trainer's device, NaN where a function returned None. `repeat`: consecutive samples per
        row of `inputs`."""
        tok = self.processing_class
        prompts = [example["prompt"] for example in inputs for _ in range(repeat)]
        completion_ids = [ids[m.bool()].tolist() for ids, m in zip(batch.completion_ids, batch.completion_mask)]
        if is_conversational(inputs[0]):  # one assistant message each, parsed as TRL parses them where the tokenizer has a response template
            prompt_ids = [ids[m.bool()].tolist() for ids, m in zip(batch.prompt_ids, batch.prompt_mask)]
            completions = assistant_messages(tok, completion_ids, prompt_ids)
        else:
            completions = tok.batch_decode(completion_ids, skip_special_tokens=True)
        return compute_rewards(self.reward_funcs, prompts, completions, completion_ids, **self.reward_kwargs(inputs, repeat)).to(self.accelerator.device)

    def log_reward_metrics(self, weight: float, window: MetricWindow | None = None) -> None:
        """Into the logging window: what the step's rewards reported through `log_metric`, each name's mean over every
        process's calls (a collective: every process calls it after its reward call). Added on their own, as TRL appends
        them: a name that is also one of the method's metrics (`kl`) is averaged with it, not a clash. weight: the
        samples the calls scored (every process's), the weight of the step's own metrics, so that the two count alike.
        window: the one to add to (default: the model's mode's)."""
        if logged := self.reward_metric_log.flush(self.accelerator):
            (window or self.metrics).add(weight, **logged)

    def prompt_texts(self, inputs) -> list[str]:
        """Each row's prompt as the policy reads it: a string as it is; chat messages (TRL's conversational format,
        `[{"role": "user", "content": ...}]`) through the tokenizer's chat template with the generation prompt, as
        TRL's GRPOTrainer renders them."""
        if not is_conversational(inputs[0]):
            return [example["prompt"] for example in inputs]
        if not getattr(self.processing_class, "chat_template", None):
            raise ValueError("prompt: the prompts are chat messages, but the tokenizer has no chat template; give processing_class one "
                             "(tokenizer.chat_template) or plain-text prompts")
        return [render_chat(self.processing_class, example["prompt"], self.args.chat_template_kwargs) for example in inputs]

    def tokenize_prompts(self, inputs) -> dict[str, torch.Tensor]:
        """The prompts (`prompt_texts`), left-padded; one longer than max_prompt_length keeps its last max_prompt_length
        tokens (the columns at the right of a left-padded batch), as TRL's GRPOTrainer cut them while it had the option:
        the prompt's end is what the completion continues (a question, "Answer:"). Cut with a warning, once per trainer."""
        prompts = self.prompt_texts(inputs)
        enc = self.processing_class(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        limit = self.args.max_prompt_length
        if enc["input_ids"].shape[1] > limit:
            lengths = enc["attention_mask"].sum(1)
            if not getattr(self, "_warned_prompt_cut", False):
                self._warned_prompt_cut = True
                logger.warning(
                    "max_prompt_length: %d of %d prompts in a batch are longer than %d tokens (the longest %d) and keep only their "
                    "last %d tokens; the rewards still receive the whole prompt text. Raise max_prompt_length, or shorten them (warned once)",
                    int((lengths > limit).sum()), len(prompts), limit, int(lengths.max()), limit,
                )
            enc = {key: value[:, -limit:] for key, value in enc.items()}
        return {key: value.to(self.accelerator.device) for key, value in enc.items()}

    def prepared_reference(self, ref_model: torch.nn.Module) -> torch.nn.Module:
        """The frozen reference on this process: sharded as the policy under FSDP2, else a whole copy (one process, DDP,
        ZeRO; `prepare_model(evaluation_mode=True)`, which skips device placement under FSDP, hence `.to`).

        Under FSDP2 a replicated float32 reference costs 4 N bytes on every GPU (28 GiB for Qwen2.5-7B), as much as the
        policy's weights and gradients together once they are sharded over 8. So it is sharded as TRL's GRPOTrainer shards
        its own (`trl.models.utils.prepare_fsdp`), but by Accelerate's own layout for the policy (`fsdp2_prepare_model`:
        each transformer block a unit, the embeddings and LM head in units of their own), so that a forward gathers one
        block at a time instead of the whole model. Each forward is then a collective: every process scores with it
        beside the policy's own calls (once per micro-batch in REINFORCE, per rollout in PPO; in GRADE the prompt, then the
        soft tokens, whose forward runs again in backward), which are collectives too,
        so the processes call it the same number of times. `reference_context` reshards it after each use: FSDP2 keeps a
        root unit (and Accelerate's embedding and head unit, `reshard_after_forward=False`) gathered after a forward, for
        a backward that a frozen model never runs (GRADE's forward on the soft tokens, which carries the exact KL's gradient
        into the rollout, is gathered again by FSDP2 for its backward, and not resharded inside it: `resharded_on_exit`).
        GRADE recomputes that forward in backward a block at a time (`reference_logits(recompute="blocks")`): recomputed
        whole, every unit would stay gathered until its gradient arrived, the whole reference at once. Under ZeRO-3 the
        reference stays whole (`models.whole_weights`)."""
        if self.accelerator.is_fsdp2:
            from accelerate.utils.fsdp_utils import fsdp2_prepare_model

            # no `.to(device)` first: `fully_shard` moves a unit at a time, as for the policy (a whole copy on the GPU
            # would cost what sharding saves, and defeat fsdp2_offload.yaml); each block resharded after its forward
            # whatever the config says (`reshard_after_forward: false` keeps a trained block for its backward; a
            # frozen one has none, and kept, the whole reference would be gathered by the end of its forward)
            plugin = self.accelerator.state.fsdp_plugin
            reshard_after_forward, plugin.reshard_after_forward = plugin.reshard_after_forward, True
            try:
                return fsdp2_prepare_model(self.accelerator, ref_model).eval()
            finally:
                plugin.reshard_after_forward = reshard_after_forward
        return self.accelerator.prepare_model(ref_model.to(self.accelerator.device), evaluation_mode=True)

    def reference_context(self, policy_model):
        """(reference module, context factory): the frozen copy, or the policy with its LoRA adapters disabled (`adapters_disabled`).

        `with context():` makes the module the reference; a factory, so that code recomputed in backward
        (activation checkpointing) can enter the same context again. A sharded reference is put back to its shards on
        exit (`prepared_reference`)."""
        if self.ref_model is not None:
            return self.ref_model, (lambda: resharded_on_exit(self.ref_model)) if is_sharded(self.ref_model) else nullcontext
        unwrapped = self.accelerator.unwrap_model(policy_model)
        return unwrapped, lambda: adapters_disabled(unwrapped)

    @property
    def metrics(self) -> MetricWindow:
        return self._metrics["train" if self.model.training else "eval"]

    def gathered_mean(self, values: torch.Tensor) -> float:
        return self.accelerator.gather(values.detach().float().reshape(-1)).mean().item()

    def reward_function_means(self, scores: torch.Tensor) -> dict[str, tuple[float, float]]:
        """{`rewards/<name>/mean`: (mean, count)} of each reward function over every process's samples it scored ((B, F)
        scores, NaN where a function returned None); a function that scored none of this batch is left out, so the
        logging window averages it over the samples where it applied instead of turning NaN."""
        gathered = self.accelerator.gather(scores.detach().float())  # (B_all, F)
        counts, means = (~gathered.isnan()).sum(0).tolist(), gathered.nanmean(0).tolist()
        return {f"rewards/{reward_name(func)}/mean": (mean, count) for func, count, mean in zip(self.reward_funcs, counts, means) if count}

    def add_reward_function_means(self, means: dict[str, tuple[float, float]], share: float = 1.0) -> None:
        """`reward_function_means` into the logging window, each weighted by its count (x `share`: the part of the batch
        a PPO mini-batch is, which adds its rollout's metrics once per mini-batch)."""
        for key, (mean, count) in means.items():
            self.metrics.add(count * share, **{key: mean})

    def gathered_sum(self, values: torch.Tensor) -> float:
        return self.accelerator.gather(values.detach().float().reshape(-1)).sum().item()

    def global_count(self, rows: int) -> float:
        """How many samples every process's `rows` make together: the weight of the means a step adds to the logging
        window (`MetricWindow.add`). Every process holds as many as this one: the gathers those means come from need it
        (Accelerate's `gather` concatenates equal shapes), so no collective of its own."""
        return float(rows * self.accelerator.num_processes)

    def gathered_std(self, values: torch.Tensor) -> float:
        """Std over every process's values (0 for a single value)."""
        gathered = self.accelerator.gather(values.detach().float().reshape(-1))
        return gathered.std().item() if gathered.numel() > 1 else 0.0

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # a training or evaluation log, not a callback's own metrics: the window's means join it. An evaluation's keys
        # carry its prefix (Trainer's metric_key_prefix): `eval_loss`, or `eval_<name>_loss` for each data set of a
        # dict eval_dataset, each of which is logged with its own window
        if self.model.training:
            if "loss" in logs:
                logs.update(self._metrics["train"].flush())
        elif loss_key := next((key for key in logs if key.endswith("_loss") and key != "train_loss"), None):  # not Trainer's closing summary
            prefix = loss_key[: -len("loss")]
            logs.update({f"{prefix}{k}": v for k, v in self._metrics["eval"].flush().items()})
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
