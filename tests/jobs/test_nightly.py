"""Nightly scoring: a date's partition is replaced whole, never duplicated or half-written, and
never written by two nightlies at once."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from binllm_core import storage
from binllm_core.errors import DataError
from binllm_core.io.lock import LockedError, WriterLock
from binllm_core.storage import read_output
from pipelines import nightly as scoring
from pipelines.pairs import CANDIDATE_SCORES_SCHEMA, score_candidates
from tests.builders import candidates, fake_run

pytestmark = pytest.mark.slow  # scoring actor pools

DATE = "2026-11-22"
IDENTITY = ["user", "item", "mode", "cold", "prompt_hash", "logit_yes", "p_yes", "adapter_hash"]


def partition(cfg, date: str = DATE) -> pl.DataFrame:
    return pl.from_arrow(scoring.read_nightly(cfg, date)).sort("user", "item")


def test_nightly_twice_same_partition_then_failure_keeps_it(
    tmp_path: Path, ray_session, monkeypatch: pytest.MonkeyPatch
):
    cfg = fake_run(tmp_path, "score.batch_size=8", "score.sort_window=2")
    cands = candidates(tmp_path / "c.parquet")
    first = scoring.run_nightly(cfg, str(cands), DATE, log=lambda _: None)
    folder = tmp_path / "f" / "nightly" / f"date={DATE}"
    one = partition(cfg)
    rows = first["tables"]["scores"]["rows"]
    assert one.height == one.select("user", "item").unique().height == rows
    assert one.filter(pl.col("user") == "u9")["cold"].all()
    assert one.filter(pl.col("user") == "u9")["mode"].unique().to_list() == ["text"]
    manifest = json.loads((folder / "_manifest.json").read_text())
    assert manifest["date"] == DATE and manifest["tables"]["scores"]["rows"] == one.height

    scoring.run_nightly(cfg, str(cands), DATE, log=lambda _: None)
    two = partition(cfg)
    assert two.height == one.height
    assert two.select(IDENTITY).equals(one.select(IDENTITY))
    assert litter(folder) == []

    # Incremental: every pair is carried over (same prompt, model and adapter), same scores.
    third = scoring.run_nightly(cfg, str(cands), DATE, incremental=True, log=lambda _: None)
    assert third["metrics"]["carried_rows"] == one.height
    carried = partition(cfg)
    assert carried["carried"].all() and carried.select(IDENTITY).equals(one.select(IDENTITY))

    # A failure after the new files are written, before the pointer: the old partition stays.
    before = sorted(p.name for p in folder.iterdir())

    def broken_put(*args, **kwargs):
        raise RuntimeError("disk gone")

    monkeypatch.setattr(storage, "put_atomically", broken_put)
    with pytest.raises(RuntimeError, match="disk gone"):
        scoring.run_nightly(cfg, str(cands), DATE, log=lambda _: None)
    assert sorted(p.name for p in folder.iterdir()) == before
    assert partition(cfg).select(IDENTITY).equals(carried.select(IDENTITY))
    assert litter(folder) == []
    monkeypatch.undo()

    # A bad input (unknown user under score.unknown=error) also leaves it as it was.
    strict = fake_run(tmp_path, "score.unknown=error")
    with pytest.raises(DataError, match="never seen by the encoder"):
        scoring.run_nightly(strict, str(cands), DATE, log=lambda _: None)
    assert sorted(p.name for p in folder.iterdir()) == before


def litter(folder: Path) -> list[str]:
    """What is in a partition besides its manifest and its one current version."""
    names = [p.name for p in folder.iterdir() if p.name != "_manifest.json"]
    current = json.loads((folder / "_manifest.json").read_text())["version"]
    return [n for n in names if n != current]


def test_second_nightly_of_a_date_stops_at_once_naming_the_holder(tmp_path: Path, ray_session):
    cfg = fake_run(tmp_path)
    cands = candidates(tmp_path / "c.parquet")
    folder = tmp_path / "f" / "nightly" / f"date={DATE}"
    fs, path = storage.resolve(str(folder))
    with WriterLock(fs, f"{path}/_lock.json", "the first nightly", lambda _: None):
        with pytest.raises(LockedError, match="is being written by") as err:
            scoring.run_nightly(cfg, str(cands), DATE, log=lambda _: None)
    assert "\n" not in str(err.value) and "pid" in str(err.value)
    assert not (folder / "_manifest.json").exists()
    # The holder gone, the same nightly runs.
    scoring.run_nightly(cfg, str(cands), DATE, log=lambda _: None)
    assert litter(folder) == []


def test_skip_policy_and_bad_date(tmp_path: Path, ray_session):
    cfg = fake_run(tmp_path, "score.unknown=skip")
    cands = candidates(tmp_path / "c.parquet", n=18)
    out = scoring.run_nightly(cfg, str(cands), "2026-01-02", log=lambda _: None)
    got = partition(cfg, "2026-01-02")
    assert not got["cold"].any() and out["metrics"]["skipped_rows"] > 0
    assert got.height + out["metrics"]["skipped_rows"] == 18
    with pytest.raises(Exception, match="YYYY-MM-DD"):
        scoring.run_nightly(cfg, str(cands), "22/11/2026", log=lambda _: None)
    with pytest.raises(Exception, match="'2026-13-45' is not a calendar date"):
        scoring.run_nightly(cfg, str(cands), "2026-13-45", log=lambda _: None)


def test_empty_candidates_give_an_empty_typed_result(tmp_path: Path, ray_session):
    cfg = fake_run(tmp_path)
    empty = tmp_path / "empty.parquet"
    pq.write_table(
        pa.table({"user": pa.array([], pa.string()), "item": pa.array([], pa.string())}), empty
    )
    night = scoring.run_nightly(cfg, str(empty), "2026-01-03", log=lambda _: None)
    pairs = score_candidates(cfg, str(empty), log=lambda _: None)
    for manifest in (night, pairs):
        assert manifest["metrics"]["input_rows"] == 0
        scores = read_output(manifest["output"], "scores")
        assert scores.num_rows == 0 and scores.schema.equals(CANDIDATE_SCORES_SCHEMA)
