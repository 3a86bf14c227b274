"""Independent sentiment judges: a second opinion on completions, never trained on.

The learned reward (`SentimentReward`) is the proxy the policy optimises; a policy can find text
it scores highly without being positive (reward hacking). A judge of a different family scores
the same generations as `gold_reward`, so a rising proxy with a falling gold exposes it.

- `TfidfJudge` (offline default): TF-IDF over word unigrams and bigrams + logistic regression,
  trained on IMDB train reviews; a bag of words, no shared weights or tokenizer with the policy.
- `ClassifierJudge`: any sequence classifier from the hub or a local folder, e.g. the literature's
  `siebert/sentiment-roberta-large-english` or `lvwerra/distilbert-imdb` (DPO paper, TRL's
  sentiment example), so numbers compare with theirs.

Both are TRL reward callables returning P(positive), the same scale as `SentimentReward`.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import torch

_WORD = re.compile(r"[a-z0-9']+")


def _ngrams(text: str) -> list[str]:
    words = _WORD.findall(text.lower().replace("<br />", " "))
    return words + [f"{a} {b}" for a, b in zip(words, words[1:])]


class Judge:
    """A TRL reward callable scoring completions by P(positive); subclasses define `probabilities(texts)`."""

    test_accuracy: float | None = None  # accuracy on IMDB test reviews, set by whoever built the judge

    def probabilities(self, texts: list[str]) -> list[float]:
        raise NotImplementedError

    def accuracy(self, texts: list[str], labels: list[int]) -> float:
        predictions = [p > 0.5 for p in self.probabilities(texts)]
        return sum(int(p) == int(y) for p, y in zip(predictions, labels)) / len(labels)

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        return self.probabilities(list(completions))


class TfidfJudge(Judge):
    """P(positive | text) = sigmoid(w . tfidf(text) + b).

    tfidf(text)_j = (1 + log tf_j) * idf_j, rows L2-normalised; idf_j = log((1 + n) / (1 + df_j)) + 1.
    Features: unigrams and bigrams seen in at least `min_df` training reviews, the `max_features`
    most frequent. Weights: full-batch L-BFGS on the mean logistic loss + `l2 / 2 * ||w||^2`.
    """

    __name__ = "tfidf_judge"

    def __init__(self, vocabulary: dict[str, int], idf: torch.Tensor, weight: torch.Tensor, bias: float):
        self.vocabulary, self.idf, self.weight, self.bias = vocabulary, idf, weight, float(bias)

    @classmethod
    def fit(cls, texts: list[str], labels: list[int], min_df: int = 2, max_features: int = 50_000, l2: float = 1e-4, steps: int = 100) -> TfidfJudge:
        docs = [set(_ngrams(t)) for t in texts]
        df = Counter(g for d in docs for g in d)
        kept = sorted((g for g, c in df.items() if c >= min_df), key=lambda g: (-df[g], g))[:max_features]
        vocabulary = {g: j for j, g in enumerate(kept)}
        idf = torch.tensor([math.log((1 + len(texts)) / (1 + df[g])) + 1 for g in kept])
        judge = cls(vocabulary, idf, torch.zeros(len(kept)), 0.0)
        features = judge.features(texts)
        y = torch.tensor(labels, dtype=torch.float32)
        params = torch.zeros(len(kept) + 1, requires_grad=True)
        optimizer = torch.optim.LBFGS([params], max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            logits = torch.sparse.mm(features, params[:-1, None]).squeeze(1) + params[-1]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + l2 / 2 * params[:-1].pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        judge.weight, judge.bias = params[:-1].detach().clone(), float(params[-1].detach())
        return judge

    def features(self, texts: list[str]) -> torch.Tensor:
        """Sparse N x V TF-IDF matrix, rows L2-normalised."""
        rows, cols, values = [], [], []
        for i, text in enumerate(texts):
            counts = Counter(j for g in _ngrams(text) if (j := self.vocabulary.get(g)) is not None)
            if not counts:
                continue
            idx = torch.tensor(list(counts))
            val = (1 + torch.log(torch.tensor(list(counts.values()), dtype=torch.float32))) * self.idf[idx]
            rows += [i] * len(idx)
            cols += idx.tolist()
            values += (val / val.norm()).tolist()
        return torch.sparse_coo_tensor(torch.tensor([rows, cols], dtype=torch.long).reshape(2, -1), torch.tensor(values), (len(texts), len(self.vocabulary)), check_invariants=False).coalesce()

    def probabilities(self, texts: list[str]) -> list[float]:
        logits = torch.sparse.mm(self.features(texts), self.weight[:, None]).squeeze(1) + self.bias
        return torch.sigmoid(logits).tolist()


class ClassifierJudge(Judge):
    """P(positive) from a `transformers` sequence classifier (hub id or local folder).

    The positive class is the label whose name contains "pos" (POSITIVE, LABEL_1 when there are two
    labels and none is named), so both siebert's and lvwerra's models work unchanged.
    """

    __name__ = "classifier_judge"

    def __init__(self, name_or_path: str, batch_size: int = 32, max_length: int = 512, device: str | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(name_or_path).eval()
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
