"""The candidates the LLM re-ranks, with time-aware popular items in their last places (stage
``rerank`` chooses how many, ``binllm recommend`` and ``nightly --topk`` use its choice).

:mod:`binllm_core.ranking.candidates` holds the rule and the choice; this module reads what they
need from a run — the time-aware popular order (the window the evaluation's baseline is chosen
by, on valid), the codes for the added items' Hamming distances, the item names — and applies
the union to candidate rows (:data:`pipelines.ops.retrieval.CANDIDATES_SCHEMA`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from binllm_core.codes import id_table
from binllm_core.ranking.candidates import PlacesChoice, choose_places, union_popular
from binllm_core.ranking.popularity import choose_window, liked_counts, popularity_order
from pipelines.ops.retrieval import CANDIDATES_SCHEMA, FULL, SERVE, codes_stage, full_lists
from pipelines.runtime.stage import StageContext

POPULAR = "popular"
"""The ``source`` of a candidate row the union added."""
UNITED = (FULL, SERVE)
"""The protocols whose lists the union changes (a sampled pool is fixed by the protocol)."""
VALID = "valid"


@dataclass(frozen=True)
class PopularItems:
    """What the union reads from a run: the time-aware popular order, the codes and names."""

    order: np.ndarray
    """The ids of the items with a code, most liked in the window first (ties: train
    popularity, then id)."""
    window_days: int | None
    user_bits: np.ndarray
    item_bits: np.ndarray
    item_names: np.ndarray

    @classmethod
    def of(cls, ctx: StageContext, days: int | None = None) -> PopularItems:
        """From the run of ``ctx``: the window ``days``, else the one of
        ``evaluate.popularity_windows`` with the best valid NDCG@10 (the evaluation's rule)."""
        columns = ["uid", "iid", "label", "split", "timestamp"]
        samples = pl.from_arrow(ctx.read_table("samples", "samples", columns=columns))
        item_map = ctx.read_table("samples", "item_map", columns=["item", "iid"])
        item_ids = np.sort(item_map["iid"].to_numpy())
        n_items = int(item_ids.max()) + 1
        if days is None:
            window = choose_window(samples, item_ids, ctx.cfg.evaluate.popularity_windows)
            days = window.days if window is not None else None
        popularity = liked_counts(samples, n_items)
        recent = liked_counts(samples, n_items, days) if days is not None else popularity
        codes = ctx.read_table(codes_stage(ctx.cfg), "codes", columns=["entity", "id", "bits"])
        names = np.full(n_items, "", dtype=object)
        names[item_map["iid"].to_numpy()] = item_map["item"].to_pylist()
        # The retriever's catalog: an item without a code has no distance for the blend.
        coded = codes.filter(pc.equal(codes["entity"], "item"))["id"].to_numpy()
        coded = np.sort(coded[coded < n_items])
        return cls(
            popularity_order(recent, popularity, coded),
            days,
            np.asarray(id_table(codes, "user", "bits"), np.uint8),
            np.asarray(id_table(codes, "item", "bits"), np.uint8),
            names,
        )

    def apply(
        self,
        candidates: pa.Table,
        n: int,
        places: int,
        excluded: Mapping[tuple[str, int], np.ndarray],
    ) -> pa.Table:
        """``candidates`` with each list of :data:`UNITED` protocols the union of its first
        ``n - places`` items and the popular ones (:func:`union_popular`), ranked in that
        order; ``excluded``: per (split, uid) the items the user may not be given. An
        added row has its Hamming distance to the user, no tie score and source
        :data:`POPULAR`. A popularity list (a user without a code) and the sampled pools stay
        as they are."""
        united = pc.and_(
            pc.is_in(candidates["protocol"], pa.array(UNITED)),
            pc.not_equal(candidates["source"], "popularity"),
        )
        rows = pl.from_arrow(candidates.filter(united)).sort("split", "uid", "rank")
        parts = [candidates.filter(pc.invert(united))]
        empty = np.array([], np.int64)
        # A coded user's uid is theirs alone (users without a code share 0: popularity lists).
        for (split, uid), mine in rows.group_by(["split", "uid"], maintain_order=True):
            items = union_popular(
                mine["iid"].to_numpy(), self.order, excluded.get((split, uid), empty), n, places
            )
            known = mine.filter(pl.col("iid").is_in(items))
            new = np.setdiff1d(items, known["iid"].to_numpy())
            added = pl.DataFrame(
                {
                    "iid": new,
                    "item": self.item_names[new].astype(str),
                    "hamming": (self.item_bits[new] != self.user_bits[uid]).sum(axis=1),
                    "source": [POPULAR] * len(new),
                }
            ).with_columns(**{c: pl.lit(mine[c][0]) for c in ("protocol", "split", "uid", "user")})
            position = {int(i): r for r, i in enumerate(items, start=1)}
            one = pl.concat([known.drop("rank"), added], how="diagonal_relaxed")
            one = one.with_columns(
                rank=pl.col("iid").replace_strict(position, return_dtype=pl.Int32)
            ).sort("rank")
            parts.append(one.select(CANDIDATES_SCHEMA.names).to_arrow().cast(CANDIDATES_SCHEMA))
        return pa.concat_tables(parts)


def choose_union(
    ctx: StageContext, users: pa.Table, n: int
) -> tuple[PlacesChoice, PopularItems] | None:
    """Stage ``rerank``'s choice among ``rerank.popular_places`` (None when it is ``[0]``): P
    by :func:`choose_places` over every retrieved valid user's first ``n`` candidates
    (``users``: ``retrieve/users``' split, uid, positives, exclude)."""
    grid = ctx.cfg.rerank.popular_places
    if list(grid) == [0]:
        return None
    popular = PopularItems.of(ctx)
    valid = users.filter(pc.equal(users["split"], VALID))
    uids = valid["uid"].to_pylist()
    positives = dict(zip(uids, map(_ids, valid["positives"].to_pylist()), strict=True))
    excluded = dict(zip(uids, map(_ids, valid["exclude"].to_pylist()), strict=True))

    lists = full_lists(ctx, [VALID], n).get(VALID, {})
    choice = choose_places(lists, positives, excluded, popular.order, n, grid, popular.window_days)
    return choice, popular


def _ids(values: list[int] | None) -> np.ndarray:
    return np.asarray(values or [], np.int64)


def served_places(metrics: Mapping[str, Any] | None, n: int) -> tuple[int, int | None, str]:
    """The places ``binllm recommend`` gives popular items, the window and where they come
    from: stage ``rerank``'s choice (``metrics``: its manifest's, None when it has not run or
    is stale) where it re-ranked the same ``n`` candidates; else 0, the codes' own lists."""
    if metrics is None:
        return 0, None, "the codes' own candidates: no fresh rerank stage"
    union = metrics.get("popular_union")
    if union is None:
        return 0, None, "the codes' own candidates (rerank.popular_places [0])"
    if metrics.get("top_n") != n:
        return 0, None, f"the codes' own candidates: stage rerank re-ranked {metrics['top_n']}"
    return int(union["places"]), union["window_days"], f"stage rerank ({union['chosen_by']})"
