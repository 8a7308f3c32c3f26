"""The built-in review corpus and the ground-truth rewards of the sentiment experiment."""

import pytest

from prefopt.experiments import corpus
from prefopt.experiments.reward import (
    CorpusReward,
    read_polarity_dir,
    split_reviews,
    train_classifier,
)


def test_corpus_is_deterministic_for_a_seed():
    a = corpus.generate_reviews(300, seed=3)
    b = corpus.generate_reviews(300, seed=3)
    c = corpus.generate_reviews(300, seed=4)
    assert [r.text for r in a] == [r.text for r in b]
    assert [r.label for r in a] == [r.label for r in b]
    assert [r.text for r in a] != [r.text for r in c]


def test_corpus_looks_like_reviews_and_its_labels_follow_the_valence():
    reviews = corpus.generate_reviews(2000, seed=0)
    assert all(r.text.endswith(" .") and r.text == r.text.lower() for r in reviews)
    assert 0.4 < sum(r.label for r in reviews) / len(reviews) < 0.6
    pos = [r.valence for r in reviews if r.label]
    neg = [r.valence for r in reviews if not r.label]
    assert sum(pos) / len(pos) > 1.0 and sum(neg) / len(neg) < -1.0
    # not trivially separable: some reviews' exact valence disagrees with their latent label
    assert 0.7 < sum((r.valence > 0) == bool(r.label) for r in reviews) / len(reviews) < 0.97


@pytest.mark.parametrize("text, expected", [
    ("the film is brilliant .", 2.0),
    ("the film is awful .", -2.0),
    ("the acting was good , but the plot is dull .", 0.0),
    ("the plot is not bad .", 1.0),                       # negation flips the next sentiment word
    ("the plot is not very bad .", 1.0),                  # ... across neutral words
    ("i never loved the film .", -2.0),
    ("the cast is not long , and the score is great .", 1.5),  # a negator without a sentiment word ends at ","
    ("the plot is not dull and boring .", -0.5),          # "and" ends the clause: +1 - 1.5
    ("it is not a masterpiece but a mess .", -3.5),       # "but" ends the negation: -2 - 1.5
    ("what a gem , i adored the sequel .", 3.5),
    ("it runs two hours .", 0.0),
    ("the lead is hardly clumsy", 1.0),
])
def test_valence_of_known_sentences(text, expected):
    assert corpus.valence(text) == pytest.approx(expected)


def test_reward_scores_prompt_and_response_together():
    # the negator is in the prompt; the sentiment word in the response
    assert corpus.reward(["the film is not"], [" boring ."]) == [1.5]
    assert corpus.reward(["the film is"], [" boring ."]) == [-1.5]
    assert CorpusReward()(["a", "b"], [" great", " awful"]) == [1.5, -2.0]
    with pytest.raises(ValueError):
        corpus.reward(["a"], [])


def test_review_prompt():
    assert corpus.review_prompt("the film is not bad .", 3) == "the film is"


def test_split_is_seeded_and_complete():
    items = list(range(100))
    a = split_reviews(items, (0.5, 0.4, 0.1), seed=0)
    assert [len(p) for p in a] == [50, 40, 10]
    assert sorted(x for p in a for x in p) == items
    assert a == split_reviews(items, (0.5, 0.4, 0.1), seed=0)
    assert a != split_reviews(items, (0.5, 0.4, 0.1), seed=1)


def test_classifier_reward_learns_sentiment_and_reports_accuracy(tmp_path):
    reviews = corpus.generate_reviews(1500, seed=1)
    train, test = reviews[:1200], reviews[1200:]
    clf = train_classifier([r.text for r in train], [r.label for r in train], [r.text for r in test],
                           [r.label for r in test])
    assert clf.accuracy is not None and clf.accuracy > 0.65  # chance is 0.5; the latent labels are noisy
    pos, neg = clf(["the film is", "the film is"], [" wonderful and moving .", " dreadful and tedious ."])
    assert pos > 0 > neg  # log-odds of "positive"
    refit = train_classifier([r.text for r in train], [r.label for r in train], [r.text for r in test],
                             [r.label for r in test])  # deterministic: refitting replaces saving a pickle
    assert refit(["the film is"], [" wonderful ."]) == pytest.approx(clf(["the film is"], [" wonderful ."]))
    assert refit.info()["classifier_heldout_accuracy"] == clf.accuracy


def test_read_polarity_dir(tmp_path):
    (tmp_path / "x.pos").write_text("a  good film\n\nfine\n")
    (tmp_path / "x.neg").write_bytes(b"bad \xff film\n")
    rows = read_polarity_dir(tmp_path)
    assert rows[:2] == [("a good film", 1), ("fine", 1)]
    assert rows[2][1] == 0 and rows[2][0].startswith("bad ")
    from prefopt.errors import ConfigError

    with pytest.raises(ConfigError, match=r"\*\.pos"):
        read_polarity_dir(tmp_path / "missing")
