"""Stage ``retrieve`` (Ray Data, batches of users): each user's top-N items by Hamming distance,
with :func:`pipelines.ops.retrieval.retrieve` over every user with a positive in
``retrieve.splits`` (``rerank`` re-ranks a seeded ``rerank.max_users`` of them; the evaluation
measures the codes on all). Tables ``candidates`` and ``users`` (see
:mod:`pipelines.ops.retrieval`), ``candidates`` sorted by split, user, protocol and rank, in
files of :data:`~pipelines.ops.retrieval.ROWS_PER_FILE` rows.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from binllm_core.errors import StageError
from binllm_core.ranking.retrieval import users_for_splits
from pipelines.ops.retrieval import ROWS_PER_FILE, in_order, retrieve, retriever_kwargs
from pipelines.runtime.stage import StageContext

_SAMPLES_READ = ["sample_id", "uid", "iid", "label", "split", "timestamp", "history"]


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.cfg.retrieve
    samples = pl.from_arrow(ctx.read_table("samples", "samples", columns=_SAMPLES_READ))
    users = users_for_splits(samples, cfg.splits, cfg.exclude)
    if users.height == 0:
        raise StageError(
            f"no user has a positive in the splits {cfg.splits}",
            ctx.uri(ctx.stage_path("samples")),
            "check retrieve.splits and the protocol's label threshold",
        )
    kwargs = retriever_kwargs(ctx, cfg, samples)
    candidates = retrieve(users.to_arrow(), kwargs, cfg).materialize()
    ctx.write_dataset(in_order(candidates), "candidates", rows_per_file=ROWS_PER_FILE)
    ctx.write_table(users.drop("seen").to_arrow(), "users")
    per_split = {}
    for (split,), part in users.group_by(["split"], maintain_order=True):
        eligible = samples.filter((pl.col("split") == split) & (pl.col("label") == 1))[
            "uid"
        ].n_unique()
        per_split[split] = {"users": part.height, "users_with_positive": eligible}
    return {
        "users": per_split,
        "rows": candidates.count(),
        "top_n": cfg.top_n,
        "tie_break": cfg.tie_break,
        "backend": cfg.backend,
        "sampled_negatives": cfg.sampled_negatives,
        "catalog_items": len(kwargs["catalog"]),
    }
