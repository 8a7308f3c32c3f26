"""A procedurally generated corpus of short movie-review-like lines whose sentiment is known exactly.

The built-in stand-in for IMDb / rt-polarity in the sentiment experiment: no files, no classifier, and a
ground-truth reward with no noise. Lines look like rt-polarity (lower case, punctuation split off by spaces):

    the acting was not very clever , but the score is superb .

Every sentiment word has a valence (``VALENCES``: +2 "brilliant" ... -2 "awful"); everything else is neutral.
The exact reward of a text is the sum of the valences of its sentiment words, where a negator ("not",
"never", "hardly") flips the sign of the next sentiment word of the same clause (a clause ends at
``, . ; but and although while``); one negator flips one word. ``valence`` is that rule; ``reward`` applies it
to prompt + response as a ``prefopt label`` / ``prefopt ppo`` reward function
(``--reward-fn prefopt.experiments.corpus:reward``).

Reviews are drawn from a small grammar: a latent polarity per review, 1 to 4 clauses, each positive with
probability 0.8 under a positive review (0.2 under a negative one); negated clauses use a word of the opposite
polarity ("not bad" is positive). Same seed, same corpus.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------- lexicon

POSITIVE_ADJS = {"brilliant": 2.0, "wonderful": 2.0, "superb": 2.0, "great": 1.5, "moving": 1.5, "gripping": 1.5,
                 "beautiful": 1.5, "delightful": 1.5, "charming": 1.0, "good": 1.0, "funny": 1.0, "clever": 1.0,
                 "solid": 0.5, "decent": 0.5, "fine": 0.5}
NEGATIVE_ADJS = {"awful": -2.0, "terrible": -2.0, "dreadful": -2.0, "boring": -1.5, "tedious": -1.5,
                 "painful": -1.5, "stupid": -1.5, "dull": -1.0, "bad": -1.0, "clumsy": -1.0, "weak": -1.0,
                 "messy": -1.0, "forgettable": -1.0, "flat": -0.5, "bland": -0.5}
POSITIVE_VERBS = {"loved": 2.0, "adored": 2.0, "enjoyed": 1.5, "admired": 1.0, "liked": 1.0}
NEGATIVE_VERBS = {"hated": -2.0, "loathed": -2.0, "regretted": -1.5, "disliked": -1.0, "endured": -1.0}
POSITIVE_NOUNS = {"masterpiece": 2.0, "triumph": 2.0, "gem": 1.5, "treat": 1.0, "pleasure": 1.0}
NEGATIVE_NOUNS = {"disaster": -2.0, "mess": -1.5, "bore": -1.5, "chore": -1.0, "letdown": -1.0}

VALENCES: dict[str, float] = {**POSITIVE_ADJS, **NEGATIVE_ADJS, **POSITIVE_VERBS, **NEGATIVE_VERBS,
                              **POSITIVE_NOUNS, **NEGATIVE_NOUNS}
"""Every sentiment word and its valence; all other words are neutral (0)."""
NEGATORS = frozenset({"not", "never", "hardly"})
"""A negator flips the sign of the next sentiment word in its clause."""
CLAUSE_BREAKS = frozenset({",", ".", ";", "!", "?", "but", "and", "although", "while"})
"""Words that end a clause (and with it any pending negation)."""

SUBJECTS = ["the film", "this movie", "the story", "the acting", "the script", "the cast", "the director",
            "the plot", "the ending", "the score", "the dialogue", "the pacing", "the photography", "the lead",
            "the humor", "the sequel", "the premise", "the finale"]
COPULAS = ["is", "was", "feels", "seems", "remains"]
INTENSIFIERS = ["very", "really", "truly", "quite", "rather", "so"]
NEUTRAL_ADJS = ["long", "quiet", "familiar", "ambitious", "modern", "simple", "dark", "loud", "old-fashioned",
                "french", "short"]
FILLERS = ["i saw it on a sunday", "it runs two hours", "the theater was full", "my friend picked it",
           "it is based on a novel", "the trailer gave a lot away", "it opens in a small town",
           "the director made three films before this one", "it was shot in winter", "the cast is mostly new"]
CONNECTORS = [" , and ", " , but ", " . ", " ; ", " , although ", " and ", " , while "]


# ---------------------------------------------------------------------------------------------- reward

def valence(text: str) -> float:
    """The exact sentiment of a text: the sum of its sentiment words' valences, negation applied."""
    total, negated = 0.0, False
    for word in text.lower().split():
        if word in CLAUSE_BREAKS:
            negated = False
        elif word in NEGATORS:
            negated = True
        elif word in VALENCES:
            total += -VALENCES[word] if negated else VALENCES[word]
            negated = False
    return total


def reward(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """Ground-truth reward of each completed review: ``valence(prompt + response)``.

    The signature of a ``prefopt label`` / ``prefopt ppo`` reward function. The whole review is scored (as the
    paper's classifier scores the whole review), so a negator at the end of the prompt applies to the response.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return [valence(_join(p, r)) for p, r in zip(prompts, responses)]


def _join(prompt: str, response: str) -> str:
    if not isinstance(prompt, str):
        raise TypeError("the corpus reward scores plain-text prompts, not message lists")
    return prompt + response if response[:1].isspace() or not prompt else prompt + " " + response


# ---------------------------------------------------------------------------------------------- grammar

@dataclass
class Review:
    text: str
    label: int
    """The latent polarity the review was drawn with: 1 positive, 0 negative."""

    @property
    def valence(self) -> float:
        return valence(self.text)


def _word(rng: random.Random, polarity: int, pos: dict[str, float], neg: dict[str, float]) -> str:
    return rng.choice(sorted(pos if polarity > 0 else neg))


def _clause(rng: random.Random, polarity: int, first: bool) -> str:
    """One clause that expresses ``polarity`` (+1 / -1), or a neutral one."""
    kind = rng.choices(["adj", "adj", "adj", "verb", "noun", "neutral", "filler"],
                       weights=[3, 3, 3, 2, 2, 1, 0 if first else 1.5])[0]
    negate = kind in ("adj", "verb", "noun") and rng.random() < 0.2
    expressed = -polarity if negate else polarity  # "not bad" expresses a positive opinion
    subj = rng.choice(SUBJECTS)
    if kind == "adj":
        cop = rng.choice(COPULAS)
        intens = rng.choice(INTENSIFIERS) + " " if rng.random() < 0.3 else ""
        neg = rng.choice(["not", "hardly", "never"]) + " " if negate else ""
        return f"{subj} {cop} {neg}{intens}{_word(rng, expressed, POSITIVE_ADJS, NEGATIVE_ADJS)}"
    if kind == "verb":
        neg = "never " if negate else ""
        return f"i {neg}{_word(rng, expressed, POSITIVE_VERBS, NEGATIVE_VERBS)} {subj}"
    if kind == "noun":
        lead = rng.choice(["it is not a", "this is never a", "the film is not a"] if negate else
                          ["it is a", "this is a", "the film is a", "what a"])
        return f"{lead} {_word(rng, expressed, POSITIVE_NOUNS, NEGATIVE_NOUNS)}"
    if kind == "neutral":
        return f"{subj} {rng.choice(COPULAS)} {rng.choice(NEUTRAL_ADJS)}"
    return rng.choice(FILLERS)


def make_review(rng: random.Random) -> Review:
    label = rng.random() < 0.5
    polarity = 1 if label else -1
    n = rng.choices([1, 2, 3, 4], weights=[2, 4, 3, 1])[0]
    clauses = [_clause(rng, polarity if rng.random() < 0.8 else -polarity, first=i == 0) for i in range(n)]
    text = clauses[0]
    for c in clauses[1:]:
        text += rng.choice(CONNECTORS) + c
    return Review(text + " .", int(label))


def generate_reviews(n: int, seed: int = 0) -> list[Review]:
    """``n`` reviews, deterministic for a seed."""
    rng = random.Random(f"prefopt-corpus:{seed}")
    return [make_review(rng) for _ in range(n)]


def review_prompt(text: str, num_words: int) -> str:
    """The first ``num_words`` words of a review (the experiment's prompt)."""
    return " ".join(text.split()[:num_words])


__all__ = [
    "CLAUSE_BREAKS",
    "NEGATORS",
    "VALENCES",
    "Review",
    "generate_reviews",
    "make_review",
    "review_prompt",
    "reward",
    "valence",
]
