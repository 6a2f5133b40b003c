"""What a person sees of one ``binllm`` command: binllm's own lines on the terminal, Ray's in a
log file of the run.

Ray writes its INFO/WARNING lines ("Starting execution of Dataset…", "Execution plan of…") and
the stack traces of failed tasks through Python loggers under ``ray`` (its own handlers, which
write to whatever ``sys.stderr`` is), and its C++ core worker writes error lines straight to
file descriptor 2. While a :class:`Console` is open, both go to ``{run}/logs/{time}-{command}.log``
instead: the loggers' console handlers are swapped for a handler on that file, Python warnings
are logged there too, and, when the process's stderr is a real file descriptor (a terminal, a
pipe; not a test's captured stream), descriptor 2 itself points at the file while ``sys.stderr``
keeps writing to the terminal. Closing the console puts everything back.

A run folder on object storage gets the log at close (it is written locally meanwhile).
``verbose`` leaves Ray's lines on the terminal and still writes the file.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import fsspec

from binllm_core.storage import is_local, join, to_uri

LOGS = "logs"
"""The folder of a run that holds the commands' log files."""

_current: Console | None = None
_last_uri = ""


def current() -> Console | None:
    """The open console of this process, if a command opened one."""
    return _current


def last_uri() -> str:
    """The log file of the last console this process opened ('' if none)."""
    return _last_uri


class Console:
    """One command's log file and the routing of Ray's output into it (a context manager)."""

    def __init__(self, fs: Any, run_folder: str, command: str, verbose: bool = False) -> None:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        self.name = f"{stamp}-{command}-{os.getpid()}.log"
        self.fs, self.local = fs, is_local(fs)
        self.target = join(run_folder, LOGS, self.name)
        """Where the log ends up (the run folder)."""
        if self.local:
            self.path = Path(self.target)
        else:
            self.path = Path(tempfile.gettempdir(), "binllm-logs", self.name)
        self.verbose = verbose
        self.terminal: TextIO = sys.stderr
        """binllm's console stream: the terminal even while descriptor 2 goes to the log."""
        self._handler: logging.Handler | None = None
        self._swapped: list[tuple[logging.Logger, logging.Handler]] = []
        self._saved_fd: int | None = None
        self._saved_stderr: TextIO | None = None
        self._captured_warnings = False
        self._closers: list[Callable[[], None]] = []

    def on_close(self, closer: Callable[[], None]) -> None:
        """Call ``closer`` when the console closes (what a command's display started)."""
        self._closers.append(closer)

    @property
    def uri(self) -> str:
        return (
            str(self.path)
            if self.local and self.target != str(self.path)
            else to_uri(self.fs, self.target)
        )

    def fall_back_to_temp(self) -> None:
        """Keep the log in the temp folder (the run folder could not be written)."""
        global _last_uri
        self.path = Path(tempfile.gettempdir(), "binllm-logs", self.name)
        self.target = str(self.path)
        self.fs, self.local = fsspec.filesystem("file"), True
        _last_uri = self.uri

    # ---- opening and closing -----------------------------------------------------------------
    def __enter__(self) -> Console:
        global _current, _last_uri
        handler = _LogFile(self)
        handler.setLevel(logging.INFO)  # Ray Data logs DEBUG to its own files already
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self._handler = handler
        log = logging.getLogger("binllm")
        log.setLevel(logging.INFO)
        log.propagate = False
        log.addHandler(handler)
        if not self.verbose:
            self.route_ray_logs()
            logging.captureWarnings(True)
            self._captured_warnings = True
            logging.getLogger("py.warnings").addHandler(handler)
        _current, _last_uri = self, self.uri
        return self

    def ray_started(self) -> None:
        """Ray is up: from now on its output goes to the log file, which exists from here on."""
        self.open_log()
        self.route_ray_logs()
        if not self.verbose and self._saved_fd is None:
            self._redirect_descriptor()

    def open_log(self) -> None:
        """Create the log file now (it is made on first use: a command refused before Ray
        starts leaves none)."""
        assert self._handler is not None
        logging.getLogger("binllm").info("Ray is up")

    @property
    def opened(self) -> bool:
        return self._handler is not None and self.path.exists()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        global _current
        if error is not None:
            self.record_error(error)
        for closer in reversed(self._closers):
            try:
                closer()
            except Exception as err:  # noqa: BLE001 - closing a display must not mask the run's end
                logging.getLogger("binllm").warning("closing the console: %s", err)
        _current = None
        assert self._handler is not None
        for logger, original in reversed(self._swapped):
            logger.removeHandler(self._handler)
            logger.addHandler(original)
        self._swapped = []
        if self._captured_warnings:
            logging.getLogger("py.warnings").removeHandler(self._handler)
            logging.captureWarnings(False)
        self._restore_descriptor()
        logging.getLogger("binllm").removeHandler(self._handler)
        self._handler.close()
        if not self.local and self.path.exists():
            self._upload()

    def record_error(self, error: BaseException) -> None:
        """The whole trace of what stopped the command, into the log file: always for an
        unexpected error, and for a user's error once the log exists (Ray had started)."""
        from binllm_core.errors import find_user_error, io_error

        users = find_user_error(error) is not None or io_error(error) is not None
        if self._handler is None or (users and not self.opened):
            return
        text = "".join(traceback.format_exception(error))
        logging.getLogger("binllm").error("the command stopped:\n%s", text)

    # ---- Ray's output ------------------------------------------------------------------------
    def route_ray_logs(self) -> None:
        """Swap every console handler of Ray's loggers for the log file's handler (Ray adds
        loggers as its modules load and as it starts: call again after ``ray.init``)."""
        if self.verbose or self._handler is None:
            return
        names = [n for n in logging.Logger.manager.loggerDict if n == "ray" or n.startswith("ray.")]
        for name in names:
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                if _writes_to_console(handler):
                    logger.removeHandler(handler)
                    logger.addHandler(self._handler)
                    self._swapped.append((logger, handler))

    def _redirect_descriptor(self) -> None:
        """Point descriptor 2 at the log file (C-level writes: Ray's core worker) and keep
        ``sys.stderr`` on the terminal; only for the process's own stderr."""
        if sys.stderr is not sys.__stderr__ or sys.stderr is None:
            return
        try:
            fd = sys.stderr.fileno()
        except (AttributeError, io.UnsupportedOperation, ValueError):
            return
        sys.stderr.flush()
        self._saved_fd = os.dup(fd)
        self._saved_stderr = sys.stderr
        terminal = open(os.dup(self._saved_fd), "w", buffering=1, encoding="utf-8")  # noqa: SIM115
        with open(self.path, "ab") as log:  # the log file exists: ray_started opened it
            os.dup2(log.fileno(), fd)
        sys.stderr = terminal
        self.terminal = terminal

    def _restore_descriptor(self) -> None:
        if self._saved_fd is None or self._saved_stderr is None:
            return
        sys.stderr.flush()
        terminal = sys.stderr
        os.dup2(self._saved_fd, self._saved_stderr.fileno())
        os.close(self._saved_fd)
        sys.stderr = self._saved_stderr
        self.terminal = self._saved_stderr
        self._saved_fd = self._saved_stderr = None
        terminal.close()

    def _upload(self) -> None:
        """Copy the local log into the run folder on object storage (best effort: a log that
        cannot be copied is left where it is, and said so)."""
        try:
            self.fs.makedirs(join(self.target.rsplit("/", 1)[0]), exist_ok=True)
            self.fs.put_file(str(self.path), self.target)
        except OSError as err:
            print(
                f"[binllm] the log stays at {self.path}: copying it to {self.uri} failed ({err})",
                file=sys.stderr,
            )
        else:
            self.path.unlink(missing_ok=True)


class _LogFile(logging.FileHandler):
    """The log file, created on its first record with the command line at its top, and its
    path printed then (once)."""

    def __init__(self, console: Console) -> None:
        super().__init__(console.path, encoding="utf-8", delay=True)
        self.console = console

    def _open(self) -> Any:
        try:
            self.console.path.parent.mkdir(parents=True, exist_ok=True)
            stream = super()._open()
        except OSError:  # the run folder cannot take it (the command says why): a temp file
            self.console.fall_back_to_temp()
            self.baseFilename = str(self.console.path)
            self.console.path.parent.mkdir(parents=True, exist_ok=True)
            stream = super()._open()
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        stream.write(f"{stamp} binllm command: {' '.join(sys.argv)}\n")
        print(f"[binllm] log: {self.console.uri}", flush=True)  # stdout, as the stages' lines
        return stream


def _writes_to_console(handler: logging.Handler) -> bool:
    """A stream handler that is not a file's: Ray's write to the terminal (its ``PlainRayHandler``
    to whatever ``sys.stderr`` is when it emits)."""
    return isinstance(handler, logging.StreamHandler) and not isinstance(
        handler, logging.FileHandler
    )
