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

from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import ray

from binllm_core.ranking.blend import blend_weights
from binllm_core.ranking.retrieval import rerank_users
from pipelines.ops.candidates import choose_union
from pipelines.ops.reranking import histories_of, rank_lists, score_lists
from pipelines.ops.retrieval import CANDIDATES_SCHEMA, FULL
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
    union = choose_union(ctx, users, top_n)
    if union is not None and union[0].places:
        (choice, popular), excluded = union, _excluded(users)
        rows = to_arrow(candidates, CANDIDATES_SCHEMA)
        candidates = ray.data.from_arrow(popular.apply(rows, top_n, choice.places, excluded))
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
        "popular_union": union[0].summary() if union is not None else None,
        "users": {split: len(uids) for split, uids in chosen.items()},
        "candidates": candidates.count(),
        "rows": ranked.count(),
    }


def _excluded(users: pa.Table) -> dict[tuple[str, int], np.ndarray]:
    """Per (split, uid) the items the user may not be given (``retrieve/users``)."""
    return {
        (split, uid): np.asarray(e, np.int64)
        for split, uid, e in zip(
            users["split"].to_pylist(),
            users["uid"].to_pylist(),
            users["exclude"].to_pylist(),
            strict=True,
        )
    }


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
