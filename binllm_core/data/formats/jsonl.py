"""JSON lines: one JSON object a line (``.json`` / ``.jsonl``, maybe gzipped), the wanted keys
decoded into one column each. A line that is not a JSON object, or holds an object or array
where a plain value is wanted, is a bad line.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass

import polars as pl
import pyarrow as pa

from binllm_core.data.formats.lines import Text, body, first_reason, interactions_table, settle
from binllm_core.data.formats.spec import FormatSpec
from binllm_core.errors import DataError


def json_fields(
    lines: pl.DataFrame,
    types: dict[str, pl.DataType],
    required: tuple[str, ...],
    label: str,
    whole: bytes | None = None,
) -> pl.DataFrame:
    """Decode each line's ``types`` keys into ``f:KEY`` columns; bad lines get a ``json_error``.

    ``whole``: the bytes ``lines`` were cut from, of string ``types``, to try
    :func:`_json_at_once` first. A ``required`` key absent from every line of a non-empty chunk
    is a missing column, not bad lines.
    """
    struct = pl.Struct({k: t for k, t in types.items()})
    at_once = None if whole is None else _json_at_once(whole, lines, types)
    if at_once is not None:
        records = at_once.select(pl.struct(pl.all()).alias("json")).to_series()
        frame = lines.with_columns(records, json_error=pl.lit(None, pl.String))
    else:
        try:
            decoded = lines.with_columns(pl.col("text").str.json_decode(struct).alias("json"))
            frame = decoded.with_columns(json_error=pl.lit(None, pl.String))
        except pl.exceptions.PolarsError:
            frame = lines.with_columns(_json_slow(lines["text"], types))
    fields = frame["json"].struct.rename_fields([f"f:{k}" for k in types])
    frame = frame.drop("json").with_columns(fields.struct.unnest())
    ok = frame.filter(pl.col("json_error").is_null())
    for key in required:
        if ok.height and ok[f"f:{key}"].null_count() == ok.height:
            keys = ", ".join(json.loads(ok["text"][0]))
            raise DataError(
                f"column {key} missing in {label} (its first record has keys: {keys})",
                todo="check data.format: " + _json_formats(),
            )
    return frame


def _json_at_once(
    data: bytes, lines: pl.DataFrame, types: dict[str, pl.DataType]
) -> pl.DataFrame | None:
    """Every record of ``data`` in one call of polars' native NDJSON reader (about 3x decoding
    the lines' text, on 2 cores), when that surely gives what line by line gives: the reader
    accepts the whole chunk, yields one record per non-blank line of ``lines`` (it skips blank
    ones too) and no value is an object or array (which it would write as JSON text where line
    by line they make the line bad); ``data`` is valid UTF-8. Else None: decode line by line."""
    if "bad_utf8" in lines.columns:
        return None
    try:
        frame = pl.read_ndjson(io.BytesIO(data), schema=types)
    except pl.exceptions.PolarsError:
        return None
    nested = pl.any_horizontal(pl.col(k).str.contains(r"^[\[{]") for k in types).any()
    if frame.height != lines.height or frame.select(nested).item():
        return None
    return frame


def _json_formats() -> str:
    """``name: files`` of the formats with JSON-lines interaction files."""
    from binllm_core.data.formats.registry import FORMATS  # the registry imports this module

    json_specs = [s for s in FORMATS.values() if isinstance(s.interactions, JsonInteractions)]
    return "; ".join(f"{s.name}: {s.files}" for s in json_specs)


def _json_slow(text: pl.Series, types: dict[str, pl.DataType]) -> list[pl.Series]:
    """Per-line decoding, for a chunk polars rejected: finds the lines at fault."""
    records: list[dict | None] = []
    errors: list[str | None] = []
    for line in text:
        try:
            value = json.loads(line)
            if not isinstance(value, dict):
                raise ValueError("not a JSON object")
            records.append({k: _coerce(value.get(k), t) for k, t in types.items()})
            errors.append(None)
        except (ValueError, TypeError) as err:
            records.append(None)
            errors.append(f"not a valid JSON record ({err})")
    struct = pl.Struct({k: t for k, t in types.items()})
    return [pl.Series("json", records, dtype=struct), pl.Series("json_error", errors, pl.String)]


def _coerce(value: object, dtype: pl.DataType) -> object:
    if value is None:
        return None
    if dtype == pl.List(pl.String):
        items = value if isinstance(value, list) else [value]
        return [i if isinstance(i, str) else json.dumps(i) for i in items]
    if isinstance(value, (dict, list)):
        raise TypeError(f"unexpected {type(value).__name__} value {json.dumps(value)[:40]}")
    return value if isinstance(value, str) else json.dumps(value)


@dataclass(frozen=True)
class JsonInteractions:
    """An interaction file of JSON records, one a line."""

    keys: dict[str, str]
    """Record key -> output column (``user``, ``item``, ``rating``, ``timestamp``); all needed."""
    per_second: int
    """Timestamp units per second (1: seconds, 1000: milliseconds)."""

    header = False

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
        lines, _ = body(data, Text.of(spec, label, offset, skip_bad), False, True)
        types = dict.fromkeys(self.keys, pl.String)
        frame = json_fields(lines, types, tuple(self.keys), label, whole=data)
        renamed = frame.rename({f"f:{k}": f"f:{v}" for k, v in self.keys.items()})
        json_check = (pl.col("json_error").is_not_null(), pl.col("json_error"))
        return interactions_table(
            renamed, self.per_second, spec, offset, label, skip_bad, lines_before, json_check
        )


@dataclass(frozen=True)
class JsonItems:
    """An item (metadata) file of JSON records, one a line, parsed whole."""

    keys: dict[str, tuple[str, pl.DataType]]
    """Record key -> (output column, type). The first key is the item id, which every record
    needs; the others may be absent."""

    def __call__(
        self, spec: FormatSpec, data: bytes, label: str, skip_bad: bool
    ) -> tuple[pa.Table, pa.Table]:
        lines, _ = body(data, Text.of(spec, label, 0, skip_bad), False, True)
        item_key = next(iter(self.keys))
        types = {k: t for k, (_, t) in self.keys.items()}
        frame = json_fields(lines, types, (item_key,), label)
        empty = pl.col(f"f:{item_key}").is_null() | (pl.col(f"f:{item_key}") == "")
        checks = [(pl.col("json_error").is_not_null(), pl.col("json_error"))]
        reason = first_reason([*checks, (empty, pl.lit(f"missing {item_key}"))])
        good, rejects = settle(frame.with_columns(reason), label, skip_bad, lambda: 0)
        table = good.select(
            *[pl.col(f"f:{k}").alias(column) for k, (column, _) in self.keys.items()],
            row="offset",
        )
        return table.to_arrow(), rejects
