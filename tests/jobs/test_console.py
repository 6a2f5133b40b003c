"""What a person sees running ``binllm`` in a terminal or a CI log: binllm's lines, Ray's in the
run's log file, one line for an error whose trace is in that file, and Ctrl-C stopping a real
run mid-stage with nothing committed after it. (``-v`` and the console's own mechanics:
tests/pipelines/runtime/test_console.py.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
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


class Cuttable:
    """A TCP proxy to ``upstream`` (host, port) that can be cut: from then on nothing answers
    on its port, as when an object store dies, while the store behind it keeps what it held."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.upstream)
            except OSError:
                return
            self.open += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self.listener.close()
        for s in self.open:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass


def test_a_store_that_dies_mid_stage_is_one_line_and_what_it_held_is_unchanged(
    tmp_path: Path, s3_bucket
):
    """output_root on a real S3 API (moto) that stops answering while encode writes to it:
    exit 2, one line naming the storage and what to check and the log, no trace; the stages
    published before are what they were."""
    import s3fs

    root, options = s3_bucket
    store = s3fs.S3FileSystem(**options)
    upstream = options["endpoint_url"].rsplit(":", 1)
    proxy = Cuttable((upstream[0].removeprefix("http://"), int(upstream[1])))
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    command = [
        sys.executable,
        "-m",
        "jobs.cli",
        "run",
        "configs/tiny.yaml",
        "--stages",
        "ingest,samples,encode",
        "--set",
        f"output_root={root}",
        "--set",
        f"output_storage_options.endpoint_url=http://127.0.0.1:{proxy.port}",
    ]
    out_path, err_path = tmp_path / "out.txt", tmp_path / "err.txt"
    with out_path.open("w") as out_file, err_path.open("w") as err_file:
        child = subprocess.Popen(command, cwd=REPO, env=env, stdout=out_file, stderr=err_file)
        deadline = time.time() + 300
        while "[binllm] encode: running" not in out_path.read_text():
            assert child.poll() is None and time.time() < deadline, err_path.read_text()
            time.sleep(0.1)
        before = {p: store.info(p)["ETag"] for p in store.find(f"{root}/tiny/samples")}
        before |= {p: store.info(p)["ETag"] for p in store.find(f"{root}/tiny/ingest")}
        time.sleep(3)  # encode's Ray Train run is up and writing
        proxy.cut()
        child.wait(timeout=300)
    out, err = out_path.read_text(), err_path.read_text()
    assert child.returncode == 2, err
    # binllm's stage lines, then one line: the store, what to check, the log (left local: the
    # store cannot take it), and nothing about the log's copy that failed
    lines = [line for line in (out + err).splitlines() if not line.startswith("[binllm] ")]
    assert len(lines) == 1 and "Traceback" not in out + err, err
    assert lines[0].startswith("binllm: error: the storage stopped answering ("), err
    assert f"http://127.0.0.1:{proxy.port}/" in lines[0]
    assert "check that the store (endpoint_url) is up and reachable" in lines[0]
    log = Path(lines[0].split("; the trace is in ")[1])
    assert "Traceback" in log.read_text() and "the log stays" not in out + err
    store.invalidate_cache()
    after = {p: store.info(p)["ETag"] for p in store.find(f"{root}/tiny/samples")}
    after |= {p: store.info(p)["ETag"] for p in store.find(f"{root}/tiny/ingest")}
    assert after == before and before
