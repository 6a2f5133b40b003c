"""Stage evaluate on fake finished score and encode stages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from binllm_core.config import load_config
from binllm_core.evaluation import metrics
from binllm_core.storage import read_output
from pipelines.runtime.registry import STAGES
from pipelines.runtime.stage import run_stage
from tests.builders import publish_stage


def fake(run: Path, stage: str, metrics_: dict, tables: dict[str, pa.Table]) -> None:
    publish_stage(run, stage, tables, metrics_)


def test_evaluate_writes_metrics_report_and_roc(tmp_path: Path):
    cfg = load_config(
        "configs/tiny.yaml", [f"output_root={tmp_path}", "run_name=e", "retrieve.top_n=0"]
    )
    rng = np.random.default_rng(0)
    n = 120
    label = rng.integers(0, 2, n)
    scores = pa.table(
        {
            "sample_id": pa.array(np.tile(np.arange(n // 2), 2), pa.int64()),
            "split": ["test"] * n,
            "mode": ["text"] * (n // 2) + ["binary"] * (n // 2),
            "uid": pa.array(rng.integers(1, 10, n), pa.int32()),
            "label": pa.array(label, pa.int8()),
            "warm": rng.random(n) < 0.5,
            "not_cold": rng.random(n) < 0.7,
            "logit_yes": label + rng.normal(size=n),
            "adapter": ["a"] * n,
        }
    )
    run = tmp_path / "e"
    fake(run, "score", {"max_rows": 60}, {"scores": scores})
    fake(run, "encode", {"codes": {"test": {"auc": 0.66, "uauc": 0.6, "warm_auc": 0.7}}}, {})
    stage = next(s for s in STAGES if s.name == "evaluate")
    manifest = run_stage(cfg, stage)
    out = run / "evaluate"
    table = pl.from_arrow(read_output(str(out), "metrics"))
    assert table["scorer"].to_list() == ["llm", "llm", "codes"]
    text = scores.slice(0, n // 2)
    assert table["auc"][0] == metrics.auc(text["label"].to_numpy(), text["logit_yes"].to_numpy())
    assert table["auc"][2] == 0.66 and table["cold_auc"][2] is None
    folder = (run / manifest["metrics"]["report"]).parent  # recorded relative to the run
    assert folder.parent.parent == out and folder.parent.name == manifest["version"]
    report = (folder / "report.md").read_text()
    assert "| codes | codes |" in report and "score.max_rows" in report
    assert (folder / "roc_test.png").read_bytes().startswith(b"\x89PNG")
    data = json.loads((folder / "metrics.json").read_text())
    assert "warm" in data["definitions"] and len(data["rows"]) == 3
    assert manifest["metrics"]["rows"][0]["mode"] == "text"


def lists(protocol: str, by_user: dict[int, list[int]], **extra: str) -> list[dict]:
    return [
        {"protocol": protocol, "split": "test", "uid": u, "iid": i, "rank": r + 1, **extra}
        for u, items in by_user.items()
        for r, i in enumerate(items)
    ]


DAY = 86_400


def test_evaluate_ranks_every_user_and_the_llm_on_the_users_it_reranked(tmp_path: Path):
    cfg = load_config(
        "configs/tiny.yaml",
        [
            f"output_root={tmp_path}",
            "run_name=r",
            "retrieve.top_n=3",
            "rerank.top_n=2",
            "rerank.max_users=2",
            "rerank.seed=1",  # re-ranks users 1 and 2 of 1, 2, 3
            "evaluate.popularity_windows=[365, 7]",
        ],
    )
    run = tmp_path / "r"
    scores = pa.table(
        {
            "sample_id": pa.array([0, 1], pa.int64()),
            "split": ["test"] * 2,
            "mode": ["binary"] * 2,
            "uid": pa.array([1, 2], pa.int32()),
            "label": pa.array([1, 0], pa.int8()),
            "warm": [True] * 2,
            "not_cold": [True] * 2,
            "logit_yes": [0.5, 0.1],
            "adapter": ["a"] * 2,
        }
    )
    fake(run, "score", {}, {"scores": scores})
    vector = pa.list_(pa.float32(), 2)
    embeddings = pa.table(
        {
            "entity": ["user"] * 3 + ["item"] * 6,
            "id": pa.array([1, 2, 3, 1, 2, 3, 4, 5, 6], pa.int32()),
            "relaxed": pa.array([[1, 0]] * 9, vector),
            "float": pa.array(
                [[1, 0], [0, 1], [0, 1], [0, 0], [1, 1], [2, 0], [0, 0], [0, 2], [0, 3]], vector
            ),
        }
    )
    fake(run, "encode", {"codes": {}}, {"embeddings": embeddings})
    # Train positives: item 4 twice long ago, items 2 and 1 once each lately; user 7's valid
    # positive is item 1, which the last 7 days of train rank first (the whole train second).
    samples = pa.table(
        {
            "uid": pa.array([5, 6, 5, 6, 7], pa.int32()),
            "iid": pa.array([4, 4, 2, 1, 1], pa.int32()),
            "label": pa.array([1, 1, 1, 1, 1], pa.int8()),
            "split": ["train"] * 4 + ["valid"],
            "timestamp": pa.array([0, DAY, 100 * DAY, 100 * DAY, 101 * DAY], pa.int64()),
        }
    )
    fake(
        run,
        "samples",
        {},
        {"samples": samples, "item_map": pa.table({"iid": pa.array(range(1, 7), pa.int32())})},
    )
    # User 1: positive 3, item 1 excluded; user 2: positives 5 and 6; user 3: positive 6.
    users = pa.Table.from_pylist(
        [
            {"split": "test", "uid": 1, "positives": [3], "exclude": [1], "sampled_positive": 3},
            {"split": "test", "uid": 2, "positives": [5, 6], "exclude": [], "sampled_positive": 5},
            {"split": "test", "uid": 3, "positives": [6], "exclude": [], "sampled_positive": 6},
        ],
        schema=pa.schema(
            [
                ("split", pa.string()),
                ("uid", pa.int32()),
                ("positives", pa.list_(pa.int32())),
                ("exclude", pa.list_(pa.int32())),
                ("sampled_positive", pa.int32()),
            ]
        ),
    )
    candidates = pa.Table.from_pylist(
        lists("full", {1: [2, 3, 4], 2: [1, 2, 5], 3: [6, 1, 2]})
        + lists("sampled", {1: [4, 3, 6], 2: [5, 1, 2], 3: [1, 6, 2]})
    )
    fake(run, "retrieve", {}, {"users": users, "candidates": candidates})
    recs = pa.Table.from_pylist(lists("full", {1: [3, 2], 2: [2, 1]}, mode="binary"))
    # The blend kept the codes' order for user 1 (2, 3) and swapped user 2's (1, 2).
    recs = recs.append_column("blend_rank", pa.array([2, 1, 2, 1], pa.int32()))
    blend = {
        "alpha": 0.5,
        "chosen_by": "valid NDCG@10",
        "valid_users": 4,
        "valid_ndcg@10": {"0": 0.25, "0.5": 0.375, "1": 0.125},
        "valid_lift": 0.125,
    }
    fake(run, "rerank", {"blend": {"binary": blend}}, {"recommendations": recs})
    manifest = run_stage(cfg, next(s for s in STAGES if s.name == "evaluate"))
    ranking = pl.from_arrow(read_output(str(run / "evaluate"), "ranking"))

    def value(method: str, users: str, k: int, key: str = "ndcg", protocol: str = "full"):
        row = ranking.filter(
            (pl.col("method") == method)
            & (pl.col("users") == users)
            & (pl.col("k") == k)
            & (pl.col("protocol") == protocol)
        )
        assert row.height == 1, (method, users, k, protocol)
        return row.row(0, named=True)

    g = 1 / np.log2(3)  # the gain of rank 2
    # Every user is measured (all: 3); the LLM's 2 users again with every method (reranked).
    assert (
        value("codes", "all", 5)["n_users"] == 3 and value("codes", "reranked", 5)["n_users"] == 2
    )
    # codes: user 1 hits at rank 2; user 2 at rank 3 out of an ideal of two hits; user 3 at 1.
    assert value("codes", "all", 5)["ndcg"] == pytest.approx((g + 0.5 / (1 + g) + 1) / 3)
    assert value("codes", "reranked", 5)["ndcg"] == pytest.approx((g + 0.5 / (1 + g)) / 2)
    assert value("codes", "reranked", 5)["recall"] == pytest.approx((1 + 0.5) / 2)
    # The LLM moved user 1's positive to rank 1; user 2's positives were never re-ranked.
    assert ranking.filter((pl.col("method") == "codes+llm") & (pl.col("users") == "all")).is_empty()
    assert value("codes+llm", "reranked", 2)["ndcg"] == pytest.approx(0.5)
    retrieved = value("codes+llm", "retrieved", 2)
    assert retrieved["n_users"] == 1 and retrieved["ndcg"] == pytest.approx(1.0)
    assert value("codes", "retrieved", 5)["ndcg"] == pytest.approx(g)
    # The blend: user 1's positive at rank 2 (as the codes), user 2's never re-ranked.
    assert ranking.filter((pl.col("method") == "blend") & (pl.col("users") == "all")).is_empty()
    blended = value("blend", "reranked", 2)
    assert blended["ndcg"] == pytest.approx(g / 2) and blended["mode"] == "binary"
    assert blended["ndcg_low"] <= blended["ndcg"] <= blended["ndcg_high"]  # intervals as the rest
    # popularity (train positives: 4, then 1 and 2, then ids): user 1 without its excluded
    # item 1 finds 3 at rank 3; user 2 finds 5 at rank 5; user 3 finds 6 at rank 6.
    pop = (1 / np.log2(4) + (1 / np.log2(6)) / (1 + g)) / 2
    assert value("popularity", "reranked", 5)["ndcg"] == pytest.approx(pop)
    assert value("popularity", "all", 5)["ndcg"] == pytest.approx(pop * 2 / 3)
    # time-aware popularity, 7 days chosen on valid: items 1 and 2 (ties: id), then 4 (train
    # popularity), then ids: user 1 (without item 1) finds 3 at rank 3, user 2 5 at rank 5.
    assert manifest["metrics"]["popularity_window"]["days"] == 7
    assert manifest["metrics"]["popularity_window"]["valid_ndcg@10"] == {
        "7": pytest.approx(1.0),
        "365": pytest.approx(g),
    }
    recent = value("recent_popularity", "all", 5)
    assert recent["ndcg"] == pytest.approx((1 / np.log2(4) + (1 / np.log2(6)) / (1 + g)) / 3)
    # sampled pools in the same order: 3 second of (4, 3, 6), 5 and 6 third of their pools.
    sampled = value("recent_popularity", "all", 5, key="mrr", protocol="sampled")
    assert sampled["mrr"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 3) / 3)
    # float inner products: user 1 (1, 0) ranks item 3 first, users 2 and 3 (0, 1) 6 and 5.
    assert value("float", "all", 5)["ndcg"] == pytest.approx(1.0)
    sampled = value("codes", "reranked", 5, protocol="sampled")
    assert sampled["mrr"] == pytest.approx((1 / 2 + 1) / 2)
    for row in ranking.iter_rows(named=True):  # every figure inside its interval
        for key in ("recall", "ndcg", "hr", "mrr"):
            assert row[f"{key}_low"] - 1e-12 <= row[key] <= row[f"{key}_high"] + 1e-12, row
    headline = manifest["metrics"]["ranking"]
    assert {(r["method"], r["users"]) for r in headline if r["protocol"] == "full"} == {
        ("codes", "all"),
        ("popularity", "all"),
        ("recent_popularity", "all"),
        ("float", "all"),
        ("codes", "reranked"),  # what the blend must beat, on the same users
    }  # codes+llm has no K = 10 here: it re-ranks 2
    folder = next((run / "evaluate").glob("v-*/report"))
    report = (folder / "report.md").read_text()
    codes10 = value("codes", "all", 10)
    assert (
        "**test, NDCG@10 on every user with a positive (3), full catalog:** codes "
        f"{codes10['ndcg']:.4f} [{codes10['ndcg_low']:.4f}, {codes10['ndcg_high']:.4f}]"
    ) in report
    # The codes against their float model on the same users, with a paired interval.
    ratios = {(r["protocol"], r["split"]): r for r in manifest["metrics"]["ratios"]}
    assert set(ratios) == {("full", "test"), ("sampled", "test")}
    ratio = ratios["full", "test"]
    float10 = value("float", "all", 10)
    assert ratio["ratio"] == pytest.approx(codes10["ndcg"] / float10["ndcg"])
    assert ratio["low"] <= ratio["ratio"] <= ratio["high"] and ratio["n_users"] == 3
    assert f"codes / float {ratio['ratio']:.3f} [{ratio['low']:.3f}, " in report
    assert "time-aware popularity (7 days)" in report and "W = **7 days**" in report
    assert "Split `per_user`" in report and "### test, full ranking" in report
    assert "Retriever (codes, all users)" in report
    assert (  # no lift over codes: the blend's K (2) is none of the codes' (5, 10, 20)
        "`blend` in `binary`: α = **0.5** (valid NDCG@10); valid NDCG@10 of the blended lists "
        "over 4 re-ranked valid users (`rerank.alpha_grid`): 0 0.2500, **0.5 0.3750**, 1 0.1250; "
        "lift over the retriever (α = 0) +0.1250. \n"
    ) in report
    assert "| blend | binary | reranked | 2 |" in report
    for name in ("ranking_test_full.png", "ranking_test_full_reranked.png"):
        assert f"({name})" in report and (folder / name).read_bytes().startswith(b"\x89PNG")
