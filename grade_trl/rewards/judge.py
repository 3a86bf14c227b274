"""Independent sentiment judges: a second opinion on completions, never trained on.

The learned reward (`SentimentReward`) is the proxy the policy optimises; a policy can find text
it scores highly without being positive (reward hacking). A judge of a different family scores
the same generations as `gold_reward`, so a rising proxy with a falling gold exposes it.

- `TfidfJudge` (offline default): scikit-learn's TF-IDF over word unigrams and bigrams + logistic
  regression, trained on IMDB train reviews; a bag of words, no shared weights or tokenizer with the policy.
- `ClassifierJudge`: any sequence classifier from the hub or a local folder, e.g. the literature's
  `siebert/sentiment-roberta-large-english` or `lvwerra/distilbert-imdb` (DPO paper, TRL's
  sentiment example), so numbers compare with theirs.

Both are TRL reward callables returning P(positive), the same scale as `SentimentReward`.

A fitted `TfidfJudge` is kept on disk between runs (`fitted_tfidf_judge`, joblib's `Memory`): on the full
IMDB train set the fit takes about 30 s of one CPU core in every run and every process of a launch, the
same fit each time.
"""

from __future__ import annotations

import inspect
import logging
import os
import warnings

import torch

from .base import completion_text

logger = logging.getLogger(__name__)


class Judge:
    """A TRL reward callable scoring completions by P(positive); subclasses define `probabilities(texts)`."""

    test_accuracy: float | None = None  # accuracy on IMDB test reviews, set by whoever built the judge

    def probabilities(self, texts: list[str]) -> list[float]:
        raise NotImplementedError

    def accuracy(self, texts: list[str], labels: list[int]) -> float:
        logger.info("gold judge: scoring %d labelled reviews for its accuracy ...", len(texts))
        predictions = [p > 0.5 for p in self.probabilities(texts)]
        return sum(int(p) == int(y) for p, y in zip(predictions, labels)) / len(labels)

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        return self.probabilities([completion_text(c) for c in completions])


class TfidfJudge(Judge):
    """P(positive | text) from scikit-learn: `TfidfVectorizer` + `LogisticRegression`.

    Features: word unigrams and bigrams (tokens `[a-z0-9']+` of the lower-cased text) seen in at least
    `min_df` training reviews, the `max_features` most frequent; tf-idf = (1 + log tf) * idf with
    idf = log((1 + n) / (1 + df)) + 1, rows L2-normalised (scikit-learn's `sublinear_tf`, `smooth_idf`).
    Weights: L2-regularised logistic regression (lbfgs) minimising the mean logistic loss + l2/2 ||w||^2,
    i.e. scikit-learn's C = 1 / (l2 n); the intercept is not penalised. Ours are only these settings and the
    convergence check: `converged` is False (and a warning logged) when lbfgs stopped at `max_iter`.
    """

    __name__ = "tfidf_judge"

    def __init__(self, vectorizer, classifier, converged: bool = True):
        self.vectorizer, self.classifier, self.converged = vectorizer, classifier, converged
        self.positive = list(classifier.classes_).index(1)

    @classmethod
    def fit(cls, texts: list[str], labels: list[int], min_df: int = 2, max_features: int = 50_000, l2: float = 1e-4, max_iter: int = 1000) -> TfidfJudge:
        import numpy as np
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        logger.info("gold judge: fitting TF-IDF + logistic regression on %d reviews ...", len(texts))
        vectorizer = TfidfVectorizer(lowercase=True, token_pattern=r"[a-z0-9']+", ngram_range=(1, 2), min_df=min_df, max_features=max_features,
                                     sublinear_tf=True, smooth_idf=True, norm="l2", dtype=np.float64)
        features = vectorizer.fit_transform(texts)
        classifier = LogisticRegression(C=1.0 / (l2 * len(texts)), solver="lbfgs", max_iter=max_iter, tol=1e-6)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            classifier.fit(features, list(labels))
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        if not converged:
            logger.warning("gold judge: logistic regression did not converge in %d lbfgs iterations; raise max_iter", max_iter)
        return cls(vectorizer, classifier, converged)

    def features(self, texts: list[str]):
        """Sparse N x V tf-idf matrix (scipy CSR), rows L2-normalised."""
        return self.vectorizer.transform(texts)

    @property
    def vocabulary(self) -> dict[str, int]:
        return self.vectorizer.vocabulary_

    def probabilities(self, texts: list[str]) -> list[float]:
        return self.classifier.predict_proba(self.features(texts))[:, self.positive].tolist()


CACHE_ENV = "GRADE_TRL_CACHE"


def cache_folder() -> str | None:
    """Where fitted judges are kept between runs: `$GRADE_TRL_CACHE`, else `$XDG_CACHE_HOME/grade_trl`, else
    `~/.cache/grade_trl`; `GRADE_TRL_CACHE=none` (or empty) keeps nothing. None also when the folder cannot be made
    or written (a warning: a run never fails for its cache). The folder is made when a run builds its judge: after
    the recipe's checks (a refused recipe writes nothing there), before the set-up's later ones (a tracker that cannot
    start finds it made, as it finds a trained reward head)."""
    folder = os.environ.get(CACHE_ENV)
    if folder is None:
        folder = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "grade_trl")
    if folder.strip().lower() in ("", "none", "off", "0", "false"):
        return None
    folder = os.path.abspath(os.path.expanduser(folder))  # `~/x` as a shell would; a relative path from where the run started
    try:
        os.makedirs(folder, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"not writable: {folder}")
    except OSError as error:
        logger.warning("gold judge: no cache (%s); set %s to a writable folder, or to none to keep nothing", error, CACHE_ENV)
        return None
    return folder


_FITS = [0]  # fits made in this process: a call that made none read the cache


def _pickled_fit(digest: str, code_and_versions: tuple, reviews: list[str], labels: list[int]) -> bytes:
    """The fitted judge, pickled by Python's C pickler: joblib reads its entries with pure-Python unpickling, 1.7 s
    for the judge's 50k-term vocabulary as an object against 0.04 s for these bytes. `digest` and
    `code_and_versions` are the cache key only; `reviews` and `labels` are not hashed by joblib (`digest` is theirs)."""
    import pickle

    from ..data.imdb import clean_review

    _FITS[0] += 1
    return pickle.dumps(TfidfJudge.fit([clean_review(t) for t in reviews], labels))


def _cache_key(reviews: list[str], labels: list[int]) -> tuple[str, tuple]:
    """A SHA-256 of the reviews and labels themselves (not a path: a data set edited in place is another key), and
    what else decides the fit: the source of this module and of data/imdb.py (the fit, its settings, the cleaning and
    its patterns) and the versions of scikit-learn, SciPy (lbfgs), NumPy and Python (a pickle read by another
    scikit-learn may predict otherwise). OSError where the sources cannot be read (an install without .py files)."""
    import hashlib
    import platform
    import sys

    import numpy
    import scipy
    import sklearn

    from ..data import imdb

    digest = hashlib.sha256(f"{len(reviews)}\x1e".encode())
    digest.update("\x1f".join(reviews).encode("utf-8", "surrogatepass"))
    digest.update(bytes(labels) if all(0 <= y < 256 for y in labels) else repr(labels).encode())
    code = (inspect.getsource(sys.modules[__name__]), inspect.getsource(imdb))
    return digest.hexdigest(), (*code, sklearn.__version__, scipy.__version__, numpy.__version__, platform.python_version())


def fitted_tfidf_judge(train_reviews: list[str], train_labels: list[int]) -> TfidfJudge:
    """`TfidfJudge.fit` on the train reviews (as the data set holds them: `data.imdb.clean_review` is applied here),
    read back from `cache_folder()` when this fit was made before (joblib's `Memory`, keyed by `_cache_key`: the
    train reviews, not the test ones the caller scores it on, so every seed's run shares one fit). joblib writes each
    entry to a temporary file and renames it, so the processes of one launch, which all fit on a first run, do not
    corrupt it; an entry that cannot be read is fitted again (joblib warns). `tasks.build_gold_judge` on the full IMDB
    train set (2 cores, 2026-12-07): 18-29 s fitted, 2.4 s read back with the data's loading, the hash and the accuracy
    on 5,000 test reviews; 4.8 s and 0.3-0.9 s on the embedded sample."""
    import pickle

    reviews, labels = list(train_reviews), [int(y) for y in train_labels]
    folder = cache_folder()
    try:
        key = _cache_key(reviews, labels) if folder is not None else None
    except OSError as error:  # the key needs the sources; without them, no cache
        logger.warning("gold judge: no cache (cannot read its code's source: %s)", error)
        key = None
    if key is None:
        return pickle.loads(_pickled_fit("", (), reviews, labels))
    from joblib import Memory

    fits = _FITS[0]
    judge = pickle.loads(Memory(folder, verbose=0).cache(_pickled_fit, ignore=["reviews", "labels"])(*key, reviews, labels))
    if _FITS[0] == fits:
        logger.info("gold judge: the TF-IDF fit on these %d reviews read from the cache in %s", len(reviews), folder)
    return judge


class ClassifierJudge(Judge):
    """P(positive) from a `transformers` sequence classifier (hub id or local folder).

    The positive class is the label whose name contains "pos" (POSITIVE, LABEL_1 when there are two
    labels and none is named), so both siebert's and lvwerra's models work unchanged.
    """

    __name__ = "classifier_judge"

    def __init__(self, name_or_path: str, batch_size: int = 32, max_length: int = 512, device: str | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from ..models import load_pretrained

        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = load_pretrained(AutoModelForSequenceClassification, name_or_path).eval()  # whole: replicated under ZeRO-3 too
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        labels = {i: str(name).lower() for i, name in self.model.config.id2label.items()}
        named = [i for i, name in labels.items() if "pos" in name]
        if not named and len(labels) != 2:
            raise ValueError(f"gold_judge {name_or_path!r}: cannot tell the positive label among {sorted(labels.values())}")
        self.positive = named[0] if named else 1
        self.batch_size, self.max_length = batch_size, max_length

    @torch.no_grad()
    def probabilities(self, texts: list[str]) -> list[float]:
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start : start + self.batch_size], return_tensors="pt", padding=True, truncation=True, max_length=self.max_length).to(self.device)
            out += self.model(**enc).logits.float().softmax(-1)[:, self.positive].tolist()
        return out
