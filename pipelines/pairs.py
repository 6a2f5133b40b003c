"""Scoring arbitrary (user, item) pairs with a trained run: ``binllm score`` (and the nightly
job, :mod:`pipelines.nightly`).

:func:`score_pairs` renders every pair with what the run knows (source ids -> uid/iid, history,
codes, titles), scores each prompt mode with its adapter on the actor pool of stage ``score``
(:func:`pipelines.ops.scoring.score_now`), and returns the rows with ``user``, ``item``, ``row``
(input position) and ``cold`` (the pair's user or item has no code: text prompt, or skipped).
:func:`score_candidates` publishes them to ``{run}/pairs/{input name}`` (or ``--output``).
"""

from __future__ import annotations

import time
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import ray

from binllm_core.config import RunConfig
from binllm_core.errors import DataError, StageError
from binllm_core.llm.strategies import plan
from binllm_core.prompts.templates import Templates, templates_from_config
from binllm_core.prompts.user_pairs import (
    PAIR_PROMPTS_SCHEMA,
    check_pairs,
    render_candidates,
    summary,
    with_row_numbers,
)
from binllm_core.storage import parquet_files, read_parquet, resolve
from pipelines.ops.scoring import (
    NONE,
    SCORE_FIELDS,
    adapter_hash,
    adapter_plan,
    model_id,
    now_utc,
    score_now,
)
from pipelines.runtime.outputs import publish_command
from pipelines.runtime.ray_helpers import to_arrow
from pipelines.runtime.runs import input_stem, load_lookups
from pipelines.runtime.stage import StageContext

PROMPT_COLUMNS = ("prompt", "soft_ids")
"""What the scorer reads of a rendered candidate and leaves out of its scores."""
CANDIDATE_SCORES_SCHEMA = pa.schema(
    [f for f in PAIR_PROMPTS_SCHEMA if f.name not in PROMPT_COLUMNS]
    + SCORE_FIELDS
    + [("carried", pa.bool_())]
)
"""Scores of pairs: ``carried`` marks rows taken over from an earlier nightly partition (same
prompt, model and adapter) instead of being scored again."""
CARRY_COLUMNS = [
    "prompt_hash",
    "adapter_hash",
    "model",
    "adapter",
    "run_name",
    "n_tokens",
    "logit_yes",
    "p_yes",
    "scored_at",
]
"""What an earlier nightly partition lends a carried-over row (``--incremental``)."""
PAIRS = "pairs"


def candidate_mode(cfg: RunConfig) -> str:
    """The mode candidates are rendered in: ``score.candidate_mode`` (checked at load), else the
    mode the run was tuned on last."""
    return cfg.score.candidate_mode or plan(cfg.finetune)[-1].mode


def read_pairs(uri: str, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """A candidates table (Parquet file or folder of them) with ``user``/``item`` columns."""
    fs, path = resolve(uri, storage_options)
    if not fs.exists(path):
        raise DataError(f"candidates {uri} not found", todo="give a Parquet file or folder")
    if not parquet_files(fs, path):
        raise DataError(f"no Parquet files under {uri}")
    try:
        table = read_parquet(fs, path)
    except StageError as err:
        raise DataError(str(err)) from None
    return check_pairs(table, uri)


def _render(batch: pa.Table, **kwargs: Any) -> pa.Table:
    return render_candidates(batch, **kwargs)


def score_pairs(
    cfg: RunConfig,
    pairs: pa.Table,
    where: str,
    carry: pl.DataFrame | None = None,
) -> tuple[ray.data.Dataset, dict[str, Any]]:
    """Render and score (user, item) pairs with a trained run; the scored dataset (materialized,
    :data:`CANDIDATE_SCORES_SCHEMA`) and counts. ``carry`` holds earlier scores (prompt_hash,
    adapter_hash, model, n_tokens, logit_yes, p_yes, scored_at): rows whose prompt, model and
    adapter match one of them take that score instead of being scored again."""
    from pipelines.runtime.ray_helpers import ensure_ray

    ensure_ray()
    ctx = StageContext.open(cfg, "score")
    mode = candidate_mode(cfg)
    finetune = manifest_or_none(ctx, "finetune")
    plan = adapter_plan(cfg, list(dict.fromkeys([mode, "text"])), finetune, ctx.run_uri)
    lookups = load_lookups(ctx, mode)
    templates: Templates = templates_from_config(cfg.prompts)
    pairs = with_row_numbers(pairs)
    started = time.time()
    rendered = (
        ray.data.from_arrow(pairs)
        .map_batches(
            _render,
            fn_kwargs={
                "lookups": lookups,
                "templates": templates,
                "mode": mode,
                "unknown": cfg.score.unknown,
                "history_len": cfg.prompts.history_len,
                "where": where,
            },
            batch_format="pyarrow",
            batch_size=4096,
        )
        .materialize()
    )
    meta = to_arrow(
        rendered.drop_columns(list(PROMPT_COLUMNS)),
        pa.schema([f for f in PAIR_PROMPTS_SCHEMA if f.name not in PROMPT_COLUMNS]),
    )
    stats = summary(meta, pairs.num_rows)
    scored_at = now_utc()
    model = model_id(cfg.model)
    hashes = {m: adapter_hash(a, cfg.output_storage_options) for m, a in plan.items()}

    carried = _carried(meta, carry, model, hashes) if carry is not None else None
    carried_rows = (
        carried["row"] if carried is not None and carried.num_rows else pa.array([], pa.int64())
    )
    parts = []
    per_mode = {}
    for m in dict.fromkeys(meta["mode"].to_pylist()):
        subset = rendered.map_batches(
            _rows_of_mode, fn_kwargs={"mode": m, "skip": carried_rows}, batch_format="pyarrow"
        ).materialize()
        n = subset.count()
        per_mode[m] = {"adapter": plan[m] or NONE, "scored_rows": n}
        if n == 0:
            continue
        t0 = time.time()
        part = score_now(subset, cfg, plan[m], scored_at, f"score {m}")
        per_mode[m]["prompts_per_s"] = round(n / max(time.time() - t0, 1e-9), 3)
        parts.append(
            part.map_batches(_mark_carried, fn_kwargs={"value": False}, batch_format="pyarrow")
        )
    if carried is not None and carried.num_rows:
        parts.append(ray.data.from_arrow(carried))
    if not parts:
        out = ray.data.from_arrow(CANDIDATE_SCORES_SCHEMA.empty_table())
    else:
        out = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    out = out.map_batches(_conform, batch_format="pyarrow").materialize()
    stats.update(
        mode=mode,
        modes=per_mode,
        carried_rows=int(carried.num_rows) if carried is not None else 0,
        model=model,
        adapters={m: plan[m] or NONE for m in plan},
        adapter_hashes=hashes,
        scored_at=scored_at.isoformat(),
        wall_time_s=round(time.time() - started, 2),
    )
    return out, stats


def manifest_or_none(ctx: StageContext, stage: str) -> dict[str, Any] | None:
    try:
        return ctx.manifest_of(stage)["metrics"]
    except StageError:
        return None


def _rows_of_mode(batch: pa.Table, mode: str, skip: pa.Array) -> pa.Table:
    mask = pc.and_(pc.equal(batch["mode"], mode), pc.invert(pc.is_in(batch["row"], skip)))
    return batch.filter(mask)


def _mark_carried(batch: pa.Table, value: bool) -> pa.Table:
    return batch.append_column("carried", pa.array([value] * batch.num_rows, pa.bool_()))


def _conform(batch: pa.Table) -> pa.Table:
    return batch.select(CANDIDATE_SCORES_SCHEMA.names).cast(CANDIDATE_SCORES_SCHEMA)


def _carried(meta: pa.Table, carry: pl.DataFrame, model: str, hashes: dict[str, str]) -> pa.Table:
    """Rows of ``meta`` whose (prompt, model, adapter) was scored before, with those scores."""
    frame = pl.from_arrow(meta).with_columns(
        pl.col("mode").replace_strict(hashes, default=None).alias("adapter_hash"),
        pl.lit(model).alias("model"),
    )
    key = ["prompt_hash", "adapter_hash", "model"]
    previous = carry.select(CARRY_COLUMNS).unique(subset=key, keep="first", maintain_order=True)
    joined = frame.join(previous, on=key, how="inner")
    joined = joined.with_columns(pl.lit(True).alias("carried")).sort("row")
    return joined.to_arrow().select(CANDIDATE_SCORES_SCHEMA.names).cast(CANDIDATE_SCORES_SCHEMA)


# ---- ``binllm score`` / ``python -m jobs.score`` ----------------------------------------------
def score_candidates(
    cfg: RunConfig, input_uri: str, output_uri: str = "", log: Any = print
) -> dict[str, Any]:
    """Score every row of a (user, item) table with the trained run ``cfg`` and publish the
    scores to ``output_uri`` (default ``{run}/pairs/{input name}``).

    The output must be new, empty, or an earlier ``binllm score`` output (then its new version
    replaces it whole); the run folder and its ancestors are refused."""
    pairs = read_pairs(input_uri, cfg.output_storage_options)

    def produce() -> tuple[ray.data.Dataset, dict[str, Any]]:
        log(f"[binllm] score: {pairs.num_rows:,} candidates from {input_uri}")
        return score_pairs(cfg, pairs, input_uri)

    manifest = publish_command(
        cfg,
        kind=PAIRS,
        name=input_stem(input_uri, "candidates"),
        who="scoring with this run",
        produce=produce,
        table="scores",
        schema=CANDIDATE_SCORES_SCHEMA,
        fields={"input": input_uri},
        output_uri=output_uri,
        log=log,
    )
    stats = manifest["metrics"]
    log(
        f"[binllm] score: {stats['rendered_rows']:,} rows ({stats['cold_rows']:,} cold, "
        f"{stats['skipped_rows']:,} skipped) -> {manifest['output']}"
    )
    return manifest
