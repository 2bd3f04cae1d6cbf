"""The `rdhpc` command. Each subcommand is a thin entry point into the library.

    rdhpc config configs/debug.yaml --set model.mean_recurrence=8   # resolve, validate, summarise
    rdhpc demo                                                       # the main job on an embedded default

User errors (bad config, bad checkpoint) print every problem and exit with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import sys

def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True):
    parser.add_argument("config", nargs=None if required else "?", help="YAML run configuration")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable); the value is parsed as YAML")


def cmd_config(args) -> int:
    from rdhpc.config import config_to_yaml, load_config

    config = load_config(args.config, args.overrides)
    if not args.quiet:
        print(config_to_yaml(config), end="")
    print(model_summary(config.model), file=sys.stderr if not args.quiet else sys.stdout)
    return 0


def model_summary(model_config) -> str:
    import torch

    from rdhpc.model import RecurrentDepthModel

    with torch.device("meta"):
        model = RecurrentDepthModel(model_config)
    counts = model.parameter_counts()
    r = model_config.mean_recurrence
    return (f"# model {model_config.size or '(custom)'}: {counts['total']:,} parameters "
            f"(core {counts['core']:,}, prelude+coda {counts['prelude'] + counts['coda']:,}, "
            f"adapter {counts['adapter']:,}, embedding {counts['embedding']:,}); "
            f"{model.unrolled_parameters(r):,} unrolled at the mean depth r={r}")


def cmd_train(args) -> int:
    from rdhpc.config import load_config
    from rdhpc.distributed import discover_ranks
    from rdhpc.train.trainer import train

    run = load_config(args.config, args.overrides)
    train(run, discover_ranks())
    return 0


def cmd_launch_local(args) -> int:
    from rdhpc.config import ConfigError, load_config
    from rdhpc.launch.local import launch_local

    problems = [f"--nproc: must be >= 1, got {args.nproc}"] if args.nproc < 1 else []
    try:
        run = load_config(args.config, args.overrides)  # every problem reported once, before any rank starts
        problems += run.training_problems()
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        raise ConfigError(problems, args.config)
    command = ["train", args.config] + [f"--set={o}" for o in args.overrides]
    return launch_local(command, args.nproc, log=lambda *a, **k: print(*a, **k))


def cmd_demo(args) -> int:
    from rdhpc.demo import run_demo

    return run_demo(args.run_dir, steps=args.steps, overrides=args.overrides, gpu=args.gpu, nproc=args.nproc)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rdhpc", description="Pretraining of recurrent-depth language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("config", help="resolve and validate a run configuration; print it with a model summary")
    add_config_arguments(p)
    p.add_argument("--quiet", action="store_true", help="only validate and print the summary")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("train", help="DeepSpeed ZeRO pretraining (this process is one rank)")
    add_config_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("launch", help="start the trainer on several ranks")
    where = p.add_subparsers(dest="where", metavar="WHERE", required=True)
    q = where.add_parser("local", help="N ranks on this machine (gloo on CPU, one GPU each otherwise)")
    add_config_arguments(q)
    q.add_argument("--nproc", type=int, default=1)
    q.set_defaults(func=cmd_launch_local)

    p = sub.add_parser("demo", help="the main job on an embedded default (what `make demo` runs)")
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--steps", type=int, default=None, help="training steps (default from configs/demo.yaml)")
    p.add_argument("--gpu", action="store_true", help="train on this machine's GPUs in bf16, one rank per GPU")
    p.add_argument("--nproc", type=int, default=None, help="ranks (default 2 on CPU, the GPU count with --gpu)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.set_defaults(func=cmd_demo)

    from data_prep.cli import add_prep_parser

    add_prep_parser(sub)

    from rdhpc.cli_tools import add_tool_parsers  # eval, generate, export, plan, tensorboard

    add_tool_parsers(sub)

    from rdhpc.launch.cli import add_submit_parser

    add_submit_parser(sub)  # submit, status (rdhpc.launch.slurm is imported only when they run)

    return parser


def main(argv: list[str] | None = None) -> int:
    from rdhpc.errors import ConfigError, UserError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"rdhpc {args.command}: {exc}", file=sys.stderr)
        return 2
    except UserError as exc:
        print(f"rdhpc {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
