"""What every benchmark script shares: peak-memory sampling and writing its results.

Results go to ``benchmarks/results/<name>.json`` and to the script's own section of
``BENCHMARKS.md`` (between ``<!-- name:start -->`` and ``<!-- name:end -->``), so each script
rewrites only its table and the numbers in the file always come from a run.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
SHARED = ROOT.parent / "shared"


class PeakMemory:
    """Peak resident memory (bytes) of this process and all its descendants, by polling; and of
    the process alone (``peak_self``).

    Ray's raylet and workers are descendants of a driver that started Ray locally, so the tree
    counts the whole pipeline and the process alone is the driver; a plain single-process run is
    measured the same way.
    """

    def __init__(self, pid: int | None = None, interval_s: float = 0.1) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak = 0
        self.peak_self = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _rss(self) -> tuple[int, int]:
        """(the tree's, the process's own) resident bytes now."""
        try:
            me = psutil.Process(self.pid)
            own = me.memory_info().rss
        except psutil.Error:
            return 0, 0
        total = own
        for proc in me.children(recursive=True):
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                continue
        return total, own

    def _sample(self) -> None:
        tree, own = self._rss()
        self.peak = max(self.peak, tree)
        self.peak_self = max(self.peak_self, own)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self.baseline, self.baseline_self = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


@contextmanager
def measured(pid: int | None = None) -> Iterator[dict[str, float]]:
    """Wall time (s) and peak RSS (GiB) of the process tree of ``pid`` (default: this one), and
    of the process alone (``self_*``)."""
    out: dict[str, float] = {}
    with PeakMemory(pid) as mem:
        start = time.perf_counter()
        yield out
        out["wall_s"] = time.perf_counter() - start
    out["peak_rss_gib"] = mem.peak / 2**30
    out["extra_rss_gib"] = max(mem.peak - mem.baseline, 0) / 2**30
    out["self_peak_rss_gib"] = mem.peak_self / 2**30
    out["self_extra_rss_gib"] = max(mem.peak_self - mem.baseline_self, 0) / 2**30


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def commit() -> str:
    """HEAD's short hash, with ``+dirty`` when tracked files other than the benchmarks' own
    outputs differ from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
             ":!BENCHMARKS.md", ":!benchmarks/results"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (head + ("+dirty" if dirty else "")) if head else "unknown"


def save(name: str, result: dict[str, Any], markdown: str) -> Path:
    """Write the JSON result and replace this benchmark's section of BENCHMARKS.md."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": name, "commit": commit(), "machine": machine(), **result}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = f"{start}\n{markdown.strip()}\n\n_From `{path.relative_to(ROOT)}`, commit " \
        f"{result['commit']}, {result['machine']['cpus']} CPUs._\n{end}"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else (
        "# Benchmarks\n\nEvery table below is written by the script named in its heading.\n"
    )
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    BENCHMARKS_MD.write_text(text)
    return path


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
