"""Stage ``render`` (Ray Data): samples + item titles + codes -> ``prompts``.

One row per sample and prompt mode. Titles and codes are small next to the samples, so they are
read once on the driver and shipped to the rendering tasks; the samples stream through
``map_batches``. A second pass counts tokens with the configured tokenizer (one actor, loaded
once) into ``n_tokens``, whose per-mode summary goes to the manifest. ``prompts`` is written
partitioned, ``prompts/mode=M/split=S/`` (the columns stay in the files too), so a stage that needs
one mode reads only its slice: ``ctx.read_dataset("render", "prompts", {"mode": "binary"})``.

With ``prompts.aux.tasks``, the auxiliary task rows (:mod:`binllm_core.aux_tasks`) are made from
the train samples on the driver (a few rows per user and task) and written, in every prompt
mode and with their token counts, as the table ``aux``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import ray

from binllm_core.aux_tasks import AuxTemplates, build_rows, render_rows
from binllm_core.config import ModelConfig
from binllm_core.errors import StageError
from binllm_core.llm import load_tokenizer
from binllm_core.prompts import (
    SAMPLE_COLUMNS,
    Lookups,
    Templates,
    check_codes,
    lookups_from_tables,
    render_table,
    templates_from_config,
)
from binllm_core.soft import SOFT
from pipelines.progress import Reporter, progress
from pipelines.stage import StageContext


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.cfg.prompts
    templates = templates_from_config(cfg)
    modes = list(cfg.modes)
    items = ctx.read_table("ingest", "items", columns=["item", "title"])
    item_map = ctx.read_table("samples", "item_map", columns=["item", "iid"])
    codes = None
    if any(m != "text" for m in modes):
        codes = ctx.read_table("encode", "codes", columns=["entity", "id", "bits"])
    lookups = lookups_from_tables(items, item_map, codes)
    if codes is not None:
        ids = ctx.read_table("samples", "samples", columns=["uid", "iid"])
        check_codes(
            ids["uid"].unique().to_pylist(), ids["iid"].unique().to_pylist(), lookups, modes
        )

    samples = ctx.read_dataset("samples", "samples").select_columns(SAMPLE_COLUMNS)
    total = ctx.manifest_of("samples")["tables"]["samples"]["rows"] * len(modes)
    with progress("render", total, "prompt") as reporter:
        prompts = _rendered(samples, lookups, templates, modes, cfg.history_len, ctx, reporter)
    if prompts.count() == 0:
        raise StageError("no samples to render", ctx.uri(ctx.stage_path("samples")))
    summary = pa.concat_tables(
        ray.get(prompts.select_columns(["mode", "split", "n_tokens"]).to_arrow_refs())
    )
    # Partitioned by mode and split: finetune and score read only the slices they use.
    for mode in modes:
        for split in _count(summary.filter(pc.equal(summary["mode"], mode)), "split"):
            part = prompts.filter(expr=f"mode == '{mode}' and split == '{split}'")
            ctx.write_dataset(part, "prompts", {"mode": mode, "split": split})

    return {
        **({"aux": _write_aux(ctx, lookups, _in_words(modes))} if cfg.aux.tasks else {}),
        "modes": modes,
        "rows_per_mode": _count(summary, "mode"),
        "rows_per_split": {k: v // len(modes) for k, v in _count(summary, "split").items()},
        "tokenizer": ctx.cfg.model.backbone,
        "tokens_per_mode": {m: _token_stats(summary, m) for m in modes},
        "templates": {"text": templates.text, "code": templates.code},
        "empty_history": templates.empty_history,
        "soft_history": templates.soft_history,
    }


def _rendered(
    samples: ray.data.Dataset,
    lookups: Lookups,
    templates: Templates,
    modes: list[str],
    history_len: int,
    ctx: StageContext,
    reporter: Reporter,
) -> ray.data.Dataset:
    """Every sample's prompt in every mode, with its token count (materialized)."""
    return (
        samples.map_batches(
            _render,
            fn_kwargs={
                "lookups": lookups,
                "templates": templates,
                "modes": modes,
                "history_len": history_len,
            },
            batch_format="pyarrow",
            batch_size=2048,
        )
        .map_batches(
            TokenCounter,
            fn_constructor_kwargs={"model_cfg": ctx.cfg.model, "reporter": reporter},
            compute=ray.data.ActorPoolStrategy(size=1),
            batch_format="pyarrow",
            batch_size=2048,
        )
        .materialize()
    )


def _write_aux(ctx: StageContext, lookups: Lookups, modes: list[str]) -> dict[str, Any]:
    """The table ``aux``: every task's rows in every mode, with ``n_tokens``; its summary."""
    cfg = ctx.cfg.prompts.aux
    columns = ["sample_id", "uid", "iid", "label", "timestamp", "split"]
    samples = pl.from_arrow(ctx.read_table("samples", "samples", columns=columns))
    rows = build_rows(samples, cfg, lookups.titles)
    if not rows:
        raise StageError(
            f"no user has the {cfg.min_positives} train positives an aux row needs",
            ctx.uri(ctx.stage_path("samples")),
            "lower prompts.aux.min_positives or drop prompts.aux.tasks",
        )
    table = TokenCounter(ctx.cfg.model)(
        render_rows(rows, lookups, AuxTemplates.of(ctx.cfg.prompts), modes)
    )
    ctx.write_table(table, "aux")
    users = {
        t: len(set(table.filter(pc.equal(table["task"], t))["uid"].to_pylist())) for t in cfg.tasks
    }
    return {
        "tasks": list(cfg.tasks),
        "rows_per_task": {t: n // len(modes) for t, n in _count(table, "task").items()},
        "users_per_task": users,
        "tokens": {
            task: {m: _token_stats(table.filter(pc.equal(table["task"], task)), m) for m in modes}
            for task in cfg.tasks
        },
    }


def _in_words(modes: list[str]) -> list[str]:
    """The modes aux rows are written in: every rendered one but ``soft`` (aux rows carry no
    soft ids)."""
    return [m for m in modes if m != SOFT]


def _render(
    batch: pa.Table, lookups: Lookups, templates: Templates, modes: list[str], history_len: int
) -> pa.Table:
    return render_table(batch, lookups, templates, modes, history_len)


class TokenCounter:
    """Adds ``n_tokens`` (int32): the prompt's length in tokens of the configured tokenizer."""

    def __init__(self, model_cfg: ModelConfig, reporter: Reporter | None = None) -> None:
        self.tokenizer = load_tokenizer(model_cfg)
        self.reporter = reporter or Reporter()

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = self.tokenizer(batch["prompt"].to_pylist(), add_special_tokens=False)["input_ids"]
        self.reporter.post(advance=batch.num_rows)
        return batch.append_column("n_tokens", pa.array([len(i) for i in ids], pa.int32()))


def _count(table: pa.Table, column: str) -> dict[str, int]:
    counts = pc.value_counts(table[column]).to_pylist()
    return {c["values"]: c["counts"] for c in sorted(counts, key=lambda c: c["values"])}


def _token_stats(table: pa.Table, mode: str) -> dict[str, float]:
    n = table.filter(pc.equal(table["mode"], mode))["n_tokens"].to_numpy()
    if len(n) == 0:
        return {"mean": 0.0, "p95": 0.0, "max": 0}
    return {
        "mean": round(float(n.mean()), 2),
        "p95": round(float(np.percentile(n, 95)), 2),
        "max": int(n.max()),
    }
