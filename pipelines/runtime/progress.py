"""Progress of a stage's long part (training epochs and steps, rendered and scored rows), shown on
the driver while Ray Train workers and Ray Data actors do the work.

Workers post to a small actor (:class:`Board`, no CPU) through a picklable :class:`Reporter`,
fire-and-forget; a thread of the driver drains the board twice a second and draws a bar on a
terminal (``tqdm``: count, rate, ETA and the stage's own fields) or, when stderr is not a
terminal (CI, ``ray job`` logs), a plain line every :data:`PLAIN_EVERY_S` seconds and one at the
end. Progress is shown only while a :mod:`~pipelines.runtime.console` is open (the ``binllm``
command); elsewhere (tests, notebooks calling the pipeline) :func:`progress` hands out a reporter
that does nothing and starts no actor.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO

import ray

from pipelines.runtime import console

PLAIN_EVERY_S = 30.0
"""Seconds between two progress lines when stderr is not a terminal."""
POLL_S = 0.5

Describe = Callable[[dict[str, Any]], str]
"""The stage's own fields of the latest event, as a short text (``loss 0.671, valid AUC 0.60``)."""


@ray.remote(num_cpus=0)
class Board:
    """Where workers post progress events; the driver takes those of the part it shows. One
    per command (an actor costs a worker process), killed when its console closes."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def post(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def ping(self) -> None:
        """A call that returns once every earlier call of the same caller has run."""

    def take(self, part: int) -> list[dict[str, Any]]:
        """The events of ``part``; a late one of an earlier part is dropped."""
        events, self.events = self.events, []
        return [e for e in events if e["part"] == part]


@dataclass(frozen=True)
class Reporter:
    """What a worker holds (picklable): ``post(advance=n)`` for work done since its last post
    (rows of several actors add up), ``post(done=n)`` for a position (a training step, which a
    resumed run repeats), and any fields the stage shows. Never blocks, never fails the work."""

    board: Any = None
    part: int = 0

    def post(self, advance: int = 0, done: int | None = None, **fields: Any) -> None:
        if self.board is None:
            return
        event = {"part": self.part, "advance": advance, "done": done, **fields}
        try:
            self.board.post.remote(event)
        except Exception:  # noqa: BLE001 - progress is a display; the work goes on without it
            pass

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until this worker's posts have reached the board (calls from one caller to an
        actor run in order)."""
        if self.board is None:
            return
        try:
            ray.get(self.board.ping.remote(), timeout=timeout)
        except Exception:  # noqa: BLE001 - progress is a display
            pass


_board: tuple[console.Console, Any] | None = None
_parts = 0


def _board_of(shown: console.Console) -> Any:
    """The board of the open console, started on first use."""
    global _board
    if _board is None or _board[0] is not shown:
        handle = Board.remote()
        _board = (shown, handle)

        def close() -> None:
            global _board
            _board = None
            ray.kill(handle)

        shown.on_close(close)
    return _board[1]


MIN_RATE_S = 2.0
"""A rate is shown once it is measured over at least this many seconds."""


@dataclass
class Tally:
    """The driver's view of a stage part: how far, and the latest fields. The rate counts from
    the first event on (not the workers' start-up)."""

    total: int
    done: int = 0
    fields: dict[str, Any] = field(default_factory=dict)
    first: tuple[float, int] | None = None
    """(time, done) at the first event: the rate counts what was done after it."""

    def add(self, event: dict[str, Any]) -> None:
        self.done = event["done"] if event.get("done") is not None else self.done + event["advance"]
        own = {k: v for k, v in event.items() if k not in ("part", "advance", "done")}
        self.fields.update(own)
        if self.first is None:
            self.first = (time.monotonic(), self.done)

    def rate(self) -> float:
        """Units per second since the first event; 0 until :data:`MIN_RATE_S` have passed
        (events that arrive together right after the first would otherwise show an absurd
        rate, e.g. ``106288 epochs/s``)."""
        if self.first is None:
            return 0.0
        elapsed = time.monotonic() - self.first[0]
        return (self.done - self.first[1]) / elapsed if elapsed >= MIN_RATE_S else 0.0

    def line(self, title: str, unit: str, describe: Describe, final: bool = False) -> str:
        """The plain-text line: ``[binllm] title: 40/175 steps (23%), 0.95 steps/s, ETA 2m22s,
        loss 0.6710, ...``; the last one without an ETA."""
        share = 100 * self.done / max(self.total, 1)
        parts = [f"{self.done:,}/{self.total:,} {unit}s ({share:.0f}%)"]
        rate = self.rate()
        if rate > 0:
            parts.append(f"{rate:.2f} {unit}s/s")
        if not final and 0 < self.done < self.total and rate > 0:
            parts.append(f"ETA {_duration((self.total - self.done) / rate)}")
        own = describe(self.fields)
        if own:
            parts.append(own)
        return f"[binllm] {title}: {', '.join(parts)}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class _Display:
    """Draws a tally: a tqdm bar on a terminal (made at the first event, counting from there,
    so that a resumed run's rate is its own), plain lines elsewhere."""

    def __init__(self, title: str, total: int, unit: str, describe: Describe, out: TextIO) -> None:
        self.title, self.unit, self.describe, self.out = title, unit, describe, out
        self.tally = Tally(total)
        self.terminal = out.isatty()
        self.bar: Any = None
        """The tqdm bar, on a terminal, from the first event on."""
        self.last_line = time.monotonic()
        self.last_said: tuple[int, str] = (0, "")
        """What the last plain line said (count and fields)."""

    def update(self, events: list[dict[str, Any]]) -> None:
        before = self.tally.done
        for event in events:
            self.tally.add(event)
        if not events:
            return
        if self.terminal:
            self._draw(before)
        elif time.monotonic() - self.last_line >= PLAIN_EVERY_S:
            self.emit()

    def _draw(self, before: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(
                total=self.tally.total,
                initial=self.tally.done,
                desc=f"[binllm] {self.title}",
                unit=self.unit,
                file=self.out,
                leave=False,
                delay=MIN_RATE_S,  # no bar (and no rate) before there is a rate to show
                smoothing=0,  # the rate over the whole part, not over the last burst of events
            )
        else:
            self.bar.update(self.tally.done - before)
        self.bar.set_postfix_str(self.describe(self.tally.fields))

    def emit(self, final: bool = False) -> None:
        line = self.tally.line(self.title, self.unit, self.describe, final)
        print(line, file=self.out, flush=True)
        self.last_line, self.last_said = time.monotonic(), self._state()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tally.done and self._state() != self.last_said:  # where it ended, once
            self.emit(final=True)

    def _state(self) -> tuple[int, str]:
        return self.tally.done, self.describe(self.tally.fields)


@contextmanager
def progress(
    title: str, total: int, unit: str, describe: Describe = lambda fields: ""
) -> Iterator[Reporter]:
    """A reporter for the workers of one stage part, and its display on the driver while the
    block runs (only under an open console; otherwise, or if the display cannot start, a
    reporter that does nothing)."""
    shown = console.current()
    started = _start(shown, title, total, unit, describe) if shown is not None else None
    if started is None:
        yield Reporter()
        return
    reporter, display, stop, thread = started
    finished = False
    try:
        yield reporter
        finished = True
    finally:
        try:
            stop.set()
            thread.join(timeout=15)
            if finished:  # an error or Ctrl-C is reported at once
                _last_events(reporter, display)
        finally:
            display.close()


def _start(
    shown: console.Console, title: str, total: int, unit: str, describe: Describe
) -> tuple[Reporter, _Display, threading.Event, threading.Thread] | None:
    global _parts
    if total <= 0:
        return None
    try:
        board = _board_of(shown)
    except Exception as err:  # noqa: BLE001 - progress is a display; the work goes on without it
        logging.getLogger("binllm").warning("no progress display: %s", err)
        return None
    _parts += 1
    reporter = Reporter(board, _parts)
    display = _Display(title, total, unit, describe, shown.terminal)
    stop = threading.Event()

    def drain() -> None:
        while not stop.wait(POLL_S):
            try:
                display.update(ray.get(board.take.remote(reporter.part), timeout=10))
            except Exception:  # noqa: BLE001 - the display stops; the work goes on
                return

    thread = threading.Thread(target=drain, name=f"binllm-progress-{title}", daemon=True)
    thread.start()
    return reporter, display, stop, thread


def _last_events(reporter: Reporter, display: _Display, settle_s: float = 0.3) -> None:
    """Drain what workers posted just before they finished: their posts are not ordered with
    the driver's calls, so take until a pause brings nothing (at most a few seconds)."""
    board, part = reporter.board, reporter.part
    deadline = time.monotonic() + 5.0
    try:
        while time.monotonic() < deadline:
            events = ray.get(board.take.remote(part), timeout=10)
            display.update(events)
            if not events:
                time.sleep(settle_s)
                if not (events := ray.get(board.take.remote(part), timeout=10)):
                    return
                display.update(events)
    except Exception:  # noqa: BLE001 - a last drain is a nicety
        return
