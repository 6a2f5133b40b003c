"""Source formats: which files make a dataset, and parsing their bytes into Arrow tables.

Parsing takes a chunk of whole lines (a file, or a byte range of one aligned to newlines) and
works on all its lines at once: numpy finds the line starts, polars splits, casts and validates.
Python runs per line only on the diagnostic path of a JSON chunk that polars could not decode.

Each parse returns ``(good, rejects)``: the parsed rows and the malformed lines (``REJECTS``
schema). With ``skip_bad=False`` the first malformed line raises a one-line :class:`DataError`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
from fsspec.utils import infer_compression

from binllm_core.errors import DataError

FORMAT_FILES: dict[str, str] = {
    "ml100k": "u.data + u.item",
    "ml1m": "ratings.dat + movies.dat",
    "ml_csv": "ratings.csv + movies.csv",
    "amazon2018": "NAME.json(.gz) + meta_NAME.json(.gz)",
    "amazon2023": "NAME.jsonl(.gz) + meta_NAME.jsonl(.gz)",
    "recbole": "NAME.inter + NAME.item",
}
"""The supported formats and the files each needs (for detection and error messages)."""

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

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)  # fmt: skip

SKIP_HINT = "fix the line or set data.on_bad_rows: skip"
_TITLE_YEAR = r"\((\d{4})\)\s*$"


# ---- detection ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """One dataset found among a source's files (paths relative to the source root)."""

    format: str
    name: str
    interactions: str
    items: str


def plain_name(path: str) -> str:
    """The file name without folder and compression suffix (``meta_X.json.gz`` -> ``...json``)."""
    base = path.rpartition("/")[2]
    compression = infer_compression(base)
    return base.rsplit(".", 1)[0] if compression else base


def detect(
    files: list[str], fmt: str = "auto", name: str = "", anchor: str = "", root_name: str = ""
) -> Layout:
    """Pick the dataset to ingest among ``files``.

    ``fmt`` (``auto`` or a format) and ``name`` narrow the candidates; ``anchor`` is the file the
    user's URI named, which the dataset must contain. ``root_name`` names datasets that lie at the
    root of the source (e.g. ``ml-100k`` for ``ml-100k.zip``).
    """
    found, incomplete = _candidates(files, fmt, root_name)
    if fmt != "auto":
        found = [c for c in found if c.format == fmt]
        incomplete = [(c, m) for c, m in incomplete if c.format == fmt]
    if anchor:
        found = [c for c in found if anchor in (c.interactions, c.items)]
        incomplete = [(c, m) for c, m in incomplete if c.interactions == anchor]
    if name:
        found = [c for c in found if c.name == name]
        incomplete = [(c, m) for c, m in incomplete if c.name == name]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        listed = ", ".join(f"{c.name or '(root)'} ({c.format})" for c in found)
        raise DataError(
            f"the source holds several datasets: {listed}",
            todo="choose one with data.name (and data.format if names repeat)",
        )
    if incomplete:
        layout, missing = incomplete[0]
        raise DataError(
            f"{layout.format} dataset {layout.interactions} has no {missing} next to it",
            todo=f"add {missing} (format {layout.format} needs {FORMAT_FILES[layout.format]})",
        )
    shown = ", ".join(files[:20]) + (f" and {len(files) - 20} more" if len(files) > 20 else "")
    wanted = "any supported format" if fmt == "auto" else f"format {fmt}"
    wanted += f" named {name}" if name else ""
    supported = "; ".join(f"{k}: {v}" for k, v in FORMAT_FILES.items())
    raise DataError(
        f"no dataset of {wanted} among the files found ({shown or 'none'})",
        todo=f"point data.uri at a folder, file or .zip holding one of: {supported}",
    )


def _candidates(
    files: list[str], fmt: str, root_name: str
) -> tuple[list[Layout], list[tuple[Layout, str]]]:
    """Complete datasets, and datasets whose companion file is missing (with its name)."""
    present = set(files)
    found: list[Layout] = []
    incomplete: list[tuple[Layout, str]] = []
    for path in files:
        folder, _, base = path.rpartition("/")
        for layout_format, name, companions in _rules(plain_name(base), base, fmt):
            options = [f"{folder}/{c}" if folder else c for c in companions]
            owner = name or folder.rpartition("/")[2] or root_name
            match = next((c for c in options if c in present), "")
            layout = Layout(layout_format, owner, path, match or options[0])
            if match:
                found.append(layout)
            else:
                incomplete.append((layout, companions[0]))
    return found, incomplete


def _rules(plain: str, base: str, fmt: str) -> list[tuple[str, str, list[str]]]:
    """``(format, name, companion file names)`` for a file that anchors a dataset."""
    fixed = {"u.data": ("ml100k", "u.item"), "ratings.dat": ("ml1m", "movies.dat")}
    fixed["ratings.csv"] = ("ml_csv", "movies.csv")
    if plain in fixed:
        layout_format, companion = fixed[plain]
        return [(layout_format, "", [companion])]
    stem, _, ext = plain.rpartition(".")
    if ext == "inter":
        return [("recbole", stem, [f"{stem}.item"])]
    if ext in ("json", "jsonl") and stem and not stem.startswith("meta_"):
        layout_format = "amazon2018" if ext == "json" else "amazon2023"
        if fmt in ("amazon2018", "amazon2023"):
            layout_format = fmt  # an explicit Amazon format accepts either extension
        # 5-core review files (Books_5) share the full category's metadata (meta_Books).
        stems = [stem, stem[:-2]] if stem.endswith("_5") else [stem]
        zipped = dict.fromkeys((base[len(plain) :], "", ".gz"))
        metas = [f"meta_{s}.{ext}{z}" for s in stems for z in zipped]
        return [(layout_format, stem, metas)]
    return []


# ---- lines ----------------------------------------------------------------------------------
ENCODINGS = {"ml100k": "latin-1", "ml1m": "latin-1"}
"""Each format's documented text encoding besides UTF-8 (the others are UTF-8 only)."""


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
    def of(cls, fmt: str, label: str, offset: int = 0, skip_bad: bool = False) -> Text:
        return cls(ENCODINGS.get(fmt, "utf-8"), label, offset, skip_bad)


def _to_utf8(data: bytes, text: Text) -> bytes:
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
    utf8 = _to_utf8(data, text)
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


def _settle(
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


def _first_reason(checks: list[tuple[pl.Expr, pl.Expr]]) -> pl.Expr:
    """The reason of the first failing check, null when all pass."""
    return pl.coalesce([pl.when(bad).then(reason) for bad, reason in checks]).alias("reason")


def _number(column: str) -> pl.Expr:
    return pl.col(column).str.strip_chars().cast(pl.Float64, strict=False)


def _not_number(column: str, what: str) -> tuple[pl.Expr, pl.Expr]:
    value = _number(column)
    bad = value.is_null() | ~value.is_finite()
    reason = pl.concat_str([pl.lit(f"{what} "), pl.col(column), pl.lit(" is not a number")])
    return bad, reason


# ---- delimited text -------------------------------------------------------------------------
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


def _require(names: tuple[str, ...], wanted: dict[str, str], label: str) -> None:
    missing = [k for k in wanted if k not in names]
    if missing:
        raise DataError(
            f"column {missing[0]} missing in {label} (its columns: {', '.join(names)})",
            todo="check data.format or fix the header",
        )


def _body(
    data: bytes, text: Text, has_header: bool, at_start: bool
) -> tuple[pl.DataFrame, str | None]:
    """The chunk's non-blank lines, without the header line; and that header when in the chunk."""
    lines = lines_frame(data, text)
    header = None
    if has_header and at_start and lines.height:
        header = lines["text"][0]
        lines = lines.slice(1)
    return lines.filter(pl.col("text").str.strip_chars() != ""), header


INTERACTION_FILES: dict[str, tuple[Delimited, dict[str, str]]] = {
    "ml100k": (
        Delimited("\t", "tab", ("user", "item", "rating", "timestamp")),
        {"user": "user", "item": "item", "rating": "rating", "timestamp": "timestamp"},
    ),
    "ml1m": (
        Delimited("::", "'::'", ("user", "item", "rating", "timestamp")),
        {"user": "user", "item": "item", "rating": "rating", "timestamp": "timestamp"},
    ),
    "ml_csv": (
        Delimited(",", "comma"),
        {"userId": "user", "movieId": "item", "rating": "rating", "timestamp": "timestamp"},
    ),
    "recbole": (
        Delimited("\t", "tab", typed_header=True),
        {"user_id": "user", "item_id": "item", "rating": "rating", "timestamp": "timestamp"},
    ),
}
"""Delimited interaction files: layout, and source column -> output column."""

JSON_INTERACTIONS: dict[str, tuple[dict[str, str], int]] = {
    "amazon2018": (
        {"reviewerID": "user", "asin": "item", "overall": "rating", "unixReviewTime": "timestamp"},
        1,
    ),
    "amazon2023": (
        {"user_id": "user", "parent_asin": "item", "rating": "rating", "timestamp": "timestamp"},
        1000,
    ),
}
"""JSON-lines interaction files: key -> output column, and timestamp units per second."""


RATING_SCALES: dict[str, tuple[float, float]] = {
    "ml100k": (1.0, 5.0),
    "ml1m": (1.0, 5.0),
    "ml_csv": (0.5, 5.0),
    "amazon2018": (1.0, 5.0),
    "amazon2023": (1.0, 5.0),
}
"""Each format's documented rating scale (RecBole files have none): a rating outside it is a
bad line."""
LAST_TIMESTAMP = 4_102_444_800
"""2100-01-01 UTC in seconds: a later (or a negative) timestamp is a bad line, such as one in
milliseconds among seconds."""


def parse_interactions(
    fmt: str,
    data: bytes,
    *,
    offset: int,
    header: str | None,
    label: str,
    skip_bad: bool,
    lines_before: Callable[[], int],
) -> tuple[pa.Table, pa.Table]:
    """Parse a chunk of an interaction file into ``INTERACTIONS`` rows and rejects.

    ``offset`` is the chunk's byte offset in its file; ``header`` the file's first line for
    formats with a header, None for the file's first chunk (which holds it: after a byte order
    mark, its offset is 3); ``lines_before``
    counts the file's lines before the chunk, called only to report a malformed line.
    """
    if fmt in JSON_INTERACTIONS:
        keys, per_second = JSON_INTERACTIONS[fmt]
        lines, _ = _body(data, Text.of(fmt, label, offset, skip_bad), False, True)
        frame = _json_fields(lines, dict.fromkeys(keys, pl.String), label, whole=data)
        renamed = frame.rename({f"f:{k}": f"f:{v}" for k, v in keys.items()})
        json_check = (pl.col("json_error").is_not_null(), pl.col("json_error"))
        return _interactions(
            renamed, per_second, fmt, offset, label, skip_bad, lines_before, json_check
        )
    spec, wanted = INTERACTION_FILES[fmt]
    text = Text.of(fmt, label, offset, skip_bad)
    lines, own_header = _body(data, text, not spec.fields, header is None)
    names = spec.names(own_header or header, label)
    _require(names, wanted, label)
    frame, count_check = split_fields(lines, spec, names)
    frame = frame.rename({f"f:{k}": f"f:{v}" for k, v in wanted.items()})
    return _interactions(frame, 1, fmt, offset, label, skip_bad, lines_before, count_check)


def _interactions(
    frame: pl.DataFrame,
    per_second: int,
    fmt: str,
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
    seconds = _number("f:timestamp") / per_second
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
    if fmt in RATING_SCALES:
        low, high = RATING_SCALES[fmt]
        rating = _number("f:rating")
        checks.append(
            (
                (rating < low) | (rating > high),
                pl.concat_str(
                    pl.lit("rating "),
                    pl.col("f:rating").str.strip_chars(),
                    pl.lit(f" is outside the {fmt} scale {low:g}..{high:g}"),
                ),
            )
        )
    frame = frame.with_columns(_first_reason(checks))
    good, rejects = _settle(frame, label, skip_bad, lines_before)
    table = good.select(
        user=pl.col("f:user").str.strip_chars(),
        item=pl.col("f:item").str.strip_chars(),
        rating=_number("f:rating").cast(pl.Float32),
        timestamp=(_number("f:timestamp") / per_second).floor().cast(pl.Int64),
        row=pl.col("offset") + offset,
    )
    return table.to_arrow().cast(INTERACTIONS), rejects


def _units(per_second: int) -> str:
    return "seconds since 1970" if per_second == 1 else "milliseconds since 1970"


# ---- JSON lines -----------------------------------------------------------------------------
def _json_fields(
    lines: pl.DataFrame, types: dict[str, pl.DataType], label: str, whole: bytes | None = None
) -> pl.DataFrame:
    """Decode each line's ``types`` keys into ``f:KEY`` columns; bad lines get a ``json_error``.

    ``whole``: the bytes ``lines`` were cut from, of string ``types``, to try
    :func:`_json_at_once` first. A key absent from every line of a non-empty chunk is a missing
    column, not bad lines.
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
    for key in types:
        if ok.height and ok[f"f:{key}"].null_count() == ok.height and _required(key):
            keys = ", ".join(json.loads(ok["text"][0]))
            raise DataError(
                f"column {key} missing in {label} (its first record has keys: {keys})",
                todo="check data.format: "
                + "; ".join(f"{k}: {FORMAT_FILES[k]}" for k in JSON_INTERACTIONS),
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


def _required(key: str) -> bool:
    return key not in _OPTIONAL_META


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


# ---- items ----------------------------------------------------------------------------------
_OPTIONAL_META = {"title", "category", "brand", "categories", "main_category", "store"}

JSON_ITEMS: dict[str, dict[str, tuple[str, pl.DataType]]] = {
    "amazon2018": {
        "asin": ("item", pl.String),
        "title": ("title", pl.String),
        "category": ("category", pl.List(pl.String)),
        "brand": ("brand", pl.String),
    },
    "amazon2023": {
        "parent_asin": ("item", pl.String),
        "title": ("title", pl.String),
        "categories": ("category", pl.List(pl.String)),
        "main_category": ("main_category", pl.String),
        "store": ("store", pl.String),
    },
}
"""JSON-lines metadata: key -> (output column, type)."""

ITEM_FILES: dict[str, Delimited] = {
    "ml100k": Delimited(
        "|", "'|'", ("item", "title", "release_date", "video_date", "url", *ML100K_GENRES)
    ),
    "ml1m": Delimited("::", "'::'", ("item", "title", "genres")),
    "recbole": Delimited("\t", "tab", typed_header=True),
}

RECBOLE_ITEM_COLUMNS = {
    "item_id": "item",
    "movie_title": "title",
    "title": "title",
    "release_year": "year",
    "year": "year",
    "class": "genres",
    "genre": "genres",
}
"""RecBole item fields with a standard meaning; other fields keep their names (as strings)."""


def parse_items(fmt: str, data: bytes, *, label: str, skip_bad: bool) -> tuple[pa.Table, pa.Table]:
    """Parse a whole item file into ``item``, ``title``, what the source has, and ``row``
    (the line's byte offset, so duplicates can keep the last one); and its rejects."""
    if fmt in JSON_ITEMS:
        return _json_items(JSON_ITEMS[fmt], data, Text.of(fmt, label, 0, skip_bad), skip_bad)
    if fmt == "ml_csv":
        return _movies_csv(data, Text.of(fmt, label)), REJECTS.empty_table()
    spec = ITEM_FILES[fmt]
    lines, header = _body(data, Text.of(fmt, label, 0, skip_bad), not spec.fields, True)
    names = spec.names(header, label)
    if fmt == "recbole":
        _require(names, {"item_id": "item"}, label)
    frame, count_check = split_fields(lines, spec, names)
    empty = pl.col("f:item_id" if fmt == "recbole" else "f:item").str.strip_chars() == ""
    frame = frame.with_columns(_first_reason([count_check, (empty, pl.lit("empty item id"))]))
    good, rejects = _settle(frame, label, skip_bad, lambda: 0)
    table = {"ml100k": _ml100k_items, "ml1m": _ml1m_items, "recbole": _recbole_items}[fmt](
        good, names
    )
    return table.to_arrow(), rejects


def _ml100k_items(frame: pl.DataFrame, names: tuple[str, ...]) -> pl.DataFrame:
    flags = [pl.when(pl.col(f"f:{g}") == "1").then(pl.lit(g)) for g in ML100K_GENRES]
    return frame.select(
        item=pl.col("f:item").str.strip_chars(),
        title=pl.col("f:title"),
        year=pl.col("f:release_date").str.slice(-4).cast(pl.Int32, strict=False),
        genres=pl.concat_list(flags).list.drop_nulls(),
        row=pl.col("offset"),
    )


def _ml1m_items(frame: pl.DataFrame, names: tuple[str, ...]) -> pl.DataFrame:
    return _movielens_items(frame.rename({"f:item": "item", "f:title": "title", "f:genres": "g"}))


def _movielens_items(frame: pl.DataFrame) -> pl.DataFrame:
    """``item``, ``title``, ``g`` (pipe-joined genres) -> the items table of MovieLens."""
    genres = (
        pl.col("g")
        .str.split("|")
        .list.eval(pl.element().filter(pl.element() != "(no genres listed)"))
    )
    return frame.select(
        item=pl.col("item").str.strip_chars(),
        title=pl.col("title").str.strip_chars(),
        year=pl.col("title").str.extract(_TITLE_YEAR, 1).cast(pl.Int32, strict=False),
        genres=genres,
        row=pl.col("offset"),
    )


def _movies_csv(data: bytes, text: Text) -> pa.Table:
    label = text.label
    try:
        frame = pl.read_csv(_to_utf8(data, text), infer_schema=False, row_index_name="offset")
    except pl.exceptions.PolarsError as err:
        first = str(err).strip().splitlines()[0]
        raise DataError(f"cannot parse {label} as CSV ({first})", todo="fix the file") from None
    names = tuple(frame.columns)
    _require(names, {"movieId": "item", "title": "title", "genres": "genres"}, label)
    renamed = frame.rename({"movieId": "item", "genres": "g"})
    return _movielens_items(renamed.with_columns(pl.col("offset").cast(pl.Int64))).to_arrow()


def _recbole_items(frame: pl.DataFrame, names: tuple[str, ...]) -> pl.DataFrame:
    columns = {"item": pl.col("f:item_id").str.strip_chars()}
    for name in names:
        target = RECBOLE_ITEM_COLUMNS.get(name, name)
        if target in columns:
            continue
        value = pl.col(f"f:{name}")
        if target == "year":
            value = value.str.strip_chars().cast(pl.Int32, strict=False)
        elif target == "genres":
            value = value.str.split(" ").list.eval(pl.element().filter(pl.element() != ""))
        columns[target] = value
    columns.setdefault("title", pl.lit(None, pl.String))
    return frame.select(**columns, row=pl.col("offset"))


def _json_items(
    keys: dict[str, tuple[str, pl.DataType]], data: bytes, text: Text, skip_bad: bool
) -> tuple[pa.Table, pa.Table]:
    label = text.label
    lines, _ = _body(data, text, False, True)
    frame = _json_fields(lines, {k: t for k, (_, t) in keys.items()}, label)
    item_key = next(iter(keys))
    empty = pl.col(f"f:{item_key}").is_null() | (pl.col(f"f:{item_key}") == "")
    checks = [(pl.col("json_error").is_not_null(), pl.col("json_error"))]
    frame = frame.with_columns(_first_reason([*checks, (empty, pl.lit(f"missing {item_key}"))]))
    good, rejects = _settle(frame, label, skip_bad, lambda: 0)
    table = good.select(
        *[pl.col(f"f:{k}").alias(column) for k, (column, _) in keys.items()], row="offset"
    )
    return table.to_arrow(), rejects


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
