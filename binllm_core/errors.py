"""One error type whose message is one line: what is wrong, where, and what to do."""

from __future__ import annotations

import os
import socket


class BinllmError(Exception):
    """A user-facing error. ``str(err)`` is a single line meant to be printed as is.

    The line is kept in ``message`` as well as in ``args``: Ray appends retry notes to the
    ``args`` of an exception raised in a task, and ``message`` travels through pickling intact,
    as do ``host`` and ``pid``, where it was raised (see :func:`raised_elsewhere`).
    """

    def __init__(self, what: str, where: str = "", todo: str = "") -> None:
        message = f"{what} at {where}" if where else what
        if todo:
            message = f"{message}; {todo}"
        self.message = " ".join(message.split())
        self.host = socket.gethostname()
        self.pid = os.getpid()
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


class ConfigError(BinllmError):
    """A config file or a --set override that does not fit the config schema."""


class DataError(BinllmError):
    """Source data that cannot be read or does not fit the expected layout."""


class StageError(BinllmError):
    """A stage that cannot run: missing upstream output, an empty split, an unreachable URI."""


def find_user_error(err: BaseException | None) -> BinllmError | None:
    """The BinllmError behind ``err``, also when Ray wrapped it in a task error.

    A Ray task error keeps the original in ``cause``; it may itself subclass the original's
    type while its text is the worker's traceback, so ``cause`` is followed first.
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        cause = getattr(err, "cause", None)
        if isinstance(cause, BaseException):
            err = cause
            continue
        if isinstance(err, BinllmError):
            return err
        # Ray Train's WorkerGroupError holds each failed worker's own exception.
        for failure in (getattr(err, "worker_failures", None) or {}).values():
            found = find_user_error(failure) if isinstance(failure, BaseException) else None
            if found is not None:
                return found
        err = err.__cause__ or err.__context__
    return None


def raised_elsewhere(err: BinllmError) -> str:
    """`` (raised on host H)`` for an error raised in another process than this one (a Ray
    task, actor or Ray Train worker, maybe on another node), else ``""``: added to the line a
    user reads, since a path or file that is fine here may not be there."""
    host, pid = getattr(err, "host", None), getattr(err, "pid", None)
    if host is None or (pid == os.getpid() and host == socket.gethostname()):
        return ""
    where = f" (raised on host {host})"
    return "" if where in err.message else where  # named already, by a task that re-raised it


def io_error(err: BaseException | None) -> BinllmError | None:
    """A file-system error behind ``err`` (a folder that cannot be made, a file that cannot be
    written or read: permissions, a path under ``/proc``, a full disk) as one line naming the
    path; None when there is none, or it names no path (then it is a bug to show whole)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.filename:
            reason = err.strerror or type(err).__name__
            return StageError(
                f"cannot write or read {err.filename} ({reason})",
                todo="check output_root, data.uri and the paths given on the command line, "
                "and their permissions",
            )
        err = err.__cause__ or err.__context__
    return None


STORE_DOWN = (
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ClientConnectorError",
    "ServerDisconnectedError",
)
"""What botocore and aiohttp raise when an object store stops answering (names: neither is a
dependency of the core)."""


def store_error(err: BaseException | None) -> BinllmError | None:
    """An object store that stopped answering mid-run, behind ``err``, as one line (the whole
    trace is in the run's log); None when there is none."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if type(err).__name__ in STORE_DOWN or isinstance(err, ConnectionError):
            detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            return StageError(
                f"the storage stopped answering ({type(err).__name__}: {detail})",
                todo="check that the store (endpoint_url) is up and reachable, then run again: "
                "finished stages are skipped, and what was running published nothing",
            )
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__
    return None
