"""Shared fixtures: one local Ray for the whole session, paths to the shared data."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ML100K = SHARED / "data" / "ml-100k"
SMOLLM_GGUF = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
FIXTURES = REPO / "tests" / "fixtures"


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray, started once (starting Ray costs seconds on 2 cores)."""
    import ray

    from pipelines.runtime import ensure_ray

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


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> str:
    """A real S3 API (moto's server mode) on a free local port; its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def s3_options(endpoint: str) -> dict:
    return {"endpoint_url": endpoint, "key": "x", "secret": "x"}


@pytest.fixture
def s3_bucket(s3_server: str) -> tuple[str, dict]:
    """A new, empty bucket: its ``s3://`` root and the storage options that reach it."""
    import uuid

    import s3fs

    options = s3_options(s3_server)
    name = f"b{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**options).mkdir(name)
    return f"s3://{name}", options
