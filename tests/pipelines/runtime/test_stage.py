"""The stage contract: manifest last, skip when unchanged, --force, failures keep old output."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from binllm_core.config import RunConfig, load_config
from binllm_core.errors import StageError
from binllm_core.storage import MANIFEST, read_output
from pipelines.runtime.stage import Stage, StageContext, run_stage


def make_cfg(tmp_path: Path, **overrides: str) -> RunConfig:
    sets = [f"output_root={tmp_path}", "run_name=t", *(f"{k}={v}" for k, v in overrides.items())]
    return load_config("configs/tiny.yaml", sets)


def counting_stage(calls: list[int], fail: bool = False) -> Stage:
    def fn(ctx: StageContext) -> dict:
        calls.append(1)
        ctx.write_table(pa.table({"x": [1, 2, 3]}), "numbers")
        if fail:
            raise RuntimeError("boom")
        return {"n": 3}

    return Stage("demo", fn, ("data",))


def test_manifest_records_rows_schema_and_hash(tmp_path: Path):
    manifest = run_stage(make_cfg(tmp_path), counting_stage([]))
    on_disk = json.loads((tmp_path / "t" / "demo" / MANIFEST).read_text())
    assert on_disk["tables"]["numbers"]["rows"] == 3
    assert on_disk["tables"]["numbers"]["schema"] == {"x": "int64"}
    assert on_disk["metrics"] == {"n": 3}
    assert on_disk["config_hash"] == manifest["config_hash"]
    assert "ray" in on_disk["packages"] and on_disk["wall_time_s"] >= 0
    versions = list((tmp_path / "t" / "demo").glob("v-*"))
    assert [v.name for v in versions] == [on_disk["version"]]
    assert on_disk["tables"]["numbers"]["path"] == f"{on_disk['version']}/numbers"
    assert read_output(str(tmp_path / "t" / "demo"), "numbers").column("x").to_pylist() == [1, 2, 3]


def test_unchanged_config_skips_and_force_redoes(tmp_path: Path):
    calls: list[int] = []
    run_stage(make_cfg(tmp_path), counting_stage(calls))
    assert run_stage(make_cfg(tmp_path), counting_stage(calls))["skipped"]
    assert len(calls) == 1
    run_stage(make_cfg(tmp_path), counting_stage(calls), force=True)
    assert len(calls) == 2
    run_stage(make_cfg(tmp_path, **{"data.uri": "elsewhere"}), counting_stage(calls))
    assert len(calls) == 3


def test_failed_rerun_keeps_previous_output_whole(tmp_path: Path):
    run_stage(make_cfg(tmp_path), counting_stage([]))
    before = (tmp_path / "t" / "demo" / MANIFEST).read_text()
    with pytest.raises(RuntimeError):
        run_stage(make_cfg(tmp_path), counting_stage([], fail=True), force=True)
    assert (tmp_path / "t" / "demo" / MANIFEST).read_text() == before
    version = json.loads(before)["version"]
    assert len(list((tmp_path / "t" / "demo" / version / "numbers").glob("*.parquet"))) == 1
    assert read_output(str(tmp_path / "t" / "demo"), "numbers").column("x").to_pylist() == [1, 2, 3]
    assert [v.name for v in (tmp_path / "t" / "demo").glob("v-*")] == [version]


def test_missing_upstream_is_one_line(tmp_path: Path):
    stage = Stage("after", lambda ctx: {}, ("data",), ("demo",))
    with pytest.raises(Exception, match="has not finished") as err:
        run_stage(make_cfg(tmp_path), stage)
    assert "\n" not in str(err.value)


def test_manifest_masks_credentials(tmp_path: Path):
    options = "{key: AKIA1, secret: s3cr3t, anon: false}"
    cfg = make_cfg(tmp_path, **{"data.storage_options": options})
    run_stage(cfg, counting_stage([]))
    text = (tmp_path / "t" / "demo" / MANIFEST).read_text()
    assert "s3cr3t" not in text and "AKIA1" not in text and '"anon": false' in text


def test_a_skipped_stage_whose_files_do_not_match_its_manifest_is_redone(tmp_path: Path):
    calls: list[int] = []
    first = run_stage(make_cfg(tmp_path), counting_stage(calls))
    folder = tmp_path / "t" / "demo" / first["tables"]["numbers"]["path"]
    (part,) = folder.glob("*.parquet")
    part.write_bytes(b"not parquet")  # a file cut short or overwritten
    again = run_stage(make_cfg(tmp_path), counting_stage(calls))
    assert not again["skipped"] and len(calls) == 2
    assert again["why"].startswith("redone: its files no longer matched its manifest (")
    assert f"{part.name} is not readable Parquet" in again["why"]
    assert read_output(str(tmp_path / "t" / "demo"), "numbers")["x"].to_pylist() == [1, 2, 3]

    folder = tmp_path / "t" / "demo" / again["tables"]["numbers"]["path"]
    for f in folder.glob("*.parquet"):
        f.unlink()  # a file gone
    third = run_stage(make_cfg(tmp_path), counting_stage(calls))
    assert "table numbers has 0 rows on disk, 3 in the manifest" in third["why"]
    assert run_stage(make_cfg(tmp_path), counting_stage(calls))["skipped"] and len(calls) == 3


def test_a_stage_whose_upstream_files_are_damaged_names_the_file(tmp_path: Path):
    first = run_stage(make_cfg(tmp_path), counting_stage([]))
    (part,) = (tmp_path / "t" / "demo" / first["tables"]["numbers"]["path"]).glob("*.parquet")
    part.write_bytes(b"PAR1 cut short")

    def reader(ctx: StageContext) -> dict:
        return {"rows": ctx.read_table("demo", "numbers").num_rows}

    with pytest.raises(StageError) as err:
        run_stage(make_cfg(tmp_path), Stage("after", reader, ("data",), ("demo",)))
    message = str(err.value)
    assert message.startswith("stage after reads stage demo, whose files no longer match")
    assert f"{part} is not readable Parquet" in message and "--stages demo" in message


def test_a_lowered_keep_versions_prunes_a_skipped_stage(tmp_path: Path):
    calls: list[int] = []
    for _ in range(3):
        run_stage(make_cfg(tmp_path, keep_versions="3"), counting_stage(calls), force=True)
    folder = tmp_path / "t" / "demo"
    assert len(list(folder.glob("v-*"))) == 3
    skipped = run_stage(make_cfg(tmp_path, keep_versions="1"), counting_stage(calls))
    assert skipped["skipped"] and skipped["history"] == [] and len(calls) == 3
    on_disk = json.loads((folder / MANIFEST).read_text())
    assert [v.name for v in folder.glob("v-*")] == [on_disk["version"]]
    assert on_disk["history"] == [] and on_disk["identity"] == skipped["identity"]
