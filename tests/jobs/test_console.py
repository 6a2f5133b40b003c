"""What a person sees running ``binllm`` in a terminal or a CI log: binllm's lines, Ray's in the
run's log file, one line for an error whose trace is in that file, and Ctrl-C stopping a real
run mid-stage with nothing committed after it. (``-v`` and the console's own mechanics:
tests/pipelines/test_console.py.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, REPO

pytestmark = pytest.mark.slow


def binllm(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def log_files(run: Path) -> list[Path]:
    return sorted((run / "_logs").glob("*.log"))


def test_an_error_in_a_ray_task_is_one_line_and_its_trace_is_in_the_log(tmp_path: Path):
    data = tmp_path / "data"
    shutil.copytree(FIXTURES / "tiny", data)
    inter = data / "tiny.inter"
    lines = inter.read_text().splitlines()
    lines[5] = "u1\tnot-a-number"
    inter.write_text("\n".join(lines) + "\n")
    done = binllm(
        "run",
        "configs/tiny.yaml",
        "--stages",
        "ingest",
        "--set",
        f"output_root={tmp_path}",
        "--set",
        f"data.uri={data}",
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("binllm: error: ")
    assert "tiny.inter line 6" in done.stderr
    (log,) = log_files(tmp_path / "tiny")
    text = log.read_text()
    assert "the command stopped:" in text and "Traceback" in text


def test_ctrl_c_stops_a_real_run_mid_stage_and_commits_nothing_after(tmp_path: Path):
    """SIGINT while finetune's Ray Train run trains: exit 130 with one line, finetune publishes
    nothing, no later stage runs, and render's output stays as it was. On the way the console
    held binllm's lines only, Ray's went to the run's log file."""
    command = [
        sys.executable,
        "-m",
        "jobs.cli",
        "run",
        "configs/tiny.yaml",
        "--set",
        f"output_root={tmp_path}",
        "--set",
        "prompts.modes=[text]",
        "--set",
        "finetune.strategy=text_only",
        "--set",
        "finetune.step1.max_steps=400",
        "--set",
        "finetune.eval_every=2",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Files, not pipes: a full pipe would block the child.
    with (tmp_path / "out.txt").open("w") as out_file, (tmp_path / "err.txt").open("w") as err_file:
        child = subprocess.Popen(command, cwd=REPO, env=env, stdout=out_file, stderr=err_file)
        run = tmp_path / "tiny"
        deadline = time.time() + 420
        # Interrupt once finetune has written a checkpoint (its workers are up and stepping).
        while not any((run / "finetune").rglob("checkpoint_*")):
            failed = child.poll() is not None or time.time() > deadline
            assert not failed, (tmp_path / "err.txt").read_text()
            time.sleep(1)
        child.send_signal(signal.SIGINT)
        child.wait(timeout=180)
    out, err = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
    assert child.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("binllm: interrupted")
    # What a person saw: binllm's lines only (stages, progress, the interruption)...
    said = [line for line in (out + err).splitlines() if line.strip()]
    assert all(line.startswith(("[binllm] ", "binllm: ")) for line in said), said
    (log,) = log_files(run)
    assert f"[binllm] log: {log}" in said
    # ...and Ray's in the run's log file.
    text = log.read_text()
    assert "Starting execution of Dataset" in text and "Started a local Ray instance" in text
    assert "[binllm] score" not in out and "finetune: done" not in out
    assert not (run / "finetune" / "_manifest.json").exists()
    render = json.loads((run / "render" / "_manifest.json").read_text())
    assert (run / "render" / render["tables"]["prompts"]["path"]).is_dir()
    status = binllm(
        "status",
        "configs/tiny.yaml",
        "--set",
        f"output_root={tmp_path}",
        "--set",
        "prompts.modes=[text]",
        "--set",
        "finetune.strategy=text_only",
        "--set",
        "finetune.step1.max_steps=400",
        "--set",
        "finetune.eval_every=2",
    )
    states = {row.split()[0]: row.split()[1] for row in status.stdout.splitlines()[1:]}
    assert states["render"] == "done" and states["finetune"] == "missing", status.stdout


def interrupt_when(tmp_path: Path, args: list[str], said: str, timeout: int = 300) -> tuple:
    """Run ``binllm ARGS`` in a process group of its own and send SIGINT to the whole group,
    as a terminal's Ctrl-C does (Ray's processes are in it too), once stdout or stderr holds
    ``said``; its exit code, stdout and stderr."""
    command = [sys.executable, "-m", "jobs.cli", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out_path, err_path = tmp_path / "out.txt", tmp_path / "err.txt"
    with out_path.open("w") as out_file, err_path.open("w") as err_file:
        child = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out_file, stderr=err_file, start_new_session=True
        )
        deadline = time.time() + timeout
        while said not in out_path.read_text() + err_path.read_text():
            assert child.poll() is None and time.time() < deadline, err_path.read_text()
            time.sleep(0.02)
        os.killpg(child.pid, signal.SIGINT)
        child.wait(timeout=180)
    return child.returncode, out_path.read_text(), err_path.read_text()


def assert_one_interrupted_line(code: int, out: str, err: str) -> None:
    assert code == 130, err
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert lines[-1].startswith("binllm: interrupted: "), lines
    assert all(line.startswith(("[binllm] ", "binllm: ")) for line in lines), lines
    assert "Traceback" not in out + err and err.count("binllm: ") == 1


def test_ctrl_c_while_ray_stops_after_the_last_stage_is_130_and_one_line(tmp_path: Path):
    """Ray is stopped by the command, while its lines still go to the log: a Ctrl-C then
    (before: Ray's atexit shutdown printed "Exception ignored in atexit callback" and its trace,
    and the exit code was 0) is 130 and the one line; the stage it follows stays published."""
    args = ["run", "configs/tiny.yaml", "--stages", "ingest", "--set", f"output_root={tmp_path}"]
    assert_one_interrupted_line(*interrupt_when(tmp_path, args, "[binllm] ingest: done"))
    status = binllm("status", "configs/tiny.yaml", "--set", f"output_root={tmp_path}")
    states = {row.split()[0]: row.split()[1] for row in status.stdout.splitlines()[1:]}
    assert states["ingest"] == "done", status.stdout
