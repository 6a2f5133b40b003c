"""Top-K lists per user from a trained run: ``binllm recommend`` and ``binllm nightly --topk``.

For each user (a Parquet table with a string column ``user`` of source ids, or every user of the
run) the steps of stages ``retrieve`` and ``rerank`` run on the user's whole known past: the
``rerank.top_n`` items nearest to the user's code that the user never interacted with
(:class:`pipelines.ops.retrieval.UserRetriever`; the last places given to time-aware popular
items where stage ``rerank`` chose so, :func:`popular_places`), each rendered with the user's
latest positives as history and scored in ``score.candidate_mode``
(:func:`pipelines.ops.reranking.score_lists`, then
:func:`~pipelines.ops.reranking.rank_lists`), and the first ``k`` of the blend of the LLM's and the
retriever's scores kept (``blend_rank``; the weight of :func:`blend_alpha`, recorded in the
manifest's metrics ``alpha`` and ``alpha_from``). A user the encoder never saw has no code: by
``score.unknown`` they get the most popular items they have not seen, scored with text prompts and
flagged ``cold`` (``text``), are left out and counted (``skip``), or stop the job naming them
(``error``).

Outputs are published whole (:mod:`pipelines.runtime.publish`): ``{run}/recommendations/{name}/``
(or ``--output``), and for the nightly job ``{run}/recommendations/date=YYYY-MM-DD/``, where the
same date again replaces the partition whole. Table ``recommendations``:
:data:`pipelines.ops.reranking.RECOMMENDATIONS_SCHEMA` (protocol ``serve``, empty split).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import ray

from binllm_core.config import RunConfig
from binllm_core.errors import ConfigError, DataError, StageError
from binllm_core.prompts.user_pairs import check_ids
from binllm_core.storage import (
    join,
    parquet_files,
    read_manifest,
    read_parquet,
    read_published,
    resolve,
    to_uri,
)
from pipelines.nightly import parse_date
from pipelines.ops.candidates import PopularItems, served_places
from pipelines.ops.reranking import RECOMMENDATIONS_SCHEMA, rank_lists, score_lists
from pipelines.ops.retrieval import (
    CANDIDATES_SCHEMA,
    SERVE,
    codes_stage,
    retrieve,
    retriever_kwargs,
)
from pipelines.ops.scoring import NONE, adapter_plan
from pipelines.pairs import candidate_mode, manifest_or_none
from pipelines.runtime.outputs import publish_command
from pipelines.runtime.ray_helpers import to_arrow
from pipelines.runtime.registry import STAGE_NAMES
from pipelines.runtime.runs import input_stem, load_lookups, run_folder
from pipelines.runtime.stage import StageContext, stale_chain

RECOMMENDATIONS = "recommendations"


def read_users(uri: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The distinct source ids of a users table (column ``user``), in input order."""
    fs, path = resolve(uri, storage_options)
    if not fs.exists(path) or not parquet_files(fs, path):
        raise DataError(f"users {uri} not found", todo="give a Parquet file or folder of them")
    table = read_parquet(fs, path)
    if "user" not in table.column_names:
        raise DataError(
            f"the users table has no user column (it has: {', '.join(table.column_names)})",
            uri,
            "give a Parquet table with a string column user (source ids)",
        )
    column = check_ids(table["user"].combine_chunks(), "user", "users", uri)
    return list(dict.fromkeys(column.to_pylist()))


def check_k(cfg: RunConfig, k: int) -> None:
    """``k`` must be positive and within the candidates the LLM re-ranks."""
    if k <= 0:
        raise ConfigError(f"--k {k} must be > 0", todo="e.g. --k 10")
    if cfg.rerank.top_n < k:
        raise ConfigError(
            f"--k {k} is more than the rerank.top_n = {cfg.rerank.top_n} candidates the LLM "
            "re-ranks",
            todo=f"lower --k or --set rerank.top_n={k}",
        )


def recommend_lists(
    cfg: RunConfig, users: list[str] | None, k: int, where: str = "all users"
) -> tuple[Any, dict[str, Any]]:
    """The top-``k`` lists (a materialized dataset) and counts for ``users`` (None: every user
    of the run)."""
    from pipelines.runtime.ray_helpers import ensure_ray

    check_k(cfg, k)
    ensure_ray()
    started = time.time()
    ctx = StageContext.open(cfg, "score")
    mode = candidate_mode(cfg)
    finetune = manifest_or_none(ctx, "finetune")
    plan = adapter_plan(cfg, list(dict.fromkeys([mode, "text"])), finetune, ctx.run_uri)
    samples = pl.from_arrow(
        ctx.read_table(
            "samples", "samples", columns=["sample_id", "uid", "iid", "label", "split", "timestamp"]
        )
    )
    retrieve_cfg = replace(cfg.retrieve, top_n=cfg.rerank.top_n, sampled_negatives=0)
    kwargs = retriever_kwargs(ctx, retrieve_cfg, samples)
    user_map = ctx.read_table("samples", "user_map", columns=["user", "uid"])
    uid_of = dict(zip(user_map["user"].to_pylist(), user_map["uid"].to_pylist(), strict=True))
    names = list(uid_of) if users is None else users
    known = kwargs["known_users"]
    is_known = [0 < uid_of.get(u, 0) < len(known) and bool(known[uid_of[u]]) for u in names]
    unknown = [u for u, ok in zip(names, is_known, strict=True) if not ok]
    policy = cfg.score.unknown
    if unknown and policy == "error":
        raise DataError(
            f"user {unknown[0]!r} was never seen by the encoder (no code; {len(unknown)} such "
            "users)",
            where,
            "set score.unknown=text for popular items with text prompts, or skip",
        )
    if policy == "skip":
        names = [u for u, ok in zip(names, is_known, strict=True) if ok]
    seen = (
        samples.group_by("uid").agg(pl.col("iid").unique().sort().alias("seen"))
        if samples.height
        else pl.DataFrame(schema={"uid": pl.Int32, "seen": pl.List(pl.Int32)})
    )
    seen_of = dict(zip(seen["uid"].to_list(), seen["seen"].to_list(), strict=True))
    uids = [int(uid_of.get(u, 0)) for u in names]
    table = pa.table(
        {
            "protocol": pa.array([SERVE] * len(names), pa.string()),
            "split": pa.array([""] * len(names), pa.string()),
            "uid": pa.array(uids, pa.int32()),
            "user": pa.array(names, pa.string()),
            "exclude": pa.array([seen_of.get(u, []) for u in uids], pa.list_(pa.int32())),
        }
    )
    alpha, alpha_from = blend_alpha(cfg, ctx, mode)
    top_n = cfg.rerank.top_n
    places, days, places_from = popular_places(cfg, ctx)
    stats: dict[str, Any] = {
        "input_users": len(users) if users is not None else len(uid_of),
        "users": len(names),
        "cold_users": len(unknown) if policy == "text" else 0,
        "skipped_users": len(unknown) if policy == "skip" else 0,
        "k": k,
        "candidates_per_user": cfg.rerank.top_n,
        "mode": mode,
        "alpha": alpha,
        "alpha_from": alpha_from,
        "popular_places": places,
        "popular_places_from": places_from,
    }
    if not names:
        return ray.data.from_arrow(RECOMMENDATIONS_SCHEMA.empty_table()), stats | {"rows": 0}
    candidates = retrieve(table, kwargs, retrieve_cfg).materialize()
    if places:  # the last places to time-aware popular items, as stage rerank chose
        popular = PopularItems.of(ctx, days)
        excluded = {("", uid): np.asarray(seen_of.get(uid, []), np.int64) for uid in uids}
        rows = popular.apply(to_arrow(candidates, CANDIDATES_SCHEMA), top_n, places, excluded)
        candidates = ray.data.from_arrow(rows)
    lookups = load_lookups(ctx, mode)
    histories = {("", uid): list(h) for uid, h in lookups.histories.items()}
    scored, per_mode = score_lists(candidates, cfg, [mode], plan, lookups, histories)
    ranked = rank_lists(scored, {mode: alpha})

    def first_k(batch: pa.Table) -> pa.Table:
        return batch.filter(pc.less_equal(batch["blend_rank"], k))

    out = ranked.map_batches(first_k, batch_format="pyarrow").materialize()
    stats.update(
        rows=out.count(),
        modes=per_mode,
        adapters={m: plan[m] or NONE for m in plan},
        wall_time_s=round(time.time() - started, 2),
    )
    return out, stats


def blend_alpha(cfg: RunConfig, ctx: StageContext, mode: str) -> tuple[float, str]:
    """The weight of the LLM in the lists ``mode`` ships, and where it comes from: ``rerank.alpha``
    where set; else the one stage ``rerank`` chose on valid for ``mode``, where that stage
    finished on the outputs the run holds now with the same ``rerank.top_n``; else 0, the
    retriever's order (nothing shows that the LLM's order is better)."""
    if cfg.rerank.alpha is not None:
        return cfg.rerank.alpha, "rerank.alpha"
    fallback = "the retriever's order (alpha 0): "
    metrics = manifest_or_none(ctx, "rerank")
    if metrics is None:
        return 0.0, fallback + "stage rerank has not run"
    chosen = metrics.get("blend", {}).get(mode)
    if chosen is None:
        return 0.0, fallback + f"stage rerank chose no weight for {mode}"
    if metrics.get("top_n") != cfg.rerank.top_n:
        return 0.0, fallback + f"stage rerank re-ranked {metrics.get('top_n')} candidates"
    stale = stale_chain(ctx, ("rerank",), STAGE_NAMES)
    if stale is not None:
        return 0.0, fallback + f"stage rerank is stale ({stale[1]})"
    return float(chosen["alpha"]), f"stage rerank ({chosen['chosen_by']})"


def popular_places(cfg: RunConfig, ctx: StageContext) -> tuple[int, int | None, str]:
    """The places time-aware popular items take in the candidates (with the window), and where
    that comes from: stage ``rerank``'s choice (:func:`pipelines.ops.candidates.served_places`)
    where it finished on the outputs the run holds now; else 0, the codes' own candidates."""
    metrics = manifest_or_none(ctx, "rerank")
    if metrics is not None and stale_chain(ctx, ("rerank",), STAGE_NAMES) is not None:
        return 0, None, "the codes' own candidates: stage rerank is stale"
    return served_places(metrics, cfg.rerank.top_n)


def recommend(
    cfg: RunConfig, users_uri: str = "", k: int = 10, output_uri: str = "", log: Any = print
) -> dict[str, Any]:
    """``binllm recommend``: publish the top-``k`` lists of the users in ``users_uri`` (empty:
    every user of the run) to ``output_uri`` (default ``{run}/recommendations/{name}``)."""
    check_k(cfg, k)
    name = input_stem(users_uri, "users") if users_uri else "all"
    manifest = publish_lists(cfg, k, users_uri, name, "recommend", {}, output_uri, log)
    stats = manifest["metrics"]
    log(
        f"[binllm] recommend: {stats['rows']:,} rows for {stats['users']:,} users "
        f"({stats['cold_users']:,} cold, {stats['skipped_users']:,} skipped) -> "
        f"{manifest['output']}"
    )
    return manifest


def nightly_topk(
    cfg: RunConfig, k: int, users_uri: str = "", date: str = "", log: Any = print
) -> dict[str, Any]:
    """``binllm nightly --topk K``: the lists of one night into
    ``{run}/recommendations/date=YYYY-MM-DD/`` (a re-run of the date replaces it whole)."""
    check_k(cfg, k)
    date = parse_date(date)
    label = f"nightly {date}"
    manifest = publish_lists(cfg, k, users_uri, f"date={date}", label, {"date": date}, log=log)
    log(f"[binllm] {label}: {manifest['metrics']['rows']:,} rows -> {manifest['output']}")
    return manifest


def publish_lists(
    cfg: RunConfig,
    k: int,
    users_uri: str,
    name: str,
    label: str,
    fields: dict[str, Any],
    output_uri: str = "",
    log: Any = print,
) -> dict[str, Any]:
    """Publish the top-``k`` lists of the users in ``users_uri`` (empty: every user of the run)
    to ``output_uri``, else ``{run}/recommendations/{name}``; ``label`` names the command in its
    log line, ``fields`` go into the manifest before ``users``."""
    users = read_users(users_uri, cfg.output_storage_options) if users_uri else None

    def produce() -> tuple[ray.data.Dataset, dict[str, Any]]:
        log(f"[binllm] {label}: top {k} for {len(users) if users else 'every'} user(s)")
        return recommend_lists(cfg, users, k, users_uri or "all users")

    return publish_command(
        cfg,
        kind=RECOMMENDATIONS,
        name=name,
        who="top-K lists with this run",
        produce=produce,
        table=RECOMMENDATIONS,
        schema=RECOMMENDATIONS_SCHEMA,
        fields={**fields, "users": users_uri or "all"},
        output_uri=output_uri,
        log=log,
        reads=(codes_stage(cfg),),
    )


def read_recommendations(cfg: RunConfig, name: str) -> pa.Table:
    """A published recommendations output of the run (``all``, a users-file name, or
    ``date=YYYY-MM-DD``), its current version."""
    fs, run = run_folder(cfg)
    folder = join(run, RECOMMENDATIONS, name)
    if read_manifest(fs, folder) is None:
        raise StageError(f"no published recommendations {name}", to_uri(fs, folder))
    return read_published(fs, folder, RECOMMENDATIONS)
