"""Amazon Reviews 2018 and 2023: a review file and its category's metadata file, JSON lines.

- ``amazon2018``: ``NAME.json(.gz)`` reviews (``reviewerID``, ``asin``, ``overall``,
  ``unixReviewTime`` in seconds) + ``meta_NAME.json(.gz)`` (``asin``, ``title``, ``category``,
  ``brand``).
- ``amazon2023``: ``NAME.jsonl(.gz)`` reviews (``user_id``, ``parent_asin``, ``rating``,
  ``timestamp`` in milliseconds) + ``meta_NAME.jsonl(.gz)`` (``parent_asin``, ``title``,
  ``categories``, ``main_category``, ``store``).

A 5-core review file (``Books_5``) goes with its full category's metadata (``meta_Books``).
Ratings 1..5. A format named explicitly accepts either extension.
"""

from __future__ import annotations

import polars as pl

from binllm_core.data.formats.jsonl import JsonInteractions, JsonItems
from binllm_core.data.formats.spec import Anchor, FormatSpec

_EXTENSIONS = ("json", "jsonl")


def _reviews(own: str) -> Anchor:
    """The anchor of review files ``NAME.<own>`` (either extension when named explicitly)."""

    def anchor(plain: str, base: str, explicit: bool) -> tuple[str, list[str]] | None:
        stem, _, ext = plain.rpartition(".")
        wanted = ext == own or (explicit and ext in _EXTENSIONS)
        if not wanted or not stem or stem.startswith("meta_"):
            return None
        stems = [stem, stem[:-2]] if stem.endswith("_5") else [stem]
        zipped = dict.fromkeys((base[len(plain) :], "", ".gz"))
        return stem, [f"meta_{s}.{ext}{z}" for s in stems for z in zipped]

    return anchor


AMAZON2018 = FormatSpec(
    name="amazon2018",
    files="NAME.json(.gz) + meta_NAME.json(.gz)",
    anchor=_reviews("json"),
    interactions=JsonInteractions(
        {"reviewerID": "user", "asin": "item", "overall": "rating", "unixReviewTime": "timestamp"},
        per_second=1,
    ),
    items=JsonItems(
        {
            "asin": ("item", pl.String),
            "title": ("title", pl.String),
            "category": ("category", pl.List(pl.String)),
            "brand": ("brand", pl.String),
        }
    ),
    rating_scale=(1.0, 5.0),
)

AMAZON2023 = FormatSpec(
    name="amazon2023",
    files="NAME.jsonl(.gz) + meta_NAME.jsonl(.gz)",
    anchor=_reviews("jsonl"),
    interactions=JsonInteractions(
        {"user_id": "user", "parent_asin": "item", "rating": "rating", "timestamp": "timestamp"},
        per_second=1000,
    ),
    items=JsonItems(
        {
            "parent_asin": ("item", pl.String),
            "title": ("title", pl.String),
            "categories": ("category", pl.List(pl.String)),
            "main_category": ("main_category", pl.String),
            "store": ("store", pl.String),
        }
    ),
    rating_scale=(1.0, 5.0),
)
