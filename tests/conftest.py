"""Shared fixtures: one local Ray for the whole session, paths to the shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.builders import free_port, s3_options

# Ray Train's controller polls its workers every 2 s by default, so each of the tests' short
# TorchTrainer runs spent ~8 s waiting on polls (a no-op 2-worker fit here: 20 s at 2 s, 12 s at
# 0.25 s). Set before any Ray starts, so that every process inherits it: Ray's workers, the
# CLI's subprocesses and the job-submission test's head. A missed poll is only a late one
# (a worker is declared hung after RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, 10 minutes).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ML100K = SHARED / "data" / "ml-100k"
SMOLLM_GGUF = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
FIXTURES = REPO / "tests" / "fixtures"


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray, started once (starting Ray costs seconds on 2 cores)."""
    import ray

    from pipelines.runtime.ray_helpers import ensure_ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ensure_ray()
    yield
    ray.shutdown()


@pytest.fixture
def ml100k_dir() -> Path:
    if not (ML100K / "ml-100k.inter").exists():
        pytest.skip(f"shared MovieLens 100K not found at {ML100K}")
    return ML100K


@pytest.fixture(scope="session")
def s3_server() -> str:
    """A real S3 API (moto's server mode) on a free local port; its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: str) -> tuple[str, dict]:
    """A new, empty bucket: its ``s3://`` root and the storage options that reach it."""
    import uuid

    import s3fs

    options = s3_options(s3_server)
    name = f"b{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**options).mkdir(name)
    return f"s3://{name}", options
