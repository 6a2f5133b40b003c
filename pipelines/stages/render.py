"""Stage ``render`` (Ray Data): samples + item titles + codes -> ``prompts``.

One row per sample and prompt mode. Titles and codes are small next to the samples, so they are
read once on the driver and shipped to the rendering tasks; the samples stream through
``map_batches``. A second pass counts tokens with the configured tokenizer into ``n_tokens``, in
a pool of actors that each load it once (Ray Data fuses the rendering into them) and that grows
while batches wait. The prompts stay in Ray's object store (spilled to disk beyond it); the
driver gets only per-block counts of (mode, split, n_tokens), folded into the manifest's
summary; the user and item ids checked against the codes come from the id maps. ``prompts`` is
written partitioned, ``prompts/mode=M/split=S/`` (the columns stay in the files too), so a stage
that needs one mode reads only its slice:
``ctx.read_dataset("render", "prompts", {"mode": "binary"})``.

With ``prompts.aux.tasks``, the auxiliary task rows (:mod:`binllm_core.prompts.aux_rows`) are made
from the train samples on the driver (a few rows per user and task) and written, in every prompt
mode and with their token counts, as the table ``aux``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import ray

from binllm_core.config import ModelConfig
from binllm_core.errors import StageError
from binllm_core.llm.backbone import load_tokenizer
from binllm_core.modes import MODES
from binllm_core.prompts.aux_rows import AuxTemplates, build_rows, render_rows, repeated_rows
from binllm_core.prompts.render import (
    SAMPLE_COLUMNS,
    Lookups,
    check_codes,
    lookups_from_tables,
    render_table,
)
from binllm_core.prompts.templates import Templates, templates_from_config
from binllm_core.prompts.token_lengths import TokenLengths
from pipelines.runtime.progress import Reporter, progress
from pipelines.runtime.stage import StageContext

BATCH_ROWS = 16_384
"""Samples rendered (and prompts counted) per batch: one block of the materialized prompts
(~8 MB of text). Every later pass over the prompts (the token summary, each partition's write)
is one task per block, and a task costs ~15 ms here: 2048-row blocks spent 7 s of a 1M-prompt
render on the summary alone."""


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.cfg.prompts
    templates = templates_from_config(cfg)
    modes = list(cfg.modes)
    items = ctx.read_table("ingest", "items", columns=["item", "title"])
    item_map = ctx.read_table("samples", "item_map", columns=["item", "iid"])
    codes = None
    if any(MODES[m].has_codes for m in modes):
        codes = ctx.read_table("encode", "codes", columns=["entity", "id", "bits"])
    lookups = lookups_from_tables(items, item_map, codes)
    if codes is not None:  # every mapped user and item has samples: the maps hold their ids
        uids = ctx.read_table("samples", "user_map", columns=["uid"])["uid"].to_pylist()
        check_codes(uids, item_map["iid"].to_pylist(), lookups, modes)

    samples = ctx.read_dataset("samples", "samples").select_columns(SAMPLE_COLUMNS)
    total = ctx.manifest_of("samples")["tables"]["samples"]["rows"] * len(modes)
    with progress("render", total, "prompt") as reporter:
        prompts = _rendered(samples, lookups, templates, modes, cfg.history_len, ctx, reporter)
    summary = _summary(prompts)
    if summary.height == 0:
        raise StageError("no samples to render", ctx.uri(ctx.stage_path("samples")))
    # Partitioned by mode and split: finetune and score read only the slices they use.
    for mode, split in summary.select("mode", "split").unique().sort("mode", "split").rows():
        part = prompts.filter(expr=f"mode == '{mode}' and split == '{split}'")
        ctx.write_dataset(part, "prompts", {"mode": mode, "split": split})

    return {
        **({"aux": _write_aux(ctx, lookups, _in_words(modes))} if cfg.aux.tasks else {}),
        "modes": modes,
        "rows_per_mode": _sums(summary, "mode"),
        "rows_per_split": {k: v // len(modes) for k, v in _sums(summary, "split").items()},
        "tokenizer": ctx.cfg.model.backbone,
        "tokens_per_mode": {m: _token_stats(summary.filter(pl.col("mode") == m)) for m in modes},
        "templates": {"text": templates.text, "code": templates.code},
        "empty_history": templates.empty_history,
        "soft_history": templates.soft_history,
    }


def _rendered(
    samples: ray.data.Dataset,
    lookups: Lookups,
    templates: Templates,
    modes: list[str],
    history_len: int,
    ctx: StageContext,
    reporter: Reporter,
) -> ray.data.Dataset:
    """Every sample's prompt in every mode, with its token count (materialized)."""
    return (
        samples.map_batches(
            _render,
            fn_kwargs={
                "lookups": lookups,
                "templates": templates,
                "modes": modes,
                "history_len": history_len,
            },
            batch_format="pyarrow",
            batch_size=BATCH_ROWS,
        )
        .map_batches(
            TokenCounter,
            fn_constructor_kwargs={"model_cfg": ctx.cfg.model, "reporter": reporter},
            # Rendering fuses into these actors: a pool that grows with the queue (to every
            # free CPU of the cluster), each actor loading the tokenizer once.
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=None),
            batch_format="pyarrow",
            batch_size=BATCH_ROWS,
        )
        .materialize()
    )


def _write_aux(ctx: StageContext, lookups: Lookups, modes: list[str]) -> dict[str, Any]:
    """The table ``aux``: every task's rows in every mode, with ``n_tokens``; its summary."""
    cfg = ctx.cfg.prompts.aux
    columns = ["sample_id", "uid", "iid", "label", "timestamp", "split"]
    samples = pl.from_arrow(ctx.read_table("samples", "samples", columns=columns))
    rows = build_rows(samples, cfg, lookups.titles)
    if not rows:
        raise StageError(
            f"no user has the {cfg.min_positives} train positives an aux row needs",
            ctx.uri(ctx.stage_path("samples")),
            "lower prompts.aux.min_positives or drop prompts.aux.tasks",
        )
    table = TokenCounter(ctx.cfg.model)(
        render_rows(rows, lookups, AuxTemplates.of(ctx.cfg.prompts), modes)
    )
    repeated = repeated_rows(rows)
    ctx.write_table(table, "aux")
    rows = pl.from_arrow(table.select(["task", "mode", "uid", "n_tokens"]))
    counts = rows.group_by("task", "mode", "n_tokens").agg(n=pl.len())
    per_task = {t: n // len(modes) for t, n in _sums(counts, "task").items()}
    for task, n in sorted(repeated.items()):
        if n:
            print(
                f"[binllm] render: {n:,} of {per_task[task]:,} {task} rows repeat an earlier row "
                f"of the same user (users with few train positives; see prompts.aux."
                "rows_per_user and min_positives)"
            )
    return {
        "tasks": list(cfg.tasks),
        "rows_per_task": per_task,
        "repeated_rows_per_task": repeated,
        "users_per_task": {
            t: rows.filter(pl.col("task") == t)["uid"].n_unique() for t in cfg.tasks
        },
        "tokens": {
            task: {
                m: _token_stats(counts.filter((pl.col("task") == task) & (pl.col("mode") == m)))
                for m in modes
            }
            for task in cfg.tasks
        },
    }


def _in_words(modes: list[str]) -> list[str]:
    """The modes aux rows are written in: every rendered one but ``soft`` (aux rows carry no
    soft ids)."""
    return [m for m in modes if not MODES[m].soft]


def _render(
    batch: pa.Table, lookups: Lookups, templates: Templates, modes: list[str], history_len: int
) -> pa.Table:
    return render_table(batch, lookups, templates, modes, history_len)


class TokenCounter:
    """Adds ``n_tokens`` (int32): the prompt's length in tokens of the configured tokenizer."""

    def __init__(self, model_cfg: ModelConfig, reporter: Reporter | None = None) -> None:
        self.lengths = TokenLengths(load_tokenizer(model_cfg))
        self.reporter = reporter or Reporter()

    def __call__(self, batch: pa.Table) -> pa.Table:
        lengths = self.lengths(batch["prompt"].to_pylist())
        self.reporter.post(advance=batch.num_rows)
        return batch.append_column("n_tokens", pa.array(lengths, pa.int32()))


def _summary(prompts: ray.data.Dataset) -> pl.DataFrame:
    """Prompts per (mode, split, n_tokens): counted per block by Ray Data, folded here (bounded
    by the modes, splits and prompt lengths, whatever the number of prompts)."""
    counts = prompts.select_columns(["mode", "split", "n_tokens"]).map_batches(
        _token_counts, batch_format="pyarrow", batch_size=None
    )
    keys = ["mode", "split", "n_tokens"]
    total = pl.DataFrame(schema={"mode": pl.String, "split": pl.String, "n_tokens": pl.Int32})
    total = total.with_columns(n=pl.lit(0, pl.Int64))
    for batch in counts.iter_batches(batch_format="pyarrow", batch_size=None):
        total = pl.concat([total, pl.from_arrow(batch)]).group_by(keys).agg(pl.col("n").sum())
    return total.sort(keys)


def _token_counts(batch: pa.Table) -> pa.Table:
    frame = pl.from_arrow(batch).group_by("mode", "split", "n_tokens").agg(n=pl.len())
    return frame.with_columns(pl.col("n").cast(pl.Int64)).to_arrow()


def _sums(counts: pl.DataFrame, column: str) -> dict[str, int]:
    """Rows per value of ``column``, from rows counted in ``n``."""
    totals = counts.group_by(column).agg(pl.col("n").sum()).sort(column)
    return {k: int(v) for k, v in totals.iter_rows()}


def _token_stats(lengths: pl.DataFrame) -> dict[str, float]:
    """Mean, 95th percentile (numpy's linear interpolation) and max of prompt lengths given as
    ``n_tokens`` with their counts ``n``."""
    lengths = lengths.group_by("n_tokens").agg(pl.col("n").sum()).sort("n_tokens")
    total = int(lengths["n"].sum())
    if total == 0:
        return {"mean": 0.0, "p95": 0.0, "max": 0}
    values = lengths["n_tokens"].to_numpy().astype(np.float64)
    ends = np.cumsum(lengths["n"].to_numpy())
    position = 0.95 * (total - 1)
    low, high = math.floor(position), math.ceil(position)
    at_low = values[np.searchsorted(ends, low, side="right")]
    at_high = values[np.searchsorted(ends, high, side="right")]
    return {
        "mean": round(float((values * lengths["n"].to_numpy()).sum() / total), 2),
        "p95": round(float(at_low + (at_high - at_low) * (position - low)), 2),
        "max": int(values[-1]),
    }
