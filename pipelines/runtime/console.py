"""What a person sees of one ``binllm`` command: binllm's own lines on the terminal, Ray's in a
log file of the run.

Ray writes its INFO/WARNING lines ("Starting execution of Dataset…", "Execution plan of…") and
the stack traces of failed tasks through Python loggers under ``ray`` (its own handlers, which
write to whatever ``sys.stderr`` is), and its C++ core worker writes error lines straight to
file descriptor 2. While a :class:`Console` is open, both go to
``{run}/_logs/{time}-{command}-{pid}.log`` instead: the loggers' console handlers are swapped
for a handler on that file, Python warnings are logged there too, and once Ray has started, when
the process's stderr is a real file descriptor (a terminal, a pipe; not a test's captured
stream), descriptor 2 itself points at the file while ``sys.stderr`` keeps writing to the
terminal. What Ray's driver prints itself (the raylet's warnings) goes to the file as well.
Closing the console undoes each of these, whatever happens on the way.

The file is made on its first record (a command refused before Ray starts leaves none); a run
folder on object storage gets it when the console closes (it is written locally meanwhile, and
both paths are printed). ``verbose`` leaves Ray's lines on the terminal as well as in the file.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import fsspec

from binllm_core.storage import is_local, join, to_uri

LOGS = "_logs"
"""The folder of a run that holds the commands' log files."""

_current: Console | None = None
_error_log = ""


def current() -> Console | None:
    """The open console of this process, if a command opened one."""
    return _current


def error_log() -> str:
    """The log file that holds the trace of the last error a console recorded ('' if none);
    :func:`forget_error` clears it when a command starts."""
    return _error_log


def forget_error() -> None:
    global _error_log
    _error_log = ""


class Console:
    """One command's log file and the routing of Ray's output into it (a context manager)."""

    def __init__(
        self,
        fs: Any,
        run_folder: str,
        command: str,
        verbose: bool = False,
        argv: list[str] | None = None,
    ) -> None:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
        self.name = f"{stamp}-{command}-{os.getpid()}.log"
        self.fs, self.local = fs, is_local(fs)
        self.target = join(run_folder, LOGS, self.name)
        """Where the log ends up (the run folder)."""
        self.path = Path(self.target) if self.local else _temp_folder() / self.name
        """Where it is written."""
        self.verbose = verbose
        self.argv = ["binllm", *argv] if argv is not None else sys.argv
        self.terminal: TextIO = sys.stderr
        """binllm's console stream: the terminal even while descriptor 2 goes to the log."""
        self._handler: _LogFile | None = None
        self._undo = ExitStack()
        self._redirected = False
        self._routed_prints = False
        self._closers: list[Callable[[], None]] = []

    @property
    def uri(self) -> str:
        return to_uri(self.fs, self.target)

    def on_close(self, closer: Callable[[], None]) -> None:
        """Call ``closer`` when the console closes (what a command's display started)."""
        self._closers.append(closer)

    # ---- opening and closing -----------------------------------------------------------------
    def __enter__(self) -> Console:
        global _current
        handler = _LogFile(self)
        handler.setLevel(logging.INFO)  # Ray Data logs DEBUG to its own files already
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self._handler = handler
        self._undo.callback(handler.close)
        log = logging.getLogger("binllm")
        self._undo.callback(_restore_logger, log, log.level, log.propagate)
        log.setLevel(logging.INFO)
        log.propagate = False
        self._attach(log, handler)
        if not logging.getLogger("py.warnings").handlers and _warnings_free():
            logging.captureWarnings(True)
            self._undo.callback(logging.captureWarnings, False)
            self._attach(logging.getLogger("py.warnings"), handler)
        self.route_ray_logs()
        _current = self
        self._undo.callback(_forget_current, self)
        return self

    def ray_started(self) -> None:
        """Ray is up: its output goes to the log file, which exists from here on."""
        if self._handler is None:
            return
        if self._handler.stream is None:
            logging.getLogger("binllm").info("Ray is up")
        self.route_ray_logs()
        self._route_driver_prints()
        if not self.verbose and not self._redirected:
            self._redirect_descriptor()

    @property
    def opened(self) -> bool:
        return self._handler is not None and self._handler.stream is not None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        interrupted = False
        try:
            if error is not None:
                self.record_error(error)
            for closer in reversed(self._closers):
                try:
                    closer()
                except KeyboardInterrupt:  # every closer still runs; raised at the end
                    interrupted = True
                except Exception as err:  # noqa: BLE001 - a display must not mask the run's end
                    logging.getLogger("binllm").warning("closing the console: %s", err)
        finally:
            self._undo.close()  # every undo step runs, even if one fails
            if not self.local and self.path.exists():
                self._upload()
        if interrupted and not isinstance(error, KeyboardInterrupt):
            raise KeyboardInterrupt

    def record_error(self, error: BaseException) -> None:
        """The whole trace of what stopped the command, into the log file: always for an
        unexpected error, and for a user's error once the log exists (Ray had started)."""
        global _error_log
        from binllm_core.errors import find_user_error, io_error

        users = find_user_error(error) is not None or io_error(error) is not None
        if self._handler is None or (users and not self.opened):
            return
        text = "".join(traceback.format_exception(error))
        logging.getLogger("binllm").error("the command stopped:\n%s", text)
        _error_log = self.where

    @property
    def where(self) -> str:
        """The log's path as printed: the run folder's, and the local copy's until the end."""
        if self.local:
            return str(self.path)
        return f"{self.path} (copied to {self.uri} at the end)"

    # ---- Ray's output ------------------------------------------------------------------------
    def route_ray_logs(self) -> None:
        """Send Ray's loggers to the log file: instead of their console handlers, or, with
        ``verbose``, beside them. Ray adds loggers as its modules load and as it starts: call
        again after ``ray.init``."""
        if self._handler is None:
            return
        names = [n for n in logging.Logger.manager.loggerDict if n == "ray" or n.startswith("ray.")]
        for name in names:
            logger = logging.getLogger(name)
            consoles = [h for h in logger.handlers if _writes_to_console(h)]
            if not consoles or self._handler in logger.handlers:
                continue
            self._attach(logger, self._handler)
            if self.verbose:
                continue
            for handler in consoles:
                logger.removeHandler(handler)
                self._undo.callback(logger.addHandler, handler)

    def _route_driver_prints(self) -> None:
        """Send what Ray's driver prints itself into the log file (and, with ``verbose``, also
        where it went): the raylet's warnings ("(raylet) WARNING: 8 PYTHON worker processes
        have been started…", under load) and, with ``log_to_driver``, the workers' lines. A
        thread of the driver writes them to ``sys.stdout`` / ``sys.stderr`` through
        ``print_to_stdstream``, no logger; the name is Ray's private one, so a Ray without it
        is left as it is."""
        if self._routed_prints:
            return
        from ray._private import worker

        original = getattr(worker, "print_to_stdstream", None)
        if original is None:
            return
        log = logging.getLogger("binllm.ray")

        def to_log(data: dict[str, Any], ignore_prefix: bool) -> None:
            for line in data.get("lines") or []:
                log.info("(%s) %s", data.get("pid"), line)
            if self.verbose:
                original(data, ignore_prefix)

        worker.print_to_stdstream = to_log
        self._routed_prints = True

        def restore() -> None:
            worker.print_to_stdstream = original
            self._routed_prints = False

        self._undo.callback(restore)

    def _attach(self, logger: logging.Logger, handler: logging.Handler) -> None:
        logger.addHandler(handler)
        self._undo.callback(logger.removeHandler, handler)

    def _redirect_descriptor(self) -> None:
        """Point descriptor 2 at the log file (C-level writes: Ray's core worker) and keep
        ``sys.stderr`` on the terminal; only for the process's own stderr."""
        if sys.stderr is None or sys.stderr is not sys.__stderr__:
            return
        try:
            fd = sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):
            return
        original = sys.stderr
        original.flush()
        saved = os.dup(fd)
        terminal = open(  # noqa: SIM115 - closed by the undo steps
            os.dup(saved), "w", buffering=1, encoding=original.encoding, errors="backslashreplace"
        )
        with open(self.path, "ab") as log:  # ray_started made the file
            os.dup2(log.fileno(), fd)
        sys.stderr = self.terminal = terminal
        self._redirected = True

        def restore() -> None:
            try:
                terminal.flush()
            finally:
                os.dup2(saved, fd)
                os.close(saved)
                sys.stderr = self.terminal = original
                self._redirected = False
                terminal.close()

        self._undo.callback(restore)

    def _upload(self) -> None:
        """Copy the local log into the run folder on object storage (best effort: a log that
        cannot be copied is left where it is, and said so: by the command's error line, which
        names it, when the store is down and the trace of that is in the log)."""
        try:
            self.fs.makedirs(self.target.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(self.path), self.target)
        except Exception as err:  # noqa: BLE001 - the command's own outcome comes first
            global _error_log
            from binllm_core.errors import store_error

            if _error_log == self.where:  # the trace of the command's error is in this log
                _error_log = str(self.path)
                if store_error(err) is not None:
                    return  # the store is down: the command's one line says so, and where
            print(
                f"[binllm] the log stays at {self.path}: copying it to {self.uri} failed ({err})",
                file=sys.stderr,
            )
        else:
            self.path.unlink(missing_ok=True)

    def fall_back_to_temp(self) -> None:
        """Keep the log in this user's temp folder (the run folder could not take it)."""
        self.path = _temp_folder() / self.name
        self.target = str(self.path)
        self.fs, self.local = fsspec.filesystem("file"), True


class _LogFile(logging.FileHandler):
    """The log file, made on its first record with the command line at its top; its path is
    printed then (once). A run folder that cannot take it sends it to the temp folder, and a
    temp folder that cannot either to nowhere (the command still runs)."""

    def __init__(self, console: Console) -> None:
        super().__init__(console.path, encoding="utf-8", delay=True)
        self.console = console
        self.failed = False
        """A write failed (a full disk): the file takes nothing more."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        """A record that cannot be written (the disk filled up) stops the file, with one line,
        instead of logging's report of every record after it (hundreds of lines); the command
        goes on and reports its own outcome."""
        err = sys.exc_info()[1]
        if not self.failed:
            self.failed = True
            print(
                f"[binllm] the log {self.console.where} cannot be written ({err}); Ray's lines "
                "are dropped from now on",
                file=sys.stderr,
                flush=True,
            )
        try:
            if self.stream is not None:
                self.stream.close()
        except OSError:
            pass
        self.stream = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - the handler's

    def _open(self) -> Any:
        try:
            stream = self._open_at(self.console.path)
        except OSError:
            self.console.fall_back_to_temp()
            try:
                stream = self._open_at(self.console.path)
            except OSError:
                return open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - the handler's
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        stream.write(f"{stamp} binllm command: {' '.join(self.console.argv)}\n")
        print(f"[binllm] log: {self.console.where}", flush=True)  # stdout, as the stages' lines
        return stream

    def _open_at(self, path: Path) -> Any:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.baseFilename = str(path)
        return super()._open()


def _temp_folder() -> Path:
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir(), f"binllm-logs-{uid}")


def _writes_to_console(handler: logging.Handler) -> bool:
    """A stream handler that is not a file's: Ray's write to the terminal (its ``PlainRayHandler``
    to whatever ``sys.stderr`` is when it emits)."""
    return isinstance(handler, logging.StreamHandler) and not isinstance(
        handler, logging.FileHandler
    )


def _warnings_free() -> bool:
    """Python warnings are not already captured into logging by someone else."""
    return getattr(logging, "_warnings_showwarning", None) is None


def _restore_logger(logger: logging.Logger, level: int, propagate: bool) -> None:
    logger.setLevel(level)
    logger.propagate = propagate


def _forget_current(console: Console) -> None:
    global _current
    if _current is console:
        _current = None
