"""Stage rerank on a fake finished run: the LLM's lists and the blend that ships, its weight
chosen on the valid users' lists and recorded with its valid curve."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from binllm_core.ranking.blend import choose_alpha
from binllm_core.ranking.metrics import ranking_metrics
from binllm_core.storage import read_output
from pipelines.ops.candidates import choose_union
from pipelines.ops.retrieval import CANDIDATES_SCHEMA
from pipelines.runtime.stage import StageContext, run_stage
from tests.builders import N_ITEMS, fake_run, publish_stage, stage

pytestmark = pytest.mark.slow  # scoring actor pool

USERS_SCHEMA = pa.schema(
    [
        ("split", pa.string()),
        ("uid", pa.int32()),
        ("positives", pa.list_(pa.int32())),
        ("history", pa.list_(pa.int32())),
        ("exclude", pa.list_(pa.int32())),
    ]
)
SPLITS = {1: "valid", 2: "valid", 3: "valid", 4: "valid", 5: "test", 6: "test"}


def candidate(protocol: str, split: str, uid: int, iid: int, rank: int, hamming: int) -> dict:
    """One row of ``retrieve/candidates``."""
    return {
        "protocol": protocol,
        "split": split,
        "uid": uid,
        "iid": iid,
        "user": f"u{uid}",
        "item": f"i{iid}",
        "rank": rank,
        "hamming": hamming,
        "tie": 0.0,
        "source": "hamming",
    }


def fake_retrieve(run: Path) -> None:
    """Valid users 1-4 and test users 5-6, each with 5 candidates (distances with ties) and one
    positive among them."""
    users, rows = [], []
    for uid, split in SPLITS.items():
        items = [1 + (uid + 2 * r) % 11 for r in range(5)]
        positives = [items[uid % 5]]
        users.append(
            {"split": split, "uid": uid, "positives": positives, "history": [12], "exclude": []}
        )
        rows += [candidate("full", split, uid, iid, r + 1, r // 2) for r, iid in enumerate(items)]
    tables = {
        "users": pa.Table.from_pylist(users, schema=USERS_SCHEMA),
        "candidates": pa.Table.from_pylist(rows, schema=CANDIDATES_SCHEMA),
    }
    publish_stage(run, "retrieve", tables)
    publish_stage(run, "finetune", {})


def test_rerank_chooses_the_blend_on_valid_and_writes_both_orders(tmp_path: Path, ray_session):
    sets = ["rerank.modes=[binary]", "retrieve.splits=[valid,test]", "retrieve.top_n=5"]
    cfg = fake_run(tmp_path, *sets, "rerank.top_n=4", "rerank.max_users=0", "score.batch_size=8")
    fake_retrieve(tmp_path / "f")
    blend = run_stage(cfg, stage("rerank"))["metrics"]["blend"]["binary"]
    recs = pl.from_arrow(read_output(str(tmp_path / "f" / "rerank"), "recommendations"))
    assert recs.height == len(SPLITS) * 4
    for _, part in recs.group_by(["split", "uid"]):
        assert part["rank"].to_list() == [1, 2, 3, 4]  # rows in the LLM's order
        assert part["score"].is_sorted(descending=True)
        shipped = part.sort("blend_rank")
        assert shipped["blend_rank"].to_list() == [1, 2, 3, 4]
        assert shipped["blend_score"].is_sorted(descending=True)
    curve = {float(a): v for a, v in blend["valid_ndcg@10"].items()}
    assert list(curve) == cfg.rerank.alpha_grid and blend["valid_users"] == 4
    assert blend["alpha"] == choose_alpha(curve) and blend["chosen_by"] == "valid NDCG@10"
    assert blend["valid_lift"] == pytest.approx(curve[blend["alpha"]] - curve[0.0])
    assert blend["valid_lift"] >= 0
    # The table's blended valid lists are the ones the curve measured at the chosen weight.
    valid = recs.filter(pl.col("split") == "valid").sort("uid", "blend_rank")
    lists = {u: p["iid"].to_numpy() for (u,), p in valid.group_by(["uid"], maintain_order=True)}
    positives = {u: np.array([1 + (u + 2 * (u % 5)) % 11]) for u in lists}
    got = ranking_metrics(lists, positives, [10])[10]["ndcg"]
    assert got == pytest.approx(curve[blend["alpha"]])


def test_popular_items_join_the_lists_where_they_raise_valid_recall(tmp_path: Path, ray_session):
    cfg = fake_run(
        tmp_path, "retrieve.splits=[valid,test]", "rerank.top_n=4", "rerank.popular_places=[0,1,2]"
    )
    run = tmp_path / "f"
    samples = pl.from_arrow(read_output(str(run / "samples"), "samples"))
    liked = samples.filter((pl.col("split") == "train") & (pl.col("label") == 1))["iid"].to_numpy()
    counts = np.bincount(liked, minlength=N_ITEMS + 1)
    top = int(np.argmax(counts))  # every train row is inside the shortest window: the most liked
    others = [i for i in range(1, N_ITEMS) if i != top]
    users, rows = [], []
    for uid, split in SPLITS.items():
        items = others[uid % 3 : uid % 3 + 5]
        # Valid users 1-3 liked the popular item the codes missed; user 4 the codes' first.
        positives = [items[0]] if uid in (4, 5, 6) else [top]
        users.append(
            {"split": split, "uid": uid, "positives": positives, "history": [], "exclude": []}
        )
        for protocol in ("full", "sampled"):
            rows += [candidate(protocol, split, uid, iid, r + 1, r) for r, iid in enumerate(items)]
    users_table = pa.Table.from_pylist(users, schema=USERS_SCHEMA)
    candidates = pa.Table.from_pylist(rows, schema=CANDIDATES_SCHEMA)
    publish_stage(run, "retrieve", {"users": users_table, "candidates": candidates})
    union = choose_union(StageContext.open(cfg, "rerank"), users_table, 4)
    assert union is not None
    choice, popular = union
    summary = choice.summary()
    assert summary["valid_recall@4"] == {"0": 0.25, "1": 1.0, "2": 1.0}
    assert summary["places"] == 1 and summary["valid_lift"] == 0.75
    first = candidates.filter(pa.compute.less_equal(candidates["rank"], 4))
    lists = pl.from_arrow(popular.apply(first, 4, 1, {}))
    codes = pl.from_arrow(read_output(str(run / "encode"), "codes")).filter(pl.col("id") > 0)
    bits = {(e, i): np.array(b) for e, i, b in codes.select("entity", "id", "bits").iter_rows()}
    for (protocol, uid), part in lists.group_by(["protocol", "uid"]):
        part = part.sort("rank")
        assert part["rank"].to_list() == [1, 2, 3, 4]
        if protocol == "sampled":  # the sampled pools stay as they were
            assert (part["source"] == "hamming").all()
            continue
        assert part["source"].to_list() == ["hamming"] * 3 + ["popular"]
        assert part["iid"][3] == top
        expected = int((bits["user", uid] != bits["item", top]).sum())
        assert part["hamming"][3] == expected and part["tie"][3] is None
        assert part["item"][3] == f"i{top}" and part["user"][3] == f"u{uid}"
