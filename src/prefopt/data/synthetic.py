"""A tiny, deterministic preference set that needs no files (quickstart and end-to-end tests).

Prompts ask for a review of a made-up title; the better response is a positive review and the worse one a
negative review with the same sentence shape, so the preference is learnable from a few sentiment words and
chosen/rejected have similar lengths.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterable

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


def write_jsonl(examples: Iterable[PreferenceExample], path: str | Path) -> Path:
    """Write explicit rows {prompt, chosen, rejected}, or ranked rows {prompt, responses, ranks} when K > 2."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for ex in examples:
            if len(ex.responses) == 2:
                row = {"prompt": ex.prompt, "chosen": ex.chosen, "rejected": ex.rejected}
            else:
                row = {"prompt": ex.prompt, "responses": ex.responses, "ranks": list(range(1, len(ex.responses) + 1))}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
