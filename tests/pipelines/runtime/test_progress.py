"""The progress a person sees while a stage's workers run: plain lines off a terminal, a bar on
one, and the events of Ray workers reaching the driver's display."""

from __future__ import annotations

import io
from pathlib import Path

import fsspec
import pytest
import ray

from pipelines.runtime import progress as progress_module
from pipelines.runtime.console import Console
from pipelines.runtime.progress import Tally, _Display, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def describe(fields: dict) -> str:
    return f"loss {fields['loss']:.2f}" if "loss" in fields else ""


def test_plain_lines_give_count_rate_eta_and_the_stage_fields(monkeypatch):
    monkeypatch.setattr(progress_module, "PLAIN_EVERY_S", 0.0)
    monkeypatch.setattr(progress_module, "MIN_RATE_S", 0.0)
    out = io.StringIO()
    display = _Display("finetune step1 (binary)", 10, "step", describe, out)
    display.update([{"part": 1, "advance": 0, "done": 1, "loss": 0.9}])
    display.update([{"part": 1, "advance": 0, "done": 4, "loss": 0.7}])
    display.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "[binllm] finetune step1 (binary): 1/10 steps (10%), loss 0.90"
    assert lines[1].startswith("[binllm] finetune step1 (binary): 4/10 steps (40%), ")
    assert "steps/s, ETA " in lines[1] and lines[1].endswith("loss 0.70")
    assert len(lines) == 2  # closing repeats nothing that was already said


def test_closing_says_where_it_ended_without_an_eta():
    out = io.StringIO()  # the periodic lines are 30 s apart: none in this test
    display = _Display("score binary", 200, "prompt", lambda f: "", out)
    display.update([{"part": 1, "advance": 64, "done": None}])
    display.update([{"part": 1, "advance": 64, "done": None}])
    display.close()
    (line,) = out.getvalue().splitlines()
    assert line.startswith("[binllm] score binary: 128/200 prompts (64%)")
    assert "ETA" not in line


def test_a_terminal_gets_a_bar_then_the_last_line(monkeypatch):
    monkeypatch.setattr(progress_module, "MIN_RATE_S", 0.0)
    out = Terminal()
    display = _Display("encode", 20, "epoch", describe, out)
    display.update([{"part": 1, "advance": 0, "done": 5, "loss": 2.2}])
    display.update([{"part": 1, "advance": 0, "done": 7, "loss": 2.1}])
    assert display.bar is not None and display.bar.n == 7 and display.bar.initial == 5
    display.close()
    text = out.getvalue()
    assert "[binllm] encode" in text and "\r" in text  # tqdm redraws in place
    assert text.rstrip().splitlines()[-1].startswith("[binllm] encode: 7/20 epochs (35%)")


def test_a_position_replaces_the_count_and_the_rate_counts_from_the_first_events():
    tally = Tally(total=100)
    tally.add({"part": 1, "advance": 0, "done": 40})  # a resumed run reports its step
    tally.add({"part": 1, "advance": 0, "done": 41})
    assert tally.done == 41 and tally.first is not None and tally.first[1] == 40
    tally.first = (tally.first[0] - 2.0, 40)  # the first event was 2 s ago
    assert tally.rate() == pytest.approx(0.5, rel=0.01)  # one step in 2 s, not 41


def test_a_burst_of_events_right_after_the_first_shows_no_rate(monkeypatch):
    """Encode's resumed epochs arrive together: 1 to 106 epochs in a millisecond is no rate."""
    monkeypatch.setattr(progress_module, "PLAIN_EVERY_S", 0.0)
    out = io.StringIO()
    display = _Display("encode", 200, "epoch", lambda f: "", out)
    display.update([{"part": 1, "advance": 0, "done": 1}])
    display.update([{"part": 1, "advance": 0, "done": 106}])
    assert display.tally.rate() == 0.0
    assert out.getvalue().splitlines()[-1] == "[binllm] encode: 106/200 epochs (53%)"


def test_without_a_console_the_reporter_does_nothing():
    with progress("render", 10, "prompt") as reporter:
        assert reporter.board is None
        reporter.post(advance=5)  # no actor, no error


@pytest.mark.slow
def test_workers_posts_reach_the_display(ray_session, tmp_path: Path, monkeypatch):
    """Events posted by Ray tasks (as Ray Train workers and scoring actors do) are drawn by the
    driver; a second part of the same command shares the board but not its events."""
    monkeypatch.setattr(progress_module, "PLAIN_EVERY_S", 0.0)

    @ray.remote(num_cpus=0)
    def work(reporter, n: int) -> None:
        for i in range(n):
            reporter.post(advance=1, loss=1.0 / (i + 1))
        reporter.flush()

    with Console(fsspec.filesystem("file"), str(tmp_path / "run"), "test") as shown:
        shown.terminal = out = io.StringIO()
        with progress("part one", 6, "row", describe) as reporter:
            ray.get([work.remote(reporter, 3), work.remote(reporter, 3)])
        with progress("part two", 2, "row", describe) as reporter:
            ray.get(work.remote(reporter, 2))
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("[binllm] part two: 2/2 rows (100%)")
    assert any(line.startswith("[binllm] part one: 6/6 rows (100%)") for line in lines)
