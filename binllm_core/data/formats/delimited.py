"""Separated-values files (tab, ``::``, ``|``, comma): split into fields, one column each.

The fields are either fixed by the format or named by the file's header line (RecBole's header
names them ``name:type``). A line with another field count is a bad line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import polars as pl
import pyarrow as pa

from binllm_core.data.formats.lines import (
    Text,
    body,
    first_reason,
    interactions_table,
    require,
    settle,
)
from binllm_core.data.formats.spec import FormatSpec
from binllm_core.errors import DataError


@dataclass(frozen=True)
class Delimited:
    """A separated-values file: its separator and the names of its fields."""

    sep: str
    sep_name: str
    fields: tuple[str, ...] = ()
    """Field names in order; empty: read from the file's header line."""
    typed_header: bool = False
    """RecBole header: ``name:type`` fields."""

    def names(self, header: str | None, label: str) -> tuple[str, ...]:
        if self.fields:
            return self.fields
        if not header:
            raise DataError(f"{label} has no header line", todo="add the header line")
        names = header.strip("\r\n").split(self.sep)
        return tuple(n.partition(":")[0].strip() if self.typed_header else n.strip() for n in names)


def split_fields(
    lines: pl.DataFrame, spec: Delimited, names: tuple[str, ...]
) -> tuple[pl.DataFrame, tuple[pl.Expr, pl.Expr]]:
    """Add one string column per field, and the field-count check."""
    count = pl.col("text").str.count_matches(spec.sep, literal=True) + 1
    parts = pl.col("text").str.split_exact(spec.sep, len(names) - 1)
    renamed = parts.struct.rename_fields([f"f:{n}" for n in names])
    frame = lines.with_columns(renamed.alias("fields"), nfields=count).unnest("fields")
    reason = pl.concat_str(
        [
            pl.lit(f"expected {len(names)} {spec.sep_name}-separated fields, got "),
            pl.col("nfields").cast(pl.String),
        ]
    )
    return frame, (pl.col("nfields") != len(names), reason)


@dataclass(frozen=True)
class DelimitedInteractions:
    """An interaction file of separated values (timestamps in seconds)."""

    layout: Delimited
    columns: dict[str, str]
    """Source field -> output column (``user``, ``item``, ``rating``, ``timestamp``)."""

    @property
    def header(self) -> bool:
        return not self.layout.fields

    def __call__(
        self,
        spec: FormatSpec,
        data: bytes,
        *,
        offset: int,
        header: str | None,
        label: str,
        skip_bad: bool,
        lines_before: Callable[[], int],
    ) -> tuple[pa.Table, pa.Table]:
        text = Text.of(spec, label, offset, skip_bad)
        lines, own_header = body(data, text, self.header, header is None)
        names = self.layout.names(own_header or header, label)
        require(names, self.columns, label)
        frame, count_check = split_fields(lines, self.layout, names)
        frame = frame.rename({f"f:{k}": f"f:{v}" for k, v in self.columns.items()})
        return interactions_table(
            frame, 1, spec, offset, label, skip_bad, lines_before, count_check
        )


@dataclass(frozen=True)
class DelimitedItems:
    """An item file of separated values, parsed whole."""

    layout: Delimited
    id_field: str
    """The field holding the item id (a line with it empty is a bad line)."""
    build: Callable[[pl.DataFrame, tuple[str, ...]], pl.DataFrame]
    """The good lines' ``f:FIELD`` columns and the field names -> ``item``, ``title``, what
    the source has, and ``row``."""

    def __call__(
        self, spec: FormatSpec, data: bytes, label: str, skip_bad: bool
    ) -> tuple[pa.Table, pa.Table]:
        text = Text.of(spec, label, 0, skip_bad)
        lines, header = body(data, text, not self.layout.fields, True)
        names = self.layout.names(header, label)
        require(names, {self.id_field: "item"}, label)
        frame, count_check = split_fields(lines, self.layout, names)
        empty = pl.col(f"f:{self.id_field}").str.strip_chars() == ""
        frame = frame.with_columns(first_reason([count_check, (empty, pl.lit("empty item id"))]))
        good, rejects = settle(frame, label, skip_bad, lambda: 0)
        return self.build(good, names).to_arrow(), rejects
