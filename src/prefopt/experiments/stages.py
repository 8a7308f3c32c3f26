"""Resumable stages: one folder each under a root, finished with a ``done`` marker that records the settings'
fingerprint, the stage's result and its wall time.

    stages = Stages("runs/x")
    info = stages.run("data", {"seed": 0}, make_data)                  # make_data(stage_dir) -> dict
    stats = stages.run("train", {"lr": 1e-3}, train, after=["data"])   # reruns when data's settings change

A rerun skips a stage whose fingerprint (its key and the fingerprints of the stages it runs after) is unchanged
and returns the recorded result; a stage whose fingerprint changed is cleared and run again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


class Stages:
    """Run named stages once. ``run(name, key, fn, after=...)`` calls ``fn(stage_dir) -> dict`` unless
    ``<root>/<name>/done`` holds the same fingerprint (of ``key`` and of the stages it runs after); then the
    recorded result is returned. A stage whose fingerprint changed is cleared and run again."""

    def __init__(self, root: str | Path, log: Callable[[str], None] = print):
        self.root = Path(root)
        self.log = log
        self.fingerprints: dict[str, str] = {}
        self.seconds: dict[str, float] = {}
        self.skipped: list[str] = []
        self.ran: list[str] = []

    def run(self, name: str, key: dict[str, Any], fn: Callable[[Path], dict[str, Any]],
            after: Sequence[str] = ()) -> dict[str, Any]:
        blob = json.dumps({"key": key, "after": [self.fingerprints[a] for a in after]}, sort_keys=True, default=str)
        fp = hashlib.sha256(blob.encode()).hexdigest()[:16]
        self.fingerprints[name] = fp
        stage_dir = self.root / name
        marker = stage_dir / "done"
        if marker.is_file():
            info = json.loads(marker.read_text())
            if info.get("fingerprint") == fp:
                self.seconds[name] = info["seconds"]
                self.skipped.append(name)
                self.log(f"[{name}] done earlier ({info['seconds']:.1f} s): skipped")
                return info["result"]
            self.log(f"[{name}] settings or inputs changed since it ran: running it again")
        if stage_dir.exists():
            shutil.rmtree(stage_dir)
        stage_dir.mkdir(parents=True)
        self.log(f"[{name}] running")
        t0 = time.perf_counter()
        result = fn(stage_dir)
        seconds = time.perf_counter() - t0
        self.seconds[name] = seconds
        self.ran.append(name)
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": fp, "seconds": seconds, "result": result}, indent=2, default=str))
        tmp.rename(marker)
        self.log(f"[{name}] finished in {seconds:.1f} s")
        return result


__all__ = ["Stages"]
