"""Built-in data that needs no files: a tiny, deterministic preference set (quickstart and end-to-end tests)
and the default corpus a new model's tokenizer is trained on (``models.init_model``).

Preference prompts ask for a review of a made-up title; the better response is a positive review and the worse
one a negative review with the same sentence shape, so the preference is learnable from a few sentiment words
and chosen/rejected have similar lengths. (``data.write_jsonl`` writes the examples as a preference file.)
"""

from __future__ import annotations

import random
from pathlib import Path

from .types import PreferenceExample

TITLE_WORDS = ["Silent", "Golden", "Hidden", "Broken", "Last", "Distant", "Crimson", "Quiet", "Electric", "Frozen"]
TITLE_NOUNS = ["River", "Garden", "Station", "Kingdom", "Letter", "Harbor", "Machine", "Forest", "Summer", "Bridge"]
KINDS = ["film", "book", "album", "play", "game"]
ASPECTS = ["story", "music", "pacing", "ending", "writing", "acting", "humor", "design", "dialogue", "mood"]
# positive and negative words pair up by index with similar lengths, so chosen/rejected lengths match
POS_VERBS = ["loved", "enjoyed", "adored", "admired", "treasured"]
NEG_VERBS = ["hated", "disliked", "loathed", "detested", "regretted"]
POS_ADJS = ["wonderful", "brilliant", "charming", "delightful", "superb", "moving", "clever", "beautiful"]
NEG_ADJS = ["dreadful", "tiresome", "annoying", "depressing", "boring", "clumsy", "stupid", "miserable"]
MAX_RESPONSES = 4  # one sentiment level per number of positive slots (verb, adjective, adjective): 3, 2, 1, 0


def _item(rng: random.Random, k: int) -> tuple[str, list[str]]:
    title = f"The {rng.choice(TITLE_WORDS)} {rng.choice(TITLE_NOUNS)}"
    prompt = f"Write a review of the {rng.choice(KINDS)} {title}."
    a1, a2 = rng.sample(ASPECTS, 2)
    slots = [(POS_VERBS, NEG_VERBS), (POS_ADJS, NEG_ADJS), (POS_ADJS, NEG_ADJS)]
    picks = [rng.randrange(len(POS_VERBS)), *rng.sample(range(len(POS_ADJS)), 2)]
    responses = []
    for i in range(k):
        positive = round(3 * (k - 1 - i) / (k - 1))  # best response: all 3 slots positive; worst: none
        verb, adj1, adj2 = ((pos if s < positive else neg)[j] for s, ((pos, neg), j) in enumerate(zip(slots, picks)))
        # leading space: prompt and response are concatenated verbatim (as in Anthropic HH)
        responses.append(f" I {verb} {title}: the {a1} was {adj1} and the {a2} felt {adj2}.")
    return prompt, responses


def make_synthetic_preferences(n: int, seed: int = 0, num_responses: int = 2) -> list[PreferenceExample]:
    """``n`` examples with ``num_responses`` (2..4) responses ordered best first; deterministic for a seed."""
    if not 2 <= num_responses <= MAX_RESPONSES:
        raise ValueError(f"num_responses must be between 2 and {MAX_RESPONSES}, got {num_responses}")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt, responses = _item(rng, num_responses)
        out.append(PreferenceExample(prompt=prompt, responses=responses, source=f"<synthetic>[{i}]"))
    return out


def synthetic_text(n_lines: int, seed: int = 0) -> list[str]:
    """Plain lines "prompt + review" from the same generator, alternating positive and negative reviews.

    Both sentiments appear equally, so a model fine-tuned on these lines is a neutral reference for DPO.
    """
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        prompt, (best, worst) = _item(rng, 2)
        lines.append(prompt + (best if i % 2 == 0 else worst))
    return lines


# -------------------------------------------------------------------------------------------- corpus

def default_corpus(n: int = 600, seed: int = 0) -> list[str]:
    """A few hundred varied English lines built from small word lists (deterministic)."""
    rng = random.Random(seed)
    names = ["Alice", "Bob", "the teacher", "my friend", "a small robot", "the old farmer", "Dr. Lee", "our team"]
    verbs = ["found", "built", "painted", "explained", "carried", "wrote about", "fixed", "described", "shared"]
    adjs = ["red", "quiet", "bright", "heavy", "strange", "simple", "useful", "ancient", "tiny", "happy"]
    nouns = ["house", "river", "question", "garden", "machine", "letter", "story", "bridge", "answer", "cat"]
    places = ["in the city", "near the lake", "at school", "on Monday", "after dinner", "in 1999", "at home"]
    common = ("the of and to a in is it you that he was for on are with as his they be at one have this from "
              "or had by word but what some we can out other were all there when up use your how said an each "
              "she which do their time if will way about many then them write would like so these her long make "
              "thing see him two has look more day could go come did number sound no most people my over know "
              "water than call first who may down side been now find any new work part take get place made live "
              "where after back little only round man year came show every good me give our under name very "
              "through just form sentence great think say help low line differ turn cause much mean before move "
              "right boy old too same tell does set three want air well also play small end put home read hand "
              "port large spell add even land here must big high such follow act why ask men change went light "
              "kind off need house picture try us again animal point mother world near build self earth father").split()
    questions = ["What is", "Why is", "How do I find", "Can you describe", "Where is"]
    out = []
    for i in range(n):
        a, v, j, o, p = (rng.choice(x) for x in (names, verbs, adjs, nouns, places))
        kind = i % 5
        if kind == 0:
            out.append(f"{a[0].upper() + a[1:]} {v} the {j} {o} {p}.")
        elif kind == 1:
            out.append(f"{rng.choice(questions)} the {j} {o}?")
        elif kind == 2:
            out.append(f"Sure! The {o} is {j}, and {a} {v} it {p}. It has {rng.randint(2, 99)} parts.")
        elif kind == 3:
            words = rng.sample(common, rng.randint(6, 14))
            out.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", "..."]))
        else:
            out.append(f"I think {a} {v} a {j} {o}; however, the {rng.choice(nouns)} was {rng.choice(adjs)}.")
    return out


def read_corpus(corpus) -> tuple[list[str], str]:
    """Tokenizer training lines and a description: the default corpus (None), a text file's non-blank lines
    (a path) or any iterable of texts."""
    if corpus is None:
        lines = default_corpus()
        return lines, f"built-in default ({len(lines)} lines)"
    if isinstance(corpus, (str, Path)):
        path = Path(corpus)
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        return lines, f"file {path} ({len(lines)} lines)"
    lines = [str(t) for t in corpus]
    return lines, f"iterable ({len(lines)} texts)"
