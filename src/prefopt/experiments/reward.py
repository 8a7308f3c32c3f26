"""Ground-truth rewards for the sentiment experiment: the callables ``(prompts, responses) -> list[float]``.

* ``CorpusReward``: the generated corpus's exact valence (``corpus.valence`` of prompt + response).
* ``ClassifierReward``: a TF-IDF + logistic-regression sentiment classifier trained on labelled reviews the
  policy never sees (rt-polarity's ``*.pos`` / ``*.neg``); the reward is its log-odds of "positive" for the
  whole review, log p(pos | x + y) - log p(neg | x + y). ``train_classifier`` reports its held-out accuracy.

Nothing is pickled: the classifier is deterministic for its seed and cheap, so it is refit when needed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from . import corpus


def _full_text(prompt: Any, response: str) -> str:
    if not isinstance(prompt, str):
        raise TypeError("sentiment rewards score plain-text prompts, not message lists")
    return corpus._join(prompt, response)


class CorpusReward:
    """The exact reward of the generated corpus (no model, no noise)."""

    name = "corpus valence (exact)"

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return corpus.reward(prompts, responses)

    def info(self) -> dict[str, Any]:
        return {"reward": self.name}


@dataclass
class ClassifierReward:
    """log-odds of a fitted sklearn pipeline (TF-IDF + logistic regression) on prompt + response."""

    pipeline: Any
    accuracy: float | None = None
    """Held-out accuracy measured by ``train_classifier``."""
    train_size: int = 0
    test_size: int = 0
    name: str = "TF-IDF + logistic regression log-odds"

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            return []
        texts = [_full_text(p, r) for p, r in zip(prompts, responses)]
        return [float(v) for v in self.pipeline.decision_function(texts)]

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        return [float(v) for v in self.pipeline.decision_function(list(texts))]

    def info(self) -> dict[str, Any]:
        return {"reward": self.name, "classifier_heldout_accuracy": self.accuracy,
                "classifier_train_size": self.train_size, "classifier_test_size": self.test_size}


def train_classifier(train_texts: Sequence[str], train_labels: Sequence[int], test_texts: Sequence[str],
                     test_labels: Sequence[int], *, seed: int = 0) -> ClassifierReward:
    """Fit TF-IDF (word 1-2 grams) + logistic regression; the accuracy is measured on the test split."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
    except ImportError as e:  # pragma: no cover
        raise ConfigError("the classifier reward needs scikit-learn: pip install scikit-learn") from e
    if len(set(train_labels)) < 2:
        raise ConfigError("the classifier's training split has only one class")
    pipeline = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True),
                             LogisticRegression(C=4.0, max_iter=2000, random_state=seed))
    pipeline.fit(list(train_texts), list(train_labels))
    accuracy = None
    if test_texts:
        accuracy = float((pipeline.predict(list(test_texts)) == list(test_labels)).mean())
    return ClassifierReward(pipeline, accuracy, len(train_texts), len(test_texts))


def read_polarity_dir(path: str | Path) -> list[tuple[str, int]]:
    """(text, label) of every non-empty line of the ``*.pos`` (label 1) and ``*.neg`` (label 0) files of a
    folder (rt-polarity layout), in file order; undecodable bytes are replaced."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data: {root} is not a folder (expected rt-polarity-style *.pos and *.neg files)")
    out: list[tuple[str, int]] = []
    for suffix, label in ((".pos", 1), (".neg", 0)):
        files = sorted(root.glob(f"*{suffix}"))
        if not files:
            raise ConfigError(f"data: no *{suffix} file in {root} (one review a line; *.pos and *.neg needed)")
        for f in files:
            for line in f.read_bytes().decode("utf-8", errors="replace").splitlines():
                if line.strip():
                    out.append((" ".join(line.split()), label))
    return out


def split_reviews(reviews: Sequence[Any], fractions: Sequence[float], seed: int) -> list[list[Any]]:
    """Shuffle (seeded) and cut into consecutive parts of the given fractions (the last takes the rest)."""
    order = list(range(len(reviews)))
    random.Random(f"prefopt-split:{seed}").shuffle(order)
    parts, start = [], 0
    for i, frac in enumerate(fractions):
        end = len(order) if i == len(fractions) - 1 else start + round(frac * len(order))
        parts.append([reviews[j] for j in order[start:end]])
        start = end
    return parts


__all__ = ["ClassifierReward", "CorpusReward", "read_polarity_dir", "split_reviews", "train_classifier"]
