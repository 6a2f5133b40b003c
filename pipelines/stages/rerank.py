"""Stage ``rerank``: the LLM orders each user's first ``rerank.top_n`` candidates of
``retrieve/candidates`` (both protocols) with :func:`pipelines.ops.reranking.rerank`, the users'
histories as ``retrieve/users`` recorded them; table ``recommendations``.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

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

    def first_n(batch: pa.Table) -> pa.Table:
        return batch.filter(pc.less_equal(batch["rank"], top_n)).select(CANDIDATES_SCHEMA.names)

    candidates = (
        ctx.read_dataset("retrieve", "candidates")
        .map_batches(first_n, batch_format="pyarrow")
        .materialize()
    )
    users = ctx.read_table("retrieve", "users", columns=["split", "uid", "history"])
    lookups = load_lookups(ctx, next((m for m in modes if m != "text"), "text"))
    ranked, per_mode = rerank(candidates, cfg, modes, plan, lookups, histories_of(users))
    ctx.write_dataset(ranked, "recommendations")
    return {
        "modes": per_mode,
        "top_n": top_n,
        "candidates": candidates.count(),
        "rows": ranked.count(),
    }
