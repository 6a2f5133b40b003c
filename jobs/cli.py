"""The ``binllm`` command line.

``binllm run CONFIG [--set k=v ...] [--stages a,b] [--force] [--dry-run]``: pipeline stages.
``binllm status RUN``: per stage, done / stale / missing and why (runs nothing).
``binllm score --run RUN --input PAIRS [--output URI]``: score (user, item) pairs.
``binllm nightly --run RUN --candidates PAIRS [--date YYYY-MM-DD] [--incremental]``, or
``binllm nightly --run RUN --topk K [--users USERS] [--date YYYY-MM-DD]``.
``binllm recommend --run RUN [--users USERS] [--k 10] [--output URI]``: top-K lists per user.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from binllm_core.errors import (
    ConfigError,
    find_user_error,
    io_error,
    raised_elsewhere,
    store_error,
)

if TYPE_CHECKING:
    from binllm_core.config import RunConfig
    from pipelines.runtime.console import Console


@dataclass(frozen=True)
class Command:
    """A ``binllm`` command: its line in ``binllm --help``, its flags, and what it runs.

    Both functions live here, not in the command's module under ``pipelines/``: those import
    Ray and Arrow, and ``binllm CMD --help`` (or a usage error) must answer without them. ``run``
    imports the work when it runs."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="binllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help))
    return parser


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show Ray's own log lines and workers' output on the terminal too (they always go "
        "to the run's log file, {run}/_logs/)",
    )


def _add_run_ref(parser: argparse.ArgumentParser, positional: bool = False) -> None:
    what = "the run: its YAML config, or its folder {output_root}/{run_name}"
    if positional:
        parser.add_argument("run", help=what)
    else:
        parser.add_argument("--run", required=True, help=what)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set score.unknown=skip (repeatable)",
    )


def _add_users(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--users",
        default="",
        help="Parquet file or folder with a string column user (source ids); default: every "
        "user of the run",
    )


def _console(cfg: Any, args: argparse.Namespace) -> Console:
    """The command's console: Ray's lines into ``{run}/_logs/``, binllm's on the terminal."""
    from pipelines.runtime.console import Console
    from pipelines.runtime.runs import run_folder

    fs, run = run_folder(cfg)
    return Console(fs, run, args.command, args.verbose, args.argv)


@contextmanager
def _trained_run(args: argparse.Namespace) -> Iterator[RunConfig]:
    """The trained run ``--run`` names (checked before anything starts), with the command's
    console, and errors of Ray's workers shown as the user errors they are."""
    from pipelines.runtime.ray_helpers import surface_user_errors
    from pipelines.runtime.runs import open_run

    cfg = open_run(args.run, args.overrides)
    with _console(cfg, args), surface_user_errors():
        yield cfg


# ---- binllm run --------------------------------------------------------------------------------
def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config, e.g. configs/ml100k.yaml")
    parser.add_argument("--config", dest="config_option", help="the same, as an option")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set data.uri=../shared/data/ml-100k (repeatable)",
    )
    parser.add_argument("--stages", default="", help="comma-separated stages (default: all)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="redo the stages from scratch, training checkpoints included",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print what each stage would do (done / stale / missing, and why); run nothing",
    )
    _add_verbose(parser)


def run_command(args: argparse.Namespace) -> None:
    from binllm_core.config import load_config

    path = args.config or args.config_option
    if not path:
        raise ConfigError("no config given", todo="write binllm run configs/ml100k.yaml")
    cfg = load_config(path, args.overrides)
    # imports Ray: config known good
    from pipelines.runtime.registry import preflight, run_pipeline

    if args.dry_run:
        print_status(cfg)
        return
    names = [s.strip() for s in args.stages.split(",") if s.strip()]
    preflight(cfg, names)  # before the log goes into the run folder
    with _console(cfg, args):
        manifests = run_pipeline(cfg, names, force=args.force)
    evaluated = manifests.get("evaluate", {}).get("metrics", {})
    rows = evaluated.get("ranking", [])
    blend = manifests.get("rerank", {}).get("metrics", {}).get("blend", {})
    for line in (lists_headline(rows, evaluated.get("ratios", [])), blend_headline(rows, blend)):
        if line:
            print(f"[binllm] {line}")
    report = evaluated.get("report")
    if report:
        from binllm_core.storage import join, to_uri
        from pipelines.runtime.runs import run_folder

        fs, run = run_folder(cfg)
        print(f"[binllm] report: {to_uri(fs, join(run, report))}")


def lists_headline(rows: list[dict], ratios: Sequence[dict] = ()) -> str:
    """The lists' NDCG@10 on every user of the test split (else the first evaluated one; full
    catalog), from the evaluate manifest's headline rows, then its ``ratios`` of that split
    (codes / float with a paired interval); empty where the run made no lists."""
    from binllm_core.evaluation.report import ratio_words

    full = _headline_split([r for r in rows if r["protocol"] == "full" and r["users"] == "all"])
    if not full:
        return ""
    split = full[0]["split"]
    figures = [f"{r['method']} {_ndcg(r)}" for r in full]
    figures += [ratio_words(r) for r in ratios if (r["protocol"], r["split"]) == ("full", split)]
    return f"{split} NDCG@10, full catalog, {full[0]['n_users']:,} users: " + "; ".join(figures)


def blend_headline(rows: list[dict], blend: dict[str, dict]) -> str:
    """The lists that ship on the users the LLM re-ranked (test split, else the first; full
    catalog): NDCG@10 of the codes' lists, the LLM's order and the blend of each mode with its
    weight (``blend``: stage rerank's choice per mode); empty where nothing was re-ranked."""
    full = _headline_split(
        [r for r in rows if r["protocol"] == "full" and r["users"] == "reranked"]
    )
    if not full:
        return ""
    figures = []
    for r in full:
        name = r["method"] if r["method"] == "codes" else f"{r['method']} ({r['mode']})"
        if r["method"] == "blend" and r["mode"] in blend:
            name += f", alpha {blend[r['mode']]['alpha']:g}"
        figures.append(f"{name} {_ndcg(r)}")
    return (
        f"{full[0]['split']} NDCG@10, full catalog, the {full[0]['n_users']:,} users the LLM "
        "re-ranked: " + "; ".join(figures)
    )


def _headline_split(rows: list[dict]) -> list[dict]:
    """The rows of the test split, else of the first split among ``rows``."""
    if not rows:
        return []
    splits = [r["split"] for r in rows]
    split = "test" if "test" in splits else splits[0]
    return [r for r in rows if r["split"] == split]


def _ndcg(row: dict) -> str:
    low, high = row.get("ndcg_low"), row.get("ndcg_high")
    return f"{row['ndcg']:.4f}" + (f" [{low:.4f}, {high:.4f}]" if low is not None else "")


# ---- binllm status -----------------------------------------------------------------------------
def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    _add_run_ref(parser, positional=True)


def print_status(cfg: Any) -> None:
    from binllm_core.io.lock import describe
    from pipelines.runtime.registry import pipeline_status, run_lock
    from pipelines.runtime.runs import run_folder

    fs, run = run_folder(cfg)
    print(f"[binllm] run {run}")
    holder = run_lock(cfg).holder()
    if holder is not None:
        print(f"  in progress: {describe(holder)}")
    rows = pipeline_status(cfg)
    width = max(len(row["stage"]) for row in rows)
    for row in rows:
        print(f"  {row['stage']:<{width}} {row['state']:<10} {row['why']}")


def status_command(args: argparse.Namespace) -> None:
    from pipelines.runtime.runs import open_run

    print_status(open_run(args.run, args.overrides, trained=False))


# ---- binllm score ------------------------------------------------------------------------------
def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    _add_run_ref(parser)
    _add_verbose(parser)
    parser.add_argument(
        "--input",
        required=True,
        help="Parquet file or folder with string columns user and item (source ids)",
    )
    parser.add_argument(
        "--output",
        default="",
        help="output folder URI: new, empty, or an earlier binllm score output "
        "(default: {run}/pairs/{input name})",
    )


def score_command(args: argparse.Namespace) -> None:
    from pipelines.pairs import score_candidates

    with _trained_run(args) as cfg:
        score_candidates(cfg, args.input, args.output)


# ---- binllm nightly ----------------------------------------------------------------------------
def add_nightly_arguments(parser: argparse.ArgumentParser) -> None:
    _add_run_ref(parser)
    _add_verbose(parser)
    parser.add_argument(
        "--candidates",
        default="",
        help="Parquet file or folder of (user, item) candidates to score",
    )
    parser.add_argument(
        "--topk",
        type=int,
        default=0,
        help="instead of candidates: the top K items per user into RUN/recommendations/date=DATE/",
    )
    _add_users(parser)
    parser.add_argument("--date", default="", help="partition date YYYY-MM-DD (default: today)")
    parser.add_argument(
        "--incremental",
        action="store_true",
        help="carry over pairs already scored with the same model and adapter",
    )


def nightly_command(args: argparse.Namespace) -> None:
    if bool(args.candidates) == bool(args.topk):
        raise ConfigError(
            "nightly needs either --candidates PAIRS or --topk K", todo="give exactly one"
        )
    if args.users and not args.topk:
        raise ConfigError("--users goes with --topk", todo="add --topk K or drop --users")
    if args.incremental and args.topk:
        raise ConfigError(
            "--incremental carries over scored candidates; --topk makes new lists",
            todo="drop --incremental",
        )
    with _trained_run(args) as cfg:
        if args.topk:
            from pipelines.recommend import nightly_topk

            nightly_topk(cfg, args.topk, args.users, args.date)
        else:
            from pipelines.nightly import run_nightly

            run_nightly(cfg, args.candidates, args.date, args.incremental)


# ---- binllm recommend --------------------------------------------------------------------------
def add_recommend_arguments(parser: argparse.ArgumentParser) -> None:
    _add_run_ref(parser)
    _add_verbose(parser)
    _add_users(parser)
    parser.add_argument("--k", type=int, default=10, help="items per user (default 10)")
    parser.add_argument(
        "--output",
        default="",
        help="output folder URI: new, empty, or an earlier binllm recommend output "
        "(default: {run}/recommendations/{users name, or all})",
    )


def recommend_command(args: argparse.Namespace) -> None:
    from pipelines.recommend import recommend

    with _trained_run(args) as cfg:
        recommend(cfg, args.users, args.k, args.output)


COMMANDS: dict[str, Command] = {
    "run": Command(
        "run pipeline stages on a local Ray or on RAY_ADDRESS", add_run_arguments, run_command
    ),
    "status": Command(
        "per stage of a run: done, stale or missing, and why (runs nothing)",
        add_status_arguments,
        status_command,
    ),
    "score": Command(
        "score a table of (user, item) pairs with a trained run", add_score_arguments, score_command
    ),
    "nightly": Command(
        "score the night's candidates into RUN/nightly/date=DATE/",
        add_nightly_arguments,
        nightly_command,
    ),
    "recommend": Command(
        "top-K items per user: codes retrieve, the LLM re-ranks",
        add_recommend_arguments,
        recommend_command,
    ),
}
"""The ``binllm`` commands, in ``binllm --help`` order; ``python -m jobs.score`` (and the other
``jobs`` modules) run their entry here."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    from pipelines.runtime import console  # after parsing: --help and usage errors stay light

    console.forget_error()
    try:
        COMMANDS[args.command].run(args)
    except KeyboardInterrupt:
        print(
            "binllm: interrupted: what was running published nothing; every output published "
            "before is kept whole",
            file=sys.stderr,
        )
        return 130
    except Exception as err:  # noqa: BLE001 - one line for users, the trace for anything else
        found = find_user_error(err) or io_error(err)
        down = None if found is not None else store_error(err)
        if found is not None or down is not None:
            line = f"{found}{raised_elsewhere(found)}" if found is not None else str(down)
            log = console.error_log() if down is not None else ""
            print(
                f"binllm: error: {line}" + (f"; the trace is in {log}" if log else ""),
                file=sys.stderr,
            )
            return 2
        log = console.error_log()
        if getattr(args, "verbose", False) or not log:
            raise
        print(
            f"binllm: internal error: {_summary(err)}; the whole trace is in {log} "
            "(please report it with that file)",
            file=sys.stderr,
        )
        return 1
    return 0


def _summary(err: BaseException, limit: int = 300) -> str:
    """The root cause of ``err`` in one line (a failed Ray task's message holds the whole
    remote traceback; its cause is the worker's own exception)."""
    root = err
    while True:
        cause = getattr(root, "cause", None) or root.__cause__
        if not isinstance(cause, BaseException) or cause is root:
            break
        root = cause
    lines = [line for line in str(root).splitlines() if line.strip()]
    text = f"{type(root).__name__}: {lines[-1].strip()}" if lines else type(root).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


if __name__ == "__main__":
    sys.exit(main())
