"""Stage ``samples`` on a local Ray, after a fake finished ingest stage."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from binllm_core.config import RunConfig, load_config
from binllm_core.errors import StageError
from binllm_core.storage import MANIFEST, read_output
from pipelines.runtime.stage import Stage, StageContext, run_stage
from pipelines.stages import samples

SAMPLES = Stage("samples", samples.run, ("protocol",), ("ingest",))


def make_cfg(tmp_path: Path, *sets: str) -> RunConfig:
    return load_config("configs/tiny.yaml", [f"output_root={tmp_path}", "run_name=t", *sets])


def fake_ingest(table: pa.Table, items: list[str] | None = None) -> Stage:
    """An ``ingest`` stage that writes ``table`` as its ``interactions`` and ``items`` (default:
    every item of the table) as its items."""

    def fn(ctx: StageContext) -> dict:
        ctx.write_table(table, "interactions")
        known = items if items is not None else sorted(set(table["item"].to_pylist()))
        ctx.write_table(pa.table({"item": known, "title": [f"T {i}" for i in known]}), "items")
        return {}

    return Stage("ingest", fn, ("data",))


def tiny_interactions(users: int = 12, per_user: int = 10) -> pa.Table:
    n = users * per_user
    return pa.table(
        {
            "user": [f"u{k // per_user}" for k in range(n)],
            "item": [f"i{(k * 7) % 23}" for k in range(n)],
            "rating": pa.array(
                [float(1 + (3 * k + k // per_user) % 5) for k in range(n)], pa.float32()
            ),
            "timestamp": pa.array([1_000 + (k % per_user) * 60 for k in range(n)], pa.int64()),
            "row": pa.array(range(n), pa.int64()),
        }
    )


def read(tmp_path: Path, table: str) -> pa.Table:
    return read_output(str(tmp_path / "t" / "samples"), table)


def test_stage_writes_samples_maps_and_metrics(ray_session, tmp_path: Path):
    cfg = make_cfg(tmp_path)
    run_stage(cfg, fake_ingest(tiny_interactions()))
    manifest = run_stage(cfg, SAMPLES)
    metrics = manifest["metrics"]
    assert (metrics["train_rows"], metrics["valid_rows"], metrics["test_rows"]) == (96, 12, 12)
    assert (metrics["user_num"], metrics["item_num"]) == (13, 24)
    assert metrics["valid_small_rows"] == 6 and metrics["protocol"] == "tiny"
    assert manifest["tables"]["samples"]["schema"] == {
        "sample_id": "int64",
        "uid": "int32",
        "iid": "int32",
        "label": "int8",
        "rating": "float",
        "timestamp": "int64",
        "split": "string",
        "valid_small": "bool",
        "history": "list<element: int32>",
        "not_cold": "bool",
        "warm": "bool",
    }
    table = read(tmp_path, "samples")
    assert table["sample_id"].to_pylist() == list(range(120))
    assert read(tmp_path, "user_map").schema.names == ["user", "uid"]
    assert read(tmp_path, "item_map").num_rows == 23
    assert run_stage(cfg, SAMPLES)["skipped"]


def test_empty_split_fails_and_writes_nothing(ray_session, tmp_path: Path):
    cfg = make_cfg(
        tmp_path,
        "protocol.split=months",
        "protocol.train_months=[2001-06, 2002-03]",
        "protocol.valid_months=[2002-04, 2002-08]",
        "protocol.test_months=[2002-09, 2003-01]",
    )
    run_stage(cfg, fake_ingest(tiny_interactions()))
    with pytest.raises(StageError, match="protocol tiny leaves split train empty: 0 of 120"):
        run_stage(cfg, SAMPLES)
    assert not (tmp_path / "t" / "samples" / MANIFEST).exists()


def test_a_split_with_a_single_label_fails_and_writes_nothing(ray_session, tmp_path: Path):
    cfg = make_cfg(tmp_path, "protocol.label_min_rating=6")  # ratings are 1..5: no positive
    run_stage(cfg, fake_ingest(tiny_interactions()))
    with pytest.raises(StageError) as err:
        run_stage(cfg, SAMPLES)
    assert str(err.value) == (
        "protocol tiny: every one of the 96 train samples is negative with label_min_rating 6 "
        "(their ratings span 1..5); set protocol.label_min_rating inside the ratings' range"
    )
    assert not (tmp_path / "t" / "samples" / MANIFEST).exists()


def test_orphans_and_exact_duplicates_go_to_rejects_unless_kept(ray_session, tmp_path: Path):
    table = tiny_interactions()
    n = table.num_rows
    extra = pa.table(
        {
            "user": ["u0", "u1", "u2"],
            "item": ["i0", "ghost", "i3"],
            "rating": pa.array([table["rating"][0].as_py(), 5.0, 5.0], pa.float32()),
            "timestamp": pa.array([table["timestamp"][0].as_py(), 1_000, 1_000], pa.int64()),
            "row": pa.array(range(n, n + 3), pa.int64()),
        }
    )
    items = sorted(set(table["item"].to_pylist()))
    cfg = make_cfg(tmp_path)
    # The copy comes first in the table, the first in the source (row 0) is kept.
    run_stage(cfg, fake_ingest(pa.concat_tables([extra, table]), items))
    metrics = run_stage(cfg, SAMPLES)["metrics"]
    assert (metrics["dropped_orphans"], metrics["dropped_duplicates"]) == (1, 1)
    assert metrics["rows"] == n + 1  # u2's i3 at 1000 is no copy (another rating time)
    dropped = read(tmp_path, "dropped").to_pylist()
    assert [(r["user"], r["item"], r["reason"]) for r in dropped] == [
        ("u0", "i0", "exact duplicate of the interaction at byte offset 0"),
        ("u1", "ghost", "item ghost is not in the items file"),
    ]
    kept = make_cfg(tmp_path, "protocol.orphans=keep", "protocol.duplicates=keep")
    metrics = run_stage(kept, SAMPLES)["metrics"]
    assert (metrics["orphan_rows"], metrics["duplicate_rows"], metrics["rows"]) == (1, 1, n + 3)
    assert read(tmp_path, "dropped").num_rows == 0


def test_missing_column_is_a_data_error(ray_session, tmp_path: Path):
    cfg = make_cfg(tmp_path)
    run_stage(cfg, fake_ingest(tiny_interactions().drop_columns(["row"])))
    with pytest.raises(Exception, match="interactions lack column.s. row") as err:
        run_stage(cfg, SAMPLES)
    assert "\n" not in str(err.value)


def test_after_the_real_ingest_on_the_tiny_fixture(ray_session, tmp_path: Path):
    from pipelines.runtime.registry import run_pipeline

    manifests = run_pipeline(make_cfg(tmp_path), ["ingest", "samples"], log=lambda _: None)
    metrics = manifests["samples"]["metrics"]
    assert sum(metrics[f"{s}_rows"] for s in ("train", "valid", "test")) == 600
    table = read(tmp_path, "samples")
    assert table["sample_id"].to_pylist() == list(range(600))
