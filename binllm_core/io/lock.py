"""One writer per run: a lock file created exclusively, naming its holder, held under a lease.

The lock is a small JSON file (owner, host, pid, Ray job, start time, command, lease). It is
created only if it does not exist, and always whole: on a local disk it is written to a temp file
that is then hard-linked to the lock's name (``os.link`` fails if that name exists); on S3 it is
one conditional PUT (``If-None-Match: *``). A second writer stops at once with one line naming
the holder.

While held, a daemon thread renews the lease (moves ``expires_at`` forward) every third of it.
A lock is stale, and taken over with a message, when its holder is a process of this host that no
longer exists (a killed run), when its lease has expired (whatever the host: a nightly job's Ray
head may be gone for good, as KubeRay's RayCronJob makes a new head each run), or when the file
cannot be parsed. A live lock of another host without a lease (written by an older binllm) is
refused: nothing tells whether its holder still runs.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from binllm_core.errors import StageError
from binllm_core.storage import is_local, protocol, to_uri

LOCK = "_lock.json"
"""The lock file's name, at the top of what it guards (a run folder, an output folder)."""

LEASE_ENV = "BINLLM_LOCK_LEASE_S"
DEFAULT_LEASE_S = 120.0
TMP = ".tmp-"
"""Infix of the temp files written next to the lock (``_lock.json.tmp-<hex>``)."""

_UNREADABLE: dict[str, Any] = {"unreadable": True}


class LockedError(StageError):
    """Another process holds the lock."""


class WriterLock:
    """Context manager: hold the lock at ``path`` of ``fs`` for the ``what`` being written."""

    def __init__(self, fs: Any, path: str, what: str, log: Callable[[str], None] = print) -> None:
        self.fs, self.path, self.what, self.log = fs, path, what, log
        self.token = uuid.uuid4().hex
        self.held = False
        self.lease_s = _lease_s()
        self._record: dict[str, Any] = {}
        self._mutex = threading.Lock()  # one write at a time: a renewal or the release
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def holder_record(self) -> dict[str, Any]:
        return {
            "owner": _user(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "job_id": os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_JOB_SUBMISSION_ID", ""),
            "started_at": _iso(time.time()),
            "command": " ".join(
                os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv)
            )[:300],
            "token": self.token,
            "lease_s": self.lease_s,
            **_expiry(self.lease_s),
        }

    def acquire(self) -> None:
        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        record = self.holder_record()
        for _ in range(2):
            if _create(self.fs, self.path, _dump(record)):
                self._hold(record)
                return
            raw = _read(self.fs, self.path)
            if raw is None:
                continue  # released between our try and our read: try once more
            holder = _parse(raw)
            why = _stale(holder)
            if why is None:
                raise self._locked(holder)
            self.log(f"[binllm] taking over the {why[0]} lock of {self.what}: {why[1]}")
            if _read(self.fs, self.path) == raw:  # not replaced meanwhile by another taker
                try:
                    self.fs.rm(self.path)
                except FileNotFoundError:
                    pass
        raise LockedError(f"could not take the lock {to_uri(self.fs, self.path)}")

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        with self._mutex:  # a renewal mid-write finishes first, and none starts after
            holder = self._holder()
            if holder is not None and holder.get("token") == self.token:
                self.fs.rm(self.path)
            self.held = False
        if self._renewer is not None and self._renewer is not threading.current_thread():
            self._renewer.join()

    def _hold(self, record: dict[str, Any]) -> None:
        self.held, self._record = True, record
        self._stop = threading.Event()
        self._renewer = threading.Thread(
            target=self._renew_loop, name=f"binllm-lock-{self.token[:8]}", daemon=True
        )
        self._renewer.start()

    def _renew_loop(self) -> None:
        """Move the lease forward every third of it, until released or the lock is lost."""
        while not self._stop.wait(self.lease_s / 3):
            with self._mutex:
                if self._stop.is_set():
                    return
                record = {**self._record, **_expiry(self.lease_s)}
                try:
                    kept = _rewrite(self.fs, self.path, self.token, _dump(record))
                except Exception as err:  # a store that failed once: try again next time
                    self.log(f"[binllm] could not renew the lock of {self.what}: {err}")
                    continue
                if not kept:
                    self.log(
                        f"[binllm] lost the lock of {self.what}: "
                        f"{to_uri(self.fs, self.path)} no longer names this process"
                    )
                    return
                self._record = record

    def _holder(self) -> dict[str, Any] | None:
        raw = _read(self.fs, self.path)
        return None if raw is None else _parse(raw)

    def holder(self) -> dict[str, Any] | None:
        """The record of the process that holds the lock now; None when nobody does."""
        return self._holder()

    def _locked(self, holder: dict[str, Any]) -> LockedError:
        return LockedError(
            f"{self.what} is being written by another binllm process: {describe(holder)}",
            todo=f"wait for it to finish; if that process is gone, delete "
            f"{to_uri(self.fs, self.path)}",
        )


def describe(holder: dict[str, Any]) -> str:
    """A lock holder in words: its command, process, host, owner, job, start and lease."""
    job = f", job {holder['job_id']}" if holder.get("job_id") else ""
    expires = _expires_at(holder)
    lease = "" if expires is None else f"; its lease expires at {_iso(expires)}"
    return (
        f"{holder.get('command') or '?'} (pid {holder.get('pid')} on {holder.get('host')}, "
        f"owner {holder.get('owner')}{job}, since {holder.get('started_at')}{lease})"
    )


def _create(fs: Any, path: str, data: bytes) -> bool:
    """Create ``path`` with ``data`` only if it does not exist; False if it does.

    Never leaves ``path`` empty or partial, not even for an instant: a reader that finds the lock
    always finds a whole record to judge.
    """
    if is_local(fs):
        tmp = _write_tmp(path, data)
        try:
            os.link(tmp, path)  # exclusive and whole at once
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True
    if protocol(fs) in ("s3", "s3a"):
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        except OSError as err:  # s3fs raises PreconditionFailed as a plain OSError
            if _precondition_failed(err):
                return False
            raise
        return True
    if fs.exists(path):  # no conditional write on this store: best effort
        return False
    fs.pipe_file(path, data)
    return True


def _rewrite(fs: Any, path: str, token: str, data: bytes) -> bool:
    """Replace ``path`` with ``data``, whole, while it holds ``token``; False if it does not."""
    if protocol(fs) in ("s3", "s3a"):
        try:
            etag = fs.info(path, refresh=True)["ETag"]  # not a listing's cached one
        except FileNotFoundError:
            return False
        raw = _read(fs, path)
        if raw is None or _parse(raw).get("token") != token:
            return False
        try:  # only over the version read: not over a lock taken over meanwhile
            fs.pipe_file(path, data, IfMatch=etag)
        except OSError as err:
            if _precondition_failed(err):
                return False
            raise
        return True
    raw = _read(fs, path)
    if raw is None or _parse(raw).get("token") != token:
        return False
    if is_local(fs):
        tmp = _write_tmp(path, data)
        try:
            os.replace(tmp, path)
        except OSError:
            os.unlink(tmp)
            raise
    else:
        fs.pipe_file(path, data)
    return True


def _write_tmp(path: str, data: bytes) -> str:
    """``data`` in a new, synced temp file next to ``path`` (same folder: link/rename work)."""
    tmp = f"{path}{TMP}{uuid.uuid4().hex}"
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def _read(fs: Any, path: str) -> bytes | None:
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        holder = json.loads(raw)
    except ValueError:
        return _UNREADABLE
    return holder if isinstance(holder, dict) else _UNREADABLE


def _stale(holder: dict[str, Any]) -> tuple[str, str] | None:
    """Why the holder's lock may be taken over (its kind, what happened), or None if it may not."""
    if holder is _UNREADABLE:
        return "unreadable", "the lock file is empty or not a JSON record"
    who = f"pid {holder.get('pid')} on {holder.get('host')}"
    if holder.get("host") == socket.gethostname() and _gone(holder.get("pid")):
        return "stale", f"{who} (since {holder.get('started_at')}) is gone"
    expires = _expires_at(holder)
    if expires is not None and expires < time.time():
        job = holder.get("job_id") or "none"
        return "stale", (
            f"its lease expired at {_iso(expires)} ({who}, owner {holder.get('owner')}, "
            f"job {job}, since {holder.get('started_at')}, {holder.get('command') or '?'})"
        )
    return None


def _gone(pid: Any) -> bool:
    """``pid`` is no process of this host."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, TypeError, OverflowError):
        return False
    return False


def _expires_at(holder: dict[str, Any]) -> float | None:
    """The holder's lease end (UTC epoch seconds); None for a lock written without a lease."""
    try:
        return float(holder["expires_at"])
    except (KeyError, TypeError, ValueError):
        return None


def _expiry(lease_s: float) -> dict[str, Any]:
    expires = time.time() + lease_s
    return {"expires_at": expires, "expires_at_iso": _iso(expires)}


def _lease_s() -> float:
    raw = os.environ.get(LEASE_ENV, "")
    try:
        lease = float(raw) if raw else DEFAULT_LEASE_S
    except ValueError:
        lease = 0.0
    if not lease > 0:
        raise StageError(f"{LEASE_ENV}={raw!r} is not a positive number of seconds")
    return lease


def _precondition_failed(err: BaseException) -> bool:
    """An S3 412: s3fs keeps the code only on the botocore error it chains (``__cause__``)."""
    response = getattr(err.__cause__, "response", None) or {}
    code = response.get("Error", {}).get("Code")
    return code == "PreconditionFailed" or "PreconditionFailed" in str(err) or "412" in str(err)


def _dump(record: dict[str, Any]) -> bytes:
    return json.dumps(record, indent=2).encode()


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
