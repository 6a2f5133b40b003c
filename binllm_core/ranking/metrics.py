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

from collections.abc import Mapping, Sequence

import numpy as np

RANKING_KEYS = ("recall", "ndcg", "hr", "mrr")


def user_metrics(ranked: np.ndarray, positives: np.ndarray, k: int) -> dict[str, float]:
    """The four metrics at ``k`` of one user."""
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
    gains = 1.0 / np.log2(np.arange(2, longest + 2))
    dcg = np.cumsum(hits * gains, axis=1)
    ideal = np.cumsum(gains)
    first = np.where(hits.any(axis=1), hits.argmax(axis=1), longest)
    hit_count = np.cumsum(hits, axis=1)
    out = {}
    for k in ks:
        found = first < k
        out[k] = {
            "recall": float((hit_count[:, k - 1] / n_pos).mean()),
            "ndcg": float((dcg[:, k - 1] / ideal[np.minimum(k, n_pos) - 1]).mean()),
            "hr": float(found.mean()),
            "mrr": float(np.where(found, 1.0 / (first + 1), 0.0).mean()),
            "users": len(users),
        }
    return out
