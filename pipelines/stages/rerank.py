"""Stage ``rerank``: the LLM orders the first ``rerank.top_n`` candidates of ``retrieve/candidates``
(both protocols) of each user it re-ranks — a seeded ``rerank.max_users`` of each split's
retrieved users, or every one — with :func:`pipelines.ops.reranking.rerank`, the users'
histories as ``retrieve/users`` recorded them; table ``recommendations``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from binllm_core.ranking.retrieval import rerank_users
from pipelines.ops.reranking import histories_of, rerank
from pipelines.ops.retrieval import CANDIDATES_SCHEMA
from pipelines.ops.scoring import adapter_plan, default_modes
from pipelines.runtime.runs import load_lookups
from pipelines.runtime.stage import StageContext


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.cfg
    finetune = ctx.manifest_of("finetune")["metrics"]
    modes = list(cfg.rerank.modes) or default_modes(cfg, finetune)
    plan = adapter_plan(cfg, list(dict.fromkeys([*modes, "text"])), finetune, ctx.run_uri)
    top_n = cfg.rerank.top_n
    users = ctx.read_table("retrieve", "users", columns=["split", "uid", "history"])
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
    lookups = load_lookups(ctx, next((m for m in modes if m != "text"), "text"))
    ranked, per_mode = rerank(candidates, cfg, modes, plan, lookups, histories_of(users))
    ctx.write_dataset(ranked, "recommendations")
    return {
        "modes": per_mode,
        "top_n": top_n,
        "users": {split: len(uids) for split, uids in chosen.items()},
        "candidates": candidates.count(),
        "rows": ranked.count(),
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
