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
