"""Fixtures of the binllm_core tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Two threads on two busy cores run the tiny model ~20x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
