"""Stage ``evaluate``: ``score/scores`` + the encode manifest -> metrics table and report.

AUC and UAUC (:mod:`binllm_core.evaluation.metrics`) overall, on warm rows and on cold rows, for
each split and prompt mode that was scored, beside the codes-only AUC the encode stage measured.
Writes:

* ``metrics`` — the metrics table (:data:`binllm_core.evaluation.report.METRICS_SCHEMA`);
* ``ranking`` — where the run retrieves candidates: Recall/NDCG/HR/MRR@K with bootstrap
  intervals of train and time-aware popularity (its window chosen on valid), the float encoder
  and the codes' Hamming lists on every user of each retrieved split, and of every method with
  the LLM re-ranking on the users it re-ranked, full and sampled protocols
  (:data:`binllm_core.ranking.lists.RANKING_SCHEMA`), and their curves
  ``report/ranking_{split}_{protocol}[_reranked].png``;
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
from binllm_core.config import RunConfig
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
from binllm_core.ranking.lists import (
    RANKING_SCHEMA,
    Ranked,
    RankingInputs,
    ranked_lists,
    ranking_rows,
    ratio_rows,
)
from binllm_core.ranking.popularity import WindowChoice, choose_window, liked_counts
from binllm_core.ranking.retrieval import rerank_users
from binllm_core.storage import join
from pipelines.ops.retrieval import codes_stage
from pipelines.runtime.stage import StageContext

COLUMNS = ["split", "mode", "uid", "label", "warm", "not_cold", "logit_yes", "adapter"]
LLM_METHODS = ("codes+llm", "blend")
"""The ranking methods measured only on the users the LLM re-ranked."""


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
    ratios: list[dict[str, Any]] = []
    window = None
    if "retrieve" in ctx.upstream:
        ranking, ratios, window, images_of = _ranking(ctx, folder)
        rerank = ctx.manifest_of("rerank")["metrics"] if "rerank" in ctx.upstream else {}
        section = ranking_markdown(
            ranking,
            images_of,
            ctx.cfg.retrieve.sampled_negatives,
            ctx.cfg.protocol.split,
            window,
            ctx.cfg.evaluate.bootstrap,
            codes_source(ctx.cfg),
            rerank.get("blend"),
            rerank.get("popular_union"),
            ratios,
        )
        report += "\n".join(section) + "\n"
    summary = window.summary() if window else None
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
                "ratios": ratios,
                "popularity_window": summary,
            },
            fh,
            indent=2,
        )
    with ctx.fs.open(join(folder, "report.md"), "w") as fh:
        fh.write(report)
    return {
        "rows": rows,
        "ranking": _headline(ranking),
        "ratios": ratios,
        "popularity_window": summary,
        "report": ctx.relative(join(folder, "report.md")),
        "images": list(images.values()),
    }


def _ranking(
    ctx: StageContext, folder: str
) -> tuple[
    list[dict[str, Any]],
    list[dict[str, Any]],
    WindowChoice | None,
    dict[tuple[str, str, str], str],
]:
    """The ranking table, the codes / float ratios (:func:`ratio_rows`), the time-aware
    popularity's window and the curves' files (written into ``folder``, keyed by protocol,
    split and user set)."""
    cfg = ctx.cfg
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
    recommendations = reranked = None
    if "rerank" in ctx.upstream:
        recommendations = pl.from_arrow(
            ctx.read_table(
                "rerank",
                "recommendations",
                columns=["protocol", "split", "mode", "uid", "iid", "rank", "blend_rank"],
            )
        )
        reranked = rerank_users(users, cfg.rerank.max_users, cfg.rerank.seed)
    samples = pl.from_arrow(
        ctx.read_table("samples", "samples", columns=["uid", "iid", "label", "split", "timestamp"])
    )
    item_ids = np.sort(ctx.read_table("samples", "item_map", columns=["iid"])["iid"].to_numpy())
    window = choose_window(samples, item_ids, cfg.evaluate.popularity_windows)
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
        popularity=liked_counts(samples, int(item_ids.max()) + 1),
        recent=window.scores if window else None,
        float_vectors=float_vectors,
        rerank_n=cfg.rerank.top_n,
        reranked=reranked,
    )
    ranked = ranked_lists(inputs)
    rows = ranking_rows(ranked, cfg.evaluate.bootstrap, cfg.evaluate.seed)
    ratios = ratio_rows(ranked, cfg.evaluate.bootstrap, cfg.evaluate.seed)
    ctx.write_table(pa.Table.from_pylist(rows, schema=RANKING_SCHEMA), "ranking")
    images = {}
    for protocol, split in dict.fromkeys((r.protocol, r.split) for r in ranked):
        mine = [r for r in ranked if (r.protocol, r.split) == (protocol, split)]
        for users_label in ("all", "reranked"):
            with_set = [r for r in mine if users_label in r.users]
            if not with_set:
                continue
            n = len(with_set[0].users[users_label])
            name = f"ranking_{split}_{protocol}{'' if users_label == 'all' else '_reranked'}.png"
            title = f"{cfg.run_name}, {split}, {protocol} ranking, {users_label} users ({n:,})"
            png = ranking_png(_curves(with_set, users_label), title)
            with ctx.fs.open(join(folder, name), "wb") as fh:
                fh.write(png)
            images[protocol, split, users_label] = name
    return rows, ratios, window, images


def codes_source(cfg: RunConfig) -> str:
    """Which codes the run's lists are retrieved by, in words for the report."""
    stage = codes_stage(cfg)
    encoder = cfg.encoder if cfg.retrieval_encoder is None else cfg.retrieval_encoder
    key = "encoder" if cfg.retrieval_encoder is None else "retrieval_encoder"
    prior = f", {encoder.prior_bits} of them prior bits" if encoder.prior_bits else ""
    return (
        f"the codes of stage `{stage}` (`{key}`: the {encoder.objective} objective, "
        f"{encoder.backbone}, {encoder.code_bits} bits{prior})"
    )


def _curves(ranked: list[Ranked], users: str) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """NDCG@K and Recall@K against K of each of ``ranked`` on the user set ``users``."""
    curves = []
    for r in ranked:
        label = r.method if r.method not in LLM_METHODS else f"{r.method} ({r.mode})"
        longest = max((len(v) for v in r.lists.values()), default=1)
        ks = np.arange(1, max(longest, 1) + 1)
        curves.append(("ndcg", label, ks, r.curve("ndcg", ks, users)))
        curves.append(("recall", label, ks, r.curve("recall", ks, users)))
    return curves


def _headline(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """NDCG@10 (with its interval) and Recall@10 per protocol, split, method and mode, for the
    manifest: each method on its widest user set (every user; the LLM on the users it
    re-ranked), and the codes on the users the LLM re-ranked too (what the blend must beat)."""
    keys = ("protocol", "split", "method", "mode", "users", "n_users", "ndcg", "ndcg_low")
    keys += ("ndcg_high", "recall")
    widest = {True: "reranked", False: "all"}
    return [
        {k: r[k] for k in keys}
        for r in rows
        if r["k"] == 10
        and (
            r["users"] == widest[r["method"] in LLM_METHODS]
            or (r["method"], r["users"]) == ("codes", "reranked")
        )
    ]


def _interleave(llm: list[dict], codes: list[dict], splits: list[str]) -> list[dict]:
    """Per split: the LLM rows, then the codes row."""
    out = []
    for split in splits:
        out += [r for r in llm if r["split"] == split]
        out += [r for r in codes if r["split"] == split]
    return out
