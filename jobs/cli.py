"""The ``binllm`` command line.

``binllm run CONFIG [--set k=v ...] [--stages a,b] [--force]``: pipeline stages.
``binllm score --run RUN --input PAIRS [--output URI]``: score (user, item) pairs.
``binllm nightly --run RUN --candidates PAIRS [--date YYYY-MM-DD] [--incremental]``.
"""

from __future__ import annotations

import argparse
import sys

from binllm_core.config import load_config
from binllm_core.errors import ConfigError, find_user_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="binllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run pipeline stages on a local Ray or on RAY_ADDRESS")
    add_run_arguments(run)
    score = sub.add_parser("score", help="score a table of (user, item) pairs with a trained run")
    add_score_arguments(score)
    nightly = sub.add_parser("nightly", help="score the night's candidates into scores/date=DATE/")
    add_nightly_arguments(nightly)
    return parser


def _add_run_ref(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run", required=True,
        help="the trained run: its YAML config, or its folder {output_root}/{run_name}",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set score.unknown=skip (repeatable)",
    )


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    _add_run_ref(parser)
    parser.add_argument(
        "--input", required=True,
        help="Parquet file or folder with string columns user and item (source ids)",
    )
    parser.add_argument(
        "--output", default="", help="output folder URI (default: {run}/scored/{input name})"
    )


def add_nightly_arguments(parser: argparse.ArgumentParser) -> None:
    _add_run_ref(parser)
    parser.add_argument(
        "--candidates", required=True, help="Parquet file or folder of (user, item) candidates"
    )
    parser.add_argument("--date", default="", help="partition date YYYY-MM-DD (default: today)")
    parser.add_argument(
        "--incremental", action="store_true",
        help="carry over pairs already scored with the same model and adapter",
    )


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config, e.g. configs/ml100k.yaml")
    parser.add_argument("--config", dest="config_option", help="the same, as an option")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set data.uri=../shared/data/ml-100k (repeatable)",
    )
    parser.add_argument("--stages", default="", help="comma-separated stages (default: all)")
    parser.add_argument("--force", action="store_true", help="redo stages that finished before")


def run_command(args: argparse.Namespace) -> None:
    path = args.config or args.config_option
    if not path:
        raise ConfigError("no config given", todo="write binllm run configs/ml100k.yaml")
    cfg = load_config(path, args.overrides)
    from pipelines.registry import run_pipeline  # imports Ray: after the config is known good

    names = [s.strip() for s in args.stages.split(",") if s.strip()]
    manifests = run_pipeline(cfg, names, force=args.force)
    report = manifests.get("evaluate", {}).get("metrics", {}).get("report")
    if report:
        print(f"[binllm] report: {report}")


def score_command(args: argparse.Namespace) -> None:
    from pipelines.candidates import open_run, score_candidates
    from pipelines.runtime import surface_user_errors

    cfg = open_run(args.run, args.overrides)
    with surface_user_errors():
        score_candidates(cfg, args.input, args.output)


def nightly_command(args: argparse.Namespace) -> None:
    from pipelines.candidates import open_run, run_nightly
    from pipelines.runtime import surface_user_errors

    cfg = open_run(args.run, args.overrides)
    with surface_user_errors():
        run_nightly(cfg, args.candidates, args.date, args.incremental)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            run_command(args)
        elif args.command == "score":
            score_command(args)
        elif args.command == "nightly":
            nightly_command(args)
    except Exception as err:  # noqa: BLE001 - one line for users, the trace for anything else
        found = find_user_error(err)
        if found is None:
            raise
        print(f"binllm: error: {found}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
