"""One writer per run: a second writer stops naming the holder; a dead holder's lock is taken
over; on S3 the lock is a conditional PUT."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from binllm_core.lock import LockedError, WriterLock
from binllm_core.storage import resolve


@pytest.fixture(params=["local", "s3"])
def lock_path(request, tmp_path: Path) -> tuple:
    if request.param == "local":
        fs, path = resolve(str(tmp_path / "run"))
    else:
        uri, options = request.getfixturevalue("s3_bucket")
        fs, path = resolve(f"{uri}/run", options)
    return fs, f"{path}/_lock.json"


def test_second_writer_is_refused_naming_the_holder(lock_path):
    fs, path = lock_path
    with WriterLock(fs, path, "run r"):
        holder = json.loads(fs.cat_file(path))
        assert holder["host"] == socket.gethostname() and holder["pid"] > 0
        with pytest.raises(LockedError) as err:
            WriterLock(fs, path, "run r").acquire()
        message = str(err.value)
        assert "run r is being written by another binllm process" in message
        assert f"pid {holder['pid']} on {holder['host']}" in message and "\n" not in message
    assert not fs.exists(path)  # released
    with WriterLock(fs, path, "run r"):  # free again
        pass


def test_stale_lock_of_a_dead_process_is_taken_over(lock_path):
    fs, path = lock_path
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    record = {"host": socket.gethostname(), "pid": dead_pid, "started_at": "then",
              "command": "binllm run old.yaml", "token": "old"}
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, json.dumps(record).encode())
    said: list[str] = []
    with WriterLock(fs, path, "run r", log=said.append):
        assert json.loads(fs.cat_file(path))["token"] != "old"
    assert said and f"pid {dead_pid}" in said[0] and "is gone" in said[0]


def test_release_never_removes_another_holders_lock(lock_path):
    fs, path = lock_path
    mine = WriterLock(fs, path, "run r")
    mine.acquire()
    fs.pipe_file(path, json.dumps({"token": "someone else", "host": "x", "pid": 1}).encode())
    mine.release()
    assert json.loads(fs.cat_file(path))["token"] == "someone else"
