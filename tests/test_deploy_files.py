"""cluster.yaml, jobs/runtime_env.yaml and the schedules parse and hold what Ray needs."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_cluster_yaml_names_a_cpu_head_and_gpu_workers_from_zero():
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    assert cfg["provider"]["type"] == "aws"
    image = cfg["docker"]["image"]
    assert image.startswith("rayproject/ray:2.60") and "ray-ml" not in image and "py311" in image
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    gpu = [t for name, t in types.items() if "gpu" in name]
    assert gpu and gpu[0]["min_workers"] == 0 and gpu[0]["max_workers"] >= 1
    assert gpu[0]["node_config"]["InstanceType"].startswith(("g5", "g6", "p4", "p5"))
    assert any("binllm" in c for c in cfg["setup_commands"])


def test_runtime_env_uses_only_keys_ray_accepts():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    assert set(env) <= {"working_dir", "excludes", "pip", "uv", "env_vars", "py_modules", "config"}
    assert env["working_dir"] == "."
    assert ".venv/" in env["excludes"] and ".git/" in env["excludes"]
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    RuntimeEnv(**{**env, "working_dir": str(REPO)})  # Ray's own validation


def test_raycronjob_wraps_a_rayjob_running_the_nightly_entrypoint():
    cron = yaml.safe_load((REPO / "deploy" / "raycronjob.yaml").read_text())
    assert cron["kind"] == "RayCronJob" and cron["apiVersion"] == "ray.io/v1"
    assert len(cron["spec"]["schedule"].split()) == 5
    job = cron["spec"]["jobTemplate"]
    assert job["entrypoint"].startswith("python -m jobs.nightly")
    assert job["shutdownAfterJobFinishes"] is True
    assert "headGroupSpec" in job["rayClusterSpec"]


def test_cron_line_submits_with_a_dated_submission_id():
    lines = [
        ln
        for ln in (REPO / "deploy" / "nightly.cron").read_text().splitlines()
        if ln.strip() and not ln.startswith("#") and "=" not in ln.split()[0]
    ]
    assert len(lines) == 1
    line = lines[0]
    assert len(line.split()[:5]) == 5
    assert "--submission-id nightly-$D" in line and "-- python -m jobs.nightly" in line
