"""Win rates from pairwise verdicts, and their 95 % intervals.

A verdict is ``policy``, ``baseline``, ``tie`` or ``invalid``. The win rate counts a tie as half a win and leaves
invalid verdicts out (they are counted and reported, never scored):

    win_rate = (wins + ties / 2) / (wins + ties + losses)

The interval is Wilson's score interval when every prompt gives one pair (independent trials; ties enter as
half successes), and a percentile bootstrap that resamples whole prompts when some prompt gives several pairs
(several samples of one prompt are not independent: resampling pairs would make the interval too narrow).
Everything here is a pure function of the verdicts (the bootstrap is seeded).
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass

OUTCOMES = ("policy", "baseline", "tie", "invalid")
SCORE = {"policy": 1.0, "tie": 0.5, "baseline": 0.0}
"""What one valid verdict is worth to the policy."""


@dataclass
class WinRate:
    win_rate: float
    """NaN when there is no valid verdict."""
    ci_low: float
    ci_high: float
    wins: int
    ties: int
    losses: int
    invalid: int
    pairs: int
    """Every judged pair, invalid ones included."""
    interval: str
    """'wilson' or 'bootstrap (clustered by prompt)'; 'none' without valid verdicts."""

    def as_dict(self) -> dict:
        return asdict(self)


def count_verdicts(verdicts: Sequence[str]) -> dict[str, int]:
    """Counts of each outcome; an unknown verdict is a ValueError."""
    counts = dict.fromkeys(OUTCOMES, 0)
    for v in verdicts:
        if v not in counts:
            raise ValueError(f"unknown verdict {v!r}: expected one of {', '.join(OUTCOMES)}")
        counts[v] += 1
    return counts


def win_rate_of(wins: float, ties: float, losses: float) -> float:
    """(wins + ties / 2) / (wins + ties + losses); NaN when there are none."""
    n = wins + ties + losses
    return (wins + 0.5 * ties) / n if n else math.nan


def wilson_interval(successes: float, n: float, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson's score interval for a proportion successes / n (successes may be fractional: ties count half)."""
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def cluster_bootstrap_interval(scores: Sequence[float], clusters: Sequence[Hashable], *, level: float = 0.95,
                               resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(scores), resampling whole clusters with replacement (each resample
    has as many clusters as the data; its mean is the pooled mean of the pairs it holds)."""
    if len(scores) != len(clusters):
        raise ValueError(f"{len(scores)} scores but {len(clusters)} cluster labels")
    if not scores:
        return math.nan, math.nan
    groups: dict[Hashable, list[float]] = {}
    for s, c in zip(scores, clusters):
        groups.setdefault(c, []).append(float(s))
    sums = [sum(g) for g in groups.values()]
    sizes = [len(g) for g in groups.values()]
    rng = random.Random(seed)
    k = len(sums)
    means = []
    for _ in range(resamples):
        picks = [rng.randrange(k) for _ in range(k)]
        means.append(sum(sums[i] for i in picks) / sum(sizes[i] for i in picks))
    means.sort()
    alpha = (1 - level) / 2
    return _quantile(means, alpha), _quantile(means, 1 - alpha)


def summarize_verdicts(verdicts: Sequence[str], clusters: Sequence[Hashable] | None = None, *,
                       resamples: int = 2000, seed: int = 0) -> WinRate:
    """Win rate, 95 % interval and counts of one set of verdicts. ``clusters`` (e.g. the prompt index of each
    pair) switches to the clustered bootstrap when some cluster holds more than one valid verdict."""
    counts = count_verdicts(verdicts)
    wins, ties, losses = counts["policy"], counts["tie"], counts["baseline"]
    rate = win_rate_of(wins, ties, losses)
    valid = [i for i, v in enumerate(verdicts) if v != "invalid"]
    if not valid:
        low, high, method = math.nan, math.nan, "none"
    elif clusters is not None and len({clusters[i] for i in valid}) < len(valid):
        low, high = cluster_bootstrap_interval([SCORE[verdicts[i]] for i in valid], [clusters[i] for i in valid],
                                               resamples=resamples, seed=seed)
        method = "bootstrap (clustered by prompt)"
    else:
        low, high = wilson_interval(wins + 0.5 * ties, len(valid))
        method = "wilson"
    return WinRate(rate, low, high, wins, ties, losses, counts["invalid"], len(verdicts), method)


__all__ = ["WinRate", "count_verdicts", "win_rate_of", "wilson_interval", "cluster_bootstrap_interval",
           "summarize_verdicts", "OUTCOMES", "SCORE"]
