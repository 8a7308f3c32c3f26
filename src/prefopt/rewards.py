"""Reward functions and reward-model inference, used wherever responses are scored: ``prefopt label``,
``prefopt score``, ``prefopt ppo`` and the experiments.

A reward is a Python callable named ``module:function`` (or ``path/to/file.py:function``) taking
``(prompts: list, responses: list[str]) -> list[float]`` (``load_reward_fn``, ``call_reward_fn``), or a trained
reward model wrapped as such a callable (``reward_model_fn``).

Reward models (trained by ``prefopt.train.rm``) are ``AutoModelForSequenceClassification`` with ``num_labels=1``
(for Llama: ``LlamaForSequenceClassification``, the transformer's weights plus a linear ``score`` head);
``load_reward_model`` loads one, ``score_texts`` scores (prompt, response) pairs in batches and
``sequence_rewards`` is the one forward both training and scoring use. The reward r(x, y) is the head's output
at the last non-pad token of ``prompt + response + EOS`` (transformers' own pooling, with
``config.pad_token_id`` set), so a saved model scores the same under plain transformers. Prompt and response
are tokenized separately and concatenated (``data.tokenize``) in training and in ``score_texts`` alike. (If the
tokenizer pads with its EOS token, transformers treats the final EOS as padding and reads the reward at the
token before it: the same in training and scoring.)
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .data.collate import collate_preferences, to_device
from .data.tokenize import SpecialTokens, tokenize_example
from .data.types import PreferenceExample, Text
from .errors import ConfigError
from .models import DTYPES, evaluating, load_tokenizer, quiet_progress_bars

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


# ------------------------------------------------------------------------------------------ reward models

def sequence_rewards(model: torch.nn.Module, batch: dict) -> Tensor:
    """One forward of the collated rows; the scalar reward of each row, [rows] in float32."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.logits[:, 0].float()


def load_reward_model(path: str | Path, *, dtype: str = "float32", device: Any = None,
                      trust_remote_code: bool = False) -> tuple[torch.nn.Module, Any]:
    """A trained reward model (e.g. from 'prefopt rm') and its tokenizer, frozen in eval mode."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    with quiet_progress_bars():
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=True)
    if model.config.num_labels != 1:
        raise ConfigError(f"{path} is not a reward model: its head has {model.config.num_labels} outputs, not 1.")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval().requires_grad_(False)
    return (model.to(device) if device is not None else model), tokenizer


@torch.no_grad()
def score_texts(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Text], responses: Sequence[Text],
                batch_size: int = 8, *, max_length: int | None = None,
                max_prompt_length: int | None = None) -> Tensor:
    """Rewards of (prompt, response) pairs, [N] float32 on the CPU, in input order.

    Each pair is tokenized exactly as in training (prompt and response separately, EOS once; message lists go
    through the chat template) and truncated by the same rules when ``max_length`` is given. Pairs are batched
    by length to limit padding.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    sp = SpecialTokens.of(tokenizer)
    items = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        tok = tokenize_example(PreferenceExample(p, [r], f"<pair {i}>"), tokenizer, max_length=max_length,
                               max_prompt_length=max_prompt_length, specials=sp)
        if tok is None:
            raise ConfigError(f"pair {i}: the prompt alone fills max_length ({max_length}); raise max_length")
        items.append(tok)
    device = next(model.parameters()).device
    order = sorted(range(len(items)), key=lambda i: len(items[i].prompt_ids) + len(items[i].response_ids[0]))
    out = torch.empty(len(items), dtype=torch.float32)
    with evaluating(model):
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = to_device(collate_preferences([items[i] for i in idx], model.config.pad_token_id), device)
            out[idx] = sequence_rewards(model, batch).cpu()
    return out


def reward_model_fn(path: str, batch_size: int = 8, device: Any = "auto", *, max_length: int | None = None,
                    max_prompt_length: int | None = None) -> RewardFn:
    """A reward callable backed by a trained reward model (``load_reward_model``, ``score_texts``); device "auto"
    is cuda when available, else cpu. Pairs longer than ``max_length`` are truncated by the training rules
    before scoring."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_reward_model(path, device=device)

    def score(prompts: list, responses: list[str]) -> list[float]:
        return score_texts(model, tokenizer, prompts, responses, batch_size, max_length=max_length,
                           max_prompt_length=max_prompt_length).float().cpu().tolist()

    return score


__all__ = ["RewardFn", "load_reward_fn", "call_reward_fn", "reward_model_fn", "load_reward_model", "score_texts",
           "sequence_rewards"]
