"""The ``prefopt`` command: one entry point, one sub-command per job.

Training sub-commands take their flags from the config dataclass (``--micro-batch-size`` is the field
``micro_batch_size``), a ``--config run.yaml`` file, or both (flags given on the command line win).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .config import DPOConfig, TrainConfig, unwrap_optional, field_docs, field_types, load_config
from .errors import PrefoptError


def add_config_flags(parser: argparse.ArgumentParser, cls: type[TrainConfig]) -> None:
    """One flag per config field; defaults are suppressed so that only flags given override the YAML."""
    parser.add_argument("--config", help="YAML file of options (flags on the command line override it)")
    docs = field_docs(cls)
    defaults = cls()
    for name, tp in field_types(cls).items():
        base, _ = unwrap_optional(tp)
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        help_ = f"{docs.get(name, '')} (default: {default})".strip()
        if base is bool:
            parser.add_argument(flag, dest=name, nargs="?", const=True, default=argparse.SUPPRESS,
                                metavar="BOOL", help=help_)
        else:
            parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, metavar=name.upper(), help=help_)


def config_from_args(cls: type[TrainConfig], args: argparse.Namespace) -> TrainConfig:
    names = set(field_types(cls))
    overrides = {k: v for k, v in vars(args).items() if k in names}
    return load_config(cls, getattr(args, "config", None), overrides)


# ---------------------------------------------------------------------------------------------------------
# Sub-commands


def cmd_dpo(args: argparse.Namespace) -> int:
    from .train.dpo import train_dpo

    train_dpo(config_from_args(DPOConfig, args))
    return 0


def cmd_model_init(args: argparse.Namespace) -> int:
    from .models import init_model

    path = init_model(args.size, args.output_dir, corpus=args.corpus, vocab_size=args.vocab_size, seed=args.seed)
    info = (Path(path) / "prefopt_model.json").read_text()
    print(f"wrote a '{args.size}' model to {path}\n{info}")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import run_quickstart

    run_quickstart(args.output_dir, steps=args.max_steps, sft_steps=args.sft_steps, size=args.size, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefopt", description="Direct Preference Optimization for causal LMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("dpo", help="train a causal LM on preference data with DPO or a related loss",
                       description="Train with DPO (or cdpo, robust, ipo, ipo_per_token, hinge, plackett_luce).")
    add_config_flags(p, DPOConfig)
    p.set_defaults(func=cmd_dpo)

    # [anchor: sft/rm sub-commands]
    from .config import RMConfig, SFTConfig

    def cmd_sft(args: argparse.Namespace) -> int:
        from .train.sft import train_sft

        train_sft(config_from_args(SFTConfig, args))
        return 0

    def cmd_rm(args: argparse.Namespace) -> int:
        from .train.rm import train_rm

        train_rm(config_from_args(RMConfig, args))
        return 0

    p = sub.add_parser("sft", help="supervised fine-tuning on prompt/response, conversation or text data",
                       description="Supervised fine-tuning: NLL of the response tokens (prompt tokens masked). "
                                   "--from-preferences trains on the chosen responses of preference data.")
    add_config_flags(p, SFTConfig)
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("rm", help="train a Bradley-Terry reward model on preference pairs",
                       description="Train a reward model (a scalar head on a causal LM) with "
                                   "-log sigmoid(r_chosen - r_rejected); saved for AutoModelForSequenceClassification.")
    add_config_flags(p, RMConfig)
    p.set_defaults(func=cmd_rm)

    # [anchor: ppo sub-command]
    from .config import PPOConfig

    def cmd_ppo(args: argparse.Namespace) -> int:
        from .train.ppo import train_ppo

        train_ppo(config_from_args(PPOConfig, args))
        return 0

    p = sub.add_parser("ppo", help="RLHF with PPO: sample, score with a reward model or function, KL-penalised "
                                   "clipped updates (the DPO paper's baseline)",
                       description="PPO-RLHF (Ziegler et al. 2019): prompts from --data, reward from --reward-model "
                                   "or --reward-fn, per-token KL penalty against the initial policy, GAE, clipped "
                                   "policy and value losses. One step = one rollout batch + ppo_epochs of updates.")
    add_config_flags(p, PPOConfig)
    p.set_defaults(func=cmd_ppo)

    # [anchor: generate/label/score sub-commands]
    from .config import GenerateConfig, LabelConfig, ScoreConfig

    def _pipeline_command(module: str, func: str, cls: type) -> Callable[[argparse.Namespace], int]:
        def run(args: argparse.Namespace) -> int:
            import importlib

            getattr(importlib.import_module(f"prefopt.{module}"), func)(config_from_args(cls, args))
            return 0
        return run

    for name, cls, module, func, help_ in (
        ("generate", GenerateConfig, "generation", "run_generate",
         "sample responses to prompts (batched, KV-cached, reproducible per seed)"),
        ("label", LabelConfig, "label", "run_label",
         "score samples with a reward function or model and write preference pairs or rankings"),
        ("score", ScoreConfig, "score", "run_score",
         "implicit rewards beta*(log pi - log pi_ref) of a DPO model, pair accuracy, optional RM comparison"),
    ):
        p = sub.add_parser(name, help=help_, description=" ".join((cls.__doc__ or help_).split()))
        add_config_flags(p, cls)  # type: ignore[arg-type]
        p.set_defaults(func=_pipeline_command(module, func, cls))

    p = sub.add_parser("model", help="make models: 'prefopt model init'")
    msub = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    q = msub.add_parser("init", help="build a small Llama-style model and train its byte-level BPE tokenizer")
    q.add_argument("--size", default="tiny", help="tiny, small or medium (default: tiny)")
    q.add_argument("--output-dir", required=True)
    q.add_argument("--corpus", help="text file for the tokenizer, one document a line (default: built-in text)")
    q.add_argument("--vocab-size", type=int, default=None, help="tokenizer vocabulary cap (default 4096)")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=cmd_model_init)

    p = sub.add_parser("quickstart", help="the built-in demo: the DPO paper's sentiment experiment in minutes "
                                          "(SFT, sampled pairs, DPO, reward vs KL table and plot)")
    p.add_argument("--output-dir", default="runs/quickstart", help="where every stage goes (a rerun skips done ones)")
    p.add_argument("--max-steps", type=int, default=None, help="DPO steps per beta (default 100)")
    p.add_argument("--sft-steps", type=int, default=None, help="SFT steps (default 400)")
    p.add_argument("--size", default="tiny", help="model size: tiny, small or medium (default: tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_quickstart)

    from .experiments.sentiment import SentimentConfig

    def cmd_experiment_sentiment(args: argparse.Namespace) -> int:
        from .experiments.sentiment import run_sentiment

        result = run_sentiment(config_from_args(SentimentConfig, args))  # type: ignore[arg-type]
        print(f"table: {result['markdown']}\nplot:  {result['plot']}")
        return 0

    p = sub.add_parser("experiment", help="experiments from the DPO paper: 'prefopt experiment sentiment'")
    esub = p.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    q = esub.add_parser("sentiment", help="controlled sentiment generation: reward vs KL for DPO, PPO, Best-of-N",
                        description=" ".join((SentimentConfig.__doc__ or "").split()) + " Stages are resumable: a "
                        "rerun skips finished ones. Without --data the built-in review corpus (exact reward) is used.")
    add_config_flags(q, SentimentConfig)  # type: ignore[arg-type]
    q.set_defaults(func=cmd_experiment_sentiment)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], Any] = args.func
    try:
        return int(func(args) or 0)
    except PrefoptError as e:
        print(f"prefopt: error: {e}", file=sys.stderr)
        return 2
    except (OSError, ConnectionError) as e:  # a missing or unreadable model/data path, or the hub while offline
        print(f"prefopt: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
