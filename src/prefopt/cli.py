"""The ``prefopt`` command: one entry point, one sub-command per job.

Training sub-commands take their flags from the config dataclass (``--micro-batch-size`` is the field
``micro_batch_size``), a ``--config run.yaml`` file, or both (flags given on the command line win).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .config import (
    DPOConfig,
    EvalConfig,
    GenerateConfig,
    InspectConfig,
    KTOConfig,
    LabelConfig,
    PPOConfig,
    RMConfig,
    ScoreConfig,
    SFTConfig,
    TrainConfig,
    field_docs,
    field_types,
    load_config,
    unwrap_optional,
)
from .errors import PrefoptError
from .experiments.sentiment import SentimentConfig


@dataclass(frozen=True)
class Command:
    """One config-driven sub-command: its flags come from ``config``, and ``runner`` gets the loaded config."""

    name: str
    """Words after 'prefopt': 'dpo', or 'experiment sentiment' for a command of the 'experiment' group."""
    config: type
    runner: str
    """'module:function', imported only when the command runs (so --help never imports torch)."""
    help: str
    description: str | None = None
    """The command's --help description; default: the config class's docstring."""
    report: str | None = None
    """Printed after the runner, formatted with the mapping it returns."""


COMMANDS: tuple[Command, ...] = (
    Command("dpo", DPOConfig, "prefopt.train.dpo:train_dpo",
            "train a causal LM on preference data with DPO or a related loss",
            "Train with DPO (or another loss of --loss: cdpo, robust, ipo, hinge, apo_zero, plackett_luce, ...)."),
    Command("sft", SFTConfig, "prefopt.train.sft:train_sft",
            "supervised fine-tuning on prompt/response, conversation or text data",
            "Supervised fine-tuning: NLL of the response tokens (prompt tokens masked). "
            "--from-preferences trains on the chosen responses of preference data."),
    Command("kto", KTOConfig, "prefopt.train.kto:train_kto",
            "train with KTO on unpaired feedback: {prompt, completion, label: true|false} rows, or pairs"),
    Command("rm", RMConfig, "prefopt.train.rm:train_rm",
            "train a Bradley-Terry reward model on preference pairs",
            "Train a reward model (a scalar head on a causal LM) with "
            "-log sigmoid(r_chosen - r_rejected); saved for AutoModelForSequenceClassification."),
    Command("ppo", PPOConfig, "prefopt.train.ppo:train_ppo",
            "RLHF with PPO: sample, score with a reward model or function, KL-penalised "
            "clipped updates (the DPO paper's baseline)",
            "PPO-RLHF (Ziegler et al. 2019): prompts from --data, reward from --reward-model "
            "or --reward-fn, per-token KL penalty against the initial policy, GAE, clipped "
            "policy and value losses. One step = one rollout batch + ppo_epochs of updates."),
    Command("generate", GenerateConfig, "prefopt.generation:run_generate",
            "sample responses to prompts (batched, KV-cached, reproducible per seed)"),
    Command("label", LabelConfig, "prefopt.label:run_label",
            "score samples with a reward function or model and write preference pairs or rankings"),
    Command("score", ScoreConfig, "prefopt.score:run_score",
            "implicit rewards beta*(log pi - log pi_ref) of a DPO model, pair accuracy, optional RM comparison"),
    Command("eval", EvalConfig, "prefopt.eval.run:run_eval",
            "win rates against a baseline judged pairwise (reward model, implicit reward, function or LLM) at "
            "several sampling temperatures, with intervals, a plot and an HTML report"),
    Command("experiment sentiment", SentimentConfig, "prefopt.experiments.sentiment:run_sentiment",
            "controlled sentiment generation: reward vs KL for DPO, PPO, Best-of-N",
            " ".join((SentimentConfig.__doc__ or "").split()) + " Stages are resumable: a rerun skips finished "
            "ones. Without --data the built-in review corpus (exact reward) is used.",
            report="table: {markdown}\nplot:  {plot}"),
    Command("data inspect", InspectConfig, "prefopt.data.inspect:run_inspect",
            "print one data row as the model sees it: text, tokens, prompt/response boundary, truncation"),
)

# Command groups ('prefopt experiment ...'): help and the metavar of the group's sub-command argument.
GROUPS = {"experiment": ("experiments from the DPO paper: 'prefopt experiment sentiment'", "EXPERIMENT"),
          "data": ("look at data as the model will see it: 'prefopt data inspect'", "ACTION")}


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
    path = getattr(args, "config", None)
    if "mixed_precision" in names and "mixed_precision" not in overrides and not _sets(path, "mixed_precision"):
        launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
        if launched in ("bf16", "fp16"):  # the accelerate config's precision, when prefopt's was not given
            overrides["mixed_precision"] = launched
            if os.environ.get("RANK", "0") == "0":
                print(f"mixed precision: {launched}, from the accelerate launch config (--mixed-precision to change it)")
    return load_config(cls, path, overrides)


def _sets(path: str | None, key: str) -> bool:
    """The YAML config file at ``path`` gives ``key``."""
    if not path or not Path(path).is_file():
        return False
    import yaml

    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError:
        return False  # load_config reports it
    return isinstance(loaded, dict) and key in loaded


# ---------------------------------------------------------------------------------------------------------
# Sub-commands


def run_command(command: Command, args: argparse.Namespace) -> int:
    """Load the command's config from the flags (and --config), import its runner, run it."""
    config = config_from_args(command.config, args)  # type: ignore[arg-type]
    module, func = command.runner.split(":")
    result = getattr(importlib.import_module(module), func)(config)
    if command.report is not None:
        print(command.report.format_map(result))
    return 0


def cmd_model_init(args: argparse.Namespace) -> int:
    from .models import init_model

    path = init_model(args.size, args.output_dir, corpus=args.corpus, vocab_size=args.vocab_size, seed=args.seed)
    info = (Path(path) / "prefopt_model.json").read_text()
    print(f"wrote a '{args.size}' model to {path}\n{info}")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from .experiments.quickstart import run_quickstart

    run_quickstart(args.output_dir, steps=args.max_steps, sft_steps=args.sft_steps, size=args.size, seed=args.seed)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .eval.plots import plot_training_curves

    output_dir = args.output_dir if args.output_dir is not None else Path(args.run_dirs[0]) / "plots"
    keys = args.keys.split(",") if args.keys else None
    for path in plot_training_curves(args.run_dirs, output_dir, keys=keys):
        print(path)
    return 0


def _add_plot_parser(sub: Any) -> None:
    p = sub.add_parser("plot", help="training curves (PNG) from runs' metrics.jsonl, several runs overlaid",
                       description="One PNG per metric group in the runs' metrics.jsonl (loss, reward margins with "
                                   "chosen/rejected rewards, accuracy, log-probs, any other numeric key), x = step, "
                                   "runs overlaid, evaluation rows dashed with markers. Prints the written paths.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a training run's --output-dir")
    p.add_argument("--output-dir", default=None, help="where the PNGs go (default: <first RUN_DIR>/plots)")
    p.add_argument("--keys", default=None, help="only these metrics, comma-separated (e.g. loss,rewards/margins)")
    p.set_defaults(func=cmd_plot)


def _add_model_parser(sub: Any) -> None:
    p = sub.add_parser("model", help="make models: 'prefopt model init'")
    msub = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    q = msub.add_parser("init", help="build a small Llama-style model and train its byte-level BPE tokenizer")
    q.add_argument("--size", default="tiny", help="tiny, small or medium (default: tiny)")
    q.add_argument("--output-dir", required=True)
    q.add_argument("--corpus", help="text file for the tokenizer, one document a line (default: built-in text)")
    q.add_argument("--vocab-size", type=int, default=None, help="tokenizer vocabulary cap (default 4096)")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=cmd_model_init)


def _add_quickstart_parser(sub: Any) -> None:
    p = sub.add_parser("quickstart", help="the built-in demo: the DPO paper's sentiment experiment in minutes "
                                          "(SFT, sampled pairs, DPO, reward vs KL table and plot)")
    p.add_argument("--output-dir", default="runs/quickstart", help="where every stage goes (a rerun skips done ones)")
    p.add_argument("--max-steps", type=int, default=None, help="DPO steps per beta (default 100)")
    p.add_argument("--sft-steps", type=int, default=None, help="SFT steps (default 400)")
    p.add_argument("--size", default="tiny", help="model size: tiny, small or medium (default: tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_quickstart)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefopt", description="Direct Preference Optimization for causal LMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, Any] = {}

    def add(command: Command) -> None:
        *group, name = command.name.split()
        parent = sub
        if group:
            if group[0] not in groups:
                help_, metavar = GROUPS[group[0]]
                p = sub.add_parser(group[0], help=help_)
                groups[group[0]] = p.add_subparsers(dest=group[0], metavar=metavar, required=True)
            parent = groups[group[0]]
        description = command.description or " ".join((command.config.__doc__ or command.help).split())
        p = parent.add_parser(name, help=command.help, description=description)
        add_config_flags(p, command.config)
        p.set_defaults(func=functools.partial(run_command, command))

    # Top-level commands, then the hand-written ones, then the groups: the order 'prefopt --help' lists them in.
    for command in COMMANDS:
        if " " not in command.name:
            add(command)
    _add_model_parser(sub)
    _add_quickstart_parser(sub)
    _add_plot_parser(sub)
    for command in COMMANDS:
        if " " in command.name:
            add(command)
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
    except KeyboardInterrupt as e:  # a run stopped on a signal: 128 + its number (SIGINT 130, SIGTERM 143)
        return int(getattr(e, "exit_code", 130))


def run() -> None:
    """The ``prefopt`` command (and ``python -m prefopt.cli``): ``main``, then exit with its code.

    A launched process (torchrun / accelerate launch: a process group is up) ends with ``os._exit`` once its
    output is flushed: its files are already written and fsynced, and a normal interpreter exit destroys
    communication threads (the process group's, its store's) that may still be joinable, which aborts the
    process after a run that finished ("terminate called without an active exception", about one launch in five
    seen here under FSDP2 and DeepSpeed), and the launcher then reports the whole run failed."""
    code = main()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    run()
