"""``prefopt quickstart``: the whole DPO path on built-in data, no files and no network needed.

A small Llama-style model and its tokenizer are made from generated text, a generated preference set
(positive vs negative reviews) is written as JSONL, and a short DPO run trains on it and evaluates on
held-out pairs. Everything lands in the output directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import DPOConfig
from .data import make_synthetic_preferences, synthetic_text, write_jsonl
from .models import init_model


def run_quickstart(output_dir: str | Path = "runs/quickstart", *, steps: int = 60, size: str = "tiny",
                   seed: int = 0, progress: bool = True) -> dict[str, Any]:
    from .train.dpo import train_dpo

    out = Path(output_dir)
    (out / "data").mkdir(parents=True, exist_ok=True)
    model_dir = init_model(size, out / "model", corpus=synthetic_text(2000, seed=seed), seed=seed)
    train_path = write_jsonl(make_synthetic_preferences(512, seed=seed), out / "data" / "train.jsonl")
    eval_path = write_jsonl(make_synthetic_preferences(64, seed=seed + 1), out / "data" / "eval.jsonl")
    cfg = DPOConfig(model=str(model_dir), data=str(train_path), eval_data=str(eval_path),
                    output_dir=str(out / "dpo"), loss="sigmoid", beta=0.1, optimizer="adamw", lr=1e-3,
                    warmup_steps=5, batch_size=16, micro_batch_size=8, max_steps=steps,
                    eval_every=max(steps // 3, 1), max_length=128, max_prompt_length=64, seed=seed,
                    progress=progress)
    print(f"quickstart: model {model_dir}, {train_path.name} 512 pairs, {eval_path.name} 64 pairs")
    summary = train_dpo(cfg)
    print(f"model: {cfg.output_dir}  metrics: {Path(cfg.output_dir) / 'metrics.jsonl'}")
    return summary
