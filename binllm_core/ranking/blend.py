"""The blend that ships: the LLM's answer scores fused with the retriever's, with a weight chosen
on valid.

Per user, over the candidates the LLM re-ranked::

    blend = alpha * z(LLM score) + (1 - alpha) * z(retriever score)

where ``z`` standardizes a score over that user's candidates (mean 0, standard deviation 1; a
score that is the same for every candidate has no order to give and becomes 0). The retriever's
score is its similarity, minus the Hamming distance; a list without distances (a popularity
list, for a user without a code) uses minus its retrieval rank. The blended list is ordered by
``blend``, ties by retrieval rank.

Why z-scores rather than reciprocal-rank fusion: RRF keeps only each list's order, so it throws
away the retriever's margins (two items at distance 3 and one at 12 are not three equal steps)
and the LLM's confidence (a logit far above the rest, or a flat set of answers). z-scores keep
both, on one scale per user. And at ``alpha = 0`` the blend is the retriever's order exactly
(z is increasing, equal distances give equal z, ties go to retrieval rank), so a weight chosen
on valid over a grid that holds 0 can never be worse than the retriever on valid.

``alpha`` is chosen per prompt mode on valid NDCG@10 of the blended lists
(:func:`alpha_curve`, :func:`choose_alpha`), never on test.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl

from binllm_core.ranking.metrics import HEADLINE, ranking_metrics

CHOICE_K = 10
"""The valid figure ``alpha`` is chosen by: NDCG@10 (:data:`HEADLINE` at this K)."""
TIE_TOLERANCE = 1e-12
"""Valid figures this close are a tie (the smaller ``alpha`` wins): identical lists give the
same figure, and equal figures of different lists may differ in their last bits."""


def zscore(values: np.ndarray) -> np.ndarray:
    """``values`` standardized (population standard deviation); all zeros when they are equal."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return values
    spread = values.std()
    if spread == 0 or not np.isfinite(spread):
        return np.zeros_like(values)
    return (values - values.mean()) / spread


def retriever_scores(hamming: np.ndarray, retrieval_rank: np.ndarray) -> np.ndarray:
    """The retriever's score of one user's candidates: minus the Hamming distance; minus the
    retrieval rank where the list has no distances (NaN: a popularity list)."""
    hamming = np.asarray(hamming, np.float64)
    if np.isnan(hamming).any():
        return -np.asarray(retrieval_rank, np.float64)
    return -hamming


def blend_scores(
    llm: np.ndarray, hamming: np.ndarray, retrieval_rank: np.ndarray, alpha: float
) -> np.ndarray:
    """One user's blend scores (see the module's docstring). Both z-scores are finite, so at
    ``alpha = 0`` this is exactly the retriever's z-score."""
    retriever = zscore(retriever_scores(hamming, retrieval_rank))
    return alpha * zscore(llm) + (1 - alpha) * retriever


def blend_order(scores: np.ndarray, retrieval_rank: np.ndarray) -> np.ndarray:
    """Positions of one user's candidates in blended order: ``scores`` descending, ties by
    retrieval rank."""
    return np.lexsort((np.asarray(retrieval_rank), -np.asarray(scores, np.float64)))


def alpha_curve(
    candidates: pl.DataFrame,
    positives: Mapping[int, np.ndarray],
    grid: Sequence[float],
    k: int = CHOICE_K,
) -> dict[float, float]:
    """NDCG@``k`` of the blended lists at each ``alpha`` of ``grid``, averaged over the users of
    ``positives`` (each user's held-out positives; a user without a list counts as all misses).
    ``candidates``: one row per re-ranked candidate of one mode, columns ``uid``, ``iid``,
    ``score`` (the LLM's), ``hamming`` (null in a popularity list), ``retrieval_rank``. Empty
    without a user with a positive."""
    if not any(len(p) for p in positives.values()):
        return {}
    frame = candidates.sort(["uid", "retrieval_rank"])
    uids = frame["uid"].to_numpy()
    starts = np.unique(uids, return_index=True)[1]  # each user's first row
    ends = [*starts[1:], len(uids)]
    iids = frame["iid"].to_numpy()
    llm = frame["score"].cast(pl.Float64).to_numpy()
    hamming = frame["hamming"].cast(pl.Float64).to_numpy()  # null -> NaN
    rank = frame["retrieval_rank"].to_numpy()
    users = [
        (
            int(uids[a]),
            iids[a:b],
            zscore(llm[a:b]),
            zscore(retriever_scores(hamming[a:b], rank[a:b])),
            rank[a:b],
        )
        for a, b in zip(starts, ends, strict=True)
    ]
    curve = {}
    for alpha in grid:
        lists = {
            uid: items[blend_order(alpha * z_llm + (1 - alpha) * z_ret, ranks)]
            for uid, items, z_llm, z_ret, ranks in users
        }
        curve[float(alpha)] = ranking_metrics(lists, positives, [k])[k][HEADLINE]
    return curve


def choose_alpha(curve: Mapping[float, float]) -> float:
    """The ``alpha`` of the best valid figure; of equal ones (:data:`TIE_TOLERANCE`), the
    smallest (the closest to the retriever)."""
    if not curve:
        raise ValueError("no valid figure to choose alpha by")
    best = max(curve.values())
    return min(a for a, v in curve.items() if v >= best - TIE_TOLERANCE)


def blend_weights(
    candidates: pl.DataFrame,
    positives: Mapping[int, np.ndarray],
    modes: Sequence[str],
    grid: Sequence[float],
    forced: float | None = None,
) -> dict[str, dict[str, Any]]:
    """Per mode of ``modes``: the weight of the lists that ship and what it rests on —
    ``alpha``; ``chosen_by`` (``rerank.alpha`` where ``forced``; else the valid curve's best,
    :func:`choose_alpha`; else, without a valid user, 0: the retriever's order);
    ``valid_users``; ``valid_ndcg@10`` (alpha -> NDCG@10 of the blended valid lists, over
    ``grid`` and a forced alpha); ``valid_lift``, the chosen alpha's figure less the retriever's
    (alpha 0; None without valid users). ``candidates``: the valid users' re-ranked candidates
    with a ``mode`` column and those of :func:`alpha_curve`; ``positives``: those users' valid
    positives."""
    weights = sorted({*grid, *([] if forced is None else [forced])})
    users = sum(1 for p in positives.values() if len(p))
    out = {}
    for mode in modes:
        curve = alpha_curve(candidates.filter(pl.col("mode") == mode), positives, weights)
        if forced is not None:
            alpha, how = forced, "rerank.alpha"
        elif curve:
            alpha, how = choose_alpha({a: curve[a] for a in grid}), f"valid NDCG@{CHOICE_K}"
        else:
            alpha, how = 0.0, "no valid user re-ranked: the retriever's order"
        out[mode] = {
            "alpha": alpha,
            "chosen_by": how,
            "valid_users": users,
            f"valid_ndcg@{CHOICE_K}": {f"{a:g}": v for a, v in curve.items()},
            "valid_lift": curve[alpha] - curve[0.0] if curve else None,
        }
    return out
