"""Stage ``samples``: ingest's interactions -> ``samples``, ``user_map``, ``item_map`` and
``dropped`` (interactions dropped as orphans or exact duplicates, with a ``reason``) tables.

Ray Data reads the ingest output and writes the tables; the protocol itself
(:func:`binllm_core.protocol.build_samples`) runs once over the whole table in polars in this
process. Splits, ids and histories need every row of a user (and, for the ``global`` and
``months_then_halves`` splits, every row) in time order: one vectorised polars pass is simpler
and faster than shuffling by user across Ray workers, and 10M interactions fit in memory.
"""

from __future__ import annotations

from typing import Any

import polars as pl
import pyarrow as pa
import ray

from binllm_core.protocol import INTERACTION_COLUMNS, build_samples, check_labels
from pipelines.stage import StageContext

BLOCK_ROWS = 1_000_000
"""Rows per block (and Parquet file at most) when writing the samples."""


def run(ctx: StageContext) -> dict[str, Any]:
    """Build the samples of ``ctx.cfg.protocol``; return the manifest metrics."""
    interactions = _read_interactions(ctx)
    items = pl.from_arrow(ctx.read_table("ingest", "items", columns=["item"]))["item"]
    result = build_samples(pl.from_arrow(interactions), ctx.cfg.protocol, items)
    check_labels(result.samples, ctx.cfg.protocol)
    ctx.write_dataset(_dataset(_to_arrow(result.samples)), "samples")
    ctx.write_dataset(_dataset(_to_arrow(result.user_map)), "user_map")
    ctx.write_dataset(_dataset(_to_arrow(result.item_map)), "item_map")
    ctx.write_table(_to_arrow(result.dropped), "dropped")
    return {"protocol": ctx.cfg.protocol.name, **result.stats}


def _read_interactions(ctx: StageContext) -> pa.Table:
    """The whole interactions table, read by Ray Data, in this process.

    Columns the table lacks are left to :func:`build_samples`, which names them in its error.
    """
    ds = ctx.read_dataset("ingest", "interactions")
    present = [c for c in INTERACTION_COLUMNS if c in ds.schema().names]
    blocks = ray.get(ds.select_columns(present).to_arrow_refs())
    if not blocks:
        return pa.table({c: pa.array([], pa.string()) for c in present})
    return pa.concat_tables(blocks, promote_options="default")


def _to_arrow(frame: pl.DataFrame) -> pa.Table:
    """Polars hands out large_string/large_list; the tables between stages use string/list."""
    table = frame.to_arrow()
    return table.cast(pa.schema([pa.field(f.name, _narrow(f.type)) for f in table.schema]))


def _narrow(dtype: pa.DataType) -> pa.DataType:
    if pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype):
        return pa.string()
    if pa.types.is_large_list(dtype) or pa.types.is_list(dtype):
        return pa.list_(_narrow(dtype.value_type))
    return dtype


def _dataset(table: pa.Table) -> ray.data.Dataset:
    """A Ray dataset of ``table`` in row order, in blocks of at most ``BLOCK_ROWS`` rows."""
    table = table.combine_chunks()
    slices = [table.slice(i, BLOCK_ROWS) for i in range(0, table.num_rows, BLOCK_ROWS)]
    return ray.data.from_arrow(slices or [table])
