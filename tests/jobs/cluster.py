"""A two-node Ray cluster on one machine, for tests that must not pass by sharing a disk.

The layout of ``cluster.yaml``: a head with ``CPU: 0`` (it runs the jobs' drivers and nothing
else) and a second node with the CPUs, so that every task, actor and Ray Train worker runs there.
The second node is started inside its own mount and UTS namespaces (``unshare --mount --uts``,
needs root) where tmpfs hides the repository, the tests' output folders and ``/tmp``, and only
the venv is bind-mounted back: it can reach the head, S3 and nothing the driver wrote on its
disk; it has a host name of its own. Every
process of both nodes is in a process group of its own, stopped by that group, never ``ray stop``.

Not a test module: the fixture of ``test_two_nodes.py`` is built from these pieces.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.builders import free_port

REPO = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)
RAY = str(Path(sys.executable).parent / "ray")

# Test credentials for moto (any value works), given to the jobs' drivers and workers.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}

# Small budgets: every stage still runs, each only briefly on 2 cores.
FAST = [
    "finetune.step1.max_steps=4",
    "finetune.step2.max_steps=4",
    "finetune.step1.batch_size=8",
    "finetune.step2.batch_size=8",
    "finetune.step1.warmup_steps=1",
    "finetune.step2.warmup_steps=1",
    "finetune.eval_every=2",
    "retrieve.top_n=0",  # recommend and nightly --topk retrieve for themselves
    "encoder.max_epochs=3",
    "prompts.modes=[text,binary]",
    "score.splits=[test]",
]


NAMESPACE_CHECK = "mount -t tmpfs tmpfs /tmp && hostname binllm-check"


def skip_reason() -> str | None:
    """Why this machine cannot run the two-node cluster (None: it can)."""
    if os.geteuid() != 0:
        return "the second node's mount namespace (unshare -m, tmpfs) needs root"
    for tool in ("unshare", "mount", "umount", "hostname"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    tried = subprocess.run(
        ["unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c", NAMESPACE_CHECK],
        capture_output=True,
        text=True,
    )
    if tried.returncode:
        return f"no mount/UTS namespace here (unshare: {tried.stderr.strip()[:200]})"
    try:
        import ray.dashboard.optional_deps  # noqa: F401
        from ray.job_submission import JobSubmissionClient  # noqa: F401
    except ImportError:
        return "job submission needs ray[default] (the dashboard)"
    try:
        import moto.server  # noqa: F401
    except ImportError:
        return "the S3 server needs moto[server]"
    return None


def ray_env() -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    # A job's `python -m ...` is this venv's python, activated or not (as on a cluster image).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _ports(*names: str) -> list[str]:
    # Fixed defaults (e.g. the agent's 52365) clash with any other Ray on the machine.
    return [f"--{name}={free_port()}" for name in names]


AGENT_PORTS = (
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
)


def head_command(gcs_port: int, dashboard_port: int, temp_dir: str, num_cpus: int = 0) -> list[str]:
    """``ray start --head``; with no CPUs (the default, as ``cluster.yaml``'s head) the jobs'
    drivers run here and nothing else."""
    return [
        RAY,
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs_port}",
        f"--dashboard-port={dashboard_port}",
        *_ports(*AGENT_PORTS, "ray-client-server-port"),
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--num-cpus={num_cpus}",
        "--object-store-memory=500000000",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
    ]


def worker_command(gcs_port: int) -> list[str]:
    """``ray start`` of the second node (its temp dir is on its own /tmp, a tmpfs)."""
    return [
        RAY,
        "start",
        f"--address=127.0.0.1:{gcs_port}",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=2",
        *_ports("node-manager-port", "object-manager-port", *AGENT_PORTS),
        "--object-store-memory=500000000",
        "--disable-usage-stats",
        "--temp-dir=/tmp/ray",
    ]


HOSTNAME = "binllm-node2"


def hidden_node_shell(
    command: list[str], hide: list[Path], venv: Path, side: Path, home: str = "/tmp/home"
) -> str:
    """The shell that ``unshare --mount --uts --propagation private sh -c`` runs for the second
    node.

    The node gets a host name of its own (as on a cluster: messages and manifests name hosts),
    the venv is bind-mounted aside, tmpfs goes over every folder of ``hide`` (a path under an
    earlier one is made on its tmpfs first, so the order does not matter), the venv is
    bind-mounted back at its own path, and the node starts from ``/`` with a fresh ``HOME``.
    """
    q = shlex.quote
    lines = ["set -eu", f"hostname {HOSTNAME}", f"mount --bind {q(str(venv))} {q(str(side))}"]
    for path in hide:
        lines.append(f"mkdir -p {q(str(path))} && mount -t tmpfs tmpfs {q(str(path))}")
    lines += [
        f"mkdir -p {q(str(venv))}",
        f"mount --bind {q(str(side))} {q(str(venv))}",
        f"umount {q(str(side))}",
        f"mkdir -p {q(home)}",
        f"export HOME={q(home)} TMPDIR=/tmp",
        "cd /",
        "exec " + " ".join(q(c) for c in command),
    ]
    return "\n".join(lines)


def _signal_group(proc: subprocess.Popen, sig: int) -> bool:
    """Send ``sig`` to the process group ``proc`` leads; False when the group is gone."""
    try:
        os.killpg(proc.pid, sig)
        return True
    except ProcessLookupError:
        return False


def stop_groups(procs: list[subprocess.Popen], grace: float = 5) -> None:
    """Stop process groups started with ``start_new_session``, all at once: SIGTERM, then
    SIGKILL after ``grace`` seconds (``ray start --block`` often outlives SIGTERM), then wait
    until no process of any group is left (never ``ray stop``: it stops every Ray here)."""
    for proc in procs:
        _signal_group(proc, signal.SIGTERM)
    deadline = time.time() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        _signal_group(proc, signal.SIGKILL)
    for proc in procs:
        proc.wait(timeout=10)  # reaped: a zombie leader would keep its group "alive"
    deadline = time.time() + 10
    while any(_signal_group(p, 0) for p in procs) and time.time() < deadline:
        time.sleep(0.2)


# Run by a driver of its own (a subprocess, so that the test process's own Ray, if any, is not
# touched): one task pinned to each node reports what that node can see.
PROBE = r"""
import json, os, sys, time
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

address, paths = sys.argv[1], json.loads(sys.argv[2])
ray.init(address=address, log_to_driver=False)
deadline = time.time() + 180
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= 2 or time.time() > deadline:
        break
    time.sleep(1)


@ray.remote(num_cpus=0)
def look(paths):
    import os
    import socket
    import ray
    try:
        import binllm_core  # noqa: F401
        importable = True
    except ImportError:
        importable = False
    return {
        "node": ray.get_runtime_context().get_node_id(),
        "host": socket.gethostname(),
        "cwd": os.getcwd(),
        "home": os.path.expanduser("~"),
        "seen": {p: os.path.exists(p) for p in paths},
        "binllm_importable": importable,
    }


out = {"driver_node": ray.get_runtime_context().get_node_id(), "nodes": [], "looks": {}}
for n in alive:
    out["nodes"].append({"id": n["NodeID"], "cpus": n["Resources"].get("CPU", 0)})
    pinned = look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], False))
    out["looks"][n["NodeID"]] = ray.get(pinned.remote(paths), timeout=180)
print("PROBE " + json.dumps(out))
"""


def probe(gcs: str, paths: list[str], cwd: Path) -> dict[str, Any]:
    """What each node of the cluster at ``gcs`` sees of ``paths`` (see :data:`PROBE`)."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, gcs, json.dumps(paths)],
        env=ray_env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
    assert done.returncode == 0 and lines, f"probe failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    return json.loads(lines[-1][len("PROBE ") :])


def wait_for_dashboard(address: str, head: subprocess.Popen, timeout: float = 180) -> None:
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + timeout
    while True:
        try:
            JobSubmissionClient(address).list_jobs()
            return
        except Exception:  # noqa: BLE001 - not up yet
            if time.time() > deadline or head.poll() is not None:
                raise
            time.sleep(2)


@dataclass
class TwoNodeCluster:
    """What the fixture yields."""

    address: str  # the job API (dashboard) of the head
    gcs: str
    head_node: str
    worker_node: str
    endpoint: str  # the S3 server
    bucket: str  # s3://NAME
    options: dict[str, Any]  # storage options that reach the bucket from the test
    base: Path  # the test's own tmp folder (hidden from the second node)

    def endpoint_sets(self) -> list[str]:
        return [
            f"data.storage_options.endpoint_url={self.endpoint}",
            f"output_storage_options.endpoint_url={self.endpoint}",
        ]


def runtime_env() -> dict[str, Any]:
    """``jobs/runtime_env.yaml`` with the code shipped from the repository, the tests' Ray
    Train poll interval and the S3 test credentials."""
    env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    env["working_dir"] = str(REPO)
    env["env_vars"]["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = os.environ.get(
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"
    )
    env["env_vars"].update(AWS_ENV)
    return env


def start_job(address: str, entrypoint: str) -> str:
    """Submit ``entrypoint`` as a Ray job (code from the repository); its id."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.time() + 120
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env())
        except RuntimeError as err:
            # The head answers list_jobs before its job agent is up on a loaded machine.
            if "No available agent" not in str(err) or time.time() > deadline:
                raise
            time.sleep(3)


def wait_jobs(address: str, jobs: list[str], timeout: float) -> list[tuple[str, str]]:
    """Wait for ``jobs``: ``(final status, logs)`` of each. Jobs still running after
    ``timeout`` seconds are stopped, and the assertion names them."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    final = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)
    deadline = time.time() + timeout
    while True:
        running = [j for j in jobs if client.get_job_status(j) not in final]
        if not running:
            break
        if time.time() > deadline:
            for job in running:
                client.stop_job(job)
            logs = "\n".join(client.get_job_logs(j)[-3000:] for j in running)
            raise AssertionError(f"jobs {running} still running after {timeout}s:\n{logs}")
        time.sleep(2)
    return [(str(client.get_job_status(j).value), client.get_job_logs(j)) for j in jobs]


def submit(address: str, entrypoint: str, timeout: float) -> tuple[str, str]:
    """Submit ``entrypoint`` as a Ray job and wait: ``(final status, logs)``."""
    return wait_jobs(address, [start_job(address, entrypoint)], timeout)[0]


def start_head(
    gcs_port: int, dashboard_port: int, temp_dir: str, cwd: Path, out: Any, num_cpus: int = 0
) -> subprocess.Popen:
    return subprocess.Popen(
        head_command(gcs_port, dashboard_port, temp_dir, num_cpus),
        env=ray_env(),
        cwd=cwd,
        start_new_session=True,
        stdout=out,
        stderr=subprocess.STDOUT,
    )


def start_hidden_node(gcs_port: int, hide: list[Path], side: Path, out: Any) -> subprocess.Popen:
    """The second node, in a mount namespace of its own (:func:`hidden_node_shell`)."""
    script = hidden_node_shell(worker_command(gcs_port), hide, VENV, side)
    return subprocess.Popen(
        ["unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c", script],
        env=ray_env(),
        cwd="/",
        start_new_session=True,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
