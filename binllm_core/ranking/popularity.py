"""The popularity baselines of the ranking evaluation, and the window of the time-aware one.

**Train popularity** ranks items by their positives (label 1) in train. **Time-aware
popularity** ranks them by their train positives of the last W days of train: those at or after
the latest train interaction minus W days, so that what was liked lately comes first (under a
``per_user`` split, train ends at a different time for each user; the window ends at the latest
train interaction of any user). W is the window of ``evaluate.popularity_windows`` whose lists
have the best NDCG@10 on the valid split — every user with a valid positive that is not one of
their train items, against lists without their train items — and never chosen on test; the
shortest of equals. Both break ties by train popularity, then item id.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from binllm_core.ranking.metrics import ranking_metrics

DAY_S = 86_400
VALID_K = 10
"""The window is chosen by NDCG at this K."""


def liked_counts(samples: pl.DataFrame, n_items: int, days: int | None = None) -> np.ndarray:
    """Train positives per item id (``samples``: iid, label, split, timestamp in seconds); with
    ``days``, only those of the last ``days`` days of train."""
    train = samples.filter(pl.col("split") == "train")
    liked = train.filter(pl.col("label") == 1)
    if days is not None and train.height:
        liked = liked.filter(pl.col("timestamp") >= train["timestamp"].max() - days * DAY_S)
    return np.bincount(liked["iid"].to_numpy(), minlength=n_items).astype(np.float64)


def popularity_order(score: np.ndarray, popularity: np.ndarray, items: np.ndarray) -> np.ndarray:
    """``items`` by ``score`` (indexed by item id), then train ``popularity``, then id."""
    return items[np.lexsort((items, -popularity[items], -score[items]))]


def head_lists(
    order: np.ndarray, uids: Iterable[int], excluded: Iterable[Sequence[int]], n: int
) -> dict[int, np.ndarray]:
    """Each user's first ``n`` items of ``order`` that are not among their ``excluded``."""
    out = {}
    for u, drop in zip(uids, excluded, strict=True):
        head = order[: n + len(drop)]
        out[int(u)] = head[~np.isin(head, drop)][:n]
    return out


@dataclass(frozen=True)
class WindowChoice:
    """The time-aware popularity's window, and what it was chosen by."""

    days: int
    """The chosen W."""
    valid_ndcg: dict[int, float]
    """Valid NDCG@10 of each window's lists."""
    popularity_valid_ndcg: float
    """Valid NDCG@10 of train popularity's lists (every train positive), for comparison."""
    valid_users: int
    """Users the valid figures average over."""
    scores: np.ndarray
    """The chosen window's train positives by item id: the scores of its lists."""

    def summary(self) -> dict[str, Any]:
        """For the manifest and ``metrics.json``."""
        return {
            "days": self.days,
            "valid_ndcg@10": {str(d): v for d, v in self.valid_ndcg.items()},
            "popularity_valid_ndcg@10": self.popularity_valid_ndcg,
            "valid_users": self.valid_users,
        }


def choose_window(
    samples: pl.DataFrame, item_ids: np.ndarray, windows: Sequence[int]
) -> WindowChoice | None:
    """The time-aware popularity's window among ``windows`` (days), by valid NDCG@10 (see the
    module); ``samples``: uid, iid, label, split, timestamp; ``item_ids``: the catalog, sorted.
    None when no valid user has a positive to choose by."""
    positives, excluded = _valid_users(samples)
    if not positives:
        return None
    n_items = int(item_ids.max()) + 1
    popularity = liked_counts(samples, n_items)

    def valid_ndcg(score: np.ndarray) -> float:
        order = popularity_order(score, popularity, item_ids)
        drops = [excluded.get(u, ()) for u in positives]
        lists = head_lists(order, positives, drops, VALID_K)
        return ranking_metrics(lists, positives, [VALID_K])[VALID_K]["ndcg"]

    counts = {days: liked_counts(samples, n_items, days) for days in sorted(windows)}
    curve = {days: valid_ndcg(score) for days, score in counts.items()}
    best = max(curve, key=lambda days: curve[days])  # the first, so the shortest, of equals
    return WindowChoice(best, curve, valid_ndcg(popularity), len(positives), counts[best])


def _valid_users(samples: pl.DataFrame) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Each valid user's valid positives that are not train items, and their train items; by
    user id in ascending order."""
    train = samples.filter(pl.col("split") == "train").select("uid", "iid").unique()
    liked = (
        samples.filter((pl.col("split") == "valid") & (pl.col("label") == 1))
        .select("uid", "iid")
        .join(train, on=["uid", "iid"], how="anti")
    )

    def by_user(pairs: pl.DataFrame) -> dict[int, np.ndarray]:
        grouped = pairs.group_by("uid").agg(pl.col("iid").unique().sort()).sort("uid")
        return {int(u): np.asarray(i) for u, i in zip(grouped["uid"], grouped["iid"], strict=True)}

    return by_user(liked), by_user(train)
