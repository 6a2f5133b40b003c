"""End to end on a real Ray head: the tiny pipeline as a Ray job, then a scoring job.

The heaviest test (~4 minutes on 2 cores): it starts its own head (``ray start --head --block``
in its own process group, stopped by that group's id, never ``ray stop``), submits
``python -m jobs.pipeline configs/tiny.yaml`` and ``python -m jobs.score`` with
``JobSubmissionClient`` and the repository's ``jobs/runtime_env.yaml``, and reads the scores back
with polars.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from binllm_core.storage import MANIFEST, read_output
from tests.conftest import free_port

pytestmark = pytest.mark.slow  # a Ray head and job submission

REPO = Path(__file__).resolve().parents[2]
FAST_FINETUNE = [
    "finetune.step1.max_steps=4",
    "finetune.step2.max_steps=4",
    "finetune.step1.batch_size=8",
    "finetune.step2.batch_size=8",
    "finetune.step1.warmup_steps=1",
    "finetune.step2.warmup_steps=1",
    "finetune.eval_every=2",
    "retrieve.top_n=0",  # ranking is tested on the trained run of test_lineage, not here
    # Every stage still runs inside the job; these only keep each one short on 2 cores.
    "encoder.max_epochs=3",
    "prompts.modes=[text,binary]",
    "score.splits=[test]",
]


@pytest.fixture
def ray_head(monkeypatch: pytest.MonkeyPatch):
    """A Ray head of our own; yields the dashboard (job API) address."""
    pytest.importorskip(
        "ray.dashboard.optional_deps", reason="job submission needs ray[default] (the dashboard)"
    )
    port, dash = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray_bin = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            f"--dashboard-port={dash}",
            # Fixed defaults (e.g. the agent's 52365) clash with any other Ray on the machine.
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            "--num-cpus=2",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.time() + 120
        while True:
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.time() > deadline or head.poll() is not None:
                    raise
                time.sleep(2)
        yield address
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=5)  # `ray start --block` often outlives SIGTERM: then SIGKILL
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(head.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def submit_and_wait(address: str, entrypoint: str, timeout: float) -> str:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    runtime_env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    runtime_env["working_dir"] = str(REPO)
    # The tests' Ray Train poll interval (conftest), for the job's own processes too.
    runtime_env["env_vars"]["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = os.environ[
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
    ]
    deadline = time.time() + 120
    while True:
        try:
            job = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
            break
        except RuntimeError as err:
            # The head answers list_jobs before its job agent is up on a loaded machine.
            if "No available agent" not in str(err) or time.time() > deadline:
                raise
            time.sleep(3)
    deadline = time.time() + timeout
    while True:
        status = client.get_job_status(job)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        assert time.time() < deadline, f"job {job} still {status} after {timeout}s"
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    return logs


def test_pipeline_job_then_scoring_job(ray_head: str, tmp_path: Path):
    out = tmp_path / "runs"
    sets = " ".join(f"--set {s}" for s in [f"output_root={out}", *FAST_FINETUNE])
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
