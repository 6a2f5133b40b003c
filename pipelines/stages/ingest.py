"""Stage ``ingest``: raw source files -> ``interactions``, ``items`` (and ``rejects``) tables.

The driver only lists the source and picks the dataset; Ray Data tasks open the files by URL
themselves and parse them (a large plain file in byte ranges, one task per range). A task returns
its parsed rows and its rejected lines in one table (reject rows have a ``reason``), so the source
is read once; the parsed datasets are materialized and then split into the output tables.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from binllm_core.data.formats import (
    FORMATS,
    REJECTS,
    Layout,
    dedupe_items,
    detect,
    parse_interactions,
    parse_items,
)
from binllm_core.data.sources import (
    Chunk,
    Source,
    first_line,
    lines_before,
    list_source,
    plan_chunks,
    read_chunk,
)
from binllm_core.errors import BinllmError, DataError
from pipelines.runtime.ray_helpers import surface_user_errors
from pipelines.runtime.stage import StageContext

_PYARROW = {"batch_format": "pyarrow", "batch_size": None, "zero_copy_batch": True}


def run(ctx: StageContext) -> dict[str, Any]:
    """Ingest ``cfg.data`` and return the metrics for the manifest."""
    data = ctx.cfg.data
    source = list_source(data.uri, data.storage_options, data.cache_dir)
    layout = _detect(source, data.format, data.name)
    files = {f.name: f for f in source.files}
    skip_bad = data.on_bad_rows == "skip"
    chunks = plan_chunks(files[layout.interactions])
    interactions = _parse(chunks, "interactions", layout.format, skip_bad)
    items = _parse([Chunk(files[layout.items])], "items", layout.format, skip_bad)

    ctx.write_dataset(interactions.map_batches(_parsed_rows, **_PYARROW), "interactions")
    item_table = dedupe_items(_collect(items.map_batches(_parsed_rows, **_PYARROW)))
    ctx.write_table(item_table, "items")
    interaction_rejects = _collect(interactions.map_batches(_rejected_rows, **_PYARROW), REJECTS)
    item_rejects = _collect(items.map_batches(_rejected_rows, **_PYARROW), REJECTS)
    rejects = pa.concat_tables([interaction_rejects, item_rejects])
    if skip_bad:
        ctx.write_table(rejects, "rejects")
    n_interactions = interactions.count() - interaction_rejects.num_rows
    for kind, label, rows, rejected in (
        ("interactions", files[layout.interactions].label, n_interactions, interaction_rejects),
        ("items", files[layout.items].label, item_table.num_rows, item_rejects),
    ):
        if rows == 0:
            why = (
                f"all {rejected.num_rows:,} of its lines were rejected"
                if rejected.num_rows
                else ("it is empty or holds only a header")
            )
            raise DataError(
                f"{label} holds no {kind}: {why}", todo=f"give a {layout.format} source with data"
            )
    return {
        "format": layout.format,
        "dataset": layout.name,
        "source_files": [files[layout.interactions].label, files[layout.items].label],
        "parse_tasks": len(chunks) + 1,
        "interactions_rows": n_interactions,
        "items_rows": item_table.num_rows,
        "rejected_rows": rejects.num_rows,
    }


def _detect(source: Source, fmt: str, name: str) -> Layout:
    """The dataset to ingest; detection errors name the source."""
    try:
        return detect([f.name for f in source.files], fmt, name, source.anchor, source.root_name)
    except BinllmError as err:
        raise type(err)(f"in {source.uri}: {err}") from None


def _parse(chunks: list[Chunk], kind: str, fmt: str, skip_bad: bool) -> ray.data.Dataset:
    """Parse ``chunks`` on Ray Data, one task each; the result is materialized."""
    ds = ray.data.from_items(
        [{"chunk": i} for i in range(len(chunks))], override_num_blocks=len(chunks)
    ).map_batches(
        _parse_batch,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={"chunks": chunks, "kind": kind, "fmt": fmt, "skip_bad": skip_bad},
    )
    with surface_user_errors():
        return ds.materialize()


def _parse_batch(
    batch: pa.Table, chunks: list[Chunk], kind: str, fmt: str, skip_bad: bool
) -> pa.Table:
    """Ray Data task: parse one chunk into its rows followed by its rejects."""
    return _parse_chunk(chunks[batch["chunk"][0].as_py()], kind, fmt, skip_bad)


def _parse_chunk(chunk: Chunk, kind: str, fmt: str, skip_bad: bool) -> pa.Table:
    offset, data = read_chunk(chunk)
    label = chunk.file.label
    if kind == "items":
        good, rejects = parse_items(fmt, data, label=label, skip_bad=skip_bad)
    else:
        header = first_line(chunk.file) if FORMATS[fmt].header and chunk.start else None
        good, rejects = parse_interactions(
            fmt,
            data,
            offset=offset,
            header=header,
            label=label,
            skip_bad=skip_bad,
            lines_before=lambda: lines_before(chunk),
        )
    return pa.concat_tables([good, rejects], promote_options="default")


def _parsed_rows(table: pa.Table) -> pa.Table:
    keep = pc.is_null(table["reason"])
    return table.filter(keep).drop_columns(REJECTS.names)


def _rejected_rows(table: pa.Table) -> pa.Table:
    keep = pc.is_valid(table["reason"])
    return table.filter(keep).select(REJECTS.names).cast(REJECTS)


def _collect(ds: ray.data.Dataset, schema: pa.Schema | None = None) -> pa.Table:
    """A small dataset as one Arrow table in the driver (``schema`` when it has no block)."""
    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_columns]
    if not tables and schema is not None:
        return schema.empty_table()
    return pa.concat_tables(tables)
