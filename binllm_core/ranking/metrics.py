"""Ranking metrics of top-K lists against each user's held-out positives.

For a user with positives ``P`` and a ranked list ``L`` (best first; it may be shorter than K):

* **Recall@K** = |L[:K] ∩ P| / |P|;
* **NDCG@K** = sum over hits at rank r <= K of 1/log2(r + 1), divided by the same sum for a
  perfect list (min(K, |P|) hits at the top);
* **HR@K** = 1 when L[:K] holds any positive;
* **MRR@K** = 1/r for the first positive at rank r <= K, else 0.

Each is the unweighted mean over users with at least one positive. Items missing from a list
(a re-ranker sees only its N candidates) count as misses. Its 95 % interval is a percentile
bootstrap over those users (:func:`bootstrap_interval`); two methods on the same users are
compared by the ratio of their means with a paired interval (:func:`ratio_interval`).
"""

from __future__ import annotations

import math
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
INTERVAL_KEYS: tuple[str, ...] = tuple(
    f"{key}_{end}" for key in RANKING_KEYS for end in ("low", "high")
)
"""``{metric}_low`` and ``{metric}_high``: the bounds of each metric's 95 % interval."""
HEADLINE = "ndcg"
"""The metric the report's ranking tables show first."""


def user_metrics(ranked: np.ndarray, positives: np.ndarray, k: int) -> dict[str, float]:
    """Every metric at ``k`` of one user."""
    found = ranking_metrics({0: np.asarray(ranked)}, {0: np.asarray(positives)}, [k])[k]
    return {key: found[key] for key in RANKING_KEYS}


def per_user_metrics(
    lists: Mapping[int, np.ndarray], positives: Mapping[int, np.ndarray], ks: Sequence[int]
) -> tuple[list[int], dict[tuple[int, str], np.ndarray]]:
    """The users of ``positives`` that have a positive, and per ``(K, metric)`` one value per
    such user, in that order (each positive counted once; a user without a list counts as all
    misses). One hit matrix serves every K."""
    users = [u for u, p in positives.items() if len(p)]
    if not users:
        return users, {}
    longest = max(ks)
    hits = np.zeros((len(users), longest), bool)
    n_pos = np.zeros(len(users), np.int64)
    empty_list = np.array([], np.int64)
    for row, user in enumerate(users):
        wanted = np.unique(positives[user])
        top = np.asarray(lists.get(user, empty_list))[:longest]
        hits[row, : len(top)] = np.isin(top, wanted)
        n_pos[row] = len(wanted)
    return users, {
        (k, name): m.per_user(hits[:, :k], n_pos) for k in ks for name, m in METRICS.items()
    }


def ranking_metrics(
    lists: Mapping[int, np.ndarray],
    positives: Mapping[int, np.ndarray],
    ks: Sequence[int],
    resamples: int = 0,
    seed: int = 0,
) -> dict[int, dict[str, float]]:
    """Per K: the mean of each metric over the users of ``positives`` that have a positive
    (:func:`per_user_metrics`); plus ``users``, how many were averaged; with ``resamples``,
    each metric's :data:`INTERVAL_KEYS` from :func:`bootstrap_interval` (the same draws for
    every K and metric)."""
    users, per_user = per_user_metrics(lists, positives, ks)
    if not users:
        empty = {**dict.fromkeys(RANKING_KEYS, float("nan")), "users": 0}
        if resamples:
            empty |= dict.fromkeys(INTERVAL_KEYS, float("nan"))
        return {k: dict(empty) for k in ks}
    out = {k: {"users": len(users)} for k in ks}
    for (k, name), values in per_user.items():
        out[k][name] = float(values.mean())
    if resamples:
        low, high = bootstrap_interval(np.stack(list(per_user.values()), axis=1), resamples, seed)
        for j, (k, name) in enumerate(per_user):
            out[k][f"{name}_low"], out[k][f"{name}_high"] = float(low[j]), float(high[j])
    return out


def resampled_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """The means of each column of ``values`` (users x figures) over ``resamples`` draws of as
    many users with replacement (resamples x figures). The draws depend only on ``seed`` and
    the number of users, so every method measured on the same users gets the same resamples
    (and a re-run the same means)."""
    n = len(values)
    by_figure = np.ascontiguousarray(values.T)
    rng = np.random.default_rng(seed)
    means = np.empty((resamples, values.shape[1]))
    step = max(1, 2**18 // n)  # draws a block at a time: bounded memory for many users
    for start in range(0, resamples, step):
        draws = rng.integers(0, n, size=(min(step, resamples - start), n))
        # One figure at a time: numpy sums a wider block in another order (last bits differ).
        for j, figure in enumerate(by_figure):
            means[start : start + len(draws), j] = figure[draws].mean(axis=1)
    return means


def bootstrap_interval(
    values: np.ndarray, resamples: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The 95 % percentile-bootstrap interval of the mean of each column of ``values`` (users x
    figures): the 2.5th and 97.5th percentiles of :func:`resampled_means`."""
    low, high = np.percentile(resampled_means(values, resamples, seed), [2.5, 97.5], axis=0)
    return low, high


def ratio_interval(
    numerator: np.ndarray, denominator: np.ndarray, resamples: int, seed: int
) -> tuple[float, float, float]:
    """The ratio of the means of two methods' per-user values on the same users (in the same
    order), and its paired 95 % percentile-bootstrap interval: each draw takes both means over
    the same users (:func:`resampled_means`), so what the two have in common (which users are
    hard) cancels, and the interval is narrower than the two methods' own intervals suggest.
    The ratio is nan where the denominator's mean is 0, and so is a draw's (the bounds are
    those of the other draws); the bounds are nan without ``resamples``."""
    pair = np.stack([numerator, denominator], axis=1).astype(np.float64)
    ratio = _ratio(pair[:, 0].mean(), pair[:, 1].mean())
    if not resamples or math.isnan(ratio):
        return float(ratio), float("nan"), float("nan")
    means = resampled_means(pair, resamples, seed)
    low, high = np.nanpercentile(_ratio(means[:, 0], means[:, 1]), [2.5, 97.5])
    return float(ratio), float(low), float(high)


def _ratio(top: np.ndarray | float, bottom: np.ndarray | float) -> np.ndarray:
    """``top / bottom``, nan where ``bottom`` is 0."""
    bottom = np.asarray(bottom, np.float64)
    safe = np.where(bottom == 0, 1.0, bottom)
    return np.where(bottom == 0, np.nan, np.asarray(top, np.float64) / safe)


def group_metrics(scores: np.ndarray, k: int = 10) -> dict[str, float]:
    """NDCG@k and MRR of listwise groups: ``scores`` (groups x size) holds each group's answer
    scores, its one liked item in column 0. Each group is ordered by score, a tie counting
    against the liked item (a constant scorer gets the worst), and measured as a user's list
    with one positive (:func:`ranking_metrics`): NDCG@k = 1/log2(r + 1) for the liked item at
    rank r <= k, MRR = 1/r (over the whole group). The means over groups, and ``groups``."""
    scores = np.asarray(scores, np.float64)
    if not scores.size:
        return {f"ndcg{k}": float("nan"), "mrr": float("nan"), "groups": 0}
    size = scores.shape[1]
    liked = np.zeros(size, bool)
    liked[0] = True
    # lexsort: the last key first; among equal scores the liked item (True) comes last.
    lists = {g: np.lexsort((liked, -row)) for g, row in enumerate(scores)}
    positives = {g: np.array([0]) for g in range(len(scores))}
    found = ranking_metrics(lists, positives, [k, size])
    return {f"ndcg{k}": found[k]["ndcg"], "mrr": found[size]["mrr"], "groups": len(scores)}
