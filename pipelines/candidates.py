"""Scoring arbitrary (user, item) candidates with a trained run: ``binllm score`` and ``nightly``.

* :func:`score_candidates`: any table of (user, item) source ids -> scores plus user, item, row
  (input position) and ``cold`` (the pair's user or item has no code: text prompt, or skipped).
* :func:`run_nightly`: candidates -> ``{run}/scores/date=YYYY-MM-DD/`` with its own
  ``_manifest.json``; the partition is built in a staging folder and swapped in whole, so a re-run
  replaces it and a failed run leaves the previous one.

The scoring itself is :func:`pipelines.score.score_dataset` (the actor pool of stage ``score``).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
import uuid
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from binllm_core.candidates import (
    CANDIDATE_SCHEMA,
    RunLookups,
    build_lookups,
    check_pairs,
    distinct_pairs,
    render_candidates,
    summary,
    with_row_numbers,
)
from binllm_core.config import (
    RunConfig,
    apply_override,
    build,
    config_hash,
)
from binllm_core.errors import ConfigError, DataError, StageError
from binllm_core.prompts import CODE_MODES, MODES, Templates, templates_from_config
from binllm_core.storage import is_local, join, resolve
from pipelines.score import (
    NONE,
    SCORE_FIELDS,
    adapter_hash,
    adapter_plan,
    model_id,
    now_utc,
    score_dataset,
)
from pipelines.stage import MANIFEST, StageContext, package_versions, plain_config

CANDIDATE_SCORES_SCHEMA = pa.schema(
    [f for f in CANDIDATE_SCHEMA if f.name != "prompt"] + SCORE_FIELDS + [("carried", pa.bool_())]
)
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
DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def candidate_mode(cfg: RunConfig) -> str:
    mode = cfg.score.candidate_mode or (
        "text" if cfg.finetune.strategy == "text_only" else cfg.finetune.code_mode
    )
    if mode not in MODES:
        raise ConfigError(f"score.candidate_mode {mode} is not one of {', '.join(MODES)}")
    return mode


# ---- a trained run, from its config or its folder ----------------------------------------------
RUN_STAGES = ("ingest", "samples", "encode", "render", "finetune", "score")


def open_run(ref: str, overrides: list[str] | None = None) -> RunConfig:
    """The config of a trained run: a YAML config file, or a run folder (local or a URI) whose
    stage manifests hold the config sections they ran with (``--set`` overrides either)."""
    from binllm_core.config import load_config

    if ref.endswith((".yaml", ".yml")):
        return load_config(ref, overrides)
    fs, path = resolve(ref)
    path = path.rstrip("/")
    if not fs.exists(join(path, "render", MANIFEST)):
        raise ConfigError(
            f"{ref} is neither a YAML config nor a run folder with a finished render stage",
            todo="give configs/NAME.yaml or {output_root}/{run_name}",
        )
    raw: dict[str, Any] = {}
    for stage in RUN_STAGES:
        manifest_path = join(path, stage, MANIFEST)
        if fs.exists(manifest_path):
            raw.update(json.loads(fs.cat_file(manifest_path)).get("config", {}))
    parent, _, name = path.rpartition("/")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    root = parent if is_local(fs) else f"{protocol}://{parent}"
    raw.update(run_name=name, output_root=root or ".")
    for item in overrides or []:
        apply_override(raw, item)
    return build(RunConfig, raw, ref)


def load_lookups(ctx: StageContext, mode: str) -> RunLookups:
    """Titles, id maps, histories and codes of the run (read once, on the driver)."""
    codes = None
    if mode in CODE_MODES:
        codes = ctx.read_table(
            "encode", "codes", columns=["entity", "id", "code_binary", "code_dotdec"]
        )
    return build_lookups(
        ctx.read_table("ingest", "items", columns=["item", "title"]),
        ctx.read_table("samples", "user_map", columns=["user", "uid"]),
        ctx.read_table("samples", "item_map", columns=["item", "iid"]),
        codes,
        ctx.read_table(
            "samples", "samples", columns=["sample_id", "uid", "iid", "label", "timestamp"]
        ),
        ctx.cfg.prompts.history_len,
    )


def read_pairs(uri: str, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """A candidates table (Parquet file or folder of them) with ``user``/``item`` columns."""
    fs, path = resolve(uri, storage_options)
    if not fs.exists(path):
        raise DataError(f"candidates {uri} not found", todo="give a Parquet file or folder")
    files = (
        [path] if fs.isfile(path) else sorted(p for p in fs.find(path) if p.endswith(".parquet"))
    )
    if not files:
        raise DataError(f"no Parquet files under {uri}")
    tables = []
    for f in files:
        try:
            with fs.open(f, "rb") as fh:
                tables.append(pq.read_table(fh))
        except pa.ArrowInvalid as err:
            raise DataError(f"cannot read {f} as Parquet ({err})".split("\n")[0]) from None
    return check_pairs(pa.concat_tables(tables, promote_options="default"), uri)


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
    from pipelines.runtime import ensure_ray

    ensure_ray()
    ctx = StageContext.open(cfg, "score")
    mode = candidate_mode(cfg)
    finetune = _manifest_or_none(ctx, "finetune")
    plan = adapter_plan(cfg, list(dict.fromkeys([mode, "text"])), finetune)
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
    meta = _to_arrow(
        rendered.drop_columns(["prompt"]),
        CANDIDATE_SCHEMA.remove(CANDIDATE_SCHEMA.get_field_index("prompt")),
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
        part = score_dataset(subset, cfg, plan[m], scored_at).materialize()
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


def _manifest_or_none(ctx: StageContext, stage: str) -> dict[str, Any] | None:
    try:
        return ctx.manifest_of(stage)["metrics"]
    except StageError:
        return None


def _to_arrow(ds: ray.data.Dataset, schema: pa.Schema) -> pa.Table:
    blocks = ray.get(ds.to_arrow_refs())
    blocks = [b for b in blocks if b.num_rows]
    return pa.concat_tables(blocks) if blocks else schema.empty_table()


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


# ---- candidates: ``binllm score`` / ``python -m jobs.score`` -----------------------------------
def score_candidates(
    cfg: RunConfig, input_uri: str, output_uri: str = "", log: Any = print
) -> dict[str, Any]:
    """Score every row of a (user, item) table with the trained run ``cfg``; write Parquet and a
    manifest to ``output_uri`` (default ``{run}/scored/{input name}``), replacing it whole."""
    pairs = read_pairs(input_uri, cfg.output_storage_options)
    ctx = StageContext.open(cfg, "score")
    if not output_uri:
        stem = input_uri.rstrip("/").rsplit("/", 1)[-1].removesuffix(".parquet") or "candidates"
        output_uri = ctx.uri(join(ctx.run_path, "scored", stem))
    log(f"[binllm] score: {pairs.num_rows:,} candidates from {input_uri}")
    out, stats = score_pairs(cfg, pairs, input_uri)
    manifest = {"kind": "candidates", "input": input_uri, **_manifest_base(cfg), "metrics": stats}
    manifest = publish(out, output_uri, manifest, cfg.output_storage_options)
    log(
        f"[binllm] score: {stats['rendered_rows']:,} rows ({stats['cold_rows']:,} cold, "
        f"{stats['skipped_rows']:,} skipped) -> {output_uri}"
    )
    return {**manifest, "output": output_uri}


def _manifest_base(cfg: RunConfig) -> dict[str, Any]:
    return {
        "run_name": cfg.run_name,
        "config_hash": config_hash(cfg.score, cfg.model, cfg.prompts),
        "config": {"score": plain_config(cfg.score), "model": plain_config(cfg.model)},
        "packages": package_versions(),
    }


# ---- publishing a folder whole -----------------------------------------------------------------
def publish(
    ds: ray.data.Dataset,
    uri: str,
    manifest: dict[str, Any],
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``ds`` and ``manifest`` to a staging folder beside ``uri``, then swap it in.

    Readers never see a mix of old and new files: the old folder stays whole until the new one is
    complete (manifest written last), then the old one is renamed away, the new one renamed in,
    and the old one deleted. A failure before the swap removes the staging folder and leaves the
    old folder as it was. (On object stores a rename is a copy, so there the swap is short but not
    atomic; a reader that finds no ``_manifest.json`` must ignore the folder.)"""
    fs, path = resolve(uri, storage_options)
    path = path.rstrip("/")
    if is_local(fs):
        path = fs._strip_protocol(path)
    parent, _, name = path.rpartition("/")
    token = uuid.uuid4().hex[:8]
    staging = join(parent, f"_staging-{name}-{token}")
    arrow_fs = None
    if not is_local(fs):
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        arrow_fs = PyFileSystem(FSSpecHandler(fs))
    try:
        fs.makedirs(staging, exist_ok=True)
        if ds.count():
            ds.write_parquet(staging, filesystem=arrow_fs)
        else:
            with fs.open(join(staging, "part-00000.parquet"), "wb") as fh:
                pq.write_table(ds.schema().base_schema.empty_table(), fh)
        rows = 0
        for f in fs.find(staging):
            if f.endswith(".parquet"):
                with fs.open(f, "rb") as fh:
                    rows += pq.read_metadata(fh).num_rows
        manifest = {
            **manifest,
            "rows": rows,
            "path": uri,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        with fs.open(join(staging, MANIFEST), "w") as fh:
            json.dump(manifest, fh, indent=2, default=str)
        _swap(fs, staging, path, join(parent, f"_replaced-{name}-{token}"))
        return manifest
    except BaseException:
        if fs.exists(staging):
            fs.rm(staging, recursive=True)
        raise


def _swap(fs: Any, staging: str, final: str, old: str) -> None:
    """Put ``staging`` in the place of ``final`` (see :func:`publish`)."""
    had_old = fs.exists(final)
    if had_old:
        fs.mv(final, old, recursive=True)
    try:
        fs.mv(staging, final, recursive=True)
    except BaseException:
        if had_old and not fs.exists(final):
            fs.mv(old, final, recursive=True)
        raise
    if had_old:
        fs.rm(old, recursive=True)


# ---- nightly ----------------------------------------------------------------------------------
def nightly_root(cfg: RunConfig) -> tuple[Any, str]:
    ctx = StageContext.open(cfg, "score")
    return ctx.fs, join(ctx.run_path, "scores")


def run_nightly(
    cfg: RunConfig,
    candidates_uri: str,
    date: str = "",
    incremental: bool = False,
    log: Any = print,
) -> dict[str, Any]:
    """Score the candidates of one night into ``{run}/scores/date=YYYY-MM-DD/`` (replaced whole).

    The same date again replaces the partition (no duplicates); a failure leaves the previous
    partition as it was. ``incremental`` takes over the score of every pair whose prompt, model
    and adapter match a row of an existing partition (newest date first) instead of scoring it
    again (``carried`` = true)."""
    date = date or dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    if not DATE_RE.match(date):
        raise ConfigError(f"date {date!r} is not YYYY-MM-DD")
    pairs = distinct_pairs(read_pairs(candidates_uri, cfg.output_storage_options))
    fs, root = nightly_root(cfg)
    carry = previous_scores(fs, root) if incremental else None
    log(
        f"[binllm] nightly {date}: {pairs.num_rows:,} distinct candidates from {candidates_uri}"
        + (
            f", {0 if carry is None else carry.height:,} earlier scores to carry"
            if incremental
            else ""
        )
    )
    out, stats = score_pairs(cfg, pairs, candidates_uri, carry)
    target = join(root, f"date={date}")
    ctx = StageContext.open(cfg, "score")
    manifest = {
        "kind": "nightly",
        "date": date,
        "candidates": candidates_uri,
        "incremental": incremental,
        **_manifest_base(cfg),
        "metrics": stats,
    }
    manifest = publish(out, ctx.uri(target), manifest, cfg.output_storage_options)
    log(
        f"[binllm] nightly {date}: {stats['rendered_rows']:,} rows "
        f"({stats['carried_rows']:,} carried, {stats['cold_rows']:,} cold, "
        f"{stats['skipped_rows']:,} skipped) -> {ctx.uri(target)}"
    )
    return {**manifest, "output": ctx.uri(target)}


def committed_partitions(fs: Any, root: str) -> list[str]:
    """Dates of the partitions under ``root`` that have a manifest, newest first."""
    if not fs.exists(root):
        return []
    dates = []
    for entry in fs.ls(root, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("date=") and fs.exists(join(entry, MANIFEST)):
            dates.append(name.removeprefix("date="))
    return sorted(dates, reverse=True)


def previous_scores(fs: Any, root: str) -> pl.DataFrame:
    """Earlier nightly scores (newest partition first) for carrying over."""
    frames = []
    for date in committed_partitions(fs, root):
        folder = join(root, f"date={date}")
        for f in sorted(p for p in fs.find(folder) if p.endswith(".parquet")):
            with fs.open(f, "rb") as fh:
                frames.append(pl.from_arrow(pq.read_table(fh, columns=CARRY_COLUMNS)))
    if not frames:
        schema = pa.schema([CANDIDATE_SCORES_SCHEMA.field(c) for c in CARRY_COLUMNS])
        return pl.from_arrow(schema.empty_table())
    return pl.concat(frames, how="vertical_relaxed")


def read_nightly(cfg: RunConfig, date: str) -> pa.Table:
    """One committed nightly partition (for tests and readers in Python)."""
    fs, root = nightly_root(cfg)
    folder = join(root, f"date={date}")
    if not fs.exists(join(folder, MANIFEST)):
        raise StageError(f"no committed nightly partition for {date}", folder)
    files = sorted(p for p in fs.find(folder) if p.endswith(".parquet"))
    tables = []
    for f in files:
        with fs.open(f, "rb") as fh:
            tables.append(pq.read_table(fh))
    return pa.concat_tables(tables)

