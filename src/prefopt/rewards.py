"""Reward functions: a Python callable named ``module:function`` (or ``path/to/file.py:function``) taking
``(prompts: list, responses: list[str]) -> list[float]``, or a trained reward model wrapped as such a callable.

Used wherever responses are scored: ``prefopt label``, ``prefopt ppo`` and the experiments.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError

RewardFn = Callable[[list, list], Sequence[float]]


# ------------------------------------------------------------------------------------ reward callables

def load_reward_fn(spec: str) -> RewardFn:
    """Import ``module:function`` (dotted module on sys.path) or ``path/to/file.py:function``."""
    if not isinstance(spec, str) or spec.count(":") < 1 or not spec.rpartition(":")[0] or not spec.rpartition(":")[2]:
        raise ConfigError(f"invalid reward_fn {spec!r}: expected 'module:function' (e.g. my_rewards:score) or "
                          "'path/to/file.py:function'.")
    module_name, _, attr = spec.rpartition(":")
    if module_name.endswith(".py"):
        path = Path(module_name).expanduser()
        if not path.is_file():
            raise ConfigError(f"invalid reward_fn {spec!r}: file {path} not found.")
        mod_spec = importlib.util.spec_from_file_location(f"prefopt_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)  # type: ignore[arg-type]
        try:
            mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
        except Exception as e:
            raise ConfigError(f"invalid reward_fn {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and module_name.startswith(e.name):
                raise ConfigError(f"invalid reward_fn {spec!r}: no module named '{module_name}' on the Python path; "
                                  f"add its directory to PYTHONPATH or give a file: path/to/file.py:{attr}.") from None
            raise ConfigError(f"invalid reward_fn {spec!r}: importing '{module_name}' failed: {e}") from e
        except Exception as e:
            raise ConfigError(f"invalid reward_fn {spec!r}: importing '{module_name}' failed: "
                              f"{type(e).__name__}: {e}") from e
    fn = getattr(module, attr, None)
    if fn is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ConfigError(f"invalid reward_fn {spec!r}: '{module_name}' has no attribute '{attr}'; "
                          f"callables there: {', '.join(public) or 'none'}.")
    if not callable(fn):
        raise ConfigError(f"invalid reward_fn {spec!r}: '{attr}' is a {type(fn).__name__}, not a callable.")
    return fn


def call_reward_fn(fn: RewardFn, prompts: list, responses: list[str], name: str = "reward function") -> list[float]:
    """Call a reward callable and check it returned one finite number per response."""
    out = fn(prompts, responses)
    if hasattr(out, "tolist"):
        out = out.tolist()
    try:
        scores = [float(v) for v in out]
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name} must return a list of numbers, got {type(out).__name__}: {e}") from None
    if len(scores) != len(responses):
        raise ConfigError(f"{name} returned {len(scores)} scores for {len(responses)} responses.")
    bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        raise ConfigError(f"{name} returned non-finite scores (e.g. response {bad[0]}: {scores[bad[0]]}).")
    return scores


def reward_model_fn(path: str, batch_size: int = 8, device: Any = "auto", *, max_length: int | None = None,
                    max_prompt_length: int | None = None) -> RewardFn:
    """A reward callable backed by a trained reward model (``prefopt.train.rm``); device "auto" is cuda when
    available, else cpu. Pairs longer than ``max_length`` are truncated by the training rules before scoring."""
    import torch

    from .train.rm import load_reward_model, score_texts  # lazy: only needed on this path

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_reward_model(path, device=device)

    def score(prompts: list, responses: list[str]) -> list[float]:
        return score_texts(model, tokenizer, prompts, responses, batch_size, max_length=max_length,
                           max_prompt_length=max_prompt_length).float().cpu().tolist()

    return score


__all__ = ["RewardFn", "load_reward_fn", "call_reward_fn", "reward_model_fn"]
