"""Reward functions of recipes/examples/custom_task.yaml: what you write for `task: custom`.

Each is a TRL reward, `reward(prompts, completions, **kwargs) -> list[float]`, usable unchanged in
`trl.GRPOTrainer(reward_funcs=[...])`; a column of the data besides the prompt (here `keyword`) arrives as a
keyword list with one value per completion. With chat prompts (a column of `[{"role", "content"}]` messages) TRL
hands each completion as one assistant message, `[{"role": "assistant", "content": ...}]`: `text` reads both kinds.
The recipe names them `my_rewards.<name>`: the runner imports modules from the recipe's folder.
"""

import re


def text(completion) -> str:
    """The completion's text: TRL hands a plain-text prompt's completion as a string, a chat prompt's as one message."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def keyword_reward(prompts, completions, keyword, **kwargs) -> list[float]:
    """1 when the completion mentions its row's keyword (a whole word, any case), else 0."""
    return [1.0 if re.search(rf"\b{re.escape(k)}\b", text(c), re.IGNORECASE) else 0.0 for c, k in zip(completions, keyword)]


def variety_judge(prompts, completions, **kwargs) -> list[float]:
    """A held-out check, never trained on (eval_reward_funcs): the share of distinct words in the completion, which
    falls when the policy repeats itself to win the training rewards."""
    return [len(set(words)) / len(words) if words else 0.0 for words in (text(c).lower().split() for c in completions)]


class PositiveWords:
    """The share of completion tokens that are one of `words`: a differentiable reward, so GRADE can train on it.

    Text path: re-tokenise the completion and count. Soft path (GRADE, `score_soft`): the same share on relaxed tokens,
    sum_t mask_t * sum_{w in words} y_t[w] / sum_t mask_t, which equals the text path on one-hot tokens. Only words
    that are one token (with or without a leading space) count. Built by the runner with `reward_kwargs` and the
    policy's `tokenizer`.
    """

    differentiable = True

    def __init__(self, tokenizer, words=("great", "good", "fun", "love", "best", "wonderful")):
        self.tokenizer = tokenizer
        variants = [tokenizer.encode(v, add_special_tokens=False) for w in words for v in (w, " " + w, " " + w.capitalize())]
        self.token_ids = sorted({ids[0] for ids in variants if len(ids) == 1})
        self.__name__ = "positive_words"

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        shares = []
        for completion in completions:
            ids = self.tokenizer(text(completion), add_special_tokens=False)["input_ids"]
            shares.append(sum(i in self.token_ids for i in ids) / max(len(ids), 1))
        return shares

    def score_soft(self, soft_tokens, attention_mask):
        from grade_trl.core.soft_tokens import as_soft_tokens

        soft_tokens = as_soft_tokens(soft_tokens)
        mass = sum(soft_tokens.probability(i) for i in self.token_ids)  # (B, T)
        mask = attention_mask.to(mass.dtype)
        return (mass * mask).sum(1) / mask.sum(1).clamp(min=1.0)
