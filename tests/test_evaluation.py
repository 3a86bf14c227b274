"""The evaluation protocol: diversity metrics, the gold judges, best checkpoint and early stopping."""

import logging
import math
import random
import warnings

import pytest
import torch

from grade_trl.evaluation import bleu, distinct_n, self_bleu
from grade_trl.models import resolve_model_path
from grade_trl.rewards.judge import ClassifierJudge, TfidfJudge
from grade_trl.run import main
from .test_run_e2e import load_results, shrunk


def test_distinct_n_counts_over_the_whole_set():
    # unigrams a b a b c: 3 distinct of 5; bigrams (a b) (b a) (b c): 3 of 3
    assert distinct_n(["a b a", "B c"], 1) == pytest.approx(3 / 5)
    assert distinct_n(["a b a", "B c"], 2) == pytest.approx(1.0)
    assert distinct_n(["", ""], 1) == 0.0


def test_bleu_against_a_hand_computed_value():
    hypothesis, reference = "the cat sat on the mat".split(), "the cat is on the mat".split()
    # clipped precisions 5/6, (3+1)/(5+1), (1+1)/(4+1), (0+1)/(3+1); equal lengths so no brevity penalty
    expected = (5 / 6 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25
    assert bleu(hypothesis, [reference]) == pytest.approx(expected)
    assert bleu(reference, [reference]) == pytest.approx(1.0)
    # brevity penalty exp(1 - r/c) for a hypothesis shorter than its reference; a 2-word text has no 3- or 4-grams:
    # p_3 = p_4 = (0 + 1) / (max(1, 0) + 1) = 1/2
    assert bleu("the cat".split(), [reference]) == pytest.approx(math.exp(1 - 6 / 2) * (1 * 1 * 0.5 * 0.5) ** 0.25)


def test_bleu_and_self_bleu_equal_nltk_with_smoothing_method2():
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    rng, vocabulary = random.Random(0), "the a film movie was good bad great plot acting it is".split()
    texts = [" ".join(rng.choice(vocabulary) for _ in range(rng.randint(1, 12))) for _ in range(40)]  # short texts included
    method2 = SmoothingFunction().method2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NLTK warns about zero n-gram counts; the values are what is compared
        for i, text in enumerate(texts):
            others = [t.split() for j, t in enumerate(texts[:8]) if j != i]
            assert bleu(text.split(), others) == pytest.approx(sentence_bleu(others, text.split(), smoothing_function=method2), abs=1e-12), text
        nltk_self = sum(sentence_bleu([t.split() for t in texts[:j] + texts[j + 1 :]], texts[j].split(), smoothing_function=method2) for j in range(len(texts))) / len(texts)
    assert self_bleu(texts) == pytest.approx(nltk_self, abs=1e-12)
    assert bleu(["great"], [["great"]]) == pytest.approx(0.5 ** 0.75)  # the short-text case of the docstring


def test_self_bleu_is_one_for_copies_and_low_for_disjoint_texts():
    assert self_bleu(["a b c d e"] * 3) == pytest.approx(1.0)
    assert self_bleu(["a b c d e", "f g h i j", "k l m n o"]) == 0.0


def test_the_gold_judge_says_what_it_fits_and_scores(caplog):
    caplog.set_level(logging.INFO, logger="grade_trl")
    judge = TfidfJudge.fit(["good good film", "bad film", "good", "bad"], [1, 0, 1, 0], min_df=1)
    judge.accuracy(["good", "bad", "film"], [1, 0, 1])
    assert "gold judge: fitting TF-IDF + logistic regression on 4 reviews ..." in caplog.text
    assert "gold judge: scoring 3 labelled reviews for its accuracy ..." in caplog.text


def test_tfidf_features_follow_the_formula():
    judge = TfidfJudge.fit(["good good film", "bad film"], [1, 0], min_df=1)
    idf_rare, idf_film = math.log(3 / 2) + 1, 1.0  # log((1 + n) / (1 + df)) + 1 with n = 2
    row = judge.features(["good good film"]).toarray()[0]
    raw = {"good": (1 + math.log(2)) * idf_rare, "film": idf_film, "good good": idf_rare, "good film": idf_rare}
    norm = math.sqrt(sum(v * v for v in raw.values()))
    for gram, value in raw.items():
        assert row[judge.vocabulary[gram]] == pytest.approx(value / norm, rel=1e-9)
    assert row[judge.vocabulary["bad"]] == 0 and judge.converged


def test_tfidf_judge_minimises_the_documented_objective():
    # At the optimum of mean logistic loss + l2/2 ||w||^2 (intercept unpenalised) the gradient vanishes:
    # X^T (p - y) / n + l2 w = 0 and sum(p - y) = 0. A judge fitted to a tolerance must satisfy both.
    from grade_trl.data.imdb import load_imdb

    train = load_imdb("embedded", "train").shuffle(seed=0).select(range(400))  # the file is sorted by label
    judge = TfidfJudge.fit(train["text"], train["label"], l2=1e-2)
    X, y = judge.features(train["text"]), torch.tensor(train["label"], dtype=torch.float64).numpy()
    p = judge.classifier.predict_proba(X)[:, judge.positive]
    w = judge.classifier.coef_[0]
    gradient = X.T @ (p - y) / len(y) + 1e-2 * w
    assert judge.converged and abs(gradient).max() < 1e-4 * abs(w).max() + 1e-6 and abs((p - y).sum()) / len(y) < 1e-4


def test_tfidf_judge_separates_imdb_sentiment():
    from grade_trl.data.imdb import load_imdb

    train, test = load_imdb("embedded", "train"), load_imdb("embedded", "test")
    judge = TfidfJudge.fit(train["text"], train["label"])
    assert judge.accuracy(test["text"][:500], test["label"][:500]) > 0.8
    good, bad = judge([""] * 2, ["a wonderful, moving film with brilliant acting", "a boring, awful waste of time"])
    assert good > 0.8 and bad < 0.2


def test_a_fitted_tfidf_judge_is_read_back_from_the_disk_cache_for_the_same_fit_only(tmp_path, monkeypatch, caplog):
    """`fitted_tfidf_judge` keeps the fit in GRADE_TRL_CACHE: the second call reads it (said in the log) and predicts
    exactly as the fit does; other test reviews (another seed's) share the fit, other train labels are another fit;
    `none` keeps nothing; an unwritable folder warns and fits; `~` is the home folder; an entry that cannot be read
    is fitted again."""
    from grade_trl.rewards.judge import fitted_tfidf_judge

    caplog.set_level(logging.INFO, logger="grade_trl")
    train = ["good good film", "bad film", "good", "bad", "great fun", "awful boring"]
    labels, test, test_labels = [1, 0, 1, 0, 1, 0], ["good fun", "bad boring", "film"], [1, 0, 1]
    probe = ["a good film", "a bad film"]
    reference = TfidfJudge.fit(train, labels)
    monkeypatch.setenv("GRADE_TRL_CACHE", str(tmp_path / "cache"))
    first = fitted_tfidf_judge(train, labels)
    assert "from the cache" not in caplog.text and first.probabilities(probe) == reference.probabilities(probe)
    assert first.accuracy(test, test_labels) == reference.accuracy(test, test_labels)
    caplog.clear()
    again = fitted_tfidf_judge(train, labels)
    assert "gold judge: the TF-IDF fit on these 6 reviews read from the cache in" in caplog.text and "fitting TF-IDF" not in caplog.text
    assert again.probabilities(probe) == reference.probabilities(probe) and again.accuracy(test, test_labels) == first.accuracy(test, test_labels)
    caplog.clear()
    other_test = fitted_tfidf_judge(train, labels)  # another seed's run: its test reviews are no part of the fit
    assert "read from the cache" in caplog.text and other_test.accuracy(["bad fun", "good"], [0, 1]) == reference.accuracy(["bad fun", "good"], [0, 1])
    caplog.clear()
    other = fitted_tfidf_judge(train, [0, 1, 0, 1, 0, 1])  # the labels are part of the key
    assert "fitting TF-IDF" in caplog.text and other.probabilities(probe) != reference.probabilities(probe)
    entries = sorted((tmp_path / "cache").rglob("output.pkl"))
    assert len(entries) == 2
    for entry in entries:  # a damaged entry (a full disk, a killed write) is fitted again
        entry.write_bytes(b"not a pickle")
    caplog.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # joblib's own warning about the entry it could not read
        again = fitted_tfidf_judge(train, labels)
    assert "fitting TF-IDF" in caplog.text and again.probabilities(probe) == reference.probabilities(probe)

    monkeypatch.chdir(tmp_path)  # `none` is no folder, here or anywhere
    monkeypatch.setenv("GRADE_TRL_CACHE", "none")
    fitted_tfidf_judge(train, labels)
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("GRADE_TRL_CACHE", str(tmp_path / "file" / "cache"))  # cannot be made
    caplog.clear()
    assert fitted_tfidf_judge(train, labels).probabilities(probe) == reference.probabilities(probe)
    assert "gold judge: no cache (" in caplog.text and "set GRADE_TRL_CACHE to a writable folder" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "file"]
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GRADE_TRL_CACHE", "~/judges")  # as a shell would expand it, not a folder named ~ here
    fitted_tfidf_judge(train, labels)
    assert (tmp_path / "home" / "judges").is_dir() and not (tmp_path / "~").exists()


@pytest.mark.parametrize("labels,positive", [({0: "NEGATIVE", 1: "POSITIVE"}, 1), ({0: "pos", 1: "neg"}, 0), ({0: "LABEL_0", 1: "LABEL_1"}, 1)])
def test_classifier_judge_reads_a_local_sequence_classifier(tmp_path, labels, positive):
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("embedded"))
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, num_labels=2, id2label=labels, label2id={v: k for k, v in labels.items()})
    torch.manual_seed(0)
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    judge = ClassifierJudge(str(tmp_path), device="cpu")
    assert judge.positive == positive
    texts = ["a fine film", "bad"]
    enc = judge.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = judge.model(**enc).logits.softmax(-1)[:, positive].tolist()
    assert judge(["", ""], texts) == pytest.approx(expected, abs=1e-6)


def test_classifier_judge_refuses_an_unreadable_label_set(tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("embedded"))
    labels = {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, num_labels=3, id2label=labels)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="positive label"):
        ClassifierJudge(str(tmp_path), device="cpu")


def test_evaluation_metrics_best_checkpoint_and_test_of_both(tmp_path):
    """Every evaluation logs the protocol's metrics; best_model/ holds the best step's weights; both are tested."""
    assert main(shrunk(tmp_path, max_steps=4, eval_steps=1, learning_rate=3e-3)) == 0
    results = load_results(tmp_path / "run" / "results.json")
    evaluations = [h for h in results["history"] if "eval_reward" in h]
    assert [h["step"] for h in evaluations] == [0, 1, 2, 3, 4]
    for key in ("eval_reward_std", "eval_gold_reward", "eval_best_of_n_reward", "eval_distinct_1", "eval_distinct_2", "eval_self_bleu", "eval_completion_length", "eval_wall_seconds", "eval_train_seconds"):
        assert all(math.isfinite(h[key]) for h in evaluations), key
    assert all(h["eval_best_of_n_reward"] >= h["eval_reward"] for h in evaluations)  # the first of the N samples is the plain one
    best = max(evaluations, key=lambda h: h["eval_reward"])
    final = results["final"]
    assert final["best_validation_step"] == best["step"] and final["best_validation"] == best["eval_reward"]
    assert evaluations[-1]["eval_best_reward"] == best["eval_reward"]
    assert set(final["test"]) == {"final", "best"} and len(final["test"]["best"]["rewards"]) == 6
    assert final["samples_per_step"] == 8 and final["peak_memory_mb"] > 0
    assert 0 <= final["test"]["final"]["metrics"]["gold_reward"] <= 1 and 0.5 < final["task"]["gold_judge_test_accuracy"] <= 1

    # best_model/ re-evaluated with the same protocol gives the best validation reward again
    from grade_trl.evaluation import GenerationSettings, RewardEvaluator
    from grade_trl.models import load_causal_lm, load_tokenizer
    from grade_trl.tasks import build_imdb_sentiment
    from grade_trl.recipe import parse_recipe

    recipe = parse_recipe(shrunk(tmp_path, max_steps=4, eval_steps=1))
    tokenizer = load_tokenizer("embedded")
    settings = GenerationSettings(max_new_tokens=8, min_new_tokens=2)
    task = build_imdb_sentiment(recipe.run, tokenizer, recipe.config.seed, settings)
    evaluator = RewardEvaluator(task.evaluator.prompts, task.reward_funcs, settings, best_of_n=1)
    model = load_causal_lm(str(tmp_path / "run" / "best_model"))
    again = evaluator.evaluate(model, tokenizer, "validation", seed=recipe.run.eval_seed)
    assert again["metrics"]["reward"] == pytest.approx(best["eval_reward"], abs=1e-5)


def test_early_stopping_stops_after_patience_evaluations_without_improvement(tmp_path):
    # learning rate 0: the policy never changes, so no evaluation beats step 0's (same prompts, same seed)
    assert main(shrunk(tmp_path, max_steps=8, eval_steps=2, learning_rate=0.0, early_stopping_patience=2)) == 0
    final = load_results(tmp_path / "run" / "results.json")["final"]
    assert final["stopped_early"] and final["steps"] == 4 and final["best_validation_step"] == 0
    assert final["test"]["best"]["rewards"] == final["test"]["final"]["rewards"]
