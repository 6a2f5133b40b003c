"""A user's error raised where Ray runs code reaches the terminal as one line naming its host."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest
import ray

from binllm_core.errors import ConfigError, DataError, find_user_error, raised_elsewhere
from pipelines.runtime.ray_helpers import sigint_deferred, surface_user_errors


@ray.remote(max_retries=0)
def _fails() -> None:
    raise DataError("bad line 3", "s3://b/u.data", "fix the file")


def test_an_error_raised_in_a_task_is_one_line_naming_its_host(ray_session):
    with pytest.raises(DataError) as err, surface_user_errors():
        ray.get(_fails.remote())
    message = str(err.value)
    assert message.startswith("bad line 3 at s3://b/u.data; fix the file (raised on host ")
    assert socket.gethostname() in message and "\n" not in message


def test_an_error_raised_here_names_no_host():
    err = ConfigError("bad key")
    assert raised_elsewhere(err) == ""
    with pytest.raises(ConfigError) as caught, surface_user_errors():
        raise err
    assert str(caught.value) == "bad key"


class _WorkerGroupError(RuntimeError):
    """The shape of Ray Train's error: each failed worker's own exception by rank."""

    def __init__(self, failures: dict[int, BaseException]) -> None:
        super().__init__("Training failed due to worker errors")
        self.worker_failures = failures


def test_a_ray_train_workers_error_is_found_behind_the_group_error():
    inner = ConfigError("finetune.init_adapter /x holds no saved adapter")
    inner.pid = os.getpid() + 1  # as if unpickled from a worker process
    found = find_user_error(_WorkerGroupError({0: RuntimeError("other"), 1: inner}))
    assert found is inner
    assert raised_elsewhere(found) == f" (raised on host {socket.gethostname()})"


def test_a_ctrl_c_while_ray_starts_or_stops_is_raised_once_it_is_done():
    """``ray.init`` and ``ray.shutdown`` run whole (an interrupted core worker crashed the
    process at exit with SIGSEGV; an interrupted shutdown printed Ray's trace and exited 0):
    the Ctrl-C is raised after the block, and Python's handler is back."""
    # Python's own handler, as in binllm's process: a plain TorchTrainer.fit earlier in this
    # test session leaves Ray Train's handler behind (binllm's InterruptibleTrainer does not).
    leftover = signal.signal(signal.SIGINT, signal.default_int_handler)
    done = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with sigint_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.1)
                done.append(True)
        assert done == [True]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, leftover)
