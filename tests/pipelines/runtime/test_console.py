"""The console of one command, without Ray: Ray's log handlers are swapped for the run's log
file and put back, the file is made only when something is logged, an unexpected error's
trace lands in it, and an unwritable run folder falls back to a temp file."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import fsspec
import pytest

from jobs.cli import main
from pipelines.runtime import console
from pipelines.runtime.console import Console

LOCAL = fsspec.filesystem("file")


@pytest.fixture
def ray_like_logger():
    """A logger under ``ray`` with a console handler, as Ray's own loggers have."""
    logger = logging.getLogger("ray.binllm_test")
    handler = logging.StreamHandler(sys.stderr)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, handler
    logger.removeHandler(handler)


def ours(logger: logging.Logger) -> list[logging.Handler]:
    """The console's file handlers on ``logger``."""
    return [h for h in logger.handlers if type(h).__name__ == "_LogFile"]


def test_rays_lines_go_to_the_file_and_everything_is_put_back(tmp_path: Path, ray_like_logger):
    logger, handler = ray_like_logger
    binllm_log = logging.getLogger("binllm")
    before = (binllm_log.level, binllm_log.propagate, list(binllm_log.handlers), sys.stderr)
    with pytest.raises(RuntimeError, match="boom"):
        with Console(LOCAL, str(tmp_path / "run"), "run", argv=["run", "x.yaml"]) as shown:
            assert console.current() is shown
            assert handler not in logger.handlers
            assert not (tmp_path / "run" / "_logs").exists()  # nothing logged yet
            logger.info("Starting execution of Dataset d_1")
            raise RuntimeError("boom")
    (log,) = (tmp_path / "run" / "_logs").glob("*-run-*.log")
    text = log.read_text()
    assert text.splitlines()[0].endswith("binllm command: binllm run x.yaml")
    assert "Starting execution of Dataset d_1" in text
    assert "the command stopped:" in text and "RuntimeError: boom" in text
    assert console.error_log() == str(log)
    assert console.current() is None
    assert handler in logger.handlers and not ours(logger)
    after = (binllm_log.level, binllm_log.propagate, list(binllm_log.handlers), sys.stderr)
    assert after == before


def test_a_command_that_logs_nothing_leaves_no_file(tmp_path: Path):
    with Console(LOCAL, str(tmp_path / "run"), "run"):
        pass
    assert not (tmp_path / "run").exists()


def test_verbose_keeps_rays_handlers_and_still_writes_the_file(tmp_path: Path, ray_like_logger):
    logger, handler = ray_like_logger
    with Console(LOCAL, str(tmp_path / "run"), "run", verbose=True):
        assert handler in logger.handlers and ours(logger)
        logger.info("Execution plan of d_1")
    (log,) = (tmp_path / "run" / "_logs").glob("*.log")
    assert "Execution plan of d_1" in log.read_text()
    assert handler in logger.handlers and not ours(logger)


def test_a_run_folder_that_cannot_hold_the_log_falls_back_to_a_temp_file(
    tmp_path: Path, ray_like_logger, capsys
):
    logger, _ = ray_like_logger
    (tmp_path / "afile").write_text("not a folder")
    with Console(LOCAL, str(tmp_path / "afile" / "run"), "run") as shown:
        logger.info("a Ray line")
    assert shown.path.parent.name.startswith("binllm-logs-") and shown.path.exists()
    assert f"[binllm] log: {shown.path}" in capsys.readouterr().out
    shown.path.unlink()


def test_an_unexpected_error_is_one_line_pointing_at_its_trace(tmp_path: Path, monkeypatch, capsys):
    def broken(cfg, names, force=False):
        console.current().ray_started()  # as ensure_ray does: the log exists from here on
        raise KeyError("no such column")

    monkeypatch.setattr("pipelines.runtime.registry.run_pipeline", broken)
    assert main(["run", "configs/tiny.yaml", "--set", f"output_root={tmp_path}"]) == 1
    err = capsys.readouterr().err
    (log,) = (tmp_path / "tiny" / "_logs").glob("*.log")
    assert err == (
        f"binllm: internal error: KeyError: 'no such column'; the whole trace is in {log} "
        "(please report it with that file)\n"
    )
    assert "Traceback" in log.read_text()


def test_an_error_before_ray_starts_leaves_no_log(tmp_path: Path, capsys):
    missing = tmp_path / "no-model"
    sets = ["--set", f"output_root={tmp_path}", "--set", f"model.backbone={missing}"]
    assert main(["run", "configs/tiny.yaml", *sets]) == 2
    assert capsys.readouterr().err.startswith("binllm: error: ")
    assert not (tmp_path / "tiny" / "_logs").exists()


def test_a_log_file_on_a_full_disk_is_one_line_not_one_per_record(
    tmp_path: Path, ray_like_logger, capsys
):
    """/dev/full answers every write with ENOSPC, as a full disk does."""
    logger, _ = ray_like_logger
    with Console(LOCAL, str(tmp_path / "run"), "run") as shown:
        logger.info("first")  # opens the file
        (handler,) = ours(logger)
        handler.stream = open("/dev/full", "w", encoding="utf-8")  # noqa: SIM115
        for i in range(50):
            logger.info("line %d", i)
        assert shown is console.current()
    err = capsys.readouterr().err
    assert err.count("cannot be written") == 1 and "No space left on device" in err
    assert "Logging error" not in err and err.count("\n") == 1


def test_the_raylets_warnings_go_to_the_file_not_the_terminal(tmp_path: Path, ray_session, capsys):
    """The raylet's warnings ("(raylet) WARNING: 8 PYTHON worker processes have been
    started…", under load) reach the driver as errors that a thread of Ray's prints to
    ``sys.stdout`` through no logger: they go to the log file, and back to stdout after."""
    import time

    import ray
    from ray._private.utils import publish_error_to_driver

    from pipelines.runtime.ray_helpers import ensure_ray

    gcs = ray._private.worker.global_worker.gcs_client
    line = "WARNING: 8 PYTHON worker processes have been started (binllm test)"
    with Console(LOCAL, str(tmp_path / "run"), "run") as shown:
        ensure_ray()
        publish_error_to_driver("binllm_test", line, gcs_client=gcs)
        deadline = time.time() + 20
        while line not in shown.path.read_text() and time.time() < deadline:
            time.sleep(0.1)
    assert f"(raylet) {line}" in shown.path.read_text()
    said = capsys.readouterr()
    assert line not in said.out + said.err
    publish_error_to_driver("binllm_test", "after the console", gcs_client=gcs)
    deadline = time.time() + 20
    while "after the console" not in capsys.readouterr().out and time.time() < deadline:
        time.sleep(0.1)
    assert time.time() < deadline  # Ray's own printing is put back
