"""The reward interface: hard/soft agreement, error reporting, save/load, GRADE's start-up check."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from grade_trl.rewards import (
    RewardFunctionError,
    compute_rewards,
    require_differentiable,
)
from grade_trl.rewards.base import check_finite_scores
from grade_trl.rewards.sentiment import (
    SentimentRewardModel,
    has_trained_head,
    train_sentiment_head,
)

TEXTS = ["A wonderful film with brilliant acting.", "Terrible and boring, the worst I have seen.", "ok"]


def test_hard_and_soft_paths_agree_on_one_hot_inputs(reward_model, tokenizer):
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True, add_special_tokens=False)
    hard = reward_model.score_ids(enc["input_ids"], enc["attention_mask"])
    one_hot = F.one_hot(enc["input_ids"], reward_model.embedding_matrix.shape[0]).float()
    soft = reward_model.score_soft(one_hot, enc["attention_mask"])
    assert_close(soft, hard, rtol=1e-5, atol=1e-6)


def test_callable_matches_score_ids_and_is_trl_shaped(sentiment_reward, reward_model, tokenizer):
    values = sentiment_reward(prompts=["p"] * 3, completions=TEXTS, completion_ids=None, trainer_state=None)
    assert isinstance(values, list) and len(values) == 3 and all(isinstance(v, float) for v in values)
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True, add_special_tokens=False)
    assert_close(torch.tensor(values), reward_model.score_ids(enc["input_ids"], enc["attention_mask"]))
    assert sentiment_reward.__name__ == "sentiment" and sentiment_reward.differentiable


def test_include_prompt_changes_what_is_scored(reward_model, tokenizer):
    from grade_trl.rewards import SentimentReward

    with_prompt = SentimentReward(reward_model, tokenizer, include_prompt=True)
    without = SentimentReward(reward_model, tokenizer, include_prompt=False)
    prompts = ["I hated every minute. "] * 3
    assert with_prompt(prompts, TEXTS) != without(prompts, TEXTS)
    assert_close(torch.tensor(with_prompt(prompts, TEXTS)), torch.tensor(without(["", "", ""], [p + t for p, t in zip(prompts, TEXTS)])))



def test_the_built_in_rewards_read_a_chat_completion_as_its_text(sentiment_reward, reward_model, tokenizer):
    """TRL hands a chat prompt's completions as one assistant message each: every built-in reward scores its content
    exactly as it scores the same text (the runner now passes chat data as TRL does)."""
    from grade_trl.rewards import GSM8KCorrectness, GSM8KFormat, LengthReward, SentimentReward
    from grade_trl.rewards.judge import TfidfJudge

    texts = [*TEXTS, "So 3 + 4 = 7.\n#### 7"]
    chat = [[{"role": "assistant", "content": t}] for t in texts]
    prompts = [[{"role": "user", "content": "Review it."}]] * len(texts)
    judge = TfidfJudge.fit(["good great fun", "bad awful boring"] * 3, [1, 0] * 3, min_df=1)
    with_prompt = SentimentReward(reward_model, tokenizer, include_prompt=True)
    for reward in (LengthReward(tokenizer.eos_token_id), sentiment_reward, with_prompt, GSM8KFormat(), judge):
        assert reward(["Review it."] * len(texts), texts) == reward(prompts, chat), reward  # no chat template here: the contents
    assert GSM8KCorrectness()(prompts, chat, answer=["7"] * 4) == GSM8KCorrectness()(prompts, texts, answer=["7"] * 4) == [0.0, 0.0, 0.0, 1.0]


def _thinking_tokenizer(tokenizer):
    """The embedded tokenizer with Qwen3.5's thinking chat template (its generation prompt opens `<think>`), its tokens,
    and the response template TRL's `add_response_schema` sets for it."""
    import copy

    from trl.chat_template_utils import add_response_schema, qwen3_5_think_chat_template

    thinking = copy.deepcopy(tokenizer)
    thinking.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    thinking.add_tokens(["<think>", "</think>"])
    thinking.chat_template = qwen3_5_think_chat_template
    return add_response_schema(thinking)


def test_chat_completions_are_parsed_as_trl_parses_them_where_the_tokenizer_has_a_response_template(tokenizer):
    """TRL's GRPOTrainer hands a reward `parse_response`'s message when the tokenizer has a response template (Qwen3's
    thinking in `reasoning_content`, the answer alone in `content`) and the decoded text otherwise; our trainers and
    evaluations hand the same (`assistant_messages`). Expected messages written out by hand."""
    from grade_trl.rewards.base import assistant_messages, has_response_parser

    thinking = _thinking_tokenizer(tokenizer)
    prompt = thinking.apply_chat_template([{"role": "user", "content": "2 + 2?"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")  # the template opens the thinking: the parser must read the prefix
    prefix = thinking(prompt, add_special_tokens=False)["input_ids"]
    answered = thinking("Two and two.\n</think>\n\nThe answer is 4<|im_end|>", add_special_tokens=False)["input_ids"]
    cut = thinking("Two and", add_special_tokens=False)["input_ids"]  # max_completion_length reached inside the thinking
    assert has_response_parser(thinking) and not has_response_parser(tokenizer)
    assert assistant_messages(thinking, [answered, cut], [prefix, prefix]) == [
        [{"role": "assistant", "reasoning_content": "Two and two.", "content": "The answer is 4"}],
        [{"role": "assistant", "reasoning_content": "Two and", "content": ""}],
    ]
    plain = tokenizer("The answer is 4", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert assistant_messages(tokenizer, [plain]) == [[{"role": "assistant", "content": "The answer is 4"}]]  # decoded, EOS skipped


def raises_on_third(prompts, completions, **kwargs):
    return [1 / (len(c) - 2) for c in completions]  # "ok" has length 2


def returns_nan(prompts, completions, **kwargs):
    return [0.5, float("nan"), 0.1][: len(completions)]


def returns_a_huge_int(prompts, completions, **kwargs):
    return [10**400] * len(completions)


def test_reward_past_floats_range_is_reported_as_not_finite():
    """An int too large for a float (a fuzz audit: an OverflowError traceback, exit 1) is a bad value like nan."""
    with pytest.raises(RewardFunctionError, match=r"'returns_a_huge_int' returned 1000000000.* for sample 0"):
        compute_rewards([returns_a_huge_int], ["p"] * 3, TEXTS)


def returns_past_float32(prompts, completions, **kwargs):
    return [1.0, 1e308, 1.0][: len(completions)]


def test_rewards_past_float32_or_summing_past_it_are_one_line_not_inf():
    """Rewards are held in float32, as in TRL: 1e308 (a finite float64) was inf there, and two functions of 3e38 each
    summed to inf (a fuzz audit: a traceback in the evaluation's statistics, exit 1)."""
    from grade_trl.rewards.base import combine_scores

    with pytest.raises(RewardFunctionError) as info:
        compute_rewards([returns_past_float32], ["p"] * 3, TEXTS)
    assert str(info.value) == ("reward function 'returns_past_float32' returned 1e+308 for sample 1; rewards must be finite numbers of float32's range, "
                               "|r| <= 3.4e38, which rewards are held in (or None where it does not apply)")
    scores = torch.tensor([[3e38, 3e38], [1.0, 2.0]])
    with pytest.raises(RewardFunctionError) as info:
        combine_scores(scores, torch.tensor([1.0, 1.0]))
    assert str(info.value) == ("reward_weights: the weighted sum of the rewards is inf for sample 0 (each reward finite, their sum past float32's range, "
                               "|r| <= 3.4e38); scale the rewards or reward_weights [1.0, 1.0] down")
    assert combine_scores(scores, torch.tensor([0.5, 0.5])).tolist() == pytest.approx([3e38, 1.5])  # in range: summed as before


def test_reward_that_raises_is_reported_with_name_and_sample_index():
    with pytest.raises(RewardFunctionError, match=r"'raises_on_third' raised on sample 2: ZeroDivisionError"):
        compute_rewards([raises_on_third], ["p"] * 3, TEXTS)


def test_a_reward_whose_signature_does_not_take_the_keywords_is_named_so_not_by_a_sample():
    """Found by a user trial (2026-12-08): a reward with a column the data set lacks, without `**kwargs`, or with
    `completion` for `completions` was reported as "raised on sample 0: TypeError ...": the call itself failed."""

    def keyword_reward(prompts, completions, keyword, **kwargs):
        return [1.0] * len(completions)

    def no_kwargs(prompts, completions):
        return [1.0] * len(completions)

    for func, why in ((keyword_reward, "missing a required argument: 'keyword'"), (no_kwargs, "got an unexpected keyword argument 'completion_ids'")):
        with pytest.raises(RewardFunctionError) as info:
            compute_rewards([func], ["p"] * 3, TEXTS, None, trainer_state=None, score=[1, 2, 3])
        assert str(info.value) == (f"reward function '{func.__name__}' cannot be called with the keywords a reward receives ({why}); it takes "
                                   "`prompts, completions, **kwargs` as TRL's rewards do, and a dataset column as a keyword of its name (given: score)")
    # a column the data left null for the failing sample is named (a user trial: the reward alone was blamed)
    def keyword_count(prompts, completions, keyword, **kwargs):
        return [float(c.count(k)) for c, k in zip(completions, keyword)]

    with pytest.raises(RewardFunctionError, match=r"^reward function 'keyword_count' raised on sample 1 \(that sample's keyword is null in the data\): TypeError"):
        compute_rewards([keyword_count], ["p"] * 3, TEXTS, None, keyword=["a", None, "b"])
    # an error raised inside a function that takes the keywords is still the sample's
    with pytest.raises(RewardFunctionError, match=r"'raises_on_third' raised on sample 2: ZeroDivisionError"):
        compute_rewards([raises_on_third], ["p"] * 3, TEXTS, None, score=[1, 2, 3])


def test_reward_that_returns_nan_is_reported_with_name_and_sample_index():
    with pytest.raises(RewardFunctionError, match=r"'returns_nan' returned nan for sample 1"):
        compute_rewards([returns_nan], ["p"] * 3, TEXTS)
    with pytest.raises(RewardFunctionError, match=r"'returns_nan' returned nan from score_soft for sample 2"):
        check_finite_scores(returns_nan, torch.tensor([0.1, 0.2, math.nan]))


async def judge_length(prompts, completions, **kwargs):
    import asyncio

    await asyncio.sleep(0.4)  # a remote judge's latency
    return [float(len(c)) for c in completions]


async def judge_words(prompts, completions, **kwargs):
    import asyncio

    await asyncio.sleep(0.4)
    return [float(len(c.split())) for c in completions]


async def judge_raises_on_second(prompts, completions, **kwargs):
    return [1.0 / (c != TEXTS[1]) for c in completions]


def test_async_rewards_are_awaited_concurrently_as_in_trl():
    """Found by a journey audit: an `async def` reward (TRL awaits them) stopped REINFORCE and PPO with "returned
    coroutine". Awaited now, several at once: two judges of 0.4 s take well under their 0.8 s sum; the values are the
    plain functions' values; errors are named by sample as a plain function's are."""
    import time

    compute_rewards([judge_words], ["p"], TEXTS[:1])  # the first call imports TRL's event-loop helper (seconds)
    started = time.perf_counter()
    scores = compute_rewards([judge_length, judge_words], ["p"] * 3, TEXTS)
    elapsed = time.perf_counter() - started
    assert scores.tolist() == [[float(len(t)), float(len(t.split()))] for t in TEXTS]
    assert elapsed < 0.7, elapsed  # sequential awaiting would take >= 0.8 s
    with pytest.raises(RewardFunctionError, match=r"^reward function 'judge_raises_on_second' raised on sample 1: ZeroDivisionError"):
        compute_rewards([judge_length, judge_raises_on_second], ["p"] * 3, TEXTS)


def test_an_async_reward_trains_reinforce(tmp_path, tokenizer):
    from datasets import Dataset

    from grade_trl import REINFORCEConfig, REINFORCETrainer

    async def longer(prompts, completions, **kwargs):
        return [len(c) / 10 for c in completions]

    args = REINFORCEConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=1, max_new_tokens=4,
                           logging_steps=1, use_cpu=True, disable_tqdm=True, report_to="none")
    trainer = REINFORCETrainer(model="embedded", reward_funcs=longer, args=args, train_dataset=Dataset.from_dict({"prompt": ["This movie was"] * 4}),
                               processing_class=tokenizer)
    trainer.train()
    rows = [row for row in trainer.state.log_history if "reward" in row]
    assert rows and rows[0]["reward"] > 0, trainer.state.log_history


def test_none_means_a_reward_does_not_apply_as_in_trl():
    """TRL's multi-task convention: a function returns None for a sample it does not apply to, and the weighted rewards
    are summed over the functions that do (nansum). A sample that no function scores is named."""
    from grade_trl.rewards.base import CheckedReward, combine_scores

    def math_only(prompts, completions, task, **kwargs):
        return [1.0 if t == "math" else None for t in task]

    def code_only(prompts, completions, task, **kwargs):
        return [0.25 if t == "code" else None for t in task]

    scores = compute_rewards([math_only, code_only], ["p"] * 3, TEXTS, task=["math", "code", "math"])
    assert torch.isnan(scores).tolist() == [[False, True], [True, False], [False, True]]
    assert combine_scores(scores, torch.tensor([2.0, 4.0])).tolist() == [2.0, 1.0, 2.0]
    with pytest.raises(RewardFunctionError, match=r"^no reward function scored sample 1: math_only, code_only all returned None"):
        compute_rewards([math_only, code_only], ["p"] * 3, TEXTS, task=["math", "poem", "code"])
    # inside TRL's GRPOTrainer our wrapper passes None on (TRL skips the function there) and still names a NaN
    assert CheckedReward(math_only)(["p"] * 2, TEXTS[:2], task=["math", "code"]) == [1.0, None]
    with pytest.raises(RewardFunctionError, match=r"'returns_nan' returned nan for sample 1"):
        CheckedReward(returns_nan)(["p"] * 3, TEXTS)


def test_a_held_out_judges_bad_reward_says_it_is_the_judges():
    from grade_trl.rewards.base import MeanReward

    with pytest.raises(RewardFunctionError, match=r"^eval_reward_funcs: reward function 'returns_nan' returned nan for sample 1"):
        MeanReward([returns_nan])(["p"] * 3, TEXTS)


def forgot_return(prompts, completions, **kwargs):
    [float(len(c)) for c in completions]  # noqa: B018 - the bug this test is about: no `return`


@pytest.mark.parametrize("returned,what", [
    (None, "None (a missing return?)"),
    (1.0, "float 1.0"),
    ("0.5", "str '0.5'"),
    (torch.tensor(0.5), "Tensor tensor(0.5000)"),
    (torch.ones(3, 1), "Tensor tensor([[1.],"),
])
def test_a_reward_that_returns_no_list_is_one_line_naming_it(returned, what):
    def odd(prompts, completions, **kwargs):
        return returned

    with pytest.raises(RewardFunctionError, match=r"^reward function 'odd' returned " + re.escape(what)) as error:
        compute_rewards([odd], ["p"] * 3, TEXTS)
    assert "it must return a list of 3 numbers, one per completion" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(RewardFunctionError, match=r"'forgot_return' returned None \(a missing return\?\)"):
        compute_rewards([forgot_return], ["p"] * 3, TEXTS)


def test_a_reward_may_return_a_tuple_a_numpy_array_or_a_1d_tensor():
    import numpy as np

    for returned in ((0.5, 1, True), np.array([0.5, 1.0, 1.0], dtype=np.float32), torch.tensor([0.5, 1.0, 1.0])):
        out = compute_rewards([lambda prompts, completions, **k: returned], ["p"] * 3, TEXTS)
        assert_close(out[:, 0], torch.tensor([0.5, 1.0, 1.0]))
    for make in (lambda c: (0.5 for _ in c), lambda c: map(float, [0.5] * len(c))):  # iterables TRL iterates over too
        out = compute_rewards([lambda prompts, completions, **k: make(completions)], ["p"] * 3, TEXTS)
        assert_close(out[:, 0], torch.full((3,), 0.5))


@pytest.mark.parametrize("scores,what", [
    (torch.tensor(0.5), "a torch.float32 tensor of shape ()"),
    (torch.zeros(3, 4), "a torch.float32 tensor of shape (3, 4)"),
    (torch.zeros(2), "a torch.float32 tensor of shape (2,)"),
    (torch.zeros(3, dtype=torch.long), "a torch.int64 tensor of shape (3,)"),
    ([0.1, 0.2, 0.3], "list [0.1, 0.2, 0.3]"),
])
def test_a_score_soft_of_the_wrong_shape_is_one_line_naming_the_reward(scores, what):
    with pytest.raises(RewardFunctionError, match=r"^reward function 'returns_nan' returned " + re.escape(what) + r" from score_soft; it must return a floating tensor of shape \(3,\)"):
        check_finite_scores(returns_nan, scores, 3)
    assert check_finite_scores(returns_nan, torch.zeros(3, dtype=torch.bfloat16), 3).dtype == torch.float32


def test_compute_rewards_stacks_columns():
    out = compute_rewards([lambda prompts, completions, **k: [1.0] * len(completions), lambda prompts, completions, **k: [len(c) for c in completions]], ["p"] * 3, TEXTS)
    assert out.shape == (3, 2) and out[2, 1] == 2


def test_grade_refuses_a_reward_without_score_soft(sentiment_reward):
    require_differentiable([sentiment_reward])
    with pytest.raises(ValueError, match=r"reward function 'raises_on_third' is not differentiable"):
        require_differentiable([sentiment_reward, raises_on_third])


def test_head_training_learns_and_save_load_round_trips(tmp_path, tokenizer):
    model = SentimentRewardModel.from_backbone("embedded")
    pos = ["A wonderful, brilliant, moving film. I loved it.", "Great acting and a beautiful story.", "One of the best movies ever made."]
    neg = ["Awful. A boring waste of time.", "Terrible acting and a stupid plot.", "The worst movie I have ever seen."]
    metrics = train_sentiment_head(model, tokenizer, pos + neg, [1, 1, 1, 0, 0, 0], pos, [1, 1, 1], epochs=60, batch_size=6)
    assert metrics["train_accuracy"] == 1.0
    assert not any(p.requires_grad for p in model.parameters())  # frozen after training
    model.save(tmp_path / "rm", metrics)
    assert has_trained_head(tmp_path / "rm")
    mode = lambda name: (tmp_path / "rm" / name).stat().st_mode & 0o777  # noqa: E731
    assert mode("head.safetensors") == mode("reward_model.json")  # not safetensors 0.8's 0600: another user can load it
    loaded = SentimentRewardModel.load(tmp_path / "rm")
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True, add_special_tokens=False)
    assert_close(loaded.score_ids(enc["input_ids"], enc["attention_mask"]), model.score_ids(enc["input_ids"], enc["attention_mask"]))
    assert loaded.metadata["train_accuracy"] == 1.0


def test_sentiment_reward_scores_the_sampled_token_ids_not_a_re_tokenization(sentiment_reward, reward_model, tokenizer):
    """The ids a policy sampled can decode to text that re-tokenizes differently; the reward scores the ids (what
    GRADE differentiated, `score_soft` on their one-hot rows), up to the first EOS."""
    merged = tokenizer("the movie", add_special_tokens=False)["input_ids"]
    split = tokenizer("th", add_special_tokens=False)["input_ids"] + tokenizer("e movie", add_special_tokens=False)["input_ids"]
    assert split != merged and tokenizer.decode(split) == tokenizer.decode(merged), "the test needs a token sequence that re-tokenizes differently"
    eos = tokenizer.eos_token_id
    text = tokenizer.decode(split)
    by_ids = sentiment_reward(["p"], [text], completion_ids=[split + [eos, 5, 6]])[0]
    one_hot = torch.nn.functional.one_hot(torch.tensor([split]), reward_model.embedding_matrix.shape[0]).float()
    assert by_ids == pytest.approx(reward_model.score_soft(one_hot, torch.ones(1, len(split))).item(), abs=1e-6)
    assert by_ids == pytest.approx(reward_model.score_ids(torch.tensor([split]), torch.ones(1, len(split), dtype=torch.long)).item(), abs=1e-6)
    by_text = sentiment_reward(["p"], [text])[0]
    assert by_text == pytest.approx(reward_model.score_ids(torch.tensor([merged]), torch.ones(1, len(merged), dtype=torch.long)).item(), abs=1e-6)
    assert abs(by_ids - by_text) > 1e-6  # a different sequence, a different score


def test_sentiment_reward_ids_with_the_prompt_and_empty_completions(reward_model, tokenizer):
    from grade_trl.rewards import SentimentReward

    with_prompt = SentimentReward(reward_model, tokenizer, include_prompt=True)
    prompt = "I hated every minute. "
    ids = tokenizer("Great film", add_special_tokens=False)["input_ids"]
    row = tokenizer(prompt, add_special_tokens=False)["input_ids"] + ids
    expected = reward_model.score_ids(torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long))
    assert with_prompt([prompt], ["Great film"], completion_ids=[ids])[0] == pytest.approx(expected.item(), abs=1e-6)
    eos = tokenizer.eos_token_id
    without = SentimentReward(reward_model, tokenizer)
    assert without(["p"], [""], completion_ids=[[eos]]) == pytest.approx(without(["p"], [""]), abs=1e-6)  # ended at once


def test_sentiment_reward_keeps_a_float64_model_in_float64(tokenizer):
    model = SentimentRewardModel.from_backbone("embedded").double()
    ids = torch.tensor([[5, 6, 7]])
    one_hot = torch.nn.functional.one_hot(ids, model.embedding_matrix.shape[0]).double().requires_grad_(True)
    score = model.score_soft(one_hot, torch.ones(1, 3))
    assert score.dtype == torch.float64
