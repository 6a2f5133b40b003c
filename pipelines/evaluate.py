"""Stage ``evaluate``: ``score/scores`` + the encode manifest -> metrics table and report.

AUC and UAUC (:mod:`binllm_core.metrics`) overall, on warm rows and on cold rows, for each split
and prompt mode that was scored, beside the codes-only AUC the encode stage measured. Writes:

* ``metrics`` — the metrics table (:data:`binllm_core.evaluation.METRICS_SCHEMA`);
* ``report/metrics.json`` — the same rows as JSON, with the definitions;
* ``report/report.md`` — the tables and, per split, ``roc_{split}.png``

(in the stage's current version folder, ``{run}/evaluate/v-.../``; the manifest's ``report`` is
the path of ``report.md`` relative to the run).

The scores are small (one row per scored prompt), so they are read whole into this process.
"""

from __future__ import annotations

import json
from typing import Any

from binllm_core.errors import StageError
from binllm_core.evaluation import (
    codes_metrics,
    llm_metrics,
    metrics_table,
    report_markdown,
    roc_curves,
    roc_png,
)
from binllm_core.storage import join
from pipelines.stage import StageContext

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
    report = report_markdown(rows, ctx.cfg.run_name, warm_more_than, images, notes)
    definitions = {
        "score": "logit of the answer token Yes at the last prompt position",
        "auc": "area under the ROC curve over all rows, ties count half",
        "uauc": "unweighted mean of per-user AUC over users with >= 2 rows and both labels",
        "warm": f"user and item each have more than {warm_more_than} train interactions",
        "cold": "user or item does not occur in train (not not_cold)",
        "codes": "encoder alone: inner product of binary codes, every sample of the split",
    }
    with ctx.fs.open(join(folder, "metrics.json"), "w") as fh:
        json.dump(
            {"run_name": ctx.cfg.run_name, "definitions": definitions, "rows": rows}, fh, indent=2
        )
    with ctx.fs.open(join(folder, "report.md"), "w") as fh:
        fh.write(report)
    return {
        "rows": rows,
        "report": ctx.relative(join(folder, "report.md")),
        "images": list(images.values()),
    }


def _interleave(llm: list[dict], codes: list[dict], splits: list[str]) -> list[dict]:
    """Per split: the LLM rows, then the codes row."""
    out = []
    for split in splits:
        out += [r for r in llm if r["split"] == split]
        out += [r for r in codes if r["split"] == split]
    return out
