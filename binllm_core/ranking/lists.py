"""Top-K lists of an evaluated run, measured: the catalog lists of the codes, the float model,
train and time-aware popularity (:mod:`binllm_core.ranking.popularity`), the retriever's
candidates and the LLM's re-ranked lists, under the full and the sampled protocol, each on the
users it can be compared on (metrics and intervals of :mod:`binllm_core.ranking.metrics`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from binllm_core.ranking.metrics import (
    HEADLINE,
    INTERVAL_KEYS,
    RANKING_KEYS,
    per_user_metrics,
    ranking_metrics,
    ratio_interval,
)
from binllm_core.ranking.popularity import head_lists, popularity_order


def top_by_score(
    scores: np.ndarray, n: int, excluded: Sequence[np.ndarray] = ()
) -> list[np.ndarray]:
    """Per row of ``scores`` ``(b, m)``: the ``n`` best columns by score, ties by column; the
    ``excluded`` columns of each row never appear."""
    scores = np.array(scores, np.result_type(scores, np.float32))  # a copy: exclusions write
    for row, drop in enumerate(excluded):
        scores[row, drop] = -np.inf
    out = []
    for row in scores:
        k = min(n, len(row))
        if k == 0:
            out.append(np.array([], np.int64))
            continue
        kth = -np.partition(-row, k - 1)[k - 1]
        near = np.flatnonzero(row >= kth)
        near = near[np.isfinite(row[near])]
        out.append(near[np.lexsort((near, -row[near]))][:k])
    return out


RANKING_SCHEMA = pa.schema(
    [
        ("protocol", pa.string()),
        ("split", pa.string()),
        ("method", pa.string()),
        ("mode", pa.string()),
        ("users", pa.string()),
        ("n_users", pa.int64()),
        ("k", pa.int32()),
        *[(key, pa.float64()) for key in RANKING_KEYS],
        *[(key, pa.float64()) for key in INTERVAL_KEYS],
    ]
)
"""One row per protocol, split, method, user set and K. ``method``: ``popularity`` (train
positives), ``recent_popularity`` (train positives of the last W days of train, W chosen on
valid), ``float`` (the continuous encoder's inner products, whole catalog), ``codes`` (the
Hamming lists of ``retrieve``), ``codes+llm`` (those lists re-ranked by the LLM in ``mode``),
``blend`` (the lists that ship: the LLM's scores in ``mode`` blended with the retriever's,
:mod:`binllm_core.ranking.blend`, the weight of stage ``rerank``).
``users``: ``all`` (every user of the split with a positive; every method but ``codes+llm``
and ``blend``), ``reranked`` (the users the LLM re-ranked, ``rerank.max_users``: every method,
compared on the same users) or ``retrieved`` (the reranked users whose positive is among
their first ``rerank.top_n`` candidates: the only users a re-ranker can help).
``{metric}_low``/``_high``: the metric's bootstrap 95 % interval over the row's users (null
without ``evaluate.bootstrap``)."""
KS = (5, 10, 20)
RETRIEVER_NS = (20, 50, 100)


@dataclass
class RankingInputs:
    """What the ranking evaluation reads (all indexed by the run's integer ids)."""

    users: pl.DataFrame
    """``retrieve/users``: split, uid, positives, exclude, sampled_positive."""
    candidates: pl.DataFrame
    """``retrieve/candidates``: protocol, split, uid, iid, rank."""
    recommendations: pl.DataFrame | None
    """``rerank/recommendations``: protocol, split, mode, uid, iid, rank, blend_rank (None: no
    rerank)."""
    item_ids: np.ndarray
    """Every item id of the catalog, sorted."""
    popularity: np.ndarray
    """Train positives by item id."""
    recent: np.ndarray | None
    """Train positives of the time-aware popularity's window by item id (None: not measured)."""
    float_vectors: tuple[np.ndarray, np.ndarray] | None
    """The continuous encoder's (user, item) tables by id (None: not exported)."""
    rerank_n: int
    """How many candidates the LLM re-ranked."""
    reranked: Mapping[str, np.ndarray] | None
    """Per split, the users the LLM re-ranked (None: no re-ranking)."""
    resamples: int = 0
    """Bootstrap resamples of each row's interval (0: none)."""
    seed: int = 0
    """Seed of the resamples."""


def _lists(frame: pl.DataFrame, key: str = "uid", rank: str = "rank") -> dict[int, np.ndarray]:
    ordered = frame.sort([key, rank]).group_by(key, maintain_order=True).agg(pl.col("iid"))
    return {u: np.asarray(items) for u, items in zip(ordered[key], ordered["iid"], strict=True)}


@dataclass
class Ranked:
    """The lists of one protocol, split, method and mode, with what they are measured on."""

    protocol: str
    split: str
    method: str
    mode: str
    lists: dict[int, np.ndarray]
    positives: dict[int, np.ndarray]
    users: dict[str, list[int]]
    """User set (``all``, ``reranked``, ``retrieved``) -> the users its rows average over."""
    ks: tuple[int, ...]

    def rows(self, resamples: int = 0, seed: int = 0) -> list[dict[str, Any]]:
        rows = []
        for label, users in self.users.items():
            subset = {u: self.positives[u] for u in users}
            found = ranking_metrics(self.lists, subset, self.ks, resamples, seed)
            for k, metrics in found.items():
                rows.append(
                    {
                        "protocol": self.protocol,
                        "split": self.split,
                        "method": self.method,
                        "mode": self.mode,
                        "users": label,
                        "n_users": metrics["users"],
                        "k": k,
                        **{key: metrics.get(key) for key in (*RANKING_KEYS, *INTERVAL_KEYS)},
                    }
                )
        return rows

    def per_user(self, k: int) -> tuple[list[int], np.ndarray]:
        """The users of the set ``all`` with a positive, and :data:`HEADLINE` at ``k`` of each."""
        subset = {u: self.positives[u] for u in self.users["all"]}
        users, values = per_user_metrics(self.lists, subset, [k])
        return users, values.get((k, HEADLINE), np.array([]))

    def curve(self, key: str, ks: Sequence[int], users: str) -> np.ndarray:
        """``key`` at each of ``ks`` over the user set ``users``."""
        subset = {u: self.positives[u] for u in self.users[users]}
        found = ranking_metrics(self.lists, subset, ks)
        return np.array([found[k][key] for k in ks])


def ranked_lists(inputs: RankingInputs) -> list[Ranked]:
    """Every method's lists for every split of ``inputs.users``, full protocol then sampled."""
    out: list[Ranked] = []
    for (split,), users in inputs.users.group_by(["split"], maintain_order=True):
        cands = inputs.candidates.filter(pl.col("split") == split)
        recs = None
        if inputs.recommendations is not None:
            recs = inputs.recommendations.filter(pl.col("split") == split)
        out += _full(inputs, split, users, cands, recs)
        out += _sampled(inputs, split, users, cands, recs)
    return out


def ranking_rows(
    ranked: Sequence[Ranked], resamples: int = 0, seed: int = 0
) -> list[dict[str, Any]]:
    """The ranking table (:data:`RANKING_SCHEMA`), with intervals of ``resamples`` draws."""
    return [row for r in ranked for row in r.rows(resamples, seed)]


RATIOS = (("codes", "float"),)
"""``(numerator, denominator)`` methods compared by :func:`ratio_rows`: the codes against the
float model they were binarized from (trained with the same objective)."""


def ratio_rows(
    ranked: Sequence[Ranked], resamples: int = 0, seed: int = 0, k: int = 10
) -> list[dict[str, Any]]:
    """Per protocol and split where both methods of a :data:`RATIOS` pair have lists: the ratio
    of their :data:`HEADLINE` metric at ``k`` over every user (``users`` ``all``) with its
    paired bootstrap interval (:func:`ratio_interval`, ``resamples`` draws: ``low`` and
    ``high``, nan without). The two methods' own intervals overlap far more than their
    difference is uncertain: a user who is hard for one is hard for the other."""
    by = {(r.protocol, r.split, r.method): r for r in ranked}
    out = []
    for top, bottom in RATIOS:
        for (protocol, split, method), numerator in by.items():
            denominator = by.get((protocol, split, bottom))
            if method != top or denominator is None:
                continue
            if k not in numerator.ks or k not in denominator.ks:
                continue
            users, top_values = numerator.per_user(k)
            bottom_users, bottom_values = denominator.per_user(k)
            if users != bottom_users:
                raise ValueError(f"{top} and {bottom} ({protocol}, {split}): not the same users")
            if not users:
                continue
            ratio, low, high = ratio_interval(top_values, bottom_values, resamples, seed)
            out.append(
                {
                    "protocol": protocol,
                    "split": split,
                    "numerator": top,
                    "denominator": bottom,
                    "metric": f"{HEADLINE}@{k}",
                    "users": "all",
                    "n_users": len(users),
                    "ratio": ratio,
                    "low": low,
                    "high": high,
                }
            )
    return out


def _catalog_lists(
    inputs: RankingInputs,
    uids: np.ndarray,
    excluded: Sequence[Sequence[int]],
    pools: Mapping[int, np.ndarray] | None,
    n: int,
) -> dict[str, dict[int, np.ndarray]]:
    """Popularity, time-aware popularity and float lists: top-``n`` of the catalog (``pools``
    None, without each user's ``excluded`` items) or every item of each user's pool, ranked.
    Ties: train popularity, then item id."""
    items = inputs.item_ids
    scores = {"popularity": inputs.popularity}
    if inputs.recent is not None:
        scores["recent_popularity"] = inputs.recent
    out: dict[str, dict[int, np.ndarray]] = {}
    for method, score in scores.items():
        if pools is None:
            order = popularity_order(score, inputs.popularity, items)
            out[method] = head_lists(order, uids, excluded, n)
        else:
            out[method] = {
                int(u): popularity_order(score, inputs.popularity, pool)
                for u, pool in pools.items()
            }
    if inputs.float_vectors is None:
        return out
    users_v, items_v = (v.astype(np.float32, copy=False) for v in inputs.float_vectors)
    inner: dict[int, np.ndarray] = {}
    if pools is None:
        block = max(1, 2**26 // (4 * max(1, len(items))))  # ~64 MiB of scores at a time
        for start in range(0, len(uids), block):
            users = uids[start : start + block]
            drops = [
                np.searchsorted(items, np.intersect1d(d, items))
                for d in excluded[start : start + block]
            ]
            tops = top_by_score(users_v[users] @ items_v[items].T, n, drops)
            inner |= {int(u): items[t] for u, t in zip(users, tops, strict=True)}
    else:
        for u, pool in pools.items():
            order = np.sort(pool)  # ties by id: score columns in id order
            scores_u = users_v[[u]] @ items_v[order].T
            inner[int(u)] = order[top_by_score(scores_u, len(order))[0]]
    out["float"] = inner
    return out


def _user_sets(
    inputs: RankingInputs,
    split: str,
    positives: dict[int, np.ndarray],
    codes: dict[int, np.ndarray],
    recs: pl.DataFrame | None,
) -> dict[str, list[int]]:
    """The users of each user set: ``all``; where the LLM re-ranked, also ``reranked`` and
    ``retrieved`` (a positive among the candidates the LLM re-ranked: the items of its lists
    in ``recs`` of this protocol, which hold popular items where ``rerank.popular_places``
    put some; else the first ``rerank_n`` of the codes)."""
    every = list(positives)
    if inputs.reranked is None:
        return {"all": every}
    chosen = set(np.asarray(inputs.reranked.get(split, [])).tolist())
    reranked = [u for u in every if u in chosen]
    empty = np.array([], np.int64)
    shown = {u: items[: inputs.rerank_n] for u, items in codes.items()}
    if recs is not None and recs.height:
        one_mode = recs.filter(pl.col("mode") == recs["mode"][0])
        shown = _lists(one_mode, rank="rank")
    retrieved = [u for u in reranked if np.isin(shown.get(u, empty), positives[u]).any()]
    return {"all": every, "reranked": reranked, "retrieved": retrieved}


def _full(
    inputs: RankingInputs,
    split: str,
    users: pl.DataFrame,
    cands: pl.DataFrame,
    recs: pl.DataFrame | None,
) -> list[Ranked]:
    uids = users["uid"].to_numpy()
    positives = {int(u): np.asarray(p) for u, p in zip(uids, users["positives"], strict=True)}
    codes = _lists(cands.filter(pl.col("protocol") == "full"))
    top_n = max((len(v) for v in codes.values()), default=0)
    full = None if recs is None else recs.filter(pl.col("protocol") == "full")
    sets = _user_sets(inputs, split, positives, codes, full)
    ks = tuple(sorted(set(KS) | {n for n in RETRIEVER_NS if n <= top_n}))
    out = [Ranked("full", split, "codes", "codes", codes, positives, sets, ks)]
    excluded = [list(e) for e in users["exclude"]]
    for method, lists in _catalog_lists(inputs, uids, excluded, None, max(ks)).items():
        out.append(Ranked("full", split, method, method, lists, positives, sets, ks))
    return out + _llm(inputs, "full", split, recs, positives, sets)


def _sampled(
    inputs: RankingInputs,
    split: str,
    users: pl.DataFrame,
    cands: pl.DataFrame,
    recs: pl.DataFrame | None,
) -> list[Ranked]:
    pooled = cands.filter(pl.col("protocol") == "sampled")
    if pooled.height == 0:
        return []
    codes = _lists(pooled)
    positives = {
        int(u): np.array([p])
        for u, p in zip(users["uid"], users["sampled_positive"], strict=True)
        if p is not None and int(u) in codes
    }
    pools = {u: np.sort(codes[u]) for u in positives}
    sampled = None if recs is None else recs.filter(pl.col("protocol") == "sampled")
    sets = _user_sets(inputs, split, positives, codes, sampled)
    out = [Ranked("sampled", split, "codes", "codes", codes, positives, sets, KS)]
    for method, lists in _catalog_lists(inputs, np.array(sorted(pools)), [], pools, 0).items():
        out.append(Ranked("sampled", split, method, method, lists, positives, sets, KS))
    return out + _llm(inputs, "sampled", split, recs, positives, sets)


def _llm(
    inputs: RankingInputs,
    protocol: str,
    split: str,
    recs: pl.DataFrame | None,
    positives: dict[int, np.ndarray],
    sets: dict[str, list[int]],
) -> list[Ranked]:
    """The re-ranked lists and the blended ones, on the users the LLM re-ranked only."""
    if recs is None:
        return []
    part = recs.filter(pl.col("protocol") == protocol)
    ks = tuple(k for k in KS if k <= inputs.rerank_n) or (inputs.rerank_n,)
    mine = {label: users for label, users in sets.items() if label != "all"}
    return [
        Ranked(protocol, split, method, mode, _lists(lists, rank=rank), positives, mine, ks)
        for (mode,), lists in part.group_by(["mode"], maintain_order=True)
        for method, rank in (("codes+llm", "rank"), ("blend", "blend_rank"))
    ]
