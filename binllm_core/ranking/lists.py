"""Top-K lists of an evaluated run, measured: the catalog lists of the codes, the float model and
popularity, the retriever's candidates and the LLM's re-ranked lists, under the full and the
sampled protocol (metrics of :mod:`binllm_core.ranking.metrics`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from binllm_core.ranking.metrics import RANKING_KEYS, ranking_metrics


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
    ]
)
"""One row per protocol, split, method, user set and K. ``method``: ``popularity`` (train
positives), ``float`` (the continuous encoder's inner products, whole catalog), ``codes`` (the
Hamming lists of ``retrieve``), ``codes+llm`` (those lists re-ranked by the LLM in ``mode``).
``users``: ``all`` (every evaluated user) or ``retrieved`` (users whose positive is among their
first ``rerank.top_n`` candidates: the only users a re-ranker can help)."""
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
    """``rerank/recommendations``: protocol, split, mode, uid, iid, rank (None: no rerank)."""
    item_ids: np.ndarray
    """Every item id of the catalog."""
    popularity: np.ndarray
    """Train positives by item id."""
    float_vectors: tuple[np.ndarray, np.ndarray] | None
    """The continuous encoder's (user, item) tables by id (None: not exported)."""
    rerank_n: int
    """How many candidates the LLM re-ranked."""


def _lists(frame: pl.DataFrame, key: str = "uid") -> dict[int, np.ndarray]:
    ordered = frame.sort([key, "rank"]).group_by(key, maintain_order=True).agg(pl.col("iid"))
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
    retrieved: set[int] | None
    """Users whose positive is among their first ``rerank_n`` candidates."""
    ks: tuple[int, ...]

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        subsets = [("all", self.positives)]
        if self.retrieved is not None:  # only where the LLM re-ranked
            subsets.append(
                ("retrieved", {u: p for u, p in self.positives.items() if u in self.retrieved})
            )
        for label, subset in subsets:
            for k, metrics in ranking_metrics(self.lists, subset, self.ks).items():
                rows.append(
                    {
                        "protocol": self.protocol,
                        "split": self.split,
                        "method": self.method,
                        "mode": self.mode,
                        "users": label,
                        "n_users": metrics["users"],
                        "k": k,
                        **{key: metrics[key] for key in RANKING_KEYS},
                    }
                )
        return rows

    def curve(self, key: str, ks: Sequence[int]) -> np.ndarray:
        """``key`` at each of ``ks`` over all users."""
        found = ranking_metrics(self.lists, self.positives, ks)
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


def ranking_rows(ranked: Sequence[Ranked]) -> list[dict[str, Any]]:
    """The ranking table (:data:`RANKING_SCHEMA`)."""
    return [row for r in ranked for row in r.rows()]


def _catalog_lists(
    inputs: RankingInputs,
    uids: np.ndarray,
    excluded: Sequence[Sequence[int]],
    pools: Mapping[int, np.ndarray] | None,
    n: int,
) -> dict[str, dict[int, np.ndarray]]:
    """Popularity and float lists (ties by item id): top-``n`` of the catalog (``pools`` None,
    without each user's ``excluded`` items) or every item of each user's pool, ranked."""
    items = inputs.item_ids  # sorted
    popular = {}
    if pools is None:
        order = items[np.lexsort((items, -inputs.popularity[items]))]
        for u, drop in zip(uids, excluded, strict=True):
            head = order[: n + len(drop)]
            popular[int(u)] = head[~np.isin(head, drop)][:n]
    else:
        for u, pool in pools.items():
            popular[int(u)] = pool[np.lexsort((pool, -inputs.popularity[pool]))]
    out = {"popularity": popular}
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
            scores = users_v[[u]] @ items_v[order].T
            inner[int(u)] = order[top_by_score(scores, len(order))[0]]
    out["float"] = inner
    return out


def _retrieved(
    inputs: RankingInputs, codes: dict[int, np.ndarray], positives: dict[int, np.ndarray]
) -> set[int] | None:
    """Users with a positive among the candidates the LLM re-ranked (None: no re-ranking)."""
    if inputs.recommendations is None or inputs.rerank_n == 0:
        return None
    empty = np.array([], np.int64)
    return {
        u for u, p in positives.items() if np.isin(codes.get(u, empty)[: inputs.rerank_n], p).any()
    }


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
    retrieved = _retrieved(inputs, codes, positives)
    ks = tuple(sorted(set(KS) | {n for n in RETRIEVER_NS if n <= top_n}))
    out = [Ranked("full", split, "codes", "codes", codes, positives, retrieved, ks)]
    excluded = [list(e) for e in users["exclude"]]
    for method, lists in _catalog_lists(inputs, uids, excluded, None, max(ks)).items():
        out.append(Ranked("full", split, method, method, lists, positives, retrieved, ks))
    return out + _llm(inputs, "full", split, recs, positives, retrieved)


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
    retrieved = _retrieved(inputs, codes, positives)
    out = [Ranked("sampled", split, "codes", "codes", codes, positives, retrieved, KS)]
    for method, lists in _catalog_lists(inputs, np.array(sorted(pools)), [], pools, 0).items():
        out.append(Ranked("sampled", split, method, method, lists, positives, retrieved, KS))
    return out + _llm(inputs, "sampled", split, recs, positives, retrieved)


def _llm(
    inputs: RankingInputs,
    protocol: str,
    split: str,
    recs: pl.DataFrame | None,
    positives: dict[int, np.ndarray],
    retrieved: set[int] | None,
) -> list[Ranked]:
    if recs is None:
        return []
    part = recs.filter(pl.col("protocol") == protocol)
    ks = tuple(k for k in KS if k <= inputs.rerank_n) or (inputs.rerank_n,)
    return [
        Ranked(protocol, split, "codes+llm", mode, _lists(lists), positives, retrieved, ks)
        for (mode,), lists in part.group_by(["mode"], maintain_order=True)
    ]
