"""MovieLens 100K and 1M (also 10M): fixed file names, fixed fields, no header, latin-1 allowed.

- ``ml100k``: ``u.data`` holds ``user<TAB>item<TAB>rating<TAB>timestamp`` lines; ``u.item``
  holds ``item|title|release date|video date|url|`` and 19 genre flags (0/1).
- ``ml1m``: ``ratings.dat`` holds ``user::item::rating::timestamp`` lines; ``movies.dat`` holds
  ``item::title (year)::Genre|Genre`` lines.

Ratings 1..5, timestamps in seconds.
"""

from __future__ import annotations

import polars as pl

from binllm_core.data.formats.delimited import Delimited, DelimitedInteractions, DelimitedItems
from binllm_core.data.formats.spec import FormatSpec, fixed_names

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)  # fmt: skip

_TITLE_YEAR = r"\((\d{4})\)\s*$"
_FIELDS = ("user", "item", "rating", "timestamp")
_SAME_NAMES = {name: name for name in _FIELDS}


def movielens_items(frame: pl.DataFrame) -> pl.DataFrame:
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
    return movielens_items(frame.rename({"f:item": "item", "f:title": "title", "f:genres": "g"}))


ML100K = FormatSpec(
    name="ml100k",
    files="u.data + u.item",
    anchor=fixed_names("u.data", "u.item"),
    interactions=DelimitedInteractions(Delimited("\t", "tab", _FIELDS), _SAME_NAMES),
    items=DelimitedItems(
        Delimited(
            "|", "'|'", ("item", "title", "release_date", "video_date", "url", *ML100K_GENRES)
        ),
        "item",
        _ml100k_items,
    ),
    encoding="latin-1",
    rating_scale=(1.0, 5.0),
)

ML1M = FormatSpec(
    name="ml1m",
    files="ratings.dat + movies.dat",
    anchor=fixed_names("ratings.dat", "movies.dat"),
    interactions=DelimitedInteractions(Delimited("::", "'::'", _FIELDS), _SAME_NAMES),
    items=DelimitedItems(Delimited("::", "'::'", ("item", "title", "genres")), "item", _ml1m_items),
    encoding="latin-1",
    rating_scale=(1.0, 5.0),
)
