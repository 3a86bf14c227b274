"""GSM8K: answer extraction, gold answers, prompts, rewards inside TRL, the evaluator, recipes and end-to-end runs.

Shrunk settings of the runs (each cut down from recipes/tiny/gsm8k_*.yaml so a run takes seconds on 2 cores):
4 optimizer steps (2 in the 2-process run, with 16 new tokens: plumbing only), 8 validation and 8 test problems.
"""

import json
import os
import subprocess
import sys
from fractions import Fraction

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

from grade_trl.data.gsm8k import (
    SYSTEM_PROMPT,
    format_prompt,
    load_gsm8k,
    make_gsm8k_splits,
    prompt_dataset,
)
from grade_trl.errors import UserError
from grade_trl.evaluation import GenerationSettings
from grade_trl.evaluation_gsm8k import GSM8KEvaluator, majority_answer
from grade_trl.methods import METHODS
from grade_trl.models import load_tokenizer, resolve_model_path
from grade_trl.recipe import RecipeError, build_recipe, load_recipe_file
from grade_trl.rewards.gsm8k import (
    GSM8KCorrectness,
    GSM8KFormat,
    extract_answer,
    gold_answer,
    has_final_answer_format,
    normalize_number,
)
from grade_trl.run import main

from .conftest import REPO, SHARED

SHARED_GSM8K = SHARED / "data" / "gsm8k"
SHARED_GPT2 = SHARED / "tokenizers" / "gpt2"
needs_shared = pytest.mark.skipif(not SHARED_GSM8K.exists(), reason="../shared/data/gsm8k is not here (the shared data of the project)")

# (completion, the value extract_answer must return or None, whether it ends with a well-formed final answer)
COMPLETIONS = [
    # the GSM8K solution style the embedded model was trained on
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72", 72, True),
    ("Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10", 10, True),
    ("She spends 3 * 4 = 12 dollars on eggs.\n#### $12", 12, True),
    ("The total is 1,200 + 600 = 1,800 dollars.\n#### 1,800", 1800, True),
    ("Each share is 36 / 2 = 18.\n#### 18.00", 18, True),
    ("The temperature fell 12 degrees below zero.\n#### -12", -12, True),
    ("#### 18 dollars", 18, False),  # a unit after the number: read, but not the `#### <number>` format
    ("#### 18\n", 18, True),
    ("#####  18", 18, True),
    # boxed answers (Qwen-Instruct style)
    ("Janet sells 16 - 3 - 4 = 9 eggs, so she makes 9 * 2 = 18 dollars.\nThe final answer is $\\boxed{18}$.", 18, True),
    ("So the answer is \\(\\boxed{\\$1,800}\\).", 1800, True),
    ("Therefore, \\boxed{18 \\text{ apples}}", 18, True),
    ("The fraction eaten is \\boxed{\\frac{3}{4}}", Fraction(3, 4), True),
    ("The change is \\boxed{-\\frac{1}{2}}", Fraction(-1, 2), True),
    ("**Final Answer:** \\(\\boxed{72}\\)", 72, True),
    ("\\boxed{3 + 4 = 7}", 7, True),  # the right-hand side of the last `=`
    ("\\boxed{x + 1}", None, False),  # an expression, not a value
    ("The answer is \\boxed{18", None, False),  # unclosed brace (cut off by the length limit)
    # "the answer is" sentences
    ("She has 5 + 13 = 18 apples. The answer is 18.", 18, False),
    ("So she needs $5 more. The answer is $5.", 5, False),
    ("Answer: **42**", 42, False),
    ("The answer is 18.5 apples.", Fraction(37, 2), False),
    ("The answer is: -3", -3, False),
    ("Total = 12 * 50 / 60 = 10 dollars. The answer is 10 dollars.", 10, False),
    ("The answer is 3 more than 4.", None, False),  # two numbers in the answer sentence: ambiguous
    ("the answer = 0.5", Fraction(1, 2), False),
    # several answers: the LAST one wins
    ("#### 18\n\nSo the answer is 18.", 18, False),
    ("The answer is 18. Wait, I forgot the tax: 18 + 2 = 20. The answer is 20.", 20, False),
    ("First guess \\boxed{18}, but recounting gives 20.\n#### 20", 20, True),
    ("#### 10\nCorrection:\n#### 12", 12, True),
    ("\\boxed{12} is wrong; the total is \\boxed{x+1}", None, False),  # the last answer is unreadable: no credit for 12
    # the last marker, the invented problem's (final_answer, after its Question/Answer prompt, reads 16: see below)
    ("#### 16\nQuestion: Tom has 3 apples. How many apples does he have?\nAnswer: #### 3", 3, True),
    # a sentence after a marked answer restates or checks it: it neither replaces nor cancels it (the GSM8K paper's
    # convention reads the marked 18, 18, 15; they were None, None, 10: a journey audit)
    ("#### 18\n\nThe answer is 18 apples, which is 6 more than 12.", 18, False),
    ("\\boxed{18}\n\nSo the answer is 18 dollars for 3 hours of work.", 18, False),
    ("#### 15\n\nTo verify the answer: 15 - 5 = 10 left.", 15, False),
    ("#### 18 (3 * 6)", 18, False),  # the working in parentheses after the marked answer
    ("#### (18)", 18, False),  # parentheses around the answer itself
    ("#### 12\nWait, I made a mistake: 3*5 = 15. The answer is 15.", 12, False),  # a correction in prose after a marker does not count
    ("The answer is 18. Then the answer is 3 more than 4.", None, False),  # no marker: the last sentence, unreadable: no credit for 18
    # no answer
    ("She has 3 apples and 5 pears, so she has 8 fruits", None, False),
    ("I don't know how to solve this.", None, False),
    ("", None, False),
    ("First find the total number of eggs: 3 * 4 = <<3*4=12>>12 eggs\nThen", None, False),  # cut off before the answer
    ("####", None, False),
    ("#### 1 1/2", None, False),  # a mixed number is ambiguous (1 and 1/2, or 11/2?)
    ("#### 1,8000", None, False),  # malformed thousands separator
    ("#### −7", -7, True),  # Unicode minus sign
    ("#### 3/4", Fraction(3, 4), True),
    ("#### 25%", 25, False),
]


@pytest.mark.parametrize("completion,expected,formatted", COMPLETIONS)
def test_answer_extraction_and_format(completion, expected, formatted):
    assert extract_answer(completion) == (None if expected is None else Fraction(expected))
    assert has_final_answer_format(completion) is formatted


def test_extraction_table_is_large_and_varied():
    assert len(COMPLETIONS) >= 30
    assert sum(e is None for _, e, _ in COMPLETIONS) >= 8 and sum(f for _, _, f in COMPLETIONS) >= 10


def test_last_number_fallback_only_without_an_answer_expression():
    assert extract_answer("She has 3 apples and 5 pears", fallback_to_last_number=True) == 5
    assert extract_answer("It costs <<48/2=24>>24", fallback_to_last_number=True) == 24
    assert extract_answer("#### 7 and then 9 more", fallback_to_last_number=True) is None  # an answer expression exists
    assert extract_answer("no numbers here", fallback_to_last_number=True) is None


@pytest.mark.parametrize(
    "text,normalised", [("72", "72"), (" 1,080 ", "1080"), ("$5", "5"), ("18.00", "18"), ("18.", "18"), ("-7", "-7"), ("0.50", "0.5"), ("3/4", "0.75"), ("1/3", "1/3"), ("109,200,000", "109200000")]
)
def test_normalize_number(text, normalised):
    assert normalize_number(text) == normalised


def test_normalize_number_refuses_what_is_not_one_number():
    for text in ("", "three", "3 or 4", "x+1"):
        with pytest.raises(ValueError, match="not a single number"):
            normalize_number(text)


def _shared_rows(split):
    with open(SHARED_GSM8K / f"{split}.jsonl") as f:
        return [json.loads(line) for line in f]


@needs_shared
def test_gold_answers_of_real_gsm8k_lines():
    train, test = _shared_rows("train"), _shared_rows("test")
    assert gold_answer(train[0]["answer"]) == "72"  # "... in April and May.\n#### 72"
    assert train[345]["answer"].endswith("#### 1,080") and gold_answer(train[345]["answer"]) == "1080"
    assert gold_answer(train[644]["answer"]) == "109200000"  # "#### 109,200,000"
    assert gold_answer(train[5715]["answer"]) == "-7"
    assert gold_answer(test[0]["answer"]) == "18" and gold_answer(test[146]["answer"]) == "2125"  # "#### 2,125"
    # Every gold answer of both splits, against an independent reading: strip commas, int().
    for row in train + test:
        assert gold_answer(row["answer"]) == str(int(row["answer"].split("####")[-1].strip().replace(",", "")))
    # The worked solution itself ends with a well-formed final answer that the correctness reward credits.
    rows = train[:200]
    correct = GSM8KCorrectness()([""] * len(rows), [r["answer"] for r in rows], answer=[r["answer"] for r in rows])
    assert correct == [1.0] * len(rows) and GSM8KFormat()([""] * len(rows), [r["answer"] for r in rows]) == [1.0] * len(rows)


def test_rewards_take_the_gold_answer_as_a_dataset_column_keyword():
    completions = ["... #### 18", "The answer is $1,800.", "\\boxed{17}", "no idea", [{"role": "assistant", "content": "#### 18"}]]
    golds = ["18", "Step 1 ... #### 1,800", "18", "18", "18.0"]  # a bare number or a whole GSM8K solution
    assert GSM8KCorrectness()(["q"] * 5, completions, answer=golds) == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert GSM8KFormat()(["q"] * 5, completions, answer=golds) == [1.0, 0.0, 1.0, 0.0, 1.0]
    with pytest.raises(KeyError, match="needs the gold answers as the dataset column 'answer'"):
        GSM8KCorrectness()(["q"], ["#### 18"], label=["18"])


def test_a_thinking_models_answer_is_read_after_its_thinking(tokenizer):
    """Found by a journey audit: with a thinking model (Qwen3-style template whose generation prompt opens <think>, and a
    response template), GSM8K's rewards and accuracy read `#### 3` written inside a thinking that never closed as the
    answer. GSM8K prompts are rendered text, so neither TRL's GRPOTrainer nor our trainers parse those completions; the
    rewards and the evaluation now read the answer after the thinking, as TRL's parse_response splits it. With
    {enable_thinking: false} the template closes the thinking in the prompt, and the whole completion is the answer."""
    from grade_trl.rewards.gsm8k import answer_text

    from .test_rewards import _thinking_tokenizer

    thinking = _thinking_tokenizer(tokenizer)
    prompt = format_prompt("1 + 2?", thinking)
    assert prompt.endswith("assistant\n<think>\n")
    completions = ["#### 3", "Three.\n</think>\n\n#### 3", "Maybe #### 3\n</think>\n\nI am not sure."]
    assert [answer_text(c, prompt, thinking) for c in completions] == ["", "#### 3", "I am not sure."]
    assert GSM8KCorrectness(tokenizer=thinking)([prompt] * 3, completions, answer=["3"] * 3) == [0.0, 1.0, 0.0]
    assert GSM8KFormat(thinking)([prompt] * 3, completions) == [0.0, 1.0, 0.0]
    assert GSM8KCorrectness()([prompt] * 3, completions, answer=["3"] * 3) == [1.0, 1.0, 1.0]  # without the tokenizer: the text, as before
    no_thinking = format_prompt("1 + 2?", thinking, chat_template_kwargs={"enable_thinking": False})
    assert GSM8KCorrectness(tokenizer=thinking)([no_thinking], ["#### 3"], answer=["3"]) == [1.0]
    # a tokenizer without a response template, and a chat completion (already parsed): the text as it is
    assert answer_text("#### 3", "Question: 1 + 2?\nAnswer:", tokenizer) == "#### 3"
    # a base model that goes on to invent the next problem: its answer is read up to it (lm-eval stops generating there);
    # the format reward reads the whole completion (going on past the answer is not the format asked for)
    from grade_trl.rewards.gsm8k import final_answer

    question = "Question: 1 + 2?\nAnswer:"
    invented = " 1 + 2 = 3\n#### 3\nQuestion: Tom has 5 apples. How many?\nAnswer: #### 5"
    assert final_answer(invented, question, tokenizer) == 3 and GSM8KCorrectness()([question], [invented], answer=["3"]) == [1.0]
    assert final_answer(invented, [{"role": "user", "content": "1 + 2?"}]) == 5  # a chat prompt: not that form, the last marker
    assert GSM8KFormat()([question], [" 1 + 2 = 3\n#### 3\nQuestion: Tom has 5 apples. And then"]) == [0.0]
    assert answer_text([{"role": "assistant", "content": "#### 3"}], [{"role": "user", "content": "1 + 2?"}], thinking) == "#### 3"


def test_majority_answer():
    f = Fraction
    assert majority_answer([f(3), f(4), f(4), None, None, None]) == 4  # None does not vote
    assert majority_answer([f(3), f(4)]) == 3  # tie: the earliest
    assert majority_answer([None, None]) is None


def test_prompts_with_and_without_a_chat_template(tokenizer):
    question = "Tom has 3 apples and buys 5 more. How many apples does he have?"
    assert format_prompt(question, tokenizer) == f"Question: {question}\nAnswer:"  # the embedded model's training form
    chat = _chat_tokenizer()
    prompt = format_prompt(question, chat)
    assert prompt.startswith(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>") and question in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert "####" in SYSTEM_PROMPT and "\\boxed" in SYSTEM_PROMPT


def test_embedded_sample_splits_and_long_prompts_are_dropped(tokenizer):
    raw_test = load_gsm8k("embedded", "test")
    assert len(load_gsm8k("embedded", "train")) == 1000 and len(raw_test) == 200
    splits, info = make_gsm8k_splits("embedded", tokenizer, max_prompt_length=128, eval_num_problems=10, test_num_problems=None)
    assert set(splits["train"].column_names) == {"prompt", "answer", "question"}
    assert len(splits["validation"]) == 10 and len(splits["test"]) == 200 - info["dropped_long_prompts"]["test"]
    assert splits["validation"]["prompt"] == splits["test"]["prompt"][:10]  # the first test problems, in file order
    assert splits["test"]["answer"][0] == gold_answer(raw_test[0]["answer"]) == "18"
    assert all(len(tokenizer(p)["input_ids"]) <= 128 for p in splits["train"]["prompt"])
    assert 0 < info["dropped_long_prompts"]["train"] < 50  # ~2% of questions are longer than 128 tokens
    with pytest.raises(UserError, match="max_prompt_length: 8 tokens fit no GSM8K train prompt"):
        make_gsm8k_splits("embedded", tokenizer, max_prompt_length=8, eval_num_problems=10, test_num_problems=None)


def test_more_problems_asked_than_the_test_data_has_is_said(tokenizer, caplog):
    """eval_num_problems 300 on the 200-problem sample validates on the problems there are, and says so (it was silent)."""
    with caplog.at_level("WARNING"):
        splits, _ = make_gsm8k_splits("embedded", tokenizer, max_prompt_length=128, eval_num_problems=300, test_num_problems=None)
    n = len(splits["test"])
    assert len(splits["validation"]) == n < 300
    assert any(r.getMessage() == f"GSM8K eval_num_problems: 300 asked, but embedded has {n} test problems that fit: using {n}" for r in caplog.records)


def test_test_repeats_and_train_questions_the_test_has_are_dropped(tmp_path, tokenizer, caplog):
    rows = {"train": [{"question": f"Tom has {i} apples. How many?", "answer": f"#### {i}"} for i in range(30)],
            "test": [{"question": f"Ann has {i} pears. How many?", "answer": f"#### {i}"} for i in range(10)]}
    rows["test"] += [rows["test"][3], {"question": "TOM has 7 apples.   How many?", "answer": "#### 7"}]  # a repeat; a train question
    for name, items in rows.items():
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in items)
    with caplog.at_level("WARNING", logger="grade_trl.data.gsm8k"):
        splits, _ = make_gsm8k_splits(str(tmp_path), tokenizer, max_prompt_length=None, eval_num_problems=5, test_num_problems=None)
    assert splits["test"]["question"] == [r["question"] for r in rows["test"][:10]] + ["TOM has 7 apples.   How many?"]  # the benchmark keeps its order
    assert "Tom has 7 apples. How many?" not in splits["train"]["question"] and len(splits["train"]) == 29
    assert [r.getMessage() for r in caplog.records] == ["GSM8K: dropped 1 repeated test problems and 1 train problems that the test has (case and whitespace ignored)"]


@needs_shared
def test_local_folder_loads_like_the_hub():
    train = load_gsm8k(str(SHARED_GSM8K), "train")
    assert len(train) == 7473 and {"question", "answer"} <= set(train.column_names)


def test_evaluator_accuracy_is_the_correctness_reward_of_greedy_completions(policy, tokenizer):
    splits, _ = make_gsm8k_splits("embedded", tokenizer, max_prompt_length=128, eval_num_problems=6, test_num_problems=6)
    # Problem 2 gets a gold answer equal to what the model says greedily, so accuracy cannot be 0 by construction.
    settings = GenerationSettings(max_new_tokens=64, min_new_tokens=0, temperature=1.0, top_p=1.0, max_prompt_length=128)
    rewards = [GSM8KCorrectness(), GSM8KFormat()]
    evaluator = GSM8KEvaluator({"validation": splits["validation"], "test": splits["test"]}, rewards, settings, weights=[1.0, 0.5], pass_k=3)
    first = evaluator.evaluate(policy, tokenizer, "validation", seed=0)
    samples = first["samples"]
    said = [s["extracted"] for s in samples]
    index = next(i for i, value in enumerate(said) if value is not None)
    answers = list(splits["validation"]["answer"])
    answers[index] = said[index]
    evaluator.problems["validation"] = splits["validation"].remove_columns("answer").add_column("answer", answers)
    result = evaluator.evaluate(policy, tokenizer, "validation", seed=0)
    metrics, samples = result["metrics"], result["samples"]
    assert [s["completion"] for s in samples] == [s["completion"] for s in first["samples"]]  # greedy: reproducible
    completions = [s["completion"] for s in samples]
    correct = GSM8KCorrectness()(None, completions, answer=answers)
    fmt = GSM8KFormat()(None, completions)
    assert metrics["accuracy"] == pytest.approx(sum(correct) / 6) and metrics["accuracy"] >= 1 / 6
    assert metrics["format_reward"] == pytest.approx(sum(fmt) / 6)
    assert metrics["reward"] == pytest.approx(sum(c + 0.5 * f for c, f in zip(correct, fmt)) / 6)
    assert metrics["accuracy_flexible"] >= metrics["accuracy"]
    assert 0 <= metrics["maj_at_3"] <= metrics["pass_at_3"] <= 1 and set(metrics) >= {"completion_length", "reward_std"}
    assert evaluator.primary == "accuracy"


def test_rewards_run_unchanged_in_trl_grpo(tmp_path, tokenizer):
    """TRL passes the `answer` column to both rewards as a keyword; the correctness reward raises without it."""
    from trl import GRPOConfig, GRPOTrainer

    from grade_trl.models import load_causal_lm

    dataset, _ = prompt_dataset(load_gsm8k("embedded", "train").select(range(16)), tokenizer, max_prompt_length=128)
    args = GRPOConfig(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
        logging_steps=1, use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none", disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=load_causal_lm("embedded"), reward_funcs=[GSM8KCorrectness(), GSM8KFormat()], args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    log = trainer.state.log_history[0]
    assert {"rewards/gsm8k_correctness/mean", "rewards/gsm8k_format/mean"} <= set(log)


def answer_matches_prompt(prompts, completions, answer, **kwargs):
    """1 for each completion whose `answer` keyword is the one of its own prompt (prompt `n + 1 = ?`, answer n + 1)."""
    return [float(int(p.split()[0]) + 1 == int(a)) for p, a in zip(prompts, answer)]


@pytest.mark.parametrize("method", ["reinforce", "ppo"])
def test_our_trainers_pass_extra_columns_aligned_with_their_completions(tmp_path, method):
    from grade_trl.trainers import (
        PPOConfig,
        PPOTrainer,
        REINFORCEConfig,
        REINFORCETrainer,
    )

    dataset = Dataset.from_dict({"prompt": [f"{n} + 1 =" for n in range(8)], "answer": [str(n + 1) for n in range(8)]})
    common = dict(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, gradient_accumulation_steps=1, max_new_tokens=4, min_new_tokens=1, logging_steps=1, use_cpu=True)
    if method == "reinforce":
        trainer_cls, args = REINFORCETrainer, REINFORCEConfig(**common, num_samples_per_prompt=2, baseline="leave_one_out")
    else:
        trainer_cls, args = PPOTrainer, PPOConfig(**common, num_mini_batches=1, ppo_epochs=1)
    trainer = trainer_cls(model="embedded", reward_funcs=[answer_matches_prompt], args=args, train_dataset=dataset)
    trainer.train()
    assert trainer.state.log_history[0]["rewards/answer_matches_prompt/mean"] == 1.0


def _gsm8k_rows(n, **change):
    return [{"question": f"Tom has {k} apples and buys {k + 1} more. How many apples has he now?", "answer": f"{k} + {k + 1} = {2 * k + 1}\n#### {2 * k + 1}", **change}
            for k in range(n)]


def _jsonl_text(rows):
    return "".join(json.dumps(row) + "\n" for row in rows)


GOOD_TEST = _jsonl_text(_gsm8k_rows(20))
# (name, {file: text} of the data folder (or one file, "FILE"), the error's end): each was found by a GSM8K journey audit
GSM8K_DATA_CASES = [
    ("answers stored as numbers", {"train.jsonl": _jsonl_text([dict(r, answer=7) for r in _gsm8k_rows(30)]), "test.jsonl": GOOD_TEST},
     "GSM8K train row 1 of '{data}' has answer 7; every `answer` must be text, as in the hub's openai/gsm8k"),  # an AttributeError traceback, exit 1
    ("a null question", {"train.jsonl": _jsonl_text(_gsm8k_rows(30)[:3] + [dict(_gsm8k_rows(1)[0], question=None)]), "test.jsonl": GOOD_TEST},
     "GSM8K train row 4 of '{data}' has question None; every `question` must be text, as in the hub's openai/gsm8k"),
    ("an answer without its number", {"train.jsonl": _jsonl_text(_gsm8k_rows(30)), "test.jsonl": _jsonl_text([dict(r, answer="He has some apples.") for r in _gsm8k_rows(5)])},
     "GSM8K test row 1 of '{data}': its answer neither ends with `#### <number>` nor is a number (it ends 'He has some apples.')"),
    ("a line that is not JSON", {"train.jsonl": _jsonl_text(_gsm8k_rows(30)) + '{"question": "cut short", "ans\n', "test.jsonl": GOOD_TEST},
     "cannot read {data}/train.jsonl as json: line 31 is not JSON: Invalid control character at column 31"),  # 3 lines, no line number
    ("one file for both splits", {"FILE": GOOD_TEST}, "{data} is one file; GSM8K needs its train and test splits: give a folder holding train.jsonl "
     "and test.jsonl (or .jsonl.gz / .parquet), a hub id, or `embedded`"),  # blamed max_prompt_length: every train problem was a test one
    ("train and test the same problems", {"train.jsonl": GOOD_TEST, "test.jsonl": GOOD_TEST}, "every GSM8K train problem of '{data}' is also one of its "
     "test problems (the test keeps them); give train and test files of different problems"),
]


@pytest.mark.parametrize("name,files,end", GSM8K_DATA_CASES, ids=[c[0] for c in GSM8K_DATA_CASES])
def test_bad_gsm8k_data_is_one_line_naming_dataset_name_exit_2_nothing_written(tmp_path, capfd, name, files, end):
    data = tmp_path / "data.jsonl" if "FILE" in files else tmp_path / "data"
    if "FILE" in files:
        data.write_text(files["FILE"])
    else:
        data.mkdir()
        for file_name, text in files.items():
            (data / file_name).write_text(text)
    out = tmp_path / "run"
    assert main([str(REPO / "recipes" / "tiny" / "gsm8k_grpo.yaml"), "--dataset_name", str(data), "--output_dir", str(out)]) == 2
    err = capfd.readouterr().err.strip().splitlines()  # the file descriptor: datasets' own log handler writes there
    assert err == [f"error: dataset_name: cannot load {str(data)!r}: " + end.replace("{data}", str(data))], err
    assert not out.exists()


def test_grade_is_refused_on_gsm8k_in_one_line(capsys):
    for method in [name for name, m in METHODS.items() if m.relaxed]:
        with pytest.raises(RecipeError, match=f"method '{method}' cannot train task 'gsm8k': GRADE needs a differentiable reward.*use reinforce, ppo, grpo or cispo"):
            build_recipe({"method": method, "task": "gsm8k"})
    # Even from a GRPO recipe, whose keys GRADE does not know: the task is the reason, so it is named first.
    assert main([str(REPO / "recipes" / "tiny" / "gsm8k_grpo.yaml"), "--method", "grade_ste"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: method 'grade_ste' cannot train task 'gsm8k': GRADE needs a differentiable reward")


def test_task_defaults_fill_only_what_the_recipe_leaves_out():
    recipe = build_recipe({"method": "grpo", "task": "gsm8k", "output_dir": "unused"})
    assert recipe.run.dataset_name == "openai/gsm8k" and recipe.run.max_prompt_length == 512
    recipe = build_recipe({"method": "reinforce", "task": "gsm8k", "output_dir": "unused", "max_prompt_length": 128, "dataset_name": "embedded"})
    assert (recipe.run.max_prompt_length, recipe.config.max_prompt_length, recipe.run.dataset_name) == (128, 128, "embedded")
    assert recipe.config.remove_unused_columns is False  # extra columns reach the rewards
    assert "max_prompt_length" not in build_recipe({"method": "grpo", "task": "gsm8k", "output_dir": "unused"}).raw  # raw = as written


# ---- the full-size recipes: valid, and built up to model loading with a stand-in of the same family ----------------


def _chat_tokenizer():
    """The real GPT-2 tokenizer (../shared) with ChatML special tokens and a Qwen2.5-style chat template."""
    if not SHARED_GPT2.exists():
        pytest.skip("../shared/tokenizers/gpt2 is not here (the shared tokenizers of the project)")
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(str(SHARED_GPT2))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
    tok.chat_template = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    return tok


@pytest.fixture(scope="module")
def qwen2_standin(tmp_path_factory):
    """A 2-layer, 64-wide random Qwen2ForCausalLM with the GPT-2 vocabulary and a chat template, saved like a hub model."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = _chat_tokenizer()
    path = tmp_path_factory.mktemp("qwen2-standin")
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    Qwen2ForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_full_cispo_recipe_is_the_background_run():
    values = load_recipe_file(str(REPO / "recipes" / "gsm8k_cispo.yaml"))
    assert values["model_name_or_path"] == "Qwen/Qwen2.5-0.5B-Instruct"
    recipe = build_recipe({**values, "bf16": False})  # bf16 autocast is for the GPU the recipe is written for
    run, config = recipe.run, recipe.config
    assert (run.method, run.task, run.eval_num_problems, run.test_num_problems) == ("cispo", "gsm8k", 500, None)
    assert (config.learning_rate, config.max_steps, config.eval_steps, config.temperature, config.max_grad_norm) == (1e-5, 500, 100, 1.0, 1.0)
    assert (config.loss_type, config.scale_rewards, config.epsilon_high) == ("cispo", "none", 5.0)
    assert "epsilon_high" in values  # set explicitly, never TRL's silent fallback to epsilon


@pytest.mark.parametrize("name", ["gsm8k_cispo", "gsm8k_grpo", "gsm8k_reinforce"])
def test_full_recipes_build_up_to_model_loading_with_a_qwen2_standin(name, qwen2_standin, tmp_path):
    if not SHARED_GSM8K.exists():
        pytest.skip("../shared/data/gsm8k is not here (the shared data of the project)")
    from grade_trl.build import build_trainer
    from grade_trl.tasks import TASK_BUILDERS

    values = load_recipe_file(str(REPO / "recipes" / f"{name}.yaml"))
    # Only what cannot run here changes: the model (no hub), the data (local copy), bf16 (CPU), the output folder.
    values.update(model_name_or_path=str(qwen2_standin), dataset_name=str(SHARED_GSM8K), bf16=False, output_dir=str(tmp_path), eval_num_problems=4, test_num_problems=4)
    recipe = build_recipe(values)
    run, config = recipe.run, recipe.config
    tokenizer = load_tokenizer(run.model_name_or_path)
    max_new, min_new = config.new_token_limits
    settings = GenerationSettings(max_new_tokens=max_new, min_new_tokens=min_new, max_prompt_length=run.max_prompt_length)
    task = TASK_BUILDERS[run.task](run, tokenizer, config.seed, settings, config.reward_weights)
    assert task.info["dropped_long_prompts"] == {"train": 0, "test": 0}  # max_prompt_length 512 keeps every problem
    assert len(task.train_dataset) == 7473 and task.train_dataset[0]["prompt"].startswith("<|im_start|>system\n")
    trainer = build_trainer(recipe, task, tokenizer)
    assert type(trainer.accelerator.unwrap_model(trainer.model)).__name__ == "Qwen2ForCausalLM"
    assert len(trainer.reward_funcs) == 2 and max_new == 512


# ---- end to end ------------------------------------------------------------------------------------------------------


def shrunk(tmp_path, recipe, name="run", **extra):
    overrides = {
        "output_dir": tmp_path / name, "max_steps": 4, "eval_steps": 2, "logging_steps": 2, "eval_num_problems": 8, "test_num_problems": 8,
        "disable_tqdm": "true", **extra,
    }
    return [str(REPO / "recipes" / "tiny" / recipe)] + [item for key, value in overrides.items() for item in (f"--{key}", str(value))]


@pytest.mark.parametrize("recipe", ["gsm8k_grpo.yaml", "gsm8k_reinforce.yaml"])
def test_tiny_recipe_end_to_end(tmp_path, recipe):
    assert main(shrunk(tmp_path, recipe)) == 0
    with open(tmp_path / "run" / "results.json") as f:
        results = json.load(f)
    history, final = results["history"], results["final"]
    assert [h["step"] for h in history if "eval_accuracy" in h] == [0, 2, 4]
    evals = [h for h in history if "eval_accuracy" in h]
    assert all(0 <= h["eval_accuracy"] <= h["eval_accuracy_flexible"] <= 1 and 0 <= h["eval_format_reward"] <= 1 for h in evals)
    train_logs = [h for h in history if "rewards/gsm8k_format/mean" in h]
    assert [h["step"] for h in train_logs] == [2, 4] and all("rewards/gsm8k_correctness/mean" in h for h in train_logs)
    assert final["validation_metric"] == "eval_accuracy" and final["task"]["split_sizes"]["validation"] == 8
    for h in evals:  # the recipe's reward_weights [1.0, 0.5]
        assert h["eval_reward"] == pytest.approx(h["eval_accuracy"] + 0.5 * h["eval_format_reward"])
    test = final["test"]["final"]
    assert len(test["corrects"]) == 8 and test["metrics"]["accuracy"] == pytest.approx(sum(test["corrects"]) / 8)
    # what was scored is kept, so a score can be checked by hand: the completion and the answer read from it
    assert len(test["completions"]) == len(test["extracted_answers"]) == 8
    for completion, extracted, correct in zip(test["completions"], test["extracted_answers"], test["corrects"]):
        predicted = extract_answer(completion)
        assert extracted == (None if predicted is None else str(predicted)) and (extracted is not None or correct == 0.0)
    trained = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    base = load_file(os.path.join(resolve_model_path("embedded"), "model.safetensors"))
    key = "transformer.h.0.attn.c_attn.weight"
    assert not torch.allclose(trained[key].float(), base[key].float())  # the format reward moved the policy
    for folder in ("model", "best_model"):  # TRL's GRPO trainer and ours: weights readable as config.json is (not 0600)
        mode = lambda name: (tmp_path / "run" / folder / name).stat().st_mode & 0o777  # noqa: E731
        assert mode("model.safetensors") == mode("config.json"), folder


def test_tiny_recipe_on_two_cpu_processes(tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--config_file", str(REPO / "accelerate_configs" / "cpu.yaml"), "-m", "grade_trl.run"]
    result = subprocess.run(cmd + shrunk(tmp_path, "gsm8k_grpo.yaml", max_steps=2, max_completion_length=16), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "run" / "results.json") as f:
        results = json.load(f)
    final = results["final"]
    assert final["num_processes"] == 2 and final["steps"] == 2
    # Problems are sharded over the two processes and gathered back in order: 8 problems, each once.
    assert len(final["test"]["final"]["prompts"]) == 8 == len(set(final["test"]["final"]["prompts"]))
    assert [h["step"] for h in results["history"] if "eval_accuracy" in h] == [0, 2]
