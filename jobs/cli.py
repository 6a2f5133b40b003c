"""The ``binllm`` command line: ``binllm run CONFIG [--set k=v ...] [--stages a,b] [--force]``."""

from __future__ import annotations

import argparse
import sys

from binllm_core.config import load_config
from binllm_core.errors import find_user_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="binllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run pipeline stages on a local Ray or on RAY_ADDRESS")
    add_run_arguments(run)
    return parser


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config, e.g. configs/ml100k.yaml")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set data.uri=../shared/data/ml-100k (repeatable)",
    )
    parser.add_argument("--stages", default="", help="comma-separated stages (default: all)")
    parser.add_argument("--force", action="store_true", help="redo stages that finished before")


def run_command(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    from pipelines.registry import run_pipeline  # imports Ray: after the config is known good

    names = [s.strip() for s in args.stages.split(",") if s.strip()]
    run_pipeline(cfg, names, force=args.force)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            run_command(args)
    except Exception as err:  # noqa: BLE001 - one line for users, the trace for anything else
        found = find_user_error(err)
        if found is None:
            raise
        print(f"binllm: error: {found}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
