"""MovieLens CSV (latest, 20M, 25M, 32M): ``ratings.csv`` + ``movies.csv``, UTF-8, with headers.

``ratings.csv``: ``userId,movieId,rating,timestamp`` (ratings 0.5..5 in half stars, timestamps
in seconds); ``movies.csv``: ``movieId,title,genres`` with quoted titles (``Title (year)``) and
pipe-joined genres.
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa

from binllm_core.data.formats.delimited import Delimited, DelimitedInteractions
from binllm_core.data.formats.lines import Text, require, to_utf8
from binllm_core.data.formats.movielens import movielens_items
from binllm_core.data.formats.spec import FormatSpec, fixed_names
from binllm_core.data.formats.tables import REJECTS
from binllm_core.errors import DataError


def _movies_csv(
    spec: FormatSpec, data: bytes, label: str, skip_bad: bool
) -> tuple[pa.Table, pa.Table]:
    """The whole ``movies.csv`` read by polars' CSV reader (quoted titles hold commas); a file
    it cannot parse is an error, whatever ``skip_bad``."""
    try:
        text = to_utf8(data, Text.of(spec, label))
        frame = pl.read_csv(text, infer_schema=False, row_index_name="offset")
    except pl.exceptions.PolarsError as err:
        first = str(err).strip().splitlines()[0]
        raise DataError(f"cannot parse {label} as CSV ({first})", todo="fix the file") from None
    names = tuple(frame.columns)
    require(names, {"movieId": "item", "title": "title", "genres": "genres"}, label)
    renamed = frame.rename({"movieId": "item", "genres": "g"})
    items = movielens_items(renamed.with_columns(pl.col("offset").cast(pl.Int64)))
    return items.to_arrow(), REJECTS.empty_table()


ML_CSV = FormatSpec(
    name="ml_csv",
    files="ratings.csv + movies.csv",
    anchor=fixed_names("ratings.csv", "movies.csv"),
    interactions=DelimitedInteractions(
        Delimited(",", "comma"),
        {"userId": "user", "movieId": "item", "rating": "rating", "timestamp": "timestamp"},
    ),
    items=_movies_csv,
    rating_scale=(0.5, 5.0),
)
