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
from pipelines.ops.retrieval import CANDIDATES_SCHEMA
from pipelines.runtime.stage import run_stage
from tests.builders import fake_run, publish_stage, stage

pytestmark = pytest.mark.slow  # scoring actor pool

USERS_SCHEMA = pa.schema(
    [
        ("split", pa.string()),
        ("uid", pa.int32()),
        ("positives", pa.list_(pa.int32())),
        ("history", pa.list_(pa.int32())),
    ]
)
SPLITS = {1: "valid", 2: "valid", 3: "valid", 4: "valid", 5: "test", 6: "test"}


def fake_retrieve(run: Path) -> None:
    """Valid users 1-4 and test users 5-6, each with 5 candidates (distances with ties) and one
    positive among them."""
    users, rows = [], []
    for uid, split in SPLITS.items():
        items = [1 + (uid + 2 * r) % 11 for r in range(5)]
        users.append({"split": split, "uid": uid, "positives": [items[uid % 5]], "history": [12]})
        for r, iid in enumerate(items):
            rows.append(
                {
                    "protocol": "full",
                    "split": split,
                    "uid": uid,
                    "iid": iid,
                    "user": f"u{uid}",
                    "item": f"i{iid}",
                    "rank": r + 1,
                    "hamming": r // 2,
                    "tie": 0.0,
                    "source": "hamming",
                }
            )
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
