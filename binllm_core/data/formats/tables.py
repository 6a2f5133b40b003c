"""The tables every format parses into: interactions, items (deduplicated) and rejected lines."""

from __future__ import annotations

import polars as pl
import pyarrow as pa

INTERACTIONS = pa.schema(
    [
        ("user", pa.string()),
        ("item", pa.string()),
        ("rating", pa.float32()),
        ("timestamp", pa.int64()),
        ("row", pa.int64()),
    ]
)
"""``row``: byte offset of the line in its (decompressed) file, which orders rows as the source."""

REJECTS = pa.schema(
    [("file", pa.string()), ("line", pa.int64()), ("text", pa.string()), ("reason", pa.string())]
)


def dedupe_items(table: pa.Table) -> pa.Table:
    """One row per item, the last in source order (Amazon metadata repeats some asins)."""
    frame = pl.from_arrow(table).sort("row")
    unique = frame.unique("item", keep="last", maintain_order=True).drop("row").to_arrow()
    return unique.cast(pa.schema([_small_types(f) for f in unique.schema]))


def _small_types(column: pa.Field) -> pa.Field:
    """``large_string`` -> ``string`` and ``large_list`` -> ``list`` (polars writes large ones)."""
    if pa.types.is_large_string(column.type):
        return column.with_type(pa.string())
    if pa.types.is_large_list(column.type):
        return column.with_type(pa.list_(_small_types(column.type.value_field)))
    return column
