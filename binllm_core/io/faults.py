"""Test-only fault points: one switch, ``BINLLM_TEST_FAULT=POINT`` or ``POINT@N``.

Tests use it to kill a real process at a chosen moment and then check what survives: a reader
of the outputs, a resumed training run, a restarted actor. The process exits at once
(``os._exit``, exit code 86), without clean-up, as a killed process would, or (where the point
says so) raises :class:`InjectedFault`, as a crashing training function would. The points:

* ``publish``: the driver, between writing a new version and publishing its pointer;
* ``encode-epoch@N``: rank 0 of the encoder's Ray Train run, at the start of epoch N (0-based);
* ``finetune-step@N``: rank 0 of a finetune step's Ray Train run raises after optimizer step N
  (a raise, not an exit: it lets Ray Train register the checkpoint reported just before);
* ``scorer-batch@N``: a scoring actor, at its N-th batch.

Ray workers do not see the driver's environment, so the driver reads the switch
(:func:`armed`) and hands the :class:`Fault` to its workers in their config; a marker file makes
each fault fire once (a restarted worker, or a resumed run, goes on).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

ENV = "BINLLM_TEST_FAULT"
EXIT_CODE = 86


class InjectedFault(RuntimeError):
    """The failure a fault point raises instead of exiting."""


@dataclass(frozen=True)
class Fault:
    """An armed fault: kill the process when the count reaches ``at``, once."""

    point: str
    at: int
    marker: str
    """A file (local path or URI) written just before the kill; while it exists, no kill."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    raises: bool = False
    """Raise :class:`InjectedFault` instead of exiting the process."""

    def reached(self, count: int) -> None:
        """Exit at once when ``count`` is the armed one and the fault has not fired yet."""
        if count != self.at:
            return
        from fsspec.core import url_to_fs

        fs, path = url_to_fs(self.marker, **self.storage_options)
        if fs.exists(path):
            return
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "w") as fh:
            fh.write(f"{self.point}@{count}: fault injected\n")
        if self.raises:
            raise InjectedFault(f"{ENV}: failure injected at {self.point}@{count}")
        _exit(f"{self.point}@{count}")


def _switch() -> tuple[str, int | None]:
    point, _, at = os.environ.get(ENV, "").partition("@")
    return point, int(at) if at else None


def armed(
    point: str,
    marker: str,
    storage_options: dict[str, Any] | None = None,
    raises: bool = False,
) -> Fault | None:
    """The fault the environment arms at ``point`` (with a count), or None."""
    name, at = _switch()
    if name != point or at is None:
        return None
    return Fault(point, at, marker, dict(storage_options or {}), raises)


def fault_point(point: str) -> None:
    """Exit at once when the environment names this point (one without a count)."""
    name, at = _switch()
    if name == point and at is None:
        _exit(point)


def _exit(what: str) -> None:
    sys.stderr.write(f"{ENV}: process killed at {what}\n")
    sys.stderr.flush()
    os._exit(EXIT_CODE)
