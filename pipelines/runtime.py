"""Connecting to Ray: a local instance, or the cluster ``RAY_ADDRESS`` names."""

from __future__ import annotations

import os

import ray


def ensure_ray() -> None:
    """Start or join Ray once per process, with order-preserving Ray Data execution.

    Order is preserved so that a re-run writes identical rows (samples, codes, prompts).
    """
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or None
        ray.init(address=address, log_to_driver=False, include_dashboard=False)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
