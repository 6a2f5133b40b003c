"""Ranking metrics of top-K lists against each user's held-out positives.

For a user with positives ``P`` and a ranked list ``L`` (best first; it may be shorter than K):

* **Recall@K** = |L[:K] ∩ P| / |P|;
* **NDCG@K** = sum over hits at rank r <= K of 1/log2(r + 1), divided by the same sum for a
  perfect list (min(K, |P|) hits at the top);
* **HR@K** = 1 when L[:K] holds any positive;
* **MRR@K** = 1/r for the first positive at rank r <= K, else 0.

Each is the unweighted mean over users with at least one positive. Items missing from a list
(a re-ranker sees only its N candidates) count as misses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np


def _gains(k: int) -> np.ndarray:
    """The discount of ranks 1..k: 1/log2(r + 1)."""
    return 1.0 / np.log2(np.arange(2, k + 2))


def _recall(hits: np.ndarray, n_pos: np.ndarray) -> np.ndarray:
    return hits.sum(axis=1) / n_pos


def _ndcg(hits: np.ndarray, n_pos: np.ndarray) -> np.ndarray:
    k = hits.shape[1]
    # cumsum, not sum: the same additions in the same order at every K (values to the last bit).
    dcg = np.cumsum(hits * _gains(k), axis=1)[:, -1]
    return dcg / np.cumsum(_gains(k))[np.minimum(k, n_pos) - 1]


def _hr(hits: np.ndarray, n_pos: np.ndarray) -> np.ndarray:
    return hits.any(axis=1).astype(np.float64)


def _mrr(hits: np.ndarray, n_pos: np.ndarray) -> np.ndarray:
    return np.where(hits.any(axis=1), 1.0 / (hits.argmax(axis=1) + 1), 0.0)


@dataclass(frozen=True)
class Metric:
    """One ranking metric: its value per user, and where the report shows it."""

    per_user: Callable[[np.ndarray, np.ndarray], np.ndarray]
    """``(hits, n_pos) ->`` one value per user, where ``hits`` (users x K, bool) marks the
    positives among each user's first K items (a shorter list is padded with misses) and
    ``n_pos`` is each user's number of positives (>= 1). Vectorised over users: the curves of
    the evaluation take every K up to the list length."""
    label: str
    """Its name in the report's prose."""
    report_ks: tuple[int, ...]
    """The K of the report's ranking-table columns."""


METRICS: dict[str, Metric] = {
    "recall": Metric(_recall, "Recall", (5, 10, 20)),
    "ndcg": Metric(_ndcg, "NDCG", (5, 10, 20)),
    "hr": Metric(_hr, "HR", (10,)),
    "mrr": Metric(_mrr, "MRR", (10,)),
}
"""Ranking metric name -> :class:`Metric`, in the column order of the ``ranking`` table. A new
metric is an entry here: it becomes a column of the ``ranking`` table and of the report."""
RANKING_KEYS: tuple[str, ...] = tuple(METRICS)
HEADLINE = "ndcg"
"""The metric the report's ranking tables show first."""


def user_metrics(ranked: np.ndarray, positives: np.ndarray, k: int) -> dict[str, float]:
    """Every metric at ``k`` of one user."""
    found = ranking_metrics({0: np.asarray(ranked)}, {0: np.asarray(positives)}, [k])[k]
    return {key: found[key] for key in RANKING_KEYS}


def ranking_metrics(
    lists: Mapping[int, np.ndarray], positives: Mapping[int, np.ndarray], ks: Sequence[int]
) -> dict[int, dict[str, float]]:
    """Per K: the mean of each metric over the users of ``positives`` that have a positive
    (each positive counted once; a user without a list counts as all misses); plus ``users``,
    how many were averaged. One hit matrix serves every K."""
    users = [u for u, p in positives.items() if len(p)]
    if not users:
        return {k: {**dict.fromkeys(RANKING_KEYS, float("nan")), "users": 0} for k in ks}
    longest = max(ks)
    hits = np.zeros((len(users), longest), bool)
    n_pos = np.zeros(len(users), np.int64)
    empty = np.array([], np.int64)
    for row, user in enumerate(users):
        wanted = np.unique(positives[user])
        top = np.asarray(lists.get(user, empty))[:longest]
        hits[row, : len(top)] = np.isin(top, wanted)
        n_pos[row] = len(wanted)
    out = {}
    for k in ks:
        at_k = hits[:, :k]
        out[k] = {name: float(m.per_user(at_k, n_pos).mean()) for name, m in METRICS.items()}
        out[k]["users"] = len(users)
    return out
