"""Synthetic interaction sources at any size, in the layouts users have (seeded, reproducible).

``movielens_csv`` writes a MovieLens-CSV folder (``ratings.csv`` + ``movies.csv``, the layout of
MovieLens latest/25M); ``amazon2018_json`` writes an Amazon-Reviews-2018-shaped folder
(``Books_5.json`` + ``meta_Books.json``, JSON lines, day-resolution ``unixReviewTime`` over
2016-2018 so that the ``amazon_book`` protocol's 2017 filter and December halves have work to
do). Both draw items with Zipf-like popularity. Used by ``benchmarks/ingest.py`` and by the
equality tests of stage ``samples``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

DAY = 86_400
START_2016 = 1_451_606_400
"""2016-01-01 UTC."""


def _items(rng: np.random.Generator, n: int, n_items: int) -> np.ndarray:
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.8
    return rng.choice(n_items, size=n, p=popularity / popularity.sum()) + 1


def movielens_csv(folder: Path, n: int, seed: int = 0) -> Path:
    """A MovieLens-CSV folder with ``n`` ratings, ~100 per user (half-star ratings, second
    timestamps over 2015-2019)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_users, n_items = max(n // 100, 10), max(n // 500, 50)
    items = _items(rng, n, n_items)
    ratings = pl.DataFrame(
        {
            "userId": rng.integers(1, n_users + 1, size=n),
            "movieId": items,
            "rating": rng.integers(1, 11, size=n) / 2.0,
            "timestamp": rng.integers(1_420_070_400, 1_577_836_800, size=n),
        }
    )
    ratings.write_csv(folder / "ratings.csv")
    ids = np.arange(1, n_items + 1)
    movies = pl.DataFrame(
        {
            "movieId": ids,
            "title": [f"Movie {i}, The ({1950 + i % 70})" for i in ids],
            "genres": ["Comedy|Drama" if i % 2 else "Action" for i in ids],
        }
    )
    movies.write_csv(folder / "movies.csv", quote_style="non_numeric")
    return folder


def amazon2018_json(folder: Path, n: int, seed: int = 0) -> Path:
    """An Amazon-2018-shaped folder with ``n`` reviews, ~60 per reviewer over three years (a
    third in 2017), 1-5 star ratings and one ``meta_Books.json`` line per product."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_users, n_items = max(n // 60, 10), max(n // 200, 50)
    users = rng.integers(0, n_users, size=n)
    items = _items(rng, n, n_items)
    days = rng.integers(0, 3 * 365, size=n)
    reviews = pl.DataFrame(
        {
            "overall": rng.integers(1, 6, size=n).astype(np.float64),
            "verified": rng.random(n) < 0.9,
            "reviewerID": pl.Series(users).cast(pl.String).str.zfill(12).str.replace(r"^", "A"),
            "asin": pl.Series(items).cast(pl.String).str.zfill(10),
            "unixReviewTime": START_2016 + days * DAY,
        }
    )
    reviews.write_ndjson(folder / "Books_5.json")
    asins = pl.Series(np.arange(1, n_items + 1)).cast(pl.String).str.zfill(10)
    meta = pl.DataFrame(
        {
            "asin": asins,
            "title": [f"Book {i}: A Novel" for i in range(1, n_items + 1)],
            "category": [["Books", "Literature & Fiction"]] * n_items,
            "brand": ["Visit Amazon's Page"] * n_items,
        }
    )
    meta.write_ndjson(folder / "meta_Books.json")
    return folder
