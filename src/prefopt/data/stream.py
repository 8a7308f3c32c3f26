"""Training data read as training goes (``--streaming``): for sets larger than memory or disk.

Why: the prepared table (``data.prepare``) reads and tokenizes the whole input before the first step and keeps
every id on disk. A stream instead reads, validates and tokenizes rows only as the steps reach them, holding a
shuffle buffer of raw examples and one chunk of tokenized ones.

What stays the same as the table: the batch semantics (step s trains on the stream's examples
``s * batch_size`` to ``(s + 1) * batch_size - 1``, split across processes the same way), the tokenization
(``tokenize_batch``, chunk by chunk), the validation rules and the report (a bad row is counted with its
``file:line``; without ``skip_bad`` it stops the run when the stream reaches it), and exact resume: a checkpoint
records how many raw examples the stream had consumed at that step, and a resumed run replays the reading and
the shuffle up to there, without tokenizing, then continues at the same row.

What differs (documented limits): no global shuffle -- a seeded buffer of ``shuffle_buffer`` examples (0: file
order), refilled per epoch with a new seed; examples too long for ``max_length`` are dropped as the stream
meets them and the next ones take their places; the length of an epoch is known only once it has been read,
so a streamed run needs ``max_steps``; each process reads the stream itself (rows are parsed and tokenized
once per process, but never all held at once); the reference runs live (nothing to precompute over).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any, Callable

from ..errors import ConfigError
from .formats import LoadReport, iter_examples, new_report, preference_reader
from .tokenize import end_token_ids
from .types import TokenizedExample
from .validation import DataValidationError

DEFAULT_SHUFFLE_BUFFER = 10_000


def shuffled(examples: Iterator[Any], buffer: int, rng: random.Random) -> Iterator[Any]:
    """A seeded buffered shuffle: fill ``buffer`` examples, then emit a random one for each new one read."""
    if buffer <= 1:
        yield from examples
        return
    pool: list[Any] = []
    for ex in examples:
        if len(pool) < buffer:
            pool.append(ex)
            continue
        j = rng.randrange(buffer)
        pool[j], ex = ex, pool[j]
        yield ex
    rng.shuffle(pool)
    yield from pool


class StreamedExamples:
    """The training examples of a stream, indexed by stream position (what ``train.loop`` indexes).

    Positions must be asked for in increasing steps (the loop does): ``[p]`` reads on until position p exists,
    and a window keeps only the positions of the current step. ``state(step)`` / ``restore(state)`` carry the
    exact position through a checkpoint."""

    def __init__(self, path: Any, tokenizer: Any, *, kind: str = "preferences", from_preferences: bool = False,
                 format: str = "auto",
                 split: str | None = None, skip_bad: bool = False, max_length: int | None = None,
                 max_prompt_length: int | None = None, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                 seed: int = 0, batch_size: int = 1, chunk: int = 256):
        from .prepare import chunk_tokenizer

        if kind == "preferences":
            self._reader = preference_reader(format, len(tokenizer), end_token_ids(tokenizer))
        else:
            from .sft import sft_reader

            self._reader = sft_reader(format, from_preferences, len(tokenizer), end_token_ids(tokenizer))
        self.path, self.split, self.skip_bad, self.format = path, split, skip_bad, format
        self.shuffle_buffer, self.seed, self.batch_size, self.chunk = shuffle_buffer, seed, batch_size, chunk
        self._tokenize: Callable[[list], list] = chunk_tokenizer(kind, tokenizer, max_length, max_prompt_length)
        self.report: LoadReport = new_report(path, format, skip_bad)
        self.dropped = 0
        self._epoch = 0
        self._raw = 0          # raw examples consumed (this epoch's stream restarted at 0)
        self._raw_total = 0    # over all epochs: what a checkpoint records
        self._next = 0         # the next stream position to assign
        self._window: dict[int, tuple[TokenizedExample, dict]] = {}  # position -> (example, stream state after it)
        self._kept_from = 0    # the window holds no position below this
        self._epoch_start = 0  # the first position of this epoch
        self._raw_stream = self._open(skip=0)

    # -- reading ------------------------------------------------------------------------------------------

    def _open(self, skip: int) -> Iterator[Any]:
        detect, convert, key = self._reader
        self.report = new_report(self.path, self.format, self.skip_bad) if skip == 0 else self.report
        rows = iter_examples(self.path, detect, convert, self.report, split=self.split, duplicate_key=key)
        it = shuffled(self._checked(rows), self.shuffle_buffer, random.Random(self.seed * 1_000_003 + self._epoch))
        for _ in range(skip):  # replay the reading and the shuffle to the checkpoint's position: no tokenizing
            next(it)
        return it

    def _checked(self, rows: Iterator[Any]) -> Iterator[Any]:
        check = self.report.validation
        for ex in rows:
            if check.first_error is not None and not self.skip_bad:
                raise DataValidationError(check)
            yield ex
        if check.first_error is not None and not self.skip_bad:
            raise DataValidationError(check)

    def _fill(self, upto: int) -> None:
        while self._next <= upto:
            raws = []
            for ex in self._raw_stream:
                raws.append(ex)
                if len(raws) == self.chunk:
                    break
            if not raws:  # the end of an epoch of the stream: start the next one, newly shuffled
                if self._next == self._epoch_start:
                    raise ConfigError(f"the stream {self.path} holds no usable examples: "
                                      + (f"all {self._raw} rows read were too long for max_length"
                                         if self._raw else "no rows"))
                self._epoch += 1
                self._epoch_start = self._next
                self._raw = 0
                self._raw_stream = self._open(skip=0)
                continue
            for raw_ex, tok in zip(raws, self._tokenize(raws)):
                self._raw += 1
                self._raw_total += 1
                if tok is None:
                    self.dropped += 1
                    self.report.validation.drop("too_long", raw_ex.source)
                    continue
                self._next += 1
                self._window[self._next - 1] = (tok, {"stream_raw": self._raw_total, "stream_epoch": self._epoch,
                                                      "stream_epoch_raw": self._raw, "stream_next": self._next})

    # -- what the loop uses --------------------------------------------------------------------------------

    def __len__(self) -> int:
        raise TypeError("a streamed data set has no length until it has been read; the run needs max_steps")

    def __getitem__(self, position: int) -> TokenizedExample:
        if position not in self._window:
            if position < self._next:
                raise IndexError(f"stream position {position} was already passed (positions must increase)")
            self._fill(position)
        step_start = position - position % self.batch_size
        if step_start > self._kept_from:  # a new step: the window keeps the current step's positions only
            for p in [p for p in self._window if p < step_start]:
                del self._window[p]
            self._kept_from = step_start
        return self._window[position][0]

    @property
    def epoch(self) -> int:
        """The epoch the stream is reading (counted from 0)."""
        return self._epoch

    def __iter__(self):
        raise TypeError("a streamed data set is read by position, step by step (it has no end to iterate to)")

    def response_counts(self) -> set[int]:
        """K of the stream's first example (a batch that mixes K is refused when it is collated)."""
        return {self[self._next].num_responses if not self._window else next(iter(self._window.values()))[0]
                .num_responses}

    def summary(self) -> str:
        """What the stream has read so far: rows, kept, and every skipped or dropped row by kind with file:line."""
        v = self.report.validation
        return f"train data (streamed): {v.summary()}" if not v.clean() else \
            f"train data (streamed): {v.rows} rows read, all kept"

    def schedule(self, batch_size: int) -> "StreamSchedule":
        return StreamSchedule(self, batch_size)

    def state(self, step: int) -> dict:
        """What a checkpoint after ``step`` optimizer steps records: where the stream stands after its last row."""
        last = step * self.batch_size - 1
        if last < 0:
            return {"stream_raw": 0, "stream_epoch": 0, "stream_epoch_raw": 0, "stream_next": 0}
        if last not in self._window:
            self._fill(last)  # this process's share ended earlier in the step: read to the step's end
        return dict(self._window[last][1])

    def restore(self, state: dict) -> None:
        """Continue a resumed run at the row after the checkpoint's step (re-reading, not re-tokenizing, to there)."""
        if "stream_raw" not in state:
            raise ConfigError("the checkpoint holds no stream position: it was written by a run without --streaming")
        self._epoch = state["stream_epoch"]
        self._raw = state["stream_epoch_raw"]
        self._raw_total = state["stream_raw"]
        self._next = self._kept_from = self._epoch_start = state["stream_next"]
        self._window.clear()
        self._raw_stream = self._open(skip=self._raw)


class StreamSchedule:
    """``BatchSchedule``'s interface for a stream: step s is positions [s * B, (s + 1) * B)."""

    def __init__(self, stream: StreamedExamples, batch_size: int):
        self.stream, self.batch_size = stream, batch_size
        self.steps_per_epoch = None

    def epoch_of(self, step: int) -> int:
        return self.stream.epoch

    def indices(self, step: int) -> list[int]:
        return list(range(step * self.batch_size, (step + 1) * self.batch_size))


__all__ = ["StreamedExamples", "StreamSchedule", "shuffled", "DEFAULT_SHUFFLE_BUFFER"]
