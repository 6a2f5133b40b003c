"""End to end on a real Ray head: the tiny pipeline as a Ray job, then a scoring job.

The heaviest test (~4 minutes on 2 cores): it starts its own head (``ray start --head --block``
in its own process group, stopped by that group's id, never ``ray stop``), submits
``python -m jobs.pipeline configs/tiny.yaml`` and ``python -m jobs.score`` with
``JobSubmissionClient`` and the repository's ``jobs/runtime_env.yaml``, and reads the scores back
with polars.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from binllm_core.storage import MANIFEST, read_output
from tests.builders import free_port
from tests.jobs.cluster import FAST, REPO, start_head, stop_groups, submit, wait_for_dashboard

pytestmark = pytest.mark.slow  # a Ray head and job submission


@pytest.fixture
def ray_head(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A Ray head of our own with 2 CPUs (one node); yields the dashboard (job API) address."""
    pytest.importorskip(
        "ray.dashboard.optional_deps", reason="job submission needs ray[default] (the dashboard)"
    )
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    gcs, dash = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    head = start_head(gcs, dash, temp_dir, REPO, subprocess.DEVNULL, num_cpus=2)
    address = f"http://127.0.0.1:{dash}"
    try:
        wait_for_dashboard(address, head)
        yield address
    finally:
        stop_groups([head])
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit_and_wait(address: str, entrypoint: str, timeout: float) -> str:
    status, logs = submit(address, entrypoint, timeout)
    assert status == "SUCCEEDED", logs[-4000:]
    return logs


def test_pipeline_job_then_scoring_job(ray_head: str, tmp_path: Path):
    out = tmp_path / "runs"
    sets = " ".join(f"--set {s}" for s in [f"output_root={out}", *FAST])
    logs = submit_and_wait(ray_head, f"python -m jobs.pipeline configs/tiny.yaml {sets}", 480)
    assert "[binllm] evaluate: done" in logs

    run = out / "tiny"
    scores = pl.from_arrow(read_output(str(run / "score"), "scores"))
    assert scores.height == scores.select("sample_id", "mode").unique().height
    assert set(scores["mode"]) == {"text", "binary"}
    assert scores["p_yes"].is_between(0, 1).all()
    report = run / json.loads((run / "evaluate" / MANIFEST).read_text())["metrics"]["report"]
    assert report.exists() and (report.parent / "roc_test.png").exists()

    pq.write_table(
        pa.table({"user": ["1", "2", "nobody", "3"], "item": ["10", "11", "12", "no-item"]}),
        tmp_path / "pairs.parquet",
    )
    target = tmp_path / "scored"
    submit_and_wait(
        ray_head,
        f"python -m jobs.score --run {run} --input {tmp_path / 'pairs.parquet'} --output {target}",
        120,
    )
    got = pl.from_arrow(read_output(str(target), "scores")).sort("row")
    assert got["user"].to_list() == ["1", "2", "nobody", "3"]
    assert got["cold"].to_list() == [False, False, True, True]
    assert got["mode"].to_list() == ["binary", "binary", "text", "text"]
    assert got.filter(pl.col("mode") == "text")["adapter"].str.ends_with("step1").all()
    assert got.filter(pl.col("mode") == "binary")["adapter"].str.ends_with("step2").all()
    assert (target / "_manifest.json").exists()
