"""Stage ``samples``: ingest's interactions -> ``samples``, ``user_map``, ``item_map`` and
``dropped`` (interactions dropped as orphans or exact duplicates, with a ``reason``) tables.

The protocol (:func:`binllm_core.data.protocol.run_protocol`) runs on Ray over partitions of whole
users, and the driver holds only what is bounded by the number of users and items:

1. Ray Data reads the interactions and applies :func:`~binllm_core.data.protocol.prepare` (types,
   empty values, ``keep_years``) batch by batch, tagging each row with its user's partition;
   one task per block cuts it into those partitions.
2. Each protocol step is one Ray task per partition (:class:`OnRay`); partitions stay in the
   object store (spilled to disk when they do not fit) and only the steps' partials (item counts,
   per-day counts, first rows, per-split sums) come back to the driver, folded as they arrive.
3. The samples are put in source ``row`` order by range: every partition is cut at the same
   equal-width ``row`` edges, each range is gathered and sorted in its own task, learns how many
   samples and valid samples come before it, and :func:`~binllm_core.data.protocol.finish` numbers
   it (``sample_id``, ``valid_small``). Ray Data writes the numbered ranges.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import ray

from binllm_core.config import ProtocolConfig
from binllm_core.data.protocol import (
    INTERACTION_COLUMNS,
    Partials,
    Step,
    check_labels,
    combine,
    finish,
    partition_of,
    prepare,
    run_protocol,
)
from pipelines.runtime.ray_helpers import surface_user_errors
from pipelines.runtime.stage import StageContext

PARTITION_ROWS = 1_000_000
"""Interactions per partition of users (before ``keep_years``): one task's polars frame."""
DROPPED_SCHEMA = pa.schema(
    [("user", pa.string()), ("item", pa.string()), ("rating", pa.float32())]
    + [("timestamp", pa.int64()), ("row", pa.int64()), ("reason", pa.string())]
)
BLOCK_ROWS = 1_000_000
"""Rows per block (and Parquet file at most) when writing the id maps."""


def run(ctx: StageContext) -> dict[str, Any]:
    """Build the samples of ``ctx.cfg.protocol``; return the manifest metrics."""
    cfg = ctx.cfg.protocol
    ds = ctx.read_dataset("ingest", "interactions")
    present = [c for c in INTERACTION_COLUMNS if c in ds.schema().names]
    input_rows = ds.count()
    n_parts = max(1, math.ceil(input_rows / PARTITION_ROWS))
    items = pl.from_arrow(ctx.read_table("ingest", "items", columns=["item"]))["item"]
    with surface_user_errors():
        parts = OnRay.read(ds.select_columns(present), cfg, n_parts)
        agg = run_protocol(parts, cfg, items, input_rows)
        check_labels(agg.per_split, cfg)
        ctx.write_dataset(parts.numbered(agg.valid_small), "samples")
    ctx.write_dataset(_dataset(_to_arrow(agg.user_map)), "user_map")
    ctx.write_dataset(_dataset(_to_arrow(agg.item_map)), "item_map")
    if agg.stats["dropped_orphans"] + agg.stats["dropped_duplicates"]:
        ctx.write_dataset(parts.set_aside_dataset(), "dropped")
    else:  # a typed empty table (a dataset of empty blocks writes no file on S3)
        ctx.write_table(DROPPED_SCHEMA.empty_table(), "dropped")
    return {"protocol": cfg.name, "partitions": n_parts, **agg.stats}


class OnRay:
    """:class:`~binllm_core.data.protocol.Partitions` as Arrow tables in Ray's object store, one
    task per partition and step."""

    def __init__(self, refs: list[ray.ObjectRef]) -> None:
        self.refs = refs
        self.aside: list[ray.ObjectRef] = []

    @classmethod
    def read(cls, ds: ray.data.Dataset, cfg: ProtocolConfig, n: int) -> OnRay:
        """Partitions of ``n`` user hashes from the prepared rows of ``ds``."""
        tagged = ds.map_batches(
            _prepared, fn_kwargs={"cfg": cfg, "n": n}, batch_format="pyarrow", batch_size=None
        )
        pieces = [_cut.options(num_returns=n).remote(block, n) for block in tagged.to_arrow_refs()]
        pieces = [p if n > 1 else [p] for p in pieces]
        return cls([_concat.remote(*[p[k] for p in pieces]) for k in range(n)])

    def map(self, step: Step, **shared: Any) -> Partials:
        shared_ref = ray.put(shared)
        calls = [_apply.remote(step, shared_ref, ref) for ref in self.refs]
        self.refs = [c[0] for c in calls]
        return _fold([c[1] for c in calls])

    def set_aside(self, column: str) -> None:
        calls = [_split_off.remote(ref, column) for ref in self.refs]
        self.refs = [c[0] for c in calls]
        self.aside += [c[1] for c in calls]

    def set_aside_dataset(self) -> ray.data.Dataset:
        """The rows set aside (the ``dropped`` table), in source order."""
        return ray.data.from_arrow_refs(_in_row_order(self.aside))

    def numbered(self, valid_small: np.ndarray) -> ray.data.Dataset:
        """The samples in ``row`` order with ``sample_id`` and ``valid_small``."""
        ordered = _in_row_order(self.refs)
        counts = ray.get([_counts.remote(ref) for ref in ordered])
        rows = np.cumsum([0] + [c[0] for c in counts])
        valid = np.cumsum([0] + [c[1] for c in counts])
        chosen = ray.put(valid_small)
        return ray.data.from_arrow_refs(
            [
                _numbered.remote(ref, int(rows[k]), int(valid[k]), chosen)
                for k, ref in enumerate(ordered)
            ]
        )


def _in_row_order(refs: list[ray.ObjectRef]) -> list[ray.ObjectRef]:
    """The rows of the tables ``refs`` sorted by ``row``, in as many tables: equal-width ranges
    of ``row`` (a position in the source file, so the rows spread evenly over it), each cut
    from every table and sorted in its own task."""
    n = len(refs)
    spans = [s for s in ray.get([_span.remote(ref) for ref in refs]) if s is not None]
    if n == 1 or not spans:
        return [_sorted.remote(ref) for ref in refs]
    lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
    edges = np.linspace(lo, hi + 1, n + 1).astype(np.int64)[1:-1]
    pieces = [_ranges.options(num_returns=n).remote(ref, edges) for ref in refs]
    return [_sorted.remote(*[p[k] for p in pieces]) for k in range(n)]


@ray.remote
def _span(table: pa.Table) -> tuple[int, int] | None:
    rows = pl.from_arrow(table.select(["row"]))["row"]
    return None if rows.is_empty() else (int(rows.min()), int(rows.max()))


@ray.remote
def _ranges(table: pa.Table, edges: np.ndarray) -> tuple[pa.Table, ...]:
    """``table`` cut at ``edges`` of ``row`` into ``len(edges) + 1`` tables."""
    at = np.searchsorted(edges, table["row"].to_numpy(), side="right")
    frame = pl.from_arrow(table).with_columns(_range=pl.Series(at))
    parts = frame.partition_by("_range", as_dict=True, include_key=False)
    empty = frame.drop("_range").clear()
    return tuple(parts.get((k,), empty).to_arrow() for k in range(len(edges) + 1))


@ray.remote
def _sorted(*tables: pa.Table) -> pa.Table:
    return pa.concat_tables(tables, promote_options="default").sort_by("row")


def _fold(refs: list[ray.ObjectRef]) -> Partials:
    """Combine the partials of ``refs`` as they finish (one partition's at a time in memory)."""
    total: Partials = {}
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        total = combine(total, ray.get(done[0]))
    return total


def _prepared(batch: pa.Table, cfg: ProtocolConfig, n: int) -> pa.Table:
    frame = prepare(pl.from_arrow(batch), cfg)
    return frame.with_columns(_part=partition_of(frame, n)).to_arrow()


@ray.remote
def _cut(block: pa.Table, n: int) -> tuple[pa.Table, ...] | pa.Table:
    """One block's rows by partition (the tag dropped)."""
    frame = pl.from_arrow(block)
    parts = frame.partition_by("_part", as_dict=True, include_key=False)
    empty = frame.drop("_part").clear()
    out = tuple(parts.get((k,), empty).to_arrow() for k in range(n))
    return out if n > 1 else out[0]


@ray.remote
def _concat(*pieces: pa.Table) -> pa.Table:
    return pa.concat_tables(pieces, promote_options="default")


@ray.remote(num_returns=2)
def _apply(step: Step, shared: dict[str, Any], table: pa.Table) -> tuple[pa.Table, Partials]:
    out, partials = step(pl.from_arrow(table), **shared)
    return (table if out is None else out.to_arrow()), partials


@ray.remote(num_returns=2)
def _split_off(table: pa.Table, column: str) -> tuple[pa.Table, pa.Table]:
    frame = pl.from_arrow(table)
    aside = frame.filter(pl.col(column).is_not_null())
    return frame.filter(pl.col(column).is_null()).drop(column).to_arrow(), _to_arrow(aside)


@ray.remote
def _counts(block: pa.Table) -> tuple[int, int]:
    return block.num_rows, int(pl.from_arrow(block)["split"].eq("valid").sum())


@ray.remote
def _numbered(block: pa.Table, first_id: int, valid_before: int, chosen: np.ndarray) -> pa.Table:
    return _to_arrow(finish(pl.from_arrow(block), first_id, valid_before, chosen))


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
