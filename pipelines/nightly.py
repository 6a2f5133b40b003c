"""Nightly scoring: the night's candidates -> ``{run}/nightly/date=YYYY-MM-DD/``, published whole.

Each night is one published output (:mod:`binllm_core.storage`): a new version of the date's
folder, then its manifest. The same date again publishes a new version that replaces the old
one whole (no duplicates); a failed or killed run leaves the previous version current; two
nightlies of one run and date cannot run at once (the second stops, naming the first).
Read every night with ``pl.scan_parquet("RUN/nightly/date=*/v-*/scores/*.parquet",
hive_partitioning=True)`` when no nightly is writing, or one night consistently with
:func:`read_nightly`.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import polars as pl
import pyarrow as pa
import ray

from binllm_core.config import RunConfig
from binllm_core.errors import ConfigError, StageError
from binllm_core.prompts.user_pairs import distinct_pairs
from binllm_core.storage import LAYOUT, join, read_manifest, read_published, to_uri
from pipelines.pairs import CANDIDATE_SCORES_SCHEMA, CARRY_COLUMNS, read_pairs, score_pairs
from pipelines.runtime.outputs import publish_command
from pipelines.runtime.runs import run_folder

NIGHTLY = "nightly"


def parse_date(date: str) -> str:
    """``date`` (empty: today, UTC) as a real calendar date ``YYYY-MM-DD``."""
    if not date:
        return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    try:
        parsed = dt.date.fromisoformat(date) if len(date) == 10 else None
    except ValueError:
        parsed = None
    if parsed is None:
        raise ConfigError(
            f"date {date!r} is not a calendar date YYYY-MM-DD", todo="e.g. 2026-11-22"
        )
    return parsed.isoformat()


def nightly_root(cfg: RunConfig) -> tuple[Any, str]:
    fs, run = run_folder(cfg)
    return fs, join(run, NIGHTLY)


def run_nightly(
    cfg: RunConfig,
    candidates_uri: str,
    date: str = "",
    incremental: bool = False,
    log: Any = print,
) -> dict[str, Any]:
    """Score the candidates of one night into ``{run}/nightly/date=YYYY-MM-DD/``.

    ``incremental`` takes over the score of every pair whose prompt, model and adapter match a
    row of an existing partition (newest date first) instead of scoring it again
    (``carried`` = true)."""
    date = parse_date(date)
    pairs = distinct_pairs(read_pairs(candidates_uri, cfg.output_storage_options))
    fs, root = nightly_root(cfg)

    def produce() -> tuple[ray.data.Dataset, dict[str, Any]]:
        carry = previous_scores(fs, root) if incremental else None
        log(
            f"[binllm] nightly {date}: {pairs.num_rows:,} distinct candidates from {candidates_uri}"
            + (
                f", {0 if carry is None else carry.height:,} earlier scores to carry"
                if incremental
                else ""
            )
        )
        return score_pairs(cfg, pairs, candidates_uri, carry)

    manifest = publish_command(
        cfg,
        kind=NIGHTLY,
        name=f"date={date}",
        who="scoring with this run",
        produce=produce,
        table="scores",
        schema=CANDIDATE_SCORES_SCHEMA,
        fields={"date": date, "candidates": candidates_uri, "incremental": incremental},
        log=log,
    )
    stats = manifest["metrics"]
    log(
        f"[binllm] nightly {date}: {stats['rendered_rows']:,} rows "
        f"({stats['carried_rows']:,} carried, {stats['cold_rows']:,} cold, "
        f"{stats['skipped_rows']:,} skipped) -> {manifest['output']}"
    )
    return manifest


def committed_partitions(fs: Any, root: str) -> list[str]:
    """Dates of the partitions under ``root`` that have a published version, newest first."""
    if not fs.exists(root):
        return []
    dates = []
    for entry in fs.ls(root, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith("date="):
            continue
        manifest = read_manifest(fs, entry)
        if manifest is not None and manifest.get("layout") == LAYOUT:
            dates.append(name.removeprefix("date="))
    return sorted(dates, reverse=True)


def previous_scores(fs: Any, root: str) -> pl.DataFrame:
    """Earlier nightly scores (newest partition first) for carrying over."""
    frames = []
    for date in committed_partitions(fs, root):
        table = read_published(fs, join(root, f"date={date}"), "scores", CARRY_COLUMNS)
        frames.append(pl.from_arrow(table))
    if not frames:
        schema = pa.schema([CANDIDATE_SCORES_SCHEMA.field(c) for c in CARRY_COLUMNS])
        return pl.from_arrow(schema.empty_table())
    return pl.concat(frames, how="vertical_relaxed")


def read_nightly(cfg: RunConfig, date: str) -> pa.Table:
    """One published nightly partition, its current version."""
    fs, root = nightly_root(cfg)
    folder = join(root, f"date={date}")
    if read_manifest(fs, folder) is None:
        raise StageError(f"no published nightly partition for {date}", to_uri(fs, folder))
    return read_published(fs, folder, "scores")
