"""Connecting to Ray: a local instance, or the cluster ``RAY_ADDRESS`` names."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow as pa
import ray

from binllm_core.errors import BinllmError, find_user_error, raised_elsewhere
from pipelines.runtime import console


def ensure_ray() -> None:
    """Start or join Ray once per process, with order-preserving Ray Data execution.

    Order is preserved so that a re-run writes identical rows (samples, codes, prompts).
    """
    shown = console.current()
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or None
        # Workers' own prints reach the terminal only with ``binllm -v``.
        verbose = shown is not None and shown.verbose
        with sigint_deferred():
            ray.init(address=address, log_to_driver=verbose, include_dashboard=False)
            if shown is not None:
                shown.on_close(stop_ray)  # the command started Ray: it stops it
    if shown is not None:
        shown.ray_started()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    # Re-raise a task's own exception rather than a generic wrapper around it.
    ctx.raise_original_map_exception = True


def stop_ray() -> None:
    """Stop Ray while the console still sends its lines to the log file, whole: a Ctrl-C
    meanwhile is raised once it is stopped (see :func:`sigint_deferred`)."""
    with sigint_deferred():
        ray.shutdown()


@contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C until the block is done, then raise it as ``KeyboardInterrupt``.

    For ``ray.init`` and ``ray.shutdown``, which must not stop halfway: a core worker
    interrupted while it is being made crashes the process at exit (SIGSEGV, after binllm's
    line), and an interrupted shutdown prints Ray's trace ("Exception ignored in atexit
    callback") and exits with code 0. Only where Python's own handler is in place (the main
    thread, nobody else's handler).
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


@contextmanager
def surface_user_errors() -> Iterator[None]:
    """Turn a BinllmError raised inside a Ray task, actor or Ray Train worker back into its
    clean one-line self, naming the host it was raised on."""
    try:
        yield
    except BinllmError as err:
        if not isinstance(err, ray.exceptions.RayTaskError):
            raise
        found = find_user_error(err)
        raise type(found)(found.message + raised_elsewhere(found)) from None  # type: ignore
    except Exception as err:
        found = find_user_error(err)
        if found is None:
            raise
        raise type(found)(found.message + raised_elsewhere(found)) from None


def to_arrow(ds: ray.data.Dataset, schema: pa.Schema) -> pa.Table:
    """A dataset small enough for this process as one Arrow table; ``schema``'s empty table
    when it has no rows (its blocks then may have lost their columns)."""
    blocks = [b for b in ray.get(ds.to_arrow_refs()) if b.num_rows]
    return pa.concat_tables(blocks) if blocks else schema.empty_table()
