"""The pipeline, nightly and recommend as Ray jobs on two nodes that share no disk.

The layout users run (``cluster.yaml``): a head with no CPUs, where the jobs' drivers run, and a
second node with the CPUs, where every task, actor and Ray Train worker runs. The second node is
started in a mount namespace of its own (``unshare -m``; tmpfs over the repository, the tests'
output folders and ``/tmp``, the venv bind-mounted back; see :mod:`tests.jobs.cluster`): the code
reaches it only through the jobs' ``--working-dir`` and the data only through S3 (moto's
server). The fixture checks that from a task pinned to that node, so no test here can pass
vacuously. The outputs are compared with a one-node run of the same config, and a local
``output_root`` (which the second node cannot see) must be refused in one line.

Slow: about 8 minutes on 2 cores shared with other work (the pipeline job ~4 min, the one-node
run ~2.5 min); needs root, ``unshare`` and ray[default], else skipped with the reason.
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from binllm_core.storage import MANIFEST, read_output, resolve
from tests.builders import free_port, s3_options
from tests.conftest import FIXTURES
from tests.jobs.cluster import (
    FAST,
    HOSTNAME,
    REPO,
    TwoNodeCluster,
    probe,
    skip_reason,
    start_head,
    start_hidden_node,
    start_job,
    stop_groups,
    submit,
    wait_for_dashboard,
    wait_jobs,
)

pytestmark = pytest.mark.slow  # two Ray nodes, an S3 server and four Ray jobs

STAGES = ("ingest", "samples", "encode", "render", "finetune", "score", "evaluate")
DATE = "2026-01-02"
K = 5
TIMES: dict[str, float] = {}


def _timed(name: str, started: float) -> None:
    TIMES[name] = round(time.monotonic() - started, 1)
    print(f"[two-nodes] {name}: {TIMES[name]} s")


def keep_log(cluster: TwoNodeCluster, name: str, logs: str) -> None:
    """The job's log beside the test's outputs, its binllm lines on the test's output."""
    (cluster.base / f"{name}.log").write_text(logs)
    for line in logs.splitlines():
        if line.startswith(("[binllm]", "binllm:")):
            print(f"[two-nodes] {name} | {line}")


@pytest.fixture(scope="module")
def two_node_cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A head with ``--num-cpus=0`` and a second node with 2 CPUs that sees neither the
    repository, nor the test's outputs, nor the driver's ``/tmp``; an S3 bucket holding the tiny
    data."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    started = time.monotonic()
    endpoint = request.getfixturevalue("s3_server")
    base = tmp_path_factory.mktemp("two_nodes")
    marker = base / "written-by-the-driver.txt"
    marker.write_text("the second node must not see this\n")
    hide = [REPO, tmp_path_factory.getbasetemp(), Path("/tmp")]
    side = Path(tempfile.mkdtemp(prefix="binllm-venv-", dir="/var/tmp"))
    head_tmp = tempfile.mkdtemp(prefix="rh2n", dir="/tmp")
    gcs_port, dash_port = free_port(), free_port()
    log_path = base / "ray-start.log"
    procs = []
    with pytest.MonkeyPatch.context() as mp, log_path.open("ab") as log:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        try:
            procs.append(start_head(gcs_port, dash_port, head_tmp, base, log))
            address = f"http://127.0.0.1:{dash_port}"
            wait_for_dashboard(address, procs[0])
            procs.append(start_hidden_node(gcs_port, hide, side, log))
            readme = str(REPO / "README.md")
            try:
                seen = probe(f"127.0.0.1:{gcs_port}", [readme, str(marker)], base)
            except AssertionError as err:
                raise AssertionError(f"{err}\nray start:\n{log_path.read_text()[-4000:]}") from None
            nodes = {n["id"]: n["cpus"] for n in seen["nodes"]}
            head = seen["driver_node"]
            assert len(nodes) == 2 and nodes.get(head) == 0, seen
            (worker,) = set(nodes) - {head}
            assert nodes[worker] == 2, seen
            # The control: the same task on the head sees both files, so the probe works.
            assert all(seen["looks"][head]["seen"].values()), seen
            assert seen["looks"][head]["binllm_importable"], seen
            # The second node is another node, and sees neither the project nor the outputs.
            assert seen["looks"][worker]["node"] == worker != head
            assert seen["looks"][worker]["host"] == HOSTNAME != seen["looks"][head]["host"]
            assert not any(seen["looks"][worker]["seen"].values()), seen
            assert not seen["looks"][worker]["binllm_importable"], seen
            print(f"[two-nodes] probe: {json.dumps(seen['looks'])}")

            bucket = f"s3://two-nodes-{uuid.uuid4().hex[:8]}"
            options = s3_options(endpoint)
            import s3fs

            fs = s3fs.S3FileSystem(**options)
            fs.mkdir(bucket)
            for f in sorted((FIXTURES / "tiny").iterdir()):
                fs.put_file(str(f), f"{bucket}/data/tiny/{f.name}")
            _timed("fixture (head, hidden node, probe, bucket)", started)
            yield TwoNodeCluster(
                address=address,
                gcs=f"127.0.0.1:{gcs_port}",
                head_node=head,
                worker_node=worker,
                endpoint=endpoint,
                bucket=bucket,
                options=options,
                base=base,
            )
        finally:
            stopping = time.monotonic()
            stop_groups(procs)
            shutil.rmtree(head_tmp, ignore_errors=True)
            try:
                side.rmdir()
            except OSError:
                pass
            _timed("teardown", stopping)
            print(f"[two-nodes] times: {json.dumps(TIMES)}")


def job_sets(cluster: TwoNodeCluster, output_root: str) -> str:
    sets = [
        f"output_root={output_root}",
        f"data.uri={cluster.bucket}/data/tiny",
        # The same path on each node is a different disk: each downloads its own copy.
        f"data.cache_dir={cluster.base / 'cache'}",
        *cluster.endpoint_sets(),
        *FAST,
    ]
    return " ".join(f"--set {shlex.quote(s)}" for s in sets)


@pytest.fixture(scope="module")
def s3_run(two_node_cluster: TwoNodeCluster) -> dict[str, Any]:
    """The tiny pipeline as a Ray job, its outputs on S3: the run's URI, status and logs."""
    started = time.monotonic()
    root = f"{two_node_cluster.bucket}/runs"
    entry = f"python -m jobs.pipeline configs/tiny.yaml {job_sets(two_node_cluster, root)}"
    status, logs = submit(two_node_cluster.address, entry, 900)
    _timed("pipeline job", started)
    keep_log(two_node_cluster, "pipeline-job", logs)
    fs, path = resolve(f"{root}/tiny", two_node_cluster.options)
    for log in fs.glob(f"{path}/_logs/*.log"):  # Ray's lines and any trace (copied up at the end)
        fs.get_file(log, str(two_node_cluster.base / log.rsplit("/", 1)[-1]))
    return {"run": f"{root}/tiny", "status": status, "logs": logs}


def manifest(cluster: TwoNodeCluster, uri: str) -> dict[str, Any]:
    fs, path = resolve(uri, cluster.options)
    return json.loads(fs.cat_file(f"{path}/{MANIFEST}"))


def check_tables(cluster: TwoNodeCluster, uri: str) -> dict[str, Any]:
    """Every table of the output at ``uri`` reads back with the manifest's row count."""
    found = manifest(cluster, uri)
    for name, entry in found["tables"].items():
        if entry.get("schema"):
            table = read_output(uri, name, storage_options=cluster.options)
            assert table.num_rows == entry["rows"], (uri, name, table.num_rows, entry["rows"])
    return found


def check_lists(cluster: TwoNodeCluster, run: str, uri: str) -> pl.DataFrame:
    """Top-K lists at ``uri``: every user of the run has K rows ranked 1..K of items the user
    never interacted with, p_yes in [0, 1]; the manifest counts the rows read."""
    published = check_tables(cluster, uri)
    recs = pl.from_arrow(read_output(uri, "recommendations", storage_options=cluster.options))
    users = pl.from_arrow(
        read_output(f"{run}/samples", "user_map", storage_options=cluster.options)
    )
    samples = pl.from_arrow(
        read_output(f"{run}/samples", "samples", ["uid", "iid"], storage_options=cluster.options)
    )
    assert recs.height == published["metrics"]["rows"] == K * users.height
    assert set(recs["user"]) == set(users["user"])
    ranks = recs.group_by("user").agg(pl.col("rank").sort())
    assert all(r == list(range(1, K + 1)) for r in ranks["rank"].to_list())
    assert recs.select("user", "item").unique().height == recs.height
    assert recs["p_yes"].is_between(0, 1).all()
    assert all(math.isfinite(s) for s in recs["score"].to_list())
    seen = recs.join(samples.unique(), on=["uid", "iid"], how="inner")
    assert seen.height == 0, seen
    return recs


def test_pipeline_nightly_recommend_on_two_nodes(
    two_node_cluster: TwoNodeCluster, s3_run: dict[str, Any]
):
    cluster = two_node_cluster
    assert s3_run["status"] == "SUCCEEDED", s3_run["logs"][-4000:]
    assert "[binllm] evaluate: done" in s3_run["logs"]
    run = s3_run["run"]

    stages = {stage: check_tables(cluster, f"{run}/{stage}") for stage in STAGES}
    print(f"[two-nodes] stage wall times: { ({s: m['wall_time_s'] for s, m in stages.items()}) }")
    samples = pl.from_arrow(
        read_output(f"{run}/samples", "samples", ["sample_id", "split"], cluster.options)
    )
    assert samples.height == stages["samples"]["tables"]["samples"]["rows"] > 0
    scores = pl.from_arrow(read_output(f"{run}/score", "scores", storage_options=cluster.options))
    assert scores.height == scores.select("sample_id", "mode").unique().height
    assert set(scores["mode"]) == {"text", "binary"}
    assert scores["p_yes"].is_between(0, 1).all()
    test_ids = set(samples.filter(pl.col("split") == "test")["sample_id"])
    assert scores.height == 2 * len(test_ids) and set(scores["sample_id"]) == test_ids
    fs, path = resolve(run, cluster.options)
    assert fs.exists(f"{path}/{stages['evaluate']['metrics']['report']}")

    # The night's lists and an ad-hoc recommend, at once on the same cluster and run.
    endpoint = f"--set output_storage_options.endpoint_url={cluster.endpoint}"
    started = time.monotonic()
    jobs = [
        start_job(
            cluster.address,
            f"python -m jobs.nightly --run {run} --topk {K} --date {DATE} {endpoint}",
        ),
        start_job(cluster.address, f"python -m jobs.recommend --run {run} --k {K} {endpoint}"),
    ]
    (nightly, nightly_logs), (recommend, recommend_logs) = wait_jobs(cluster.address, jobs, 600)
    _timed("nightly and recommend jobs (at once)", started)
    keep_log(cluster, "nightly-job", nightly_logs)
    keep_log(cluster, "recommend-job", recommend_logs)
    assert nightly == "SUCCEEDED", nightly_logs[-4000:]
    check_lists(cluster, run, f"{run}/recommendations/date={DATE}")
    assert recommend == "SUCCEEDED", recommend_logs[-4000:]
    check_lists(cluster, run, f"{run}/recommendations/all")


def version_files(uri: str, options: dict[str, Any] | None = None) -> dict[str, bytes]:
    """The files of an output's current version that are not table parts (adapters, report),
    by path within the version."""
    fs, path = resolve(uri, options)
    root = f"{path}/{json.loads(fs.cat_file(f'{path}/{MANIFEST}'))['version']}"
    return {
        found[len(root) + 1 :]: fs.cat_file(found)
        for found in fs.find(root)
        if not found.endswith(".parquet")
    }


def same_table(one: Any, two: Any, drop: tuple[str, ...] = ()) -> bool:
    one, two = (pl.from_arrow(t).drop(*drop) for t in (one, two))
    return one.sort(one.columns).equals(two.sort(two.columns))


def test_two_node_outputs_equal_one_node_run(
    two_node_cluster: TwoNodeCluster,
    s3_run: dict[str, Any],
    request: pytest.FixtureRequest,
    tmp_path: Path,
):
    """The same config on one local Ray, from the local data to local outputs: the same
    tables, adapters and scores."""
    from jobs.cli import main

    cluster = two_node_cluster
    opts = cluster.options
    assert s3_run["status"] == "SUCCEEDED", s3_run["logs"][-4000:]
    run = s3_run["run"]
    request.getfixturevalue("ray_session")
    started = time.monotonic()
    local = tmp_path / "runs" / "tiny"
    sets = [f"output_root={local.parent}", f"data.uri={FIXTURES / 'tiny'}", *FAST]
    args = ["run", str(REPO / "configs" / "tiny.yaml")]
    assert main([*args, *(a for s in sets for a in ("--set", s))]) == 0
    _timed("one-node run (in process)", started)

    found: dict[str, Any] = {}
    for stage in STAGES:
        one = json.loads((local / stage / MANIFEST).read_text())["identity"]
        found[f"{stage} identity"] = one == manifest(cluster, f"{run}/{stage}")["identity"]
    # Where identities differ, what differs (paths and times are expected to).
    for stage in ("finetune", "evaluate"):
        one, two = version_files(str(local / stage)), version_files(f"{run}/{stage}", opts)
        for name in sorted(set(one) | set(two)):
            found[f"{stage} {name}"] = one.get(name) == two.get(name)
    found["finetune evals table"] = same_table(
        read_output(str(local / "finetune"), "evals"),
        read_output(f"{run}/finetune", "evals", storage_options=opts),
    )
    found["evaluate metrics table (but adapter paths)"] = same_table(
        read_output(str(local / "evaluate"), "metrics"),
        read_output(f"{run}/evaluate", "metrics", storage_options=opts),
        drop=("adapter",),
    )
    # Scores carry scored_at and adapter paths: their rows and logits instead.
    key = ["sample_id", "mode"]
    one_scores = pl.from_arrow(read_output(str(local / "score"), "scores"))
    two_scores = pl.from_arrow(read_output(f"{run}/score", "scores", storage_options=opts))
    both = one_scores.join(two_scores, on=key, how="full", suffix="_two")
    gap = (both["logit_yes"] - both["logit_yes_two"]).abs().max()
    found["score rows"] = both.height == one_scores.height == two_scores.height
    found["score logits within 1e-5"] = gap is not None and gap <= 1e-5
    found["score adapter_hash"] = (both["adapter_hash"] == both["adapter_hash_two"]).all()

    recs_two = f"{run}/recommendations/all"
    fs, path = resolve(recs_two, opts)
    if fs.exists(f"{path}/{MANIFEST}"):  # published by test_pipeline_nightly_recommend_...
        started = time.monotonic()
        assert main(["recommend", "--run", str(local), "--k", str(K)]) == 0
        _timed("one-node recommend (in process)", started)
        order = ["user", "rank"]
        one_recs = pl.from_arrow(read_output(str(local / "recommendations" / "all"))).sort(order)
        two_recs = pl.from_arrow(read_output(recs_two, storage_options=opts)).sort(order)
        found["recommendations (user, rank, item)"] = one_recs.select(*order, "item").equals(
            two_recs.select(*order, "item")
        )
        found["recommendation scores within 1e-5"] = bool(
            (one_recs["score"] - two_recs["score"]).abs().max() <= 1e-5
        )
    print(f"[two-nodes] largest score logit gap: {gap}")
    for what, equal in found.items():
        print(f"[two-nodes] one node vs two nodes: {what}: {'equal' if equal else 'DIFFERENT'}")

    expected = [f"{s} identity" for s in ("ingest", "samples", "encode", "render")]
    expected += ["finetune evals table", "score rows", "score logits within 1e-5"]
    expected += [w for w in found if w.startswith(("recommendation", "finetune adapters/"))]
    expected += [w for w in found if w.endswith("adapter_model.safetensors")]
    assert all(found[w] for w in expected), {w: found[w] for w in expected}


def test_local_output_root_is_refused_on_two_nodes(
    two_node_cluster: TwoNodeCluster, tmp_path: Path
):
    """A local output_root is on the head's disk only: the job must stop at once, in one line
    that names it and says what to use instead (not write where no node can read it)."""
    local = tmp_path / "runs"
    started = time.monotonic()
    entry = f"python -m jobs.pipeline configs/tiny.yaml {job_sets(two_node_cluster, str(local))}"
    status, logs = submit(two_node_cluster.address, entry, 300)
    _timed("local output_root job", started)
    keep_log(two_node_cluster, "local-output-root-job", logs)
    lines = [line for line in logs.splitlines() if line.strip()]
    print(
        "[two-nodes] local output_root job, " + status + ", last lines:\n" + "\n".join(lines[-8:])
    )
    assert status == "FAILED", logs[-3000:]
    errors = [line for line in lines if line.startswith("binllm: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], logs[-3000:]
    assert str(local) in errors[0] and "s3://" in errors[0] and "shared" in errors[0], errors[0]
    assert "Traceback" not in logs, logs[-3000:]
