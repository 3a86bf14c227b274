"""GSM8K evaluation: greedy accuracy on fixed problems, optionally pass@k and maj@k from k samples.

Metrics (logged as `eval_{name}` during training; the primary one, `accuracy`, picks the best checkpoint):

| name | meaning |
|---|---|
| `accuracy` | greedy completion's final answer == gold (the `GSM8KCorrectness` reward), mean over problems |
| `accuracy_flexible` | the same with the last number taken when no answer-like expression exists (lm-eval's "flexible-extract" always takes the last number) |
| `format_reward` | fraction of greedy completions ending with `#### X` or `\\boxed{X}` (the `GSM8KFormat` reward) |
| `reward`, `reward_std` | the task's weighted total reward of the greedy completions (what training maximises) |
| `completion_length` | tokens of the greedy completion up to and including EOS |
| `pass_at_{k}` | with `eval_pass_k = k > 1`: a problem counts when any of k samples is correct (n = k, so the estimate is the plain "any") |
| `maj_at_{k}` | the most frequent extracted answer of the k samples (ties: the earliest) is correct; samples without an answer do not vote |

pass@k samples at temperature `eval_temperature`, top-p `eval_top_p` (0.9 by default, while the GSM8K recipes train at
top-p 1.0); sample j of a process's shard uses seed
`seed + 1000 j + rank`, so a rerun on as many processes reproduces it.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import replace
from fractions import Fraction

from .evaluation import Evaluator, GenerationSettings, generate_completions, shard_and_gather, weighted_rewards
from .rewards.gsm8k import answer_text, before_an_invented_question, extract_answer, final_answer, gold_answer, has_final_answer_format


def majority_answer(answers: list[Fraction | None]) -> Fraction | None:
    """The most frequent non-None answer (the earliest on ties), or None when no sample answered."""
    votes = Counter(a for a in answers if a is not None)
    return max(votes, key=lambda a: (votes[a], -answers.index(a))) if votes else None


class GSM8KEvaluator(Evaluator):
    """Greedy GSM8K accuracy on a split's problems, plus the format reward, the task's reward and pass@k / maj@k.

    Args:
        problems: {"validation": dataset, "test": dataset}, each with `prompt` and `answer` (gold number).
        reward_funcs, weights: the task's reward callables and their weights (for the `reward` metric).
        settings: generation limits (max new tokens, prompt length, sampling temperature/top-p for pass@k).
        pass_k: samples per problem for pass@k and maj@k (<= 1: greedy only).
    """

    primary = "accuracy"

    def __init__(self, problems: dict, reward_funcs, settings: GenerationSettings, weights=None, pass_k: int = 0):
        self.problems, self.reward_funcs, self.weights = problems, reward_funcs, weights
        self.greedy = replace(settings, do_sample=False)
        self.sampled = replace(settings, do_sample=True)
        self.pass_k = int(pass_k or 0)

    def describe(self, split: str) -> str:
        sampled = f" and {self.pass_k} samples each (pass@k)" if self.pass_k > 1 else ""
        return f"{len(self.problems[split])} problems, greedy{sampled}"

    def size(self, split: str) -> int:
        return len(self.problems[split])

    def evaluate(self, model, tokenizer, split: str, accelerator=None, seed: int = 0) -> dict:
        problems = self.problems[split]
        items = list(zip(problems["prompt"], problems["answer"]))

        def work(shard: list[tuple[str, str]], rank: int) -> list[dict]:
            prompts, golds = [p for p, _ in shard], [g for _, g in shard]
            completions, lengths, ids = generate_completions(model, tokenizer, prompts, self.greedy, seed + rank)
            # pass@k's samples (each call seeds its own generator, so generating them here changes none of them)
            sampled = [generate_completions(model, tokenizer, prompts, self.sampled, seed + 1000 * (j + 1) + rank)[0] for j in range(self.pass_k)] if self.pass_k > 1 else []
            if not shard:  # generated only to keep a sharded model's collectives in step (shard_and_gather)
                return []
            rewards = weighted_rewards(self.reward_funcs, self.weights, prompts, completions, ids, answer=golds, **self.reward_keywords)
            rows = []
            for prompt, gold, completion, length, reward in zip(prompts, golds, completions, lengths, rewards):
                answer = answer_text(completion, prompt, tokenizer)  # a thinking model's: after its thinking, as the rewards read it
                own = before_an_invented_question(answer, prompt)  # the answer's text (`final_answer`); the format reads all of it
                predicted, target = extract_answer(own), Fraction(gold_answer(gold))
                rows.append({
                    "prompt": prompt, "completion": completion, "length": length, "answer": gold,
                    "extracted": None if predicted is None else str(predicted), "correct": float(predicted == target),
                    "correct_flexible": float(extract_answer(own, fallback_to_last_number=True) == target),
                    "format": float(has_final_answer_format(answer)), "reward": reward,
                })
            if sampled:
                for i, row in enumerate(rows):
                    answers = [final_answer(s[i], prompts[i], tokenizer) for s in sampled]
                    target = Fraction(gold_answer(row["answer"]))
                    row["pass_at_k"] = float(any(a == target for a in answers))
                    row["maj_at_k"] = float(majority_answer(answers) == target)
            return rows

        rows = shard_and_gather(accelerator, items, work)
        rewards = [r["reward"] for r in rows]
        metrics = {
            "accuracy": statistics.fmean(r["correct"] for r in rows),
            "accuracy_flexible": statistics.fmean(r["correct_flexible"] for r in rows),
            "format_reward": statistics.fmean(r["format"] for r in rows),
            "reward": statistics.fmean(rewards),
            "reward_std": statistics.pstdev(rewards),
            "completion_length": statistics.fmean(r["length"] for r in rows),
        }
        if self.pass_k > 1:
            metrics[f"pass_at_{self.pass_k}"] = statistics.fmean(r["pass_at_k"] for r in rows)
            metrics[f"maj_at_{self.pass_k}"] = statistics.fmean(r["maj_at_k"] for r in rows)
        return {"metrics": metrics, "samples": rows}
