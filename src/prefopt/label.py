"""Turn sampled responses into preference data: score every response, then pair (or rank) them per prompt.

This is the paper's loop "sample y1, y2 ~ pi_ref(.|x), label with a reward, optimise":

    prefopt generate --model sft --prompts prompts.jsonl --num-samples 4 --output samples.jsonl
    prefopt label --samples samples.jsonl --reward-fn my_rewards:sentiment --output pairs.jsonl
    prefopt dpo --model sft --data pairs.jsonl ...

The reward is a Python callable ``module:function`` (or ``path/to/file.py:function``) taking
``(prompts: list, responses: list[str]) -> list[float]``, or a trained reward model (both from
``prefopt.rewards``).

Ties are never ordered arbitrarily: a pair whose scores differ by no more than ``min_margin`` (0: any tie) is
not written, and a prompt whose best and worst responses tie is skipped and counted; in ranking mode a prompt
with any such tie between neighbours is skipped. Identical response texts of a prompt are kept once.

Exact samples: when every sample row of a prompt carries token ids (``prompt_ids``, ``response_ids``,
``ended_with_eos``, as ``prefopt generate`` writes them), the rows written for it carry them too (pairs:
``prompt_ids``, ``chosen_ids``, ``rejected_ids``, ``chosen_ended_with_eos``, ``rejected_ended_with_eos``; ranked
rows: ``prompt_ids``, ``response_ids`` best first, ``responses_ended_with_eos``) and DPO trains on exactly those
ids. Such a prompt's responses are de-duplicated by their ids, not their text: two samples that decode to the same
text but differ in ids (one cut at max_new_tokens, one ended) are both kept; a text reward scores them equally,
so the tie rules keep them from being paired against each other. Older sample files without ids are labelled
exactly as before.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data.formats import ids_field, read_examples, text_field
from .data.types import Text
from .errors import ConfigError, DataError
from .jsonl import write_jsonl
from .rewards import RewardFn, call_reward_fn, load_reward_fn, reward_model_fn


# ---------------------------------------------------------------------------------------- grouping

@dataclass
class PromptGroup:
    prompt: Text
    responses: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    prompt_ids: list[int] | None = None
    """Set (with ``response_ids`` and ``ended_with_eos``) only when every sample row of the prompt has ids."""
    response_ids: list[list[int]] | None = None
    ended_with_eos: list[bool] | None = None


@dataclass
class _SampleRow:
    prompt: Text
    response: str
    source: str
    prompt_ids: list[int] | None = None
    response_ids: list[int] | None = None
    ended_with_eos: bool | None = None


def read_samples(path: str | Path) -> tuple[list[PromptGroup], int]:
    """Group sample rows ``{prompt, response}`` by prompt (first-appearance order); identical responses of a
    prompt are kept once (by token ids when every row of the prompt carries them, else by text). Returns
    (groups, number of duplicate responses dropped)."""
    def sample(row: dict, source: str, fmt: str) -> _SampleRow:
        prompt = text_field(row, "prompt", source)
        response = row.get("response")
        if not isinstance(response, str):
            raise DataError("missing or not a string (sample rows are {prompt, response} as written by "
                            "prefopt generate)", source=source, field="response",
                            reason="missing_field" if response is None else "wrong_type")
        out = _SampleRow(prompt, response, source)
        if row.get("prompt_ids") is not None or row.get("response_ids") is not None:
            out.prompt_ids = ids_field(row, "prompt_ids", source)
            out.response_ids = ids_field(row, "response_ids", source)
            ended = row.get("ended_with_eos")
            if not isinstance(ended, bool):
                raise DataError("must be true or false next to response_ids", source=source, field="ended_with_eos",
                                reason="missing_field" if ended is None else "wrong_type")
            out.ended_with_eos = ended
        return out

    # every row is validated first: a bad row stops with the full report (counts and file:line of each kind)
    samples, _ = read_examples(path, lambda row, source: "samples", sample)
    by_prompt: dict[str, list[_SampleRow]] = {}
    for x in samples:
        by_prompt.setdefault(json.dumps(x.prompt, sort_keys=True, ensure_ascii=False), []).append(x)
    groups: list[PromptGroup] = []
    duplicates = 0
    for rows in by_prompt.values():
        group = PromptGroup(rows[0].prompt)
        exact = all(x.response_ids is not None for x in rows)
        if exact:
            group.prompt_ids, group.response_ids, group.ended_with_eos = rows[0].prompt_ids, [], []
        seen: set = set()
        for x in rows:
            if exact and x.prompt_ids != group.prompt_ids:
                raise DataError(f"differ from the prompt_ids of {rows[0].source} for the same prompt", source=x.source,
                                field="prompt_ids", reason="diverging")
            key = tuple(x.response_ids) if exact else x.response
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            group.responses.append(x.response)
            group.sources.append(x.source)
            if exact:
                group.response_ids.append(x.response_ids)
                group.ended_with_eos.append(x.ended_with_eos)
        groups.append(group)
    if not groups:
        raise DataError("no sample rows", source=str(path), reason="empty_file")
    return groups, duplicates


def score_groups(groups: list[PromptGroup], reward_fn: RewardFn, batch_size: int = 256,
                 name: str = "reward function") -> None:
    """Fill ``group.scores`` by calling the reward on flat batches of (prompt, response)."""
    flat = [(g, j) for g in groups for j in range(len(g.responses))]
    for g in groups:
        g.scores = [math.nan] * len(g.responses)
    for start in range(0, len(flat), batch_size):
        chunk = flat[start:start + batch_size]
        scores = call_reward_fn(reward_fn, [g.prompt for g, _ in chunk], [g.responses[j] for g, j in chunk], name)
        for (g, j), s in zip(chunk, scores):
            g.scores[j] = s


# ------------------------------------------------------------------------------------ pairs / ranks

@dataclass
class LabelReport:
    prompts: int = 0
    samples: int = 0
    duplicates: int = 0
    """Identical responses of a prompt, kept once."""
    rows: int = 0
    """Pairs (or ranked rows) written."""
    skipped_ties: int = 0
    """Prompts skipped because their best and worst (ranking: any neighbours) tie within min_margin."""
    skipped_single: int = 0
    """Prompts with fewer than 2 distinct responses."""
    tied_pairs: int = 0
    """With all_pairs: pairs not written because their scores tie within min_margin."""
    mode: str = "best-vs-worst pairs"

    def summary(self) -> str:
        text = (f"labelled {self.samples} samples of {self.prompts} prompts: wrote {self.rows} {self.mode}; "
                f"skipped {self.skipped_ties} prompts with tied scores and {self.skipped_single} with fewer than 2 "
                f"distinct responses")
        if self.duplicates:
            text += f"; {self.duplicates} duplicate responses dropped"
        if self.tied_pairs:
            text += f"; {self.tied_pairs} tied pairs not written"
        return text

    __str__ = summary


def _ordered(group: PromptGroup) -> list[int]:
    """Indices best first; equal scores keep sample order (ties are then rejected by the margin checks)."""
    return sorted(range(len(group.responses)), key=lambda j: -group.scores[j])


def _answer(prompt: Text, response: str) -> Text:
    """A response as the data layer expects it next to this prompt (message lists want an assistant turn)."""
    return [{"role": "assistant", "content": response}] if isinstance(prompt, list) else response


def make_rows(groups: list[PromptGroup], *, ranking: bool = False, all_pairs: bool = False,
              min_margin: float = 0.0) -> tuple[list[dict], LabelReport]:
    """Preference rows from scored groups, and counts. A pair needs ``chosen - rejected > min_margin``."""
    if ranking and all_pairs:
        raise ConfigError("ranking and all_pairs exclude each other: ranking writes one row of all responses.")
    if min_margin < 0:
        raise ConfigError(f"invalid min_margin = {min_margin!r}: must be >= 0.")
    mode = "ranked rows" if ranking else ("pairs (all ordered pairs)" if all_pairs else "best-vs-worst pairs")
    report = LabelReport(prompts=len(groups), mode=mode)
    rows: list[dict] = []
    for g in groups:
        report.samples += len(g.responses)
        if len(g.responses) < 2:
            report.skipped_single += 1
            continue
        order = _ordered(g)
        best, worst = order[0], order[-1]
        if g.scores[best] - g.scores[worst] <= min_margin:
            report.skipped_ties += 1
            continue
        if ranking:
            if any(g.scores[a] - g.scores[b] <= min_margin for a, b in zip(order, order[1:])):
                report.skipped_ties += 1
                continue
            row = {"prompt": g.prompt, "responses": [_answer(g.prompt, g.responses[j]) for j in order],
                   "scores": [g.scores[j] for j in order]}
            if g.response_ids is not None:
                row.update(prompt_ids=g.prompt_ids, response_ids=[g.response_ids[j] for j in order],
                           responses_ended_with_eos=[g.ended_with_eos[j] for j in order])
            rows.append(row)
            continue
        pairs = [(a, b) for i, a in enumerate(order) for b in order[i + 1:]] if all_pairs else [(best, worst)]
        for a, b in pairs:
            if g.scores[a] - g.scores[b] <= min_margin:
                report.tied_pairs += 1
                continue
            row = {"prompt": g.prompt, "chosen": _answer(g.prompt, g.responses[a]),
                   "rejected": _answer(g.prompt, g.responses[b]),
                   "chosen_score": g.scores[a], "rejected_score": g.scores[b]}
            if g.response_ids is not None:
                row.update(prompt_ids=g.prompt_ids, chosen_ids=g.response_ids[a], rejected_ids=g.response_ids[b],
                           chosen_ended_with_eos=g.ended_with_eos[a], rejected_ended_with_eos=g.ended_with_eos[b])
            rows.append(row)
    report.rows = len(rows)
    return rows, report


def label_samples(samples: str | Path, reward_fn: RewardFn, *, ranking: bool = False, all_pairs: bool = False,
                  min_margin: float = 0.0, batch_size: int = 256) -> tuple[list[dict], LabelReport]:
    """Read a samples file, score it with ``reward_fn``, return preference rows and the report."""
    groups, duplicates = read_samples(samples)
    score_groups(groups, reward_fn, batch_size=batch_size)
    rows, report = make_rows(groups, ranking=ranking, all_pairs=all_pairs, min_margin=min_margin)
    report.duplicates = duplicates
    report.samples += duplicates
    return rows, report


def run_label(cfg: Any) -> LabelReport:
    """``prefopt label``: score samples with a reward function or model, write pairs or ranked rows."""
    cfg.validate()
    groups, duplicates = read_samples(cfg.samples)  # data errors before any model is loaded
    if cfg.reward_fn:
        fn, name = load_reward_fn(cfg.reward_fn), f"reward_fn {cfg.reward_fn}"
    else:
        fn, name = reward_model_fn(cfg.reward_model, batch_size=cfg.batch_size), f"reward model {cfg.reward_model}"
    score_groups(groups, fn, batch_size=cfg.batch_size if not cfg.reward_fn else 1024, name=name)
    rows, report = make_rows(groups, ranking=cfg.ranking, all_pairs=cfg.all_pairs, min_margin=cfg.min_margin)
    report.duplicates = duplicates
    report.samples += duplicates
    write_jsonl(rows, cfg.output)
    print(f"{report.summary()}; output: {cfg.output}")
    if not rows:
        print("warning: no rows written (every prompt tied or had a single distinct response)", file=sys.stderr)
    return report


__all__ = ["read_samples", "score_groups", "make_rows", "label_samples", "run_label", "LabelReport", "PromptGroup"]
