"""Stage ``rerank``: the LLM orders the first ``rerank.top_n`` candidates of ``retrieve/candidates``
(both protocols) of each user it re-ranks — a seeded ``rerank.max_users`` of each split's
retrieved users, or every one — with :func:`pipelines.ops.reranking.score_lists`, the users'
histories as ``retrieve/users`` recorded them; table ``recommendations``.

Each mode's lists are also blended with the retriever's (:mod:`binllm_core.ranking.blend`): the
weight ``rerank.alpha``, else the one of ``rerank.alpha_grid`` with the best NDCG@10 of the
blended full-protocol lists of the re-ranked valid users (never test; the smaller of equals; 0,
the retriever's order, without valid users). The manifest's ``blend`` records per mode the
weight, how it was chosen, the valid curve and the valid lift over the retriever (alpha 0).

With ``rerank.popular_places`` beyond ``[0]``, the last P of each full-catalog list's places go
to time-aware popular items (:mod:`binllm_core.ranking.candidates`; P chosen on valid Recall@N
of every retrieved valid user's list), each with its Hamming distance to the user, so the blend
scores it as the retriever would; the manifest's ``popular_union`` records P, its valid curve
and lift, and the window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import ray

from binllm_core.codes import id_table
from binllm_core.ranking.blend import blend_weights
from binllm_core.ranking.candidates import PlacesChoice, choose_places, union_popular
from binllm_core.ranking.popularity import choose_window, liked_counts, popularity_order
from binllm_core.ranking.retrieval import rerank_users
from pipelines.ops.reranking import histories_of, rank_lists, score_lists
from pipelines.ops.retrieval import CANDIDATES_SCHEMA, FULL, codes_stage
from pipelines.ops.scoring import adapter_plan, default_modes
from pipelines.runtime.ray_helpers import to_arrow
from pipelines.runtime.runs import load_lookups
from pipelines.runtime.stage import StageContext

VALID = "valid"
"""The split the blend's weight is chosen on (never test)."""
VALID_ROWS = pa.schema(
    [
        ("mode", pa.string()),
        ("uid", pa.int32()),
        ("iid", pa.int32()),
        ("score", pa.float64()),
        ("hamming", pa.int16()),
        ("retrieval_rank", pa.int32()),
    ]
)


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.cfg
    finetune = ctx.manifest_of("finetune")["metrics"]
    modes = list(cfg.rerank.modes) or default_modes(cfg, finetune)
    plan = adapter_plan(cfg, list(dict.fromkeys([*modes, "text"])), finetune, ctx.run_uri)
    top_n = cfg.rerank.top_n
    users = ctx.read_table(
        "retrieve", "users", columns=["split", "uid", "history", "positives", "exclude"]
    )
    chosen = rerank_users(
        pl.from_arrow(users.select(["split", "uid"])), cfg.rerank.max_users, cfg.rerank.seed
    )

    def first_n(batch: pa.Table) -> pa.Table:
        keep = pc.and_(pc.less_equal(batch["rank"], top_n), _of_users(batch, chosen))
        return batch.filter(keep).select(CANDIDATES_SCHEMA.names)

    candidates = (
        ctx.read_dataset("retrieve", "candidates")
        .map_batches(first_n, batch_format="pyarrow")
        .materialize()
    )
    union = _popular_union(ctx, users, top_n)
    if union is not None and union.choice.places:
        candidates = ray.data.from_arrow(union.apply(to_arrow(candidates, CANDIDATES_SCHEMA)))
    lookups = load_lookups(ctx, next((m for m in modes if m != "text"), "text"))
    scored, per_mode = score_lists(candidates, cfg, modes, plan, lookups, histories_of(users))
    blend = blend_weights(
        _valid_rows(scored),
        _valid_positives(users, chosen.get(VALID, np.array([], np.int32))),
        modes,
        cfg.rerank.alpha_grid,
        cfg.rerank.alpha,
    )
    ranked = rank_lists(scored, {mode: b["alpha"] for mode, b in blend.items()})
    ctx.write_dataset(ranked, "recommendations")
    return {
        "modes": per_mode,
        "blend": blend,
        "top_n": top_n,
        "popular_union": union.choice.summary() if union is not None else None,
        "users": {split: len(uids) for split, uids in chosen.items()},
        "candidates": candidates.count(),
        "rows": ranked.count(),
    }


@dataclass(frozen=True)
class PopularUnion:
    """The chosen union of time-aware popular items into the full-catalog lists, and what
    applying it needs: the popular order, each user's exclusions, the codes and names."""

    choice: PlacesChoice
    popular: np.ndarray
    excluded: dict[tuple[str, int], np.ndarray]
    user_bits: np.ndarray
    item_bits: np.ndarray
    item_names: np.ndarray

    def apply(self, candidates: pa.Table) -> pa.Table:
        """``candidates`` with each full-catalog list the union of its first ``top_n - P``
        items and the popular ones (:func:`union_popular`), ranked in that order; a popular
        item's row has its Hamming distance to the user, no tie score and source
        ``popular``. The sampled protocol's pools are left as they are."""
        full = pc.equal(candidates["protocol"], FULL)
        rows = pl.from_arrow(candidates.filter(full)).sort("split", "uid", "rank")
        parts = [candidates.filter(pc.invert(full))]
        n, places = self.choice.n, self.choice.places
        for (split, uid), mine in rows.group_by(["split", "uid"], maintain_order=True):
            items = union_popular(
                mine["iid"].to_numpy(), self.popular, self.excluded[split, uid], n, places
            )
            known = mine.filter(pl.col("iid").is_in(items))
            new = np.setdiff1d(items, known["iid"].to_numpy())
            distance = (self.item_bits[new] != self.user_bits[uid]).sum(axis=1)
            added = pl.DataFrame(
                {
                    "iid": new,
                    "item": self.item_names[new].astype(str),
                    "hamming": distance,
                    "source": ["popular"] * len(new),
                }
            ).with_columns(**{c: pl.lit(mine[c][0]) for c in ("protocol", "split", "uid", "user")})
            position = {int(i): r for r, i in enumerate(items, start=1)}
            one = pl.concat([known.drop("rank"), added], how="diagonal_relaxed")
            one = one.with_columns(
                rank=pl.col("iid").replace_strict(position, return_dtype=pl.Int32)
            ).sort("rank")
            parts.append(one.select(CANDIDATES_SCHEMA.names).to_arrow().cast(CANDIDATES_SCHEMA))
        return pa.concat_tables(parts)


def _popular_union(ctx: StageContext, users: pa.Table, top_n: int) -> PopularUnion | None:
    """The union of ``rerank.popular_places`` chosen on the valid users' lists (None when the
    grid is ``[0]``): the time-aware window as the evaluation chooses it, then P by
    :func:`choose_places` over every retrieved valid user."""
    grid = ctx.cfg.rerank.popular_places
    if list(grid) == [0]:
        return None
    samples = pl.from_arrow(
        ctx.read_table("samples", "samples", columns=["uid", "iid", "label", "split", "timestamp"])
    )
    item_map = ctx.read_table("samples", "item_map", columns=["item", "iid"])
    item_ids = np.sort(item_map["iid"].to_numpy())
    n_items = int(item_ids.max()) + 1
    window = choose_window(samples, item_ids, ctx.cfg.evaluate.popularity_windows)
    recent = window.scores if window is not None else liked_counts(samples, n_items)
    popular = popularity_order(recent, liked_counts(samples, n_items), item_ids)
    excluded = {
        (split, uid): np.asarray(e, np.int64)
        for split, uid, e in zip(
            users["split"].to_pylist(),
            users["uid"].to_pylist(),
            users["exclude"].to_pylist(),
            strict=True,
        )
    }
    valid_users = users.filter(pc.equal(users["split"], VALID))
    positives = {
        uid: np.asarray(p, np.int64)
        for uid, p in zip(
            valid_users["uid"].to_pylist(), valid_users["positives"].to_pylist(), strict=True
        )
    }

    def valid_lists(batch: pa.Table) -> pa.Table:
        keep = pc.and_(pc.equal(batch["protocol"], FULL), pc.equal(batch["split"], VALID))
        return batch.filter(pc.and_(keep, pc.less_equal(batch["rank"], top_n))).select(
            ["uid", "iid", "rank"]
        )

    schema = pa.schema([("uid", pa.int32()), ("iid", pa.int32()), ("rank", pa.int32())])
    rows = ctx.read_dataset("retrieve", "candidates").map_batches(
        valid_lists, batch_format="pyarrow"
    )
    ordered = pl.from_arrow(to_arrow(rows, schema)).sort("uid", "rank")
    lists = {
        int(uid): part["iid"].to_numpy()
        for (uid,), part in ordered.group_by(["uid"], maintain_order=True)
    }
    valid_excluded = {uid: excluded[VALID, uid] for uid in lists if (VALID, uid) in excluded}
    days = window.days if window is not None else None
    choice = choose_places(lists, positives, valid_excluded, popular, top_n, grid, days)
    codes = ctx.read_table(codes_stage(ctx.cfg), "codes", columns=["entity", "id", "bits"])
    names = np.full(n_items, "", dtype=object)
    names[item_map["iid"].to_numpy()] = item_map["item"].to_pylist()
    return PopularUnion(
        choice,
        popular,
        excluded,
        np.asarray(id_table(codes, "user", "bits"), np.uint8),
        np.asarray(id_table(codes, "item", "bits"), np.uint8),
        names,
    )


def _valid_rows(scored: ray.data.Dataset | None) -> pl.DataFrame:
    """The scored full-protocol candidates of valid users: mode, uid, iid, score, hamming,
    retrieval_rank."""
    if scored is None:
        return pl.from_arrow(VALID_ROWS.empty_table())

    def valid(batch: pa.Table) -> pa.Table:
        keep = pc.and_(pc.equal(batch["protocol"], FULL), pc.equal(batch["split"], VALID))
        rows = batch.filter(keep).select(
            ["list_mode", "uid", "iid", "logit_yes", "hamming", "rank"]
        )
        return rows.rename_columns(VALID_ROWS.names).cast(VALID_ROWS)

    return pl.from_arrow(to_arrow(scored.map_batches(valid, batch_format="pyarrow"), VALID_ROWS))


def _valid_positives(users: pa.Table, uids: np.ndarray) -> dict[int, np.ndarray]:
    """The valid positives of the re-ranked valid users ``uids``."""
    mine = users.filter(
        pc.and_(pc.equal(users["split"], VALID), pc.is_in(users["uid"], pa.array(uids, pa.int32())))
    )
    return {
        uid: np.asarray(p, np.int64)
        for uid, p in zip(mine["uid"].to_pylist(), mine["positives"].to_pylist(), strict=True)
    }


def _of_users(batch: pa.Table, chosen: dict[str, np.ndarray]) -> pa.ChunkedArray:
    """Which rows of ``batch`` belong to a user ``chosen`` for their split."""
    found = pa.chunked_array([pa.array(np.zeros(batch.num_rows, bool))])
    for split, uids in chosen.items():
        mine = pc.and_(
            pc.equal(batch["split"], split), pc.is_in(batch["uid"], pa.array(uids, pa.int32()))
        )
        found = pc.or_(found, mine)
    return found
