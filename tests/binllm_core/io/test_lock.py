"""One writer per run: a second writer stops naming the holder; a dead holder's lock is taken
over; on S3 the lock is a conditional PUT."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from binllm_core.io.lock import LockedError, WriterLock, _rewrite
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
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(gone.stdout)
    record = {
        "host": socket.gethostname(),
        "pid": dead_pid,
        "started_at": "then",
        "command": "binllm run old.yaml",
        "token": "old",
    }
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


# ---- leases: renewed while held; an expired one is taken over whatever its host ----------------
ELSEWHERE = "head-of-a-gone-cluster"


def iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def foreign_lock(fs, path: str, **fields) -> dict:
    """A lock file of a process of another host (an old nightly's head)."""
    record = {
        "owner": "someone",
        "host": ELSEWHERE,
        "pid": 4242,
        "started_at": "2026-01-01T00:00:00Z",
        "command": "binllm nightly",
        "token": "theirs",
        **fields,
    }
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, json.dumps(record).encode())
    return record


def test_lease_is_renewed_while_held_and_names_the_ray_job(lock_path, monkeypatch):
    fs, path = lock_path
    monkeypatch.setenv("BINLLM_LOCK_LEASE_S", "1.2")
    monkeypatch.setenv("RAY_JOB_ID", "02000000")
    lock = WriterLock(fs, path, "run r")
    with lock:
        first = json.loads(fs.cat_file(path))
        assert first["lease_s"] == 1.2 and first["job_id"] == "02000000"
        assert first["expires_at"] == pytest.approx(time.time() + 1.2, abs=0.5)
        assert first["expires_at_iso"] == iso(first["expires_at"])
        time.sleep(2.0)  # past the first lease: only renewals keep it
        now = json.loads(fs.cat_file(path))
        assert now["expires_at"] > time.time() and now["expires_at"] > first["expires_at"] + 0.5
        assert now["token"] == first["token"] and now["started_at"] == first["started_at"]
        with pytest.raises(LockedError, match="its lease expires at"):
            WriterLock(fs, path, "run r").acquire()
    assert not fs.exists(path)
    assert lock._renewer is not None and not lock._renewer.is_alive()  # stopped on release


def test_job_id_of_a_submitted_job_or_none(lock_path, monkeypatch):
    fs, path = lock_path
    monkeypatch.delenv("RAY_JOB_ID", raising=False)
    monkeypatch.delenv("RAY_JOB_SUBMISSION_ID", raising=False)
    with WriterLock(fs, path, "run r"):
        assert json.loads(fs.cat_file(path))["job_id"] == ""
    monkeypatch.setenv("RAY_JOB_SUBMISSION_ID", "raysubmit_abc")
    with WriterLock(fs, path, "run r"):
        assert json.loads(fs.cat_file(path))["job_id"] == "raysubmit_abc"


def test_expired_lease_of_another_host_is_taken_over(lock_path):
    fs, path = lock_path
    expired = time.time() - 30
    foreign_lock(fs, path, job_id="raysubmit_old", lease_s=120, expires_at=expired)
    said: list[str] = []
    with WriterLock(fs, path, "run r", log=said.append):
        assert json.loads(fs.cat_file(path))["token"] != "theirs"
    assert len(said) == 1 and "taking over the stale lock of run r" in said[0]
    assert f"lease expired at {iso(expired)}" in said[0]
    assert f"pid 4242 on {ELSEWHERE}" in said[0] and "raysubmit_old" in said[0]


def test_live_lease_of_another_host_is_refused_naming_when_it_expires(lock_path):
    fs, path = lock_path
    expires = time.time() + 600
    foreign_lock(fs, path, job_id="raysubmit_now", lease_s=120, expires_at=expires)
    with pytest.raises(LockedError) as err:
        WriterLock(fs, path, "run r", log=pytest.fail).acquire()
    message = str(err.value)
    assert "run r is being written by another binllm process" in message and "\n" not in message
    assert f"pid 4242 on {ELSEWHERE}" in message and f"lease expires at {iso(expires)}" in message
    assert json.loads(fs.cat_file(path))["token"] == "theirs"


def test_lock_of_another_host_without_a_lease_is_still_refused(lock_path):
    fs, path = lock_path
    foreign_lock(fs, path)  # written by a binllm without leases: cannot tell if it still runs
    with pytest.raises(LockedError) as err:
        WriterLock(fs, path, "run r", log=pytest.fail).acquire()
    assert f"pid 4242 on {ELSEWHERE}" in str(err.value) and "lease" not in str(err.value)
    assert json.loads(fs.cat_file(path))["token"] == "theirs"


# ---- never an empty or partial lock file -------------------------------------------------------
@pytest.mark.parametrize("content", [b"", b'{"host": "x", "pi', b"\x00garbage"])
def test_unreadable_lock_file_is_taken_over(lock_path, content: bytes):
    fs, path = lock_path
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, content)
    said: list[str] = []
    with WriterLock(fs, path, "run r", log=said.append) as lock:
        assert json.loads(fs.cat_file(path))["token"] == lock.token
    assert len(said) == 1 and "taking over the unreadable lock of run r" in said[0]


def test_lock_file_is_never_seen_empty_or_partial(tmp_path: Path):
    fs, folder = resolve(str(tmp_path / "run"))
    path = f"{folder}/_lock.json"
    seen, bad = [0], []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                with open(path, "rb") as fh:
                    raw = fh.read()
            except FileNotFoundError:
                continue
            seen[0] += 1
            try:
                assert json.loads(raw)["token"]
            except (ValueError, KeyError, AssertionError):
                bad.append(raw)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        for _ in range(300):
            with WriterLock(fs, path, "run r"):
                pass
    finally:
        stop.set()
        thread.join()
    assert seen[0] > 0 and bad == []
    assert os.listdir(tmp_path / "run") == []  # no temp file left behind


def test_refused_create_leaves_only_the_holders_lock(tmp_path: Path):
    fs, folder = resolve(str(tmp_path / "run"))
    path = f"{folder}/_lock.json"
    with WriterLock(fs, path, "run r") as lock:
        for _ in range(3):
            with pytest.raises(LockedError):
                WriterLock(fs, path, "run r").acquire()
        assert os.listdir(folder) == ["_lock.json"]
        assert json.loads(fs.cat_file(path))["token"] == lock.token


def test_release_waits_for_a_renewal_mid_write(tmp_path: Path, monkeypatch):
    fs, folder = resolve(str(tmp_path / "run"))
    path = f"{folder}/_lock.json"
    monkeypatch.setenv("BINLLM_LOCK_LEASE_S", "0.15")
    replace, writing = os.replace, threading.Event()

    def slow_replace(src, dst) -> None:  # the renewal's write, caught in the middle
        writing.set()
        time.sleep(0.3)
        replace(src, dst)

    monkeypatch.setattr(os, "replace", slow_replace)
    said: list[str] = []
    lock = WriterLock(fs, path, "run r", log=said.append)
    lock.acquire()
    assert writing.wait(5)
    lock.release()  # a release that did not wait would be undone by the renewal's write
    assert os.listdir(folder) == [] and said == []
    assert lock._renewer is not None and not lock._renewer.is_alive()


def test_renewal_never_writes_over_a_lock_taken_over_meanwhile(s3_bucket, monkeypatch):
    """On S3 the renewal PUT is conditional on the version read (If-Match): a taker that wrote
    between our read and our write wins, and we learn that we lost the lock."""
    uri, options = s3_bucket
    fs, folder = resolve(f"{uri}/run", options)
    path = f"{folder}/_lock.json"
    mine = json.dumps({"token": "mine"}).encode()
    fs.pipe_file(path, mine)
    cat = fs.cat_file

    def cat_then_taken_over(p, *args, **kwargs):
        raw = cat(p, *args, **kwargs)
        fs.pipe_file(path, json.dumps({"token": "taker"}).encode())
        return raw

    monkeypatch.setattr(fs, "cat_file", cat_then_taken_over)
    assert _rewrite(fs, path, "mine", mine) is False
    monkeypatch.undo()
    assert json.loads(fs.cat_file(path))["token"] == "taker"
