"""One writer per run: a lock file created exclusively, naming its holder.

The lock is a small JSON file (owner, host, pid, start time, command). It is created only if it
does not exist: ``O_EXCL`` on a local disk, a conditional PUT (``If-None-Match: *``) on S3. A
second writer stops at once with one line naming the holder. A lock whose holder is a process of
this host that no longer exists (a killed run) is stale: it is taken over, with a message.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from binllm_core.errors import StageError
from binllm_core.storage import is_local, protocol, to_uri

LOCK = "_lock.json"
"""The lock file's name, at the top of what it guards (a run folder, an output folder)."""


class LockedError(StageError):
    """Another process holds the lock."""


class WriterLock:
    """Context manager: hold the lock at ``path`` of ``fs`` for the ``what`` being written."""

    def __init__(self, fs: Any, path: str, what: str, log: Callable[[str], None] = print) -> None:
        self.fs, self.path, self.what, self.log = fs, path, what, log
        self.token = uuid.uuid4().hex
        self.held = False

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
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(
                os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv)
            )[:300],
            "token": self.token,
        }

    def acquire(self) -> None:
        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        data = json.dumps(self.holder_record(), indent=2).encode()
        for _ in range(2):
            if _create(self.fs, self.path, data):
                self.held = True
                return
            holder = self._holder()
            if holder is None:
                continue  # released between our try and our read: try once more
            if not _stale(holder):
                raise LockedError(
                    f"{self.what} is being written by another binllm process: "
                    f"{holder.get('command') or '?'} (pid {holder.get('pid')} on "
                    f"{holder.get('host')}, owner {holder.get('owner')}, since "
                    f"{holder.get('started_at')})",
                    todo=f"wait for it to finish; if that process is gone, delete "
                    f"{to_uri(self.fs, self.path)}",
                )
            self.log(
                f"[binllm] taking over the stale lock of {self.what}: pid {holder.get('pid')} "
                f"on {holder.get('host')} (since {holder.get('started_at')}) is gone"
            )
            self.fs.rm(self.path)
        raise LockedError(f"could not take the lock {to_uri(self.fs, self.path)}")

    def release(self) -> None:
        if not self.held:
            return
        holder = self._holder()
        if holder is not None and holder.get("token") == self.token:
            self.fs.rm(self.path)
        self.held = False

    def _holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:
            return {"command": "unreadable lock file"}


def _create(fs: Any, path: str, data: bytes) -> bool:
    """Create ``path`` with ``data`` only if it does not exist; False if it does."""
    if is_local(fs):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return True
    if protocol(fs) in ("s3", "s3a"):
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        except OSError as err:  # s3fs raises PreconditionFailed as a plain OSError
            if "PreconditionFailed" in str(err) or "412" in str(err):
                return False
            raise
        return True
    if fs.exists(path):  # no conditional write on this store: best effort
        return False
    fs.pipe_file(path, data)
    return True


def _stale(holder: dict[str, Any]) -> bool:
    """The holder is a process of this host that is gone."""
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, TypeError):
        return False
    return False


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
