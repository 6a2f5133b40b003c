"""Stage ``evaluate``: ``score/scores`` + the encode manifest -> metrics table and report.

AUC and UAUC (:mod:`binllm_core.evaluation.metrics`) overall, on warm rows and on cold rows, for
each split and prompt mode that was scored, beside the codes-only AUC the encode stage measured.
Writes:

* ``metrics`` — the metrics table (:data:`binllm_core.evaluation.report.METRICS_SCHEMA`);
* ``ranking`` — where the run retrieves candidates: Recall/NDCG/HR/MRR@K of popularity, the
  float encoder, the codes' Hamming lists and their LLM re-ranking, full and sampled protocols
  (:data:`binllm_core.ranking.lists.RANKING_SCHEMA`), and ``report/ranking_{split}_{protocol}.png``;
* ``report/metrics.json`` — the same rows as JSON, with the definitions;
* ``report/report.md`` — the tables and, per split, ``roc_{split}.png``

(in the stage's current version folder, ``{run}/evaluate/v-.../``; the manifest's ``report`` is
the path of ``report.md`` relative to the run).

The scores are small (one row per scored prompt), so they are read whole into this process.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from binllm_core.codes import id_table
from binllm_core.errors import StageError
from binllm_core.evaluation.report import (
    SCORE_DEFINITIONS,
    codes_metrics,
    llm_metrics,
    metrics_table,
    ranking_markdown,
    ranking_png,
    report_markdown,
    roc_curves,
    roc_png,
)
from binllm_core.ranking.lists import RANKING_SCHEMA, RankingInputs, ranked_lists, ranking_rows
from binllm_core.storage import join
from pipelines.ops.retrieval import codes_stage
from pipelines.runtime.stage import StageContext

COLUMNS = ["split", "mode", "uid", "label", "warm", "not_cold", "logit_yes", "adapter"]


def run(ctx: StageContext) -> dict[str, Any]:
    scores = ctx.read_table("score", "scores", columns=COLUMNS)
    if scores.num_rows == 0:
        raise StageError("the scores table is empty", ctx.uri(ctx.stage_path("score")))
    score_metrics = ctx.manifest_of("score")["metrics"]
    rows = llm_metrics(scores)
    found = list(dict.fromkeys(r["split"] for r in rows))
    splits = [s for s in ctx.cfg.score.splits if s in found] + [
        s for s in found if s not in ctx.cfg.score.splits
    ]
    codes = []
    if "encode" in ctx.upstream:  # a text-only run trains no encoder: no codes rows
        codes = codes_metrics(ctx.manifest_of("encode")["metrics"], splits)
    rows = _interleave(rows, codes, splits)
    ctx.write_table(metrics_table(rows), "metrics")

    folder = ctx.output_path("report")
    ctx.fs.makedirs(folder, exist_ok=True)
    images = {}
    for split in splits:
        name = f"roc_{split}.png"
        png = roc_png(roc_curves(scores, split), f"ROC, {ctx.cfg.run_name}, {split}")
        with ctx.fs.open(join(folder, name), "wb") as fh:
            fh.write(png)
        images[split] = name
    notes = []
    if score_metrics.get("max_rows"):
        notes.append(
            f"LLM rows are a seeded random {score_metrics['max_rows']:,} samples per split "
            "(score.max_rows); the codes rows cover every sample."
        )
    warm_more_than = ctx.cfg.protocol.warm_more_than
    answer_score = ctx.cfg.model.answer_score
    report = report_markdown(rows, ctx.cfg.run_name, warm_more_than, images, notes, answer_score)
    ranking: list[dict[str, Any]] = []
    if "retrieve" in ctx.upstream:
        ranking = _ranking(ctx, folder)
        report += (
            "\n".join(
                ranking_markdown(
                    ranking, _ranking_images(ranking), ctx.cfg.retrieve.sampled_negatives
                )
            )
            + "\n"
        )
    definitions = {
        "score": SCORE_DEFINITIONS[answer_score],
        "auc": "area under the ROC curve over all rows, ties count half",
        "uauc": "unweighted mean of per-user AUC over users with >= 2 rows and both labels",
        "warm": f"user and item each have more than {warm_more_than} train interactions",
        "cold": "user or item does not occur in train (not not_cold)",
        "codes": "encoder alone: inner product of binary codes, every sample of the split",
    }
    with ctx.fs.open(join(folder, "metrics.json"), "w") as fh:
        json.dump(
            {
                "run_name": ctx.cfg.run_name,
                "definitions": definitions,
                "rows": rows,
                "ranking": ranking,
            },
            fh,
            indent=2,
        )
    with ctx.fs.open(join(folder, "report.md"), "w") as fh:
        fh.write(report)
    return {
        "rows": rows,
        "ranking": _headline(ranking),
        "report": ctx.relative(join(folder, "report.md")),
        "images": list(images.values()),
    }


def _ranking(ctx: StageContext, folder: str) -> list[dict[str, Any]]:
    """The ranking table and its curves (written into ``folder``)."""
    users = pl.from_arrow(
        ctx.read_table(
            "retrieve",
            "users",
            columns=["split", "uid", "positives", "exclude", "sampled_positive"],
        )
    )
    candidates = pl.from_arrow(
        ctx.read_table(
            "retrieve", "candidates", columns=["protocol", "split", "uid", "iid", "rank"]
        )
    )
    recommendations = None
    if "rerank" in ctx.upstream:
        recommendations = pl.from_arrow(
            ctx.read_table(
                "rerank",
                "recommendations",
                columns=["protocol", "split", "mode", "uid", "iid", "rank"],
            )
        )
    samples = pl.from_arrow(ctx.read_table("samples", "samples", columns=["iid", "label", "split"]))
    item_ids = np.sort(ctx.read_table("samples", "item_map", columns=["iid"])["iid"].to_numpy())
    train = samples.filter((pl.col("split") == "train") & (pl.col("label") == 1))
    popularity = np.bincount(train["iid"].to_numpy(), minlength=int(item_ids.max()) + 1)
    float_vectors = None
    encode = codes_stage(ctx.cfg)  # the float model trained beside the retrieval codes
    if "embeddings" in ctx.manifest_of(encode).get("tables", {}):
        table = ctx.read_table(encode, "embeddings", columns=["entity", "id", "float"])
        float_vectors = (id_table(table, "user", "float"), id_table(table, "item", "float"))
    inputs = RankingInputs(
        users=users,
        candidates=candidates,
        recommendations=recommendations,
        item_ids=item_ids,
        popularity=popularity.astype(np.float64),
        float_vectors=float_vectors,
        rerank_n=ctx.cfg.rerank.top_n,
    )
    ranked = ranked_lists(inputs)
    rows = ranking_rows(ranked)
    ctx.write_table(pa.Table.from_pylist(rows, schema=RANKING_SCHEMA), "ranking")
    for protocol, split in dict.fromkeys((r.protocol, r.split) for r in ranked):
        curves = []
        for r in ranked:
            if (r.protocol, r.split) != (protocol, split):
                continue
            label = r.method if r.method != "codes+llm" else f"codes+llm ({r.mode})"
            longest = max((len(v) for v in r.lists.values()), default=1)
            ks = np.arange(1, max(longest, 1) + 1)
            curves.append(("ndcg", label, ks, r.curve("ndcg", ks)))
            curves.append(("recall", label, ks, r.curve("recall", ks)))
        png = ranking_png(curves, f"{ctx.cfg.run_name}, {split}, {protocol} ranking")
        with ctx.fs.open(join(folder, f"ranking_{split}_{protocol}.png"), "wb") as fh:
            fh.write(png)
    return rows


def _ranking_images(rows: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    groups = dict.fromkeys((r["protocol"], r["split"]) for r in rows)
    return {(p, s): f"ranking_{s}_{p}.png" for p, s in groups}


def _headline(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """NDCG@10 and Recall@10 per protocol, split, method and mode (all users), for the manifest."""
    return [
        {k: r[k] for k in ("protocol", "split", "method", "mode", "n_users", "ndcg", "recall")}
        for r in rows
        if r["users"] == "all" and r["k"] == 10
    ]


def _interleave(llm: list[dict], codes: list[dict], splits: list[str]) -> list[dict]:
    """Per split: the LLM rows, then the codes row."""
    out = []
    for split in splits:
        out += [r for r in llm if r["split"] == split]
        out += [r for r in codes if r["split"] == split]
    return out
