"""``prefopt quickstart``: the DPO paper's controlled-sentiment experiment in a few minutes on a CPU.

Everything is built in (no files, no network): a generated review corpus whose sentiment is known exactly, a
tiny Llama-style model fine-tuned on half of it (pi_SFT), completions sampled from pi_SFT for review prefixes,
pairs labelled best vs worst by the exact reward, DPO at two betas, and an evaluation of every policy on held-out
prefixes: mean reward and KL(pi || pi_SFT). It ends with a short table and a plot of reward against KL.

It is ``prefopt experiment sentiment`` with a small budget (see ``sentiment`` beside it); rerunning
it in the same output directory skips the stages that are done.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

QUICKSTART_SETTINGS: dict[str, Any] = dict(
    methods=["dpo"], size="tiny", corpus_size=4000, sft_steps=400, sft_lr=3e-3, sft_batch_size=32,
    num_prompts=512, samples_per_prompt=4, max_new_tokens=40, generation_batch_size=128,
    betas=[0.1, 0.5], dpo_steps=100, dpo_lr=5e-4, dpo_batch_size=16, dpo_warmup_steps=10,
    eval_prompts=100, eval_samples=4, max_length=96,
)
"""The quickstart's budget: about a minute or two on 2 CPU cores (SFT dominates)."""


def run_quickstart(output_dir: str | Path = "runs/quickstart", *, steps: int | None = None,
                   sft_steps: int | None = None, size: str = "tiny", seed: int = 0, progress: bool = True,
                   **overrides: Any) -> dict[str, Any]:
    """Run the sentiment experiment on the built-in corpus with the quickstart budget.

    ``steps``: DPO steps per beta; ``sft_steps``: SFT steps; any other ``SentimentConfig`` field can be
    overridden by keyword. Returns ``run_sentiment``'s result (rows, meta, paths of the table and the plot).
    """
    from ..eval.report import short_table
    from .sentiment import SentimentConfig, run_sentiment

    settings = {**QUICKSTART_SETTINGS, "size": size, "seed": seed, "progress": progress, **overrides}
    if steps is not None:
        settings["dpo_steps"] = steps
    if sft_steps is not None:
        settings["sft_steps"] = sft_steps
    cfg = SentimentConfig(output_dir=str(output_dir), **settings)
    result = run_sentiment(cfg)
    print("\nquickstart: mean exact reward and KL(π‖π_SFT) on held-out review prefixes (± SE clustered by prompt)")
    print(short_table(result["rows"]))
    print(f"\nplot:  {result['plot']}\ntable: {result['markdown']}  ({result['seconds']:.0f} s"
          + (f"; skipped finished stages: {', '.join(result['skipped'])}" if result["skipped"] else "") + ")")
    return result


__all__ = ["QUICKSTART_SETTINGS", "run_quickstart"]
