"""Stopping on a signal: SIGINT (Ctrl-C) and SIGTERM (what schedulers and preemptible machines send) finish the
step in progress, save a checkpoint and stop with the shell's exit code for the signal; a second signal stops at
once. Every rank of a multi-process run stops at the same step boundary."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator


class StopRequested(KeyboardInterrupt):
    """The run stopped on a signal (at a step boundary with a checkpoint, or at once on a second signal).

    A KeyboardInterrupt, so code that stops on Ctrl-C stops on it too; ``exit_code`` is the shell's 128 + signal
    number (130 for SIGINT, 143 for SIGTERM), which ``prefopt`` exits with."""

    def __init__(self, signum: int, checkpoint: Path | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.checkpoint = signum, checkpoint
        self.exit_code = 128 + signum


class StopOnSignal:
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler's or ``kill``'s stop) asks the loop to stop after the step in
    progress; ``check()`` at each step boundary then saves a checkpoint there and raises ``StopRequested``, so a
    resumed run continues exactly. A second signal stops at once (the last checkpoint stays as it was). Across
    processes the request is shared at every step boundary (one all-reduce), so all ranks stop at the same step;
    SIGTERM on any rank wins over SIGINT."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, save: Callable[[], Path], accelerator: Accelerator, *to_close: Any):
        self.save, self.accelerator, self.to_close = save, accelerator, to_close
        self.requested: int | None = None  # the signal number asked for
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested is not None:
            raise StopRequested(signum)
        self.requested = signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        self.accelerator.print(f"\n{name}: stopping after this step and saving a checkpoint "
                               f"(a second {name}: stop now)", flush=True)

    def __enter__(self) -> "StopOnSignal":
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: a signal then stops at once
                pass
        return self

    def check(self) -> None:
        requested = self.requested
        if self.accelerator.num_processes > 1:
            flags = torch.tensor([float(requested == s) for s in self.SIGNALS], device=self.accelerator.device)
            flags = self.accelerator.reduce(flags, reduction="sum").tolist()
            requested = next((s for s, f in reversed(list(zip(self.SIGNALS, flags))) if f > 0), None)
        if requested is not None:
            for obj in self.to_close:
                obj.close()
            path = self.save()
            name = signal.Signals(requested).name
            self.accelerator.print(f"stopped on {name}: checkpoint {path}; continue with --resume auto "
                                   f"(same output dir)", flush=True)
            raise StopRequested(requested, path)

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            if previous is not None:
                signal.signal(sig, previous)
        self._previous = {}


StopAtStepEnd = StopOnSignal  # the name before SIGTERM was handled too
