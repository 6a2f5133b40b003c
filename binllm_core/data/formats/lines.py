"""Lines of a chunk: decoding, one row per line, validation checks and rejected lines.

Parsing takes a chunk of whole lines (a file, or a byte range of one aligned to newlines) and
works on all its lines at once: numpy finds the line starts, polars splits, casts and validates.
Python runs per line only on the diagnostic path of a JSON chunk that polars could not decode.

Each parse returns ``(good, rejects)``: the parsed rows and the malformed lines (``REJECTS``
schema). With ``skip_bad=False`` the first malformed line raises a one-line :class:`DataError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from binllm_core.data.formats.spec import FormatSpec
from binllm_core.data.formats.tables import INTERACTIONS, REJECTS
from binllm_core.errors import DataError

SKIP_HINT = "fix the line or set data.on_bad_rows: skip"


@dataclass(frozen=True)
class Text:
    """Where a piece of a file comes from, to decode it: the format's encoding, the file's
    label and the piece's byte offset in the file."""

    encoding: str
    label: str
    offset: int = 0
    skip_bad: bool = False
    """Under ``data.on_bad_rows: skip``, a line with a byte that is not UTF-8 is a rejected
    line (``not valid UTF-8``) instead of an error for the file."""

    @classmethod
    def of(cls, spec: FormatSpec, label: str, offset: int = 0, skip_bad: bool = False) -> Text:
        return cls(spec.encoding, label, offset, skip_bad)


def to_utf8(data: bytes, text: Text) -> bytes:
    """UTF-8 bytes as they are. Otherwise a file of a format documented as latin-1 (older
    MovieLens; an item file is decided whole, being one piece) is read as latin-1, and any
    other is a one-line error naming the file and the byte offset of the first invalid byte."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        if text.encoding != "utf-8":
            return data.decode(text.encoding).encode("utf-8")
        if text.skip_bad:
            return data.decode("utf-8", errors="replace").encode("utf-8")
        raise DataError(
            f"{text.label} is not valid UTF-8: byte 0x{data[err.start]:02x} at offset "
            f"{text.offset + err.start:,}",
            todo="save the file as UTF-8, the encoding of its format",
        ) from None
    return data


def _bounds(data: bytes) -> np.ndarray:
    """Start offsets of every line and the end of the data (``n + 1`` values)."""
    ends = np.flatnonzero(np.frombuffer(data, np.uint8) == ord("\n")) + 1
    if len(ends) == 0 or ends[-1] != len(data):
        ends = np.append(ends, len(data))
    return np.concatenate(([0], ends)).astype(np.int64)


def lines_frame(data: bytes, text: Text) -> pl.DataFrame:
    """One row per line: ``index`` (0-based in ``data``), ``offset`` (byte offset in ``data``)
    and ``text`` (UTF-8, without the line end). Built without a Python loop."""
    offsets = _bounds(data)
    utf8 = to_utf8(data, text)
    text_bounds = offsets if utf8 is data else _bounds(utf8)
    count = len(offsets) - 1
    array = pa.LargeStringArray.from_buffers(count, pa.py_buffer(text_bounds), pa.py_buffer(utf8))
    frame = pl.DataFrame(
        {
            "index": np.arange(count, dtype=np.int64),
            "offset": offsets[:-1],
            "text": pl.from_arrow(array).cast(pl.String).str.strip_chars_end("\r\n"),
        }
    )
    if utf8 is not data and text.encoding == "utf-8":  # bytes replaced under skip_bad
        frame = frame.with_columns(bad_utf8=pl.col("text").str.contains("\ufffd", literal=True))
    return frame


def settle(
    frame: pl.DataFrame, label: str, skip_bad: bool, lines_before: Callable[[], int]
) -> tuple[pl.DataFrame, pa.Table]:
    """Split rows with a ``reason`` off as rejects (or raise on the first of them)."""
    if "bad_utf8" in frame.columns:
        frame = frame.with_columns(
            reason=pl.when("bad_utf8").then(pl.lit("not valid UTF-8")).otherwise("reason")
        )
    bad = frame.filter(pl.col("reason").is_not_null())
    if bad.height == 0:
        return frame, REJECTS.empty_table()
    first = lines_before() + 1
    if not skip_bad:
        row = bad.row(0, named=True)
        raise DataError(
            f"malformed line in {label} line {first + row['index']}: {row['reason']}",
            todo=SKIP_HINT,
        )
    rejects = bad.select(
        file=pl.lit(label), line=pl.col("index") + first, text="text", reason="reason"
    )
    good = frame.filter(pl.col("reason").is_null())
    return good, rejects.to_arrow().cast(REJECTS)


def first_reason(checks: list[tuple[pl.Expr, pl.Expr]]) -> pl.Expr:
    """The reason of the first failing check, null when all pass."""
    return pl.coalesce([pl.when(bad).then(reason) for bad, reason in checks]).alias("reason")


def number(column: str) -> pl.Expr:
    return pl.col(column).str.strip_chars().cast(pl.Float64, strict=False)


def _not_number(column: str, what: str) -> tuple[pl.Expr, pl.Expr]:
    value = number(column)
    bad = value.is_null() | ~value.is_finite()
    reason = pl.concat_str([pl.lit(f"{what} "), pl.col(column), pl.lit(" is not a number")])
    return bad, reason


def require(names: tuple[str, ...], wanted: dict[str, str], label: str) -> None:
    missing = [k for k in wanted if k not in names]
    if missing:
        raise DataError(
            f"column {missing[0]} missing in {label} (its columns: {', '.join(names)})",
            todo="check data.format or fix the header",
        )


def body(
    data: bytes, text: Text, has_header: bool, at_start: bool
) -> tuple[pl.DataFrame, str | None]:
    """The chunk's non-blank lines, without the header line; and that header when in the chunk."""
    lines = lines_frame(data, text)
    header = None
    if has_header and at_start and lines.height:
        header = lines["text"][0]
        lines = lines.slice(1)
    return lines.filter(pl.col("text").str.strip_chars() != ""), header


LAST_TIMESTAMP = 4_102_444_800
"""2100-01-01 UTC in seconds: a later (or a negative) timestamp is a bad line, such as one in
milliseconds among seconds."""


def interactions_table(
    frame: pl.DataFrame,
    per_second: int,
    spec: FormatSpec,
    offset: int,
    label: str,
    skip_bad: bool,
    lines_before: Callable[[], int],
    *first_checks: tuple[pl.Expr, pl.Expr],
) -> tuple[pa.Table, pa.Table]:
    """Validate the ``f:user``... string columns and build the interactions table."""
    checks = [*first_checks]
    for column in ("user", "item"):
        value = pl.col(f"f:{column}").str.strip_chars()
        checks.append((value.is_null() | (value == ""), pl.lit(f"empty {column} id")))
    checks += [_not_number("f:rating", "rating"), _not_number("f:timestamp", "timestamp")]
    seconds = number("f:timestamp") / per_second
    checks.append(
        (
            (seconds < 0) | (seconds >= LAST_TIMESTAMP),
            pl.concat_str(
                pl.lit("timestamp "),
                pl.col("f:timestamp").str.strip_chars(),
                pl.lit(f" is not a time in 1970..2099 ({_units(per_second)})"),
            ),
        )
    )
    if spec.rating_scale:
        low, high = spec.rating_scale
        rating = number("f:rating")
        checks.append(
            (
                (rating < low) | (rating > high),
                pl.concat_str(
                    pl.lit("rating "),
                    pl.col("f:rating").str.strip_chars(),
                    pl.lit(f" is outside the {spec.name} scale {low:g}..{high:g}"),
                ),
            )
        )
    frame = frame.with_columns(first_reason(checks))
    good, rejects = settle(frame, label, skip_bad, lines_before)
    table = good.select(
        user=pl.col("f:user").str.strip_chars(),
        item=pl.col("f:item").str.strip_chars(),
        rating=number("f:rating").cast(pl.Float32),
        timestamp=(number("f:timestamp") / per_second).floor().cast(pl.Int64),
        row=pl.col("offset") + offset,
    )
    return table.to_arrow().cast(INTERACTIONS), rejects


def _units(per_second: int) -> str:
    return "seconds since 1970" if per_second == 1 else "milliseconds since 1970"
