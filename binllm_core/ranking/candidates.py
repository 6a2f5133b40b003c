"""Candidates that can hold the answer: time-aware popular items unioned into the lists the LLM
re-ranks.

The LLM re-ranks a user's first ``rerank.top_n`` candidates; an item the retriever leaves out
cannot be recovered, so the retriever's Recall@N bounds every re-ranked list. The union takes the
codes' first ``N - P`` items and fills the last ``P`` places with the first time-aware popular
items (the items most liked in a recent window of train: the baseline the evaluation measures)
that the user may be recommended and that are not already there; where too few are left, the
codes' next items fill the list.

``P`` is chosen among ``rerank.popular_places`` by the Recall@N of the union lists of every
retrieved valid user (never test; the smaller of equals, so 0 — the codes' own lists — wins a
tie), as the issue that asked for it put it: union them "when that raises Recall@N on valid".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from binllm_core.ranking.metrics import ranking_metrics

TIE_TOLERANCE = 1e-12
"""Valid recalls this close are a tie (the smaller number of places wins)."""


def union_popular(
    ranked: np.ndarray, popular: np.ndarray, excluded: np.ndarray, n: int, places: int
) -> np.ndarray:
    """One user's ``n`` candidates: the first ``n - places`` of ``ranked`` (the retriever's
    items, best first), then the first ``places`` items of ``popular`` (best first) that are
    neither among those nor ``excluded``; then more of ``ranked`` where that leaves places."""
    ranked, popular = np.asarray(ranked, np.int64), np.asarray(popular, np.int64)
    head = ranked[: max(n - places, 0)]
    banned = np.concatenate([head, np.asarray(excluded, np.int64)])
    fill = popular[~np.isin(popular, banned)][:places]
    chosen = np.concatenate([head, fill])
    rest = ranked[len(head) :]
    rest = rest[~np.isin(rest, chosen)]
    return np.concatenate([chosen, rest[: n - len(chosen)]])


@dataclass(frozen=True)
class PlacesChoice:
    """How many places the popular items take, and what it was chosen by."""

    places: int
    """The chosen ``P`` (0: the codes' own lists)."""
    valid_recall: dict[int, float]
    """Valid Recall@N of the union lists for each ``P`` of the grid."""
    n: int
    """The list length N (``rerank.top_n``)."""
    valid_users: int
    """Valid users the recalls average over (0: nothing to choose by, ``P`` is 0)."""
    window_days: int | None
    """The time-aware popularity's window (chosen on valid NDCG@10 by the evaluation's rule)."""

    def summary(self) -> dict[str, Any]:
        """For the manifest and the report."""
        recall = {str(p): v for p, v in self.valid_recall.items()}
        return {
            "places": self.places,
            "chosen_by": f"valid Recall@{self.n}" if self.valid_users else "no valid users",
            f"valid_recall@{self.n}": recall,
            "valid_lift": (self.valid_recall[self.places] - self.valid_recall[0])
            if self.valid_users
            else 0.0,
            "valid_users": self.valid_users,
            "window_days": self.window_days,
        }


def choose_places(
    lists: Mapping[int, np.ndarray],
    positives: Mapping[int, np.ndarray],
    excluded: Mapping[int, np.ndarray],
    popular: np.ndarray,
    n: int,
    grid: Sequence[int],
    window_days: int | None = None,
) -> PlacesChoice:
    """``P`` of ``grid`` (which holds 0) with the best Recall@``n`` of the union lists over the
    users of ``lists`` that have ``positives`` (the valid users: per uid the retriever's items,
    best first, and the items the user may not be given)."""
    users = [u for u in lists if len(positives.get(u, ()))]
    curve: dict[int, float] = {}
    for places in sorted(set(grid)):
        if not users:
            curve[places] = float("nan")
            continue
        union = {
            u: union_popular(lists[u], popular, excluded.get(u, np.array([], np.int64)), n, places)
            for u in users
        }
        curve[places] = ranking_metrics(union, {u: positives[u] for u in users}, [n])[n]["recall"]
    if not users:
        return PlacesChoice(0, curve, n, 0, window_days)
    best = max(curve.values())
    chosen = min(p for p, v in curve.items() if v >= best - TIE_TOLERANCE)
    return PlacesChoice(chosen, curve, n, len(users), window_days)
