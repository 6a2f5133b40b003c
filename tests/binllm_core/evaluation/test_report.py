"""Evaluation report: metric rows use binllm_core.evaluation.metrics, ROC points, PNG and
Markdown."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from binllm_core.evaluation import metrics
from binllm_core.evaluation.report import (
    METRICS_SCHEMA,
    codes_metrics,
    llm_metrics,
    metrics_table,
    ranking_markdown,
    ratio_words,
    report_markdown,
    roc_curves,
    roc_png,
    roc_points,
)
from binllm_core.ranking.candidates import PlacesChoice


def scores_table(n: int = 200, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, n)
    logit = label * 0.8 + rng.normal(size=n)
    return pa.table(
        {
            "split": ["test"] * n,
            "mode": ["text"] * (n // 2) + ["binary"] * (n - n // 2),
            "uid": pa.array(rng.integers(1, 15, n), pa.int32()),
            "label": pa.array(label, pa.int8()),
            "warm": rng.random(n) < 0.6,
            "not_cold": rng.random(n) < 0.8,
            "logit_yes": logit,
            "adapter": ["a1"] * (n // 2) + ["a2"] * (n - n // 2),
        }
    )


def test_llm_metrics_match_the_metrics_module_per_mode_and_subset():
    table = scores_table()
    rows = {r["mode"]: r for r in llm_metrics(table)}
    assert list(rows) == ["text", "binary"]
    half = table.slice(0, 100)
    y = half["label"].to_numpy()
    s = half["logit_yes"].to_numpy()
    u = half["uid"].to_numpy()
    warm = half["warm"].to_numpy(zero_copy_only=False)
    cold = ~half["not_cold"].to_numpy(zero_copy_only=False)
    r = rows["text"]
    assert r["auc"] == metrics.auc(y, s) and r["uauc"] == metrics.uauc(u, y, s)
    assert r["warm_auc"] == metrics.auc(y[warm], s[warm])
    assert r["cold_auc"] == metrics.auc(y[cold], s[cold])
    assert r["rows"] == 100 and r["warm_rows"] == warm.sum() and r["cold_rows"] == cold.sum()
    assert r["adapter"] == "a1"


def test_undefined_auc_is_none_and_codes_rows_come_from_the_manifest():
    table = scores_table(40)
    table = table.set_column(3, "label", pa.array([1] * 40, pa.int8()))
    row = llm_metrics(table)[0]
    assert row["auc"] is None and row["uauc"] is None
    codes = codes_metrics(
        {"codes": {"test": {"auc": 0.7, "uauc": float("nan")}}}, ["test", "valid"]
    )
    assert len(codes) == 1 and codes[0]["auc"] == 0.7 and codes[0]["uauc"] is None
    assert metrics_table([row, *codes]).schema == METRICS_SCHEMA


def test_roc_points_span_the_unit_square_and_integrate_to_the_auc():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = np.round(y + rng.normal(size=300), 1)  # ties
    fpr, tpr = roc_points(y, s)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert math.isclose(np.trapezoid(tpr, fpr), metrics.auc(y, s), rel_tol=1e-9)


def test_png_and_markdown():
    table = scores_table()
    png = roc_png(roc_curves(table, "test"), "ROC")
    assert png.startswith(b"\x89PNG")
    rows = llm_metrics(table) + codes_metrics({"codes": {"test": {"auc": 0.61}}}, ["test"])
    text = report_markdown(rows, "r", 3, {"test": "roc_test.png"}, ["a note"])
    assert "more than 3 train interactions" in text and "not not_cold" in text
    assert "| llm | text |" in text and "| codes | codes |" in text and "0.6100" in text
    assert "![ROC curves, test](roc_test.png)" in text and "a note" in text
    assert "Scores are the logit of the answer token `Yes` at the last prompt position." in text
    odds = report_markdown(rows, "r", 3, {}, answer_score="yes_minus_no")
    assert "logit of the answer token `Yes` minus that of `No` at the last" in odds


def test_ranking_section_states_the_blends_weight_curve_and_lifts():
    def row(split: str, method: str, mode: str, k: int, ndcg: float) -> dict:
        return {"protocol": "full", "split": split, "method": method, "mode": mode} | {
            "users": "reranked",
            "n_users": 3,
            "k": k,
            **dict.fromkeys(("recall", "hr", "mrr"), 0.0),
            "ndcg": ndcg,
        }

    rows = [
        row(split, method, mode, k, value + 0.01 * k)
        for split, shift in (("valid", 0.0), ("test", 0.1))
        for method, mode, value in (("codes", "codes", shift), ("blend", "binary", shift + 0.2))
        for k in (5, 10, 20)
        if method == "codes" or k <= 10
    ]
    chosen = {
        "alpha": 0.3,
        "chosen_by": "valid NDCG@10",
        "valid_users": 3,
        "valid_ndcg@10": {"0": 0.1, "0.3": 0.3, "1": 0.2},
        "valid_lift": 0.2,
    }
    text = "\n".join(ranking_markdown(rows, {}, 99, "global", None, 0, blend={"binary": chosen}))
    assert (
        "`blend` in `binary`: α = **0.3** (valid NDCG@10); valid NDCG@10 of the blended lists over "
        "3 re-ranked valid users (`rerank.alpha_grid`): 0 0.1000, **0.3 0.3000**, 1 0.2000; lift "
        "over the retriever (α = 0) +0.2000. Lift over `codes` on the re-ranked users, full "
        "catalog: valid +0.2000 (NDCG@10 0.3000); test +0.2000 (NDCG@10 0.4000)."
    ) in text
    none = dict(chosen, alpha=0.0, valid_lift=None, **{"valid_ndcg@10": {}})
    none["chosen_by"] = "no valid user re-ranked: the retriever's order"
    text = "\n".join(ranking_markdown(rows, {}, 99, "global", None, 0, blend={"text": none}))
    assert "α = **0** (no valid user re-ranked" in text and "add valid to `retrieve.splits`" in text


def test_the_report_states_the_places_popular_items_took_and_their_valid_recall() -> None:
    rows = [
        {
            "protocol": "full",
            "split": "test",
            "method": "codes",
            "mode": "codes",
            "users": "all",
            "n_users": 3,
            "k": 10,
            "ndcg": 0.1,
            "recall": 0.2,
            "hr": 0.3,
            "mrr": 0.1,
        }
    ]
    choice = PlacesChoice(2, {0: 0.15, 2: 0.16, 5: 0.155}, 10, 400, 90)
    text = "\n".join(ranking_markdown(rows, {}, 99, "global", None, 0, union=choice.summary()))
    assert (
        "Candidates the LLM re-ranks: the codes' first 8 and **2** time-aware popular items "
        "(window 90 days; `rerank.popular_places`), chosen on valid Recall@10 over 400 valid "
        "users: 0 0.1500, **2 0.1600**, 5 0.1550; lift over the codes' own 10 +0.0100."
    ) in text
    off = "\n".join(ranking_markdown(rows, {}, 99, "global", None, 0))
    assert "Candidates the LLM re-ranks" not in off


def test_the_codes_over_float_words_as_computed_and_read_back_from_json():
    row = {"numerator": "codes", "denominator": "float", "metric": "ndcg@10", "ratio": 0.94061}
    row["low"] = 0.8812
    row["high"] = 1.0049
    assert ratio_words(row) == "codes / float 0.941 [0.881, 1.005] (paired bootstrap)"
    for unbounded in (float("nan"), None):  # evaluate.bootstrap 0; nan is null in a manifest
        assert ratio_words({**row, "low": unbounded, "high": unbounded}) == "codes / float 0.941"
    for undefined in (float("nan"), None):
        assert ratio_words({**row, "ratio": undefined}) == (
            "codes / float undefined (the float lists' ndcg@10 is 0)"
        )
