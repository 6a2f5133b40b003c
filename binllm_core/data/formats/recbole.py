"""RecBole atomic files: ``NAME.inter`` + ``NAME.item``, tab-separated, UTF-8.

Each file starts with a header of ``name:type`` fields (``user_id:token``, ``rating:float``...).
``NAME.inter`` needs ``user_id``, ``item_id``, ``rating`` and ``timestamp`` (seconds; ratings on
no fixed scale); ``NAME.item`` needs ``item_id``, and its fields with a standard meaning (title,
year, genres: space-separated) are renamed, the others kept as strings.
"""

from __future__ import annotations

import polars as pl

from binllm_core.data.formats.delimited import Delimited, DelimitedInteractions, DelimitedItems
from binllm_core.data.formats.spec import FormatSpec

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

_ATOMIC = Delimited("\t", "tab", typed_header=True)


def _inter_files(plain: str, base: str, explicit: bool) -> tuple[str, list[str]] | None:
    stem, _, ext = plain.rpartition(".")
    return (stem, [f"{stem}.item"]) if ext == "inter" else None


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


RECBOLE = FormatSpec(
    name="recbole",
    files="NAME.inter + NAME.item",
    anchor=_inter_files,
    interactions=DelimitedInteractions(
        _ATOMIC,
        {"user_id": "user", "item_id": "item", "rating": "rating", "timestamp": "timestamp"},
    ),
    items=DelimitedItems(_ATOMIC, "item_id", _recbole_items),
)
