"""One evaluation protocol for every method: hard samples, fixed settings, fixed seeds.

Every method is judged the same way: sample completions with fixed generation settings and a
fixed seed per evaluation, score them with the task's reward callables (the text path, not the
relaxed one). Prompts are sharded over processes and gathered. A task supplies an `Evaluator`
(what is measured); `EvaluationCallback` decides when (step 0, every `eval_steps`, the end),
keeps the best checkpoint and can stop early.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from . import metrics
from .core.masks import completion_mask
from .core.sharding import is_sharded, local_data, resharded
from .rewards.base import RewardMetricLog, assistant_messages, is_conversational, combine_scores, compute_rewards, has_response_parser, not_kept, render_chat, reward_name

logger = logging.getLogger(__name__)


@dataclass
class GenerationSettings:
    max_new_tokens: int = 48
    min_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 0.9
    batch_size: int = 32
    do_sample: bool = True  # False: greedy (GSM8K accuracy)
    max_prompt_length: int = 32  # prompts are truncated to this many tokens, as in training
    # TRL GRPO's `chat_template_kwargs` (e.g. {enable_thinking: false}): chat prompts are rendered with them, as TRL renders them in training
    chat_template_kwargs: dict | None = None


@torch.no_grad()
def generate_completions(model, tokenizer, prompts: list[str], settings: GenerationSettings, seed: int) -> tuple[list[str], list[int], list[list[int]]]:
    """One completion per prompt, its length in tokens and its token ids (both up to and including the first EOS, the
    `completion_ids` the trainers hand their reward functions).

    Reproducible from `seed` without touching the global RNG state.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    completions: list[str] = []
    lengths: list[int] = []
    ids: list[list[int]] = []
    devices = [device] if device.type == "cuda" else []
    sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0} if settings.do_sample else {"do_sample": False}
    # A sharded model (FSDP2) runs a collective in every forward: every process must call `generate` as often as the
    # others, and each call must decode as many steps (synced_gpus; transformers infers it only for models it sharded
    # itself). The processes' prompt shares differ by one, so a share that crosses a batch boundary the others do not
    # gets its extra call matched by a throwaway batch on the others.
    sharded = is_sharded(model) and dist.is_initialized() and dist.get_world_size() > 1
    starts = list(range(0, len(prompts), settings.batch_size))
    throwaway = 0
    if sharded:
        most = torch.tensor([len(starts)], device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        throwaway = int(most.item()) - len(starts)
    generation = dict(**sampling, max_new_tokens=settings.max_new_tokens, min_new_tokens=settings.min_new_tokens,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      synced_gpus=True if sharded else None)  # None: transformers' own inference (DeepSpeed ZeRO-3)

    def encode(texts: list[str]):
        # a prompt past max_prompt_length keeps its last tokens, as the trainers cut it (RolloutTrainer.tokenize_prompts);
        # the runner's tasks drop or pre-cut such prompts, so this only guards a direct call
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return {key: value[:, -settings.max_prompt_length :].to(device) for key, value in enc.items()}

    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in starts:
            enc = encode(prompts[start : start + settings.batch_size])
            new_tokens = model.generate(**enc, **generation)[:, enc["input_ids"].shape[1] :]
            completions.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
            mask = completion_mask(new_tokens, tokenizer.eos_token_id).bool()
            lengths.extend(mask.sum(1).int().tolist())
            ids.extend(row[keep].tolist() for row, keep in zip(new_tokens.cpu(), mask.cpu()))
        for _ in range(throwaway):  # after the real batches, so their samples do not depend on the other processes
            model.generate(**encode(prompts[:1] or [tokenizer.eos_token]), **generation)
    model.train(was_training)
    return completions, lengths, ids


def as_rendered_prompts(tokenizer, prompts: list, chat_template_kwargs: dict | None = None) -> tuple[list[str], bool]:
    """(the prompts as the policy reads them, whether they are chat messages): TRL's conversational format
    (`[{"role": ..., "content": ...}]`) through the tokenizer's chat template with the generation prompt (and TRL GRPO's
    `chat_template_kwargs`), as the trainers render them (RolloutTrainer.prompt_texts, TRL's GRPOTrainer); text as it is."""
    chat = bool(prompts) and is_conversational(prompts[0])
    if not chat:
        return list(prompts), False
    return [render_chat(tokenizer, p, chat_template_kwargs) for p in prompts], True


def prompt_token_ids(tokenizer, texts: list[str], max_prompt_length: int) -> list[list[int]]:
    """Each rendered prompt's token ids as `generate_completions` feeds them (its last max_prompt_length tokens)."""
    return [ids[-max_prompt_length:] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def shard_and_gather(accelerator, items: list, work) -> list:
    """Run `work(shard, rank) -> one row per item` on this process's shard; every process gets all rows, in order.

    `work` runs on an empty shard too (fewer items than processes): under FSDP its `generate` calls are collectives
    that the other processes wait for, so it must generate (throwaway batches) and return no row."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    index = list(range(rank, len(items), world))
    rows = list(zip(index, work([items[i] for i in index], rank)))
    if world > 1:
        from accelerate.utils import gather_object

        rows = gather_object(rows)
    return [row for _, row in sorted(rows, key=lambda r: r[0])]


# ---- diversity --------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return text.lower().split()


def _ngram_counts(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n (Li et al., 2016): distinct word n-grams / all word n-grams, over the whole set of texts."""
    counts = Counter()
    for text in texts:
        counts.update(_ngram_counts(_words(text), n))
    total = sum(counts.values())
    return len(counts) / total if total else 0.0


def _ngram_table(words: list[str], max_n: int) -> list[Counter]:
    """The 1..max_n-gram counts of one text."""
    return [_ngram_counts(words, n) for n in range(1, max_n + 1)]


def bleu(hypothesis: list[str], references: list[list[str]], max_n: int = 4) -> float:
    """Sentence BLEU-4 (Papineni et al., 2002) with add-one smoothing of the n>1 precisions (Lin & Och, 2004):
    NLTK's `sentence_bleu` with `SmoothingFunction().method2`, value for value (`tests/test_evaluation.py` pins it).

    BLEU = BP * exp(mean_n log p_n), p_n = (clipped n-gram matches + s) / (max(1, hypothesis n-grams) + s), s = 1
    for n > 1 and 0 for unigrams, the clip being the most times the n-gram occurs in any one reference;
    BP = min(1, exp(1 - r / c)), r the reference length closest to the hypothesis length c (the shorter on ties).
    Short texts: a hypothesis of fewer than n words has no n-grams, so p_n = (0 + 1) / (1 + 1) = 1/2 (NLTK's
    convention: the count is at least 1); a 1-word completion scores at most 0.5^(3/4) = 0.59 against itself.
    No unigram match, or an empty hypothesis, gives 0. We keep our own implementation because self-BLEU
    counts each text's n-grams once for all its comparisons (`_bleu`), which NLTK cannot.
    """
    if not hypothesis or not references:
        return 0.0
    return _bleu(_ngram_table(hypothesis, max_n), len(hypothesis), [_ngram_table(r, max_n) for r in references], [len(r) for r in references])


def _bleu(hypothesis: list[Counter], length: int, references: list[list[Counter]], reference_lengths: list[int]) -> float:
    """`bleu` on n-gram tables counted once, so self-BLEU does not recount every reference for every hypothesis."""
    log_precision, max_n = 0.0, len(hypothesis)
    for n in range(max_n):
        most = Counter()
        for ref in references:
            for gram, count in ref[n].items():
                most[gram] = max(most[gram], count)
        matches = sum(min(count, most[gram]) for gram, count in hypothesis[n].items())
        total = max(1, sum(hypothesis[n].values()))
        smooth = 0 if n == 0 else 1
        if matches + smooth == 0:
            return 0.0
        log_precision += math.log((matches + smooth) / (total + smooth)) / max_n
    r = min((abs(r - length), r) for r in reference_lengths)[1]
    brevity = 1.0 if length > r else math.exp(1 - r / length)
    return brevity * math.exp(log_precision)


def self_bleu(texts: list[str], max_texts: int = 200, max_n: int = 4) -> float:
    """Self-BLEU (Zhu et al., 2018): mean BLEU-4 of each text against all the others; higher = less diverse.

    Computed on the first `max_texts` texts (the cost is quadratic).
    """
    words = [_words(t) for t in texts[:max_texts]]
    if len(words) < 2:
        return 0.0
    tables, lengths = [_ngram_table(w, max_n) for w in words], [len(w) for w in words]
    return statistics.fmean(
        _bleu(tables[i], lengths[i], tables[:i] + tables[i + 1 :], lengths[:i] + lengths[i + 1 :]) if words[i] else 0.0 for i in range(len(words))
    )


def weighted_rewards(reward_funcs, weights, prompts: list[str], completions: list[str], completion_ids=None, **columns) -> list[float]:
    """sum_f weight_f * reward_f(prompt, completion) per sample (text path; dataset columns passed as keywords)."""
    scores = compute_rewards(reward_funcs, prompts, completions, completion_ids, **columns)  # (B, F), NaN where a function returned None
    return combine_scores(scores, torch.tensor(weights or [1.0] * len(reward_funcs))).tolist()


# ---- evaluators -------------------------------------------------------------------------------


class Evaluator:
    """What a task measures on a split. `evaluate` returns `{"metrics": {name: float}, "samples": [dict]}`.

    Validation metrics are logged as `eval_{name}` for every task (`grade_trl.metrics`); `primary` names the
    metric whose best value picks the best checkpoint and drives early stopping.
    """

    primary = "reward"
    # TRL's keywords for the task's reward functions beside the data columns, set by the evaluation callback when
    # training begins: `trainer_state`, `log_metric` (a RewardMetricLog: `evaluate_split` adds its means to the
    # evaluation's metrics) and `log_extra` (accepted, not kept), so a TRL reward that reads them runs in evaluations
    # as in training
    reward_keywords: dict = {}

    def evaluate(self, model, tokenizer, split: str, accelerator=None, seed: int = 0) -> dict:
        raise NotImplementedError

    def describe(self, split: str) -> str:
        """What evaluating `split` costs, for the log line that announces it (e.g. `100 prompts x 4 samples`)."""
        size = self.size(split)
        return f"{size} prompts" if size is not None else split

    def size(self, split: str) -> int | None:
        """How many prompts (problems) an evaluation of `split` scores; None when unknown (the run doctor then judges a
        fall of the validation metric without its standard error)."""
        prompts = getattr(self, "prompts", {}).get(split)
        return len(prompts) if prompts is not None else None


class RewardEvaluator(Evaluator):
    """Sampled completions scored by the task's reward, an independent judge, best-of-N and diversity.

    Metrics: `reward`, `reward_std` (one sample per prompt); `rewards/{name}/mean` (each reward function's mean, when
    there are several); `gold_reward`, `gold_reward_std` (the judge on the same completions); `best_of_n_reward`
    (N samples per prompt, the best reward, mean over prompts; the first of the N is the sample above); `distinct_1`,
    `distinct_2`, `self_bleu`; `completion_length` (tokens up to and including EOS).

    columns: {split: {column: one value per prompt}}, passed to the rewards and the judge as keywords (TRL's
    convention for extra dataset columns).
    """

    def __init__(self, prompts: dict[str, list[str]], reward_funcs, settings: GenerationSettings, weights=None, judge=None, best_of_n: int = 4, columns: dict[str, dict[str, list]] | None = None):
        self.prompts, self.reward_funcs, self.settings = prompts, reward_funcs, settings
        self.weights, self.judge, self.best_of_n = weights, judge, int(best_of_n)
        self.columns = columns or {}

    def describe(self, split: str) -> str:
        samples = f"x {self.best_of_n} samples (best-of-{self.best_of_n})" if self.best_of_n > 1 else "x 1 sample"
        judge = " and the gold judge" if self.judge is not None else ""
        return f"{len(self.prompts[split])} prompts {samples}, scored by the reward{judge}"

    def evaluate(self, model, tokenizer, split: str, accelerator=None, seed: int = 0) -> dict:
        prompts, columns = self.prompts[split], self.columns.get(split, {})
        weights = torch.tensor(self.weights or [1.0] * len(self.reward_funcs))
        names = [reward_name(f) for f in self.reward_funcs]

        def work(indices: list[int], rank: int) -> list[dict]:
            shard = [prompts[i] for i in indices]
            texts, chat = as_rendered_prompts(tokenizer, shard, self.settings.chat_template_kwargs)
            shard_columns = {key: [values[i] for i in indices] for key, values in columns.items()}
            prefixes = prompt_token_ids(tokenizer, texts, self.settings.max_prompt_length) if chat and has_response_parser(tokenizer) else None
            samples = []
            for k in range(max(1, self.best_of_n)):
                # sample k of this shard uses seed + 1000 k + rank: a rerun on as many processes reproduces it
                completions, lengths, ids = generate_completions(model, tokenizer, texts, self.settings, seed + 1000 * k + rank)
                if not shard:  # generated only to keep a sharded model's collectives in step (shard_and_gather)
                    continue
                # handed over as the trainers hand them: the prompts as the data holds them, chat completions as one assistant
                # message each (parsed as TRL parses them where the tokenizer has a response template: the prompt's ids are its prefix)
                handed = assistant_messages(tokenizer, ids, prefixes) if chat else completions
                scores = compute_rewards(self.reward_funcs, shard, handed, ids, **shard_columns, **self.reward_keywords)  # (B, F)
                samples.append((completions, lengths, combine_scores(scores, weights).tolist(), scores.tolist(), handed, ids))
            if not shard:
                return []
            completions, lengths, rewards, scores, handed, ids = samples[0]
            gold = self.judge(shard, handed, completion_ids=ids, **shard_columns) if self.judge is not None else [None] * len(shard)
            best = [max(s[2][i] for s in samples) for i in range(len(shard))]
            return [
                {"prompt": p, "completion": c, "length": n, "reward": r, "gold_reward": g, "best_of_n_reward": b, "scores": dict(zip(names, f))}
                for p, c, n, r, g, b, f in zip(texts, completions, lengths, rewards, gold, best, scores)
            ]

        rows = shard_and_gather(accelerator, list(range(len(prompts))), work)
        rewards = [r["reward"] for r in rows]
        completions = [r["completion"] for r in rows]
        metrics = {"reward": statistics.fmean(rewards), "reward_std": statistics.pstdev(rewards)}
        if len(self.reward_funcs) > 1:
            # each function's mean over the prompts it scored (NaN: it returned None there); left out where it scored none
            scored = {name: [v for r in rows if not math.isnan(v := r["scores"][name])] for name in names}
            metrics |= {f"rewards/{name}/mean": statistics.fmean(values) for name, values in scored.items() if values}
        if self.judge is not None:
            gold = [r["gold_reward"] for r in rows]
            metrics |= {"gold_reward": statistics.fmean(gold), "gold_reward_std": statistics.pstdev(gold)}
        if self.best_of_n > 1:
            metrics["best_of_n_reward"] = statistics.fmean(r["best_of_n_reward"] for r in rows)
        metrics |= {
            "distinct_1": distinct_n(completions, 1),
            "distinct_2": distinct_n(completions, 2),
            "self_bleu": self_bleu(completions),
            "completion_length": statistics.fmean(r["length"] for r in rows),
        }
        return {"metrics": metrics, "samples": rows}


# ---- when to evaluate -------------------------------------------------------------------------


class EvaluationCallback(TrainerCallback):
    """Evaluates at step 0, every `eval_steps` and at the end; keeps the best checkpoint; optional early stop.

    Logs `eval_{metric}` for every metric of the evaluator, `eval_best_{primary}`, `eval_best_step`,
    `eval_wall_seconds` (wall time since training began) and `eval_train_seconds` (the same without the
    time spent evaluating). Every evaluation uses the same prompts and the same
    seed, so methods and steps see the same conditions. The best checkpoint (highest primary metric;
    the first on ties) is saved to `best_model_dir` and kept in memory (trainable parameters only)
    for the final test. Attach the trainer (`callback.trainer = trainer`) so the values reach its loggers.
    """

    def __init__(self, evaluator: Evaluator, eval_steps: int, seed: int = 0, best_model_dir: str | None = None, early_stopping_patience: int = 0, graceful_stop=None):
        self.evaluator, self.eval_steps, self.seed = evaluator, int(eval_steps), seed
        self.best_model_dir, self.patience = best_model_dir, int(early_stopping_patience or 0)
        self.graceful_stop = graceful_stop  # resume.GracefulStop: a run stopped by a signal skips the final evaluation
        self.trainer = None
        self.best_value, self.best_step = float("-inf"), None
        self.best_parameters: dict[str, torch.Tensor] | None = None
        self.evaluations_since_best = 0
        self.stopped_early_at: int | None = None
        self.results: dict[int, dict] = {}
        self._start, self._eval_seconds, self._seconds_before = None, 0.0, 0.0  # _seconds_before: a resumed run's past
        self.deferred_step: int | None = None  # the evaluation a signal's stop left to the resumed run (on_step_end)

    # -- resume (grade_trl.resume) ------------------------------------------------------------------------------
    def state_dict(self, step: int) -> dict:
        """What a resumed run needs to continue the protocol at `step`: every result, the best (its parameters only
        when they are not the checkpoint's own weights), the patience counter and the time spent so far."""
        best_is_current = self.best_step == step
        return {
            "results": self.results,
            "best_value": self.best_value,
            "best_step": self.best_step,
            "best_parameters": None if best_is_current else self.best_parameters,
            "best_is_current": best_is_current,
            "evaluations_since_best": self.evaluations_since_best,
            "stopped_early_at": self.stopped_early_at,
            "seconds": self._elapsed(),
            "eval_seconds": self._eval_seconds,
            "deferred_step": self.deferred_step,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict`'s values (the policy holds the checkpoint's weights already); `best_model/` is written
        again from the restored best, since the stopped run may have saved a later best there after the checkpoint."""
        self.results = state["results"]
        self.best_value, self.best_step = state["best_value"], state["best_step"]
        self.evaluations_since_best, self.stopped_early_at = state["evaluations_since_best"], state["stopped_early_at"]
        self._seconds_before, self._eval_seconds = state["seconds"], state["eval_seconds"]
        self.deferred_step = state.get("deferred_step")  # absent from checkpoints saved before it existed
        if state["best_is_current"]:
            self._keep_best()
        elif state["best_parameters"] is not None:
            self.best_parameters = {name: value.to("cpu") for name, value in state["best_parameters"].items()}
            if self.best_model_dir:
                saved = self.swap_in_best()
                self.trainer.save_model(self.best_model_dir)
                self.restore(saved)

    def _elapsed(self) -> float:
        return self._seconds_before + (time.time() - self._start if self._start else 0.0)

    @property
    def best_key(self) -> str:
        return metrics.best_eval_key(self.evaluator.primary)

    def policy(self):
        return self.trainer.accelerator.unwrap_model(self.trainer.model)

    def evaluate(self, step: int) -> dict:
        trainer, started = self.trainer, time.time()
        announce(trainer.accelerator, "validation at step %d: %s ...", step, self.evaluator.describe("validation"))
        result = evaluate_split(self.evaluator, self.policy(), trainer.processing_class, "validation", trainer.accelerator, self.seed)
        self.results[step] = result
        value = result["metrics"][self.evaluator.primary]
        if value > self.best_value:
            self.best_value, self.best_step, self.evaluations_since_best = value, step, 0
            self._keep_best()
        else:
            self.evaluations_since_best += 1
        self._eval_seconds += time.time() - started
        elapsed = self._elapsed()
        return {
            **{metrics.eval_key(name): v for name, v in result["metrics"].items()},
            self.best_key: self.best_value,
            metrics.eval_key("best_step"): self.best_step,
            metrics.eval_key("wall_seconds"): elapsed,
            metrics.eval_key("train_seconds"): max(elapsed - self._eval_seconds, 0.0),
        }

    def _keep_best(self) -> None:
        # this process's part of each (core/sharding.py: local_data, from the shards under FSDP2), which is what
        # swap_in_best writes back
        self.best_parameters = {name: local_data(p).detach().to("cpu", copy=True) for name, p in resharded(self.policy()).named_parameters() if p.requires_grad}
        if self.best_model_dir:
            self.trainer.save_model(self.best_model_dir)

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.time()
        if self.trainer is None:
            return
        # the trainer's state object, which training updates in place: rewards read the step as they do in training
        self.evaluator.reward_keywords = {"trainer_state": state, "log_metric": RewardMetricLog(), "log_extra": not_kept}
        if state.global_step == 0:
            self.log(state, self.evaluate(0))
        elif self.deferred_step == state.global_step:
            # The stopped run left this step's evaluation to us, on the same weights: in the history it goes where that
            # run would have logged it, before the step's training row (its on_step_end precedes Trainer's log).
            self.deferred_step = None
            self.log(state, self.evaluate(state.global_step), before_step=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer is None or self.eval_steps <= 0 or state.global_step % self.eval_steps:
            return control
        stopping = self.graceful_stop is not None and self.graceful_stop.stopping  # agreed by every process (GracefulStop.agree)
        if stopping and not self.patience:
            # A launcher kills a process some seconds after its signal (GracefulStop): save the checkpoint first and leave
            # this evaluation to the resumed run, which runs it on the same weights. With early stopping on, this
            # evaluation may end the run here, so it runs now.
            self.deferred_step = state.global_step
            logger.warning("evaluation at step %d left to the resumed run: stopping for a signal", state.global_step)
            return control
        self.log(state, self.evaluate(state.global_step))
        if self.patience and self.evaluations_since_best >= self.patience:
            self.stopped_early_at = state.global_step
            logger.warning(
                "early stopping at step %d: %s has not improved on %.4f (step %s) for %d evaluations",
                state.global_step, metrics.eval_key(self.evaluator.primary), self.best_value, self.best_step, self.patience,
            )
            control.should_training_stop = True
        if not stopping and self.graceful_stop is not None and self.graceful_stop.agree():  # a signal during this evaluation: stop at this step
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.graceful_stop is not None and self.graceful_stop.stopping:
            return  # stopped by a signal (every process agreed): the run ends now, with the checkpoint saved at this step
        if self.trainer is not None and state.global_step not in self.results:
            self.log(state, self.evaluate(state.global_step))

    def log(self, state, metrics: dict, before_step: int | None = None) -> None:
        # Straight to the history and the reporters (W&B, TensorBoard, progress bar), not through
        # trainer.log: a trainer's log() may flush its own metric window (TRL's GRPOTrainer does).
        # before_step: placed before the history's first row of that step instead of at its end.
        trainer = self.trainer
        logs = {**metrics, "epoch": state.epoch, "step": state.global_step}
        if before_step is None:
            state.log_history.append(logs)
        else:
            rows = state.log_history
            state.log_history.insert(next((i for i, row in enumerate(rows) if row.get("step", -1) >= before_step), len(rows)), logs)
        should_log = trainer.control.should_log  # on_log resets it; this step's training log must still happen
        trainer.control = trainer.callback_handler.on_log(trainer.args, state, trainer.control, dict(metrics))
        trainer.control.should_log = should_log

    def swap_in_best(self) -> dict[str, torch.Tensor]:
        """Load the best checkpoint's trainable parameters into the policy; returns the current ones to restore."""
        current = {}
        parameters = dict(resharded(self.policy()).named_parameters())
        with torch.no_grad():
            for name, value in (self.best_parameters or {}).items():
                held = local_data(parameters[name])
                current[name] = held.detach().to("cpu", copy=True)
                held.copy_(value)
        return current

    def restore(self, saved: dict[str, torch.Tensor]) -> None:
        parameters = dict(resharded(self.policy()).named_parameters())
        with torch.no_grad():
            for name, value in saved.items():
                local_data(parameters[name]).copy_(value)


def announce(accelerator, message: str, *args) -> None:
    """An info line, from the main process only, before a phase that runs long without other output."""
    if accelerator is None or accelerator.is_main_process:
        logger.info(message, *args)


def evaluate_split(evaluator: Evaluator, policy, tokenizer, split: str, accelerator, seed: int) -> dict:
    """`evaluator.evaluate`, with what the rewards reported through TRL's `log_metric` during it added to its metrics
    (each name's mean over every call on every process, as TRL averages them; the task's own metric wins a clash of
    names). Every process calls it (the gather is a collective)."""
    result = evaluator.evaluate(policy, tokenizer, split, accelerator, seed)
    log = evaluator.reward_keywords.get("log_metric")
    if isinstance(log, RewardMetricLog):
        result["metrics"] = {**log.flush(accelerator), **result["metrics"]}
    return result


def evaluate_test(evaluator: Evaluator, policy, tokenizer, accelerator, seed: int, checkpoint: str = "final") -> dict:
    """The test split's metrics, with the prompts and per-prompt values (`rewards`, `gold_rewards`, `corrects`, ...)
    kept for paired tests, and the completions they scored (GSM8K: with `extracted_answers`, the answer read from each,
    null where none, and `gold_answers`): final["test"]["final" | "best"] of results.json."""
    announce(accelerator, "test of the %s checkpoint: %s ...", checkpoint, evaluator.describe("test"))
    result = evaluate_split(evaluator, policy, tokenizer, "test", accelerator, seed)
    samples = result["samples"]
    out = {"metrics": result["metrics"], "prompts": [s["prompt"] for s in samples]}
    for key in ("reward", "gold_reward", "best_of_n_reward", "correct"):
        if samples and samples[0].get(key) is not None:
            out[f"{key}s"] = [s[key] for s in samples]
    # what was scored, so that a reader can check a score by hand: each completion and (GSM8K) the answer read from it
    # and the gold answer it was compared with
    for key, name in (("completion", "completions"), ("extracted", "extracted_answers"), ("answer", "gold_answers")):
        if samples and key in samples[0]:
            out[name] = [s[key] for s in samples]
    return out
