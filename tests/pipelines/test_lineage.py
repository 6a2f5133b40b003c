"""Lineage, commits and the run lock, as a user hits them with ``binllm run`` on a copy of the
tiny fixture: what changed is redone and nothing else; a killed publish loses nothing; a second
writer stops at once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from binllm_core.config import load_config
from binllm_core.io.lock import WriterLock
from binllm_core.storage import MANIFEST, content_identity, read_output, resolve
from jobs.cli import blend_headline, lists_headline, main
from pipelines.runtime.registry import LOCK, STAGES, pipeline_status
from pipelines.runtime.runs import run_folder

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "tiny"


def source_copy(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(FIXTURE, src)
    return src


def sets(tmp_path: Path, src: Path, *extra: str) -> list[str]:
    pairs = [f"output_root={tmp_path / 'runs'}", f"data.uri={src}", *extra]
    return [a for kv in pairs for a in ("--set", kv)]


def run(tmp_path: Path, src: Path, *args: str, extra: tuple[str, ...] = ()) -> None:
    assert main(["run", "configs/tiny.yaml", *sets(tmp_path, src, *extra), *args]) == 0


def manifest(tmp_path: Path, stage: str) -> dict:
    return json.loads((tmp_path / "runs" / "tiny" / stage / MANIFEST).read_text())


def edit_keeping_size_and_mtime(path: Path, old: str, new: str) -> None:
    """Change bytes of ``path`` the way a stat identity cannot see: same size, same mtime."""
    assert len(old) == len(new)
    stat = path.stat()
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.slow  # ingest and samples through the CLI, several times
@pytest.mark.usefixtures("ray_session")
def test_edited_source_redoes_ingest_and_everything_after_it(tmp_path: Path, capsys):
    src = source_copy(tmp_path)
    run(tmp_path, src, "--stages", "ingest,samples")
    ingest, samples = manifest(tmp_path, "ingest"), manifest(tmp_path, "samples")
    assert ingest["inputs"]["source"] and samples["inputs"] == {"ingest": ingest["identity"]}
    capsys.readouterr()

    run(tmp_path, src, "--stages", "ingest,samples")
    out = capsys.readouterr().out
    source = ingest["inputs"]["source"][:8]
    assert f"ingest: skipped: unchanged config and inputs (source {source}" in out
    assert f"samples: skipped: unchanged config and inputs (ingest {ingest['identity'][:8]}" in out

    with (src / "tiny.inter").open("a") as f:  # a new day's ratings appended
        f.write("1\t60\t5\t880999999\n2\t60\t5\t880999999\n")
    run(tmp_path, src, "--stages", "ingest,samples")
    out = capsys.readouterr().out
    assert "ingest: done" in out and "input source changed" in out
    assert "samples: done" in out and "input ingest changed" in out
    after = manifest(tmp_path, "ingest")
    assert after["identity"] != ingest["identity"]
    assert after["tables"]["interactions"]["rows"] == ingest["tables"]["interactions"]["rows"] + 2
    assert manifest(tmp_path, "samples")["inputs"] == {"ingest": after["identity"]}


@pytest.mark.slow  # ingest and samples through the CLI, several times
@pytest.mark.usefixtures("ray_session")
def test_forced_ingest_redoes_downstream_only_when_its_output_changed(tmp_path: Path, capsys):
    src = source_copy(tmp_path)
    run(tmp_path, src, "--stages", "ingest,samples")
    ingest, samples = manifest(tmp_path, "ingest"), manifest(tmp_path, "samples")

    # Same data forced again: the same output identity, so samples is not redone.
    run(tmp_path, src, "--stages", "ingest", "--force")
    assert manifest(tmp_path, "ingest")["identity"] == ingest["identity"]
    assert manifest(tmp_path, "ingest")["version"] != ingest["version"]
    capsys.readouterr()
    run(tmp_path, src, "--stages", "ingest,samples")
    assert "samples: skipped" in capsys.readouterr().out
    assert manifest(tmp_path, "samples")["version"] == samples["version"]

    # An edit the default stat identity cannot see (same size, same mtime) is skipped...
    forced = manifest(tmp_path, "ingest")["version"]
    edit_keeping_size_and_mtime(src / "tiny.inter", "1\t21\t2\t", "1\t21\t5\t")
    run(tmp_path, src, "--stages", "ingest,samples")
    assert manifest(tmp_path, "ingest")["version"] == forced
    assert manifest(tmp_path, "samples")["version"] == samples["version"]
    # ...until ingest is forced: its output changes, and a plain run redoes samples onward.
    run(tmp_path, src, "--stages", "ingest", "--force")
    assert manifest(tmp_path, "ingest")["identity"] != ingest["identity"]
    capsys.readouterr()
    run(tmp_path, src, "--stages", "ingest,samples")
    out = capsys.readouterr().out
    assert "ingest: skipped" in out and "samples: done" in out and "input ingest changed" in out

    # data.identity=content hashes the bytes: the same kind of edit is seen without --force.
    run(tmp_path, src, "--stages", "ingest", extra=("data.identity=content",))
    before = manifest(tmp_path, "ingest")
    assert before["input_details"]["source"]["by"] == "content"
    edit_keeping_size_and_mtime(src / "tiny.inter", "1\t10\t4\t", "1\t10\t1\t")
    capsys.readouterr()
    run(tmp_path, src, "--stages", "ingest", extra=("data.identity=content",))
    assert "input source changed" in capsys.readouterr().out
    assert manifest(tmp_path, "ingest")["identity"] != before["identity"]


@pytest.mark.usefixtures("ray_session")
def test_resource_settings_never_make_a_stage_stale(tmp_path: Path, capsys):
    src = source_copy(tmp_path)
    run(tmp_path, src, "--stages", "ingest,samples")
    resources = [
        "encoder.num_workers=2",
        "encoder.max_failures=3",
        "finetune.num_workers=2",
        "finetune.cpus_per_worker=2",
        "finetune.use_gpu=true",
        "score.num_actors=4",
        "score.cpus_per_actor=2",
        "data.cache_dir=/tmp/elsewhere",
    ]
    capsys.readouterr()
    assert main(["status", "configs/tiny.yaml", *sets(tmp_path, src, *resources)]) == 0
    out = capsys.readouterr().out
    assert [ln.split()[:2] for ln in out.splitlines()[1:3]] == [
        ["ingest", "done"],
        ["samples", "done"],
    ]
    assert "encode           missing" in out and "render           waits on" not in out

    # A setting that does change what samples computes makes it (and only it) stale.
    assert (
        main(
            [
                "run",
                "configs/tiny.yaml",
                *sets(tmp_path, src, "protocol.warm_more_than=5"),
                "--dry-run",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "ingest           done" in out
    assert "samples          stale      config changed: protocol.warm_more_than" in out
    assert manifest(tmp_path, "samples")["config"]["protocol"]["warm_more_than"] == 3  # ran nothing


def test_text_only_run_does_not_need_the_encoder(tmp_path: Path):
    cfg = load_config(
        "configs/tiny.yaml",
        [f"output_root={tmp_path}", "finetune.strategy=text_only", "prompts.modes=[text]"],
    )
    by_name = {s.name: s for s in STAGES}
    assert "encode" not in by_name["render"].reads(cfg)
    assert "encode" not in by_name["evaluate"].reads(cfg)
    states = {row["stage"]: row for row in pipeline_status(cfg)}
    assert states["encode"]["state"] == "not needed"
    assert states["retrieve"]["state"] == states["rerank"]["state"] == "not needed"
    why = states["render"]["why"]
    assert why.startswith("waits on") and "encode" not in why
    coded = load_config("configs/tiny.yaml", [f"output_root={tmp_path}"])
    assert "encode" in by_name["render"].reads(coded)


@pytest.mark.slow  # two encoders through Ray Train
@pytest.mark.usefixtures("ray_session")
def test_a_retrieval_encoder_gives_retrieve_its_own_codes_and_leaves_the_prompts_alone(
    tmp_path: Path, capsys
):
    src = source_copy(tmp_path)
    own = [
        "retrieval_encoder.objective=implicit",
        "retrieval_encoder.dim=16",
        "retrieval_encoder.prior_bits=4",
        "retrieval_encoder.max_epochs=3",
    ]
    stages = ("--stages", "ingest,samples,encode,encode_retrieval,retrieve")
    run(tmp_path, src, *stages, extra=tuple(own))
    lists = manifest(tmp_path, "encode_retrieval")["metrics"]
    assert lists["objective"] == "implicit" and lists["selected_by"] == "ndcg"
    assert set(manifest(tmp_path, "retrieve")["inputs"]) == {"samples", "encode_retrieval"}

    # The candidates are the retrieval codes' nearest items, not the prompt codes'.
    run_root = tmp_path / "runs" / "tiny"
    candidates = read_output(str(run_root / "retrieve"), "candidates")
    full = candidates.filter(pc.equal(candidates["protocol"], "full")).to_pylist()

    def distances(stage: str) -> list[list[int]]:
        codes = read_output(str(run_root / stage), "codes").to_pylist()
        bits = {(c["entity"], c["id"]): np.array(c["bits"]) for c in codes}
        by_user: dict[tuple[str, int], list[int]] = {}  # a list per split and user
        for row in sorted(full, key=lambda r: (r["split"], r["uid"], r["rank"])):
            far = int((bits["user", row["uid"]] != bits["item", row["iid"]]).sum())
            by_user.setdefault((row["split"], row["uid"]), []).append(far)
        return list(by_user.values())

    assert all(d == sorted(d) for d in distances("encode_retrieval"))
    assert not all(d == sorted(d) for d in distances("encode"))

    # Another retrieval encoder redoes its codes and the lists, never the prompts' codes.
    cfg = load_config(
        "configs/tiny.yaml",
        [f"output_root={tmp_path / 'runs'}", f"data.uri={src}", *own, "retrieval_encoder.seed=5"],
    )
    states = {row["stage"]: row for row in pipeline_status(cfg)}
    assert states["encode"]["state"] == "done"
    assert states["encode_retrieval"]["state"] == "stale"
    assert "retrieval_encoder.seed" in states["encode_retrieval"]["why"]
    assert states["retrieve"]["state"] == "stale"
    # Without it, retrieve reads the prompts' codes and the stage is not needed.
    plain = load_config("configs/tiny.yaml", [f"output_root={tmp_path / 'runs'}"])
    plain_states = {row["stage"]: row for row in pipeline_status(plain)}
    assert plain_states["encode_retrieval"]["state"] == "not needed"
    assert "encode" in {s.name: s for s in STAGES}["retrieve"].reads(plain)


@pytest.mark.usefixtures("ray_session")
def test_second_run_stops_at_once_naming_the_holder_and_a_stale_lock_is_taken_over(
    tmp_path: Path, capsys
):
    src = source_copy(tmp_path)
    cfg = load_config("configs/tiny.yaml", [f"output_root={tmp_path / 'runs'}", f"data.uri={src}"])
    fs, folder = run_folder(cfg)
    with WriterLock(fs, f"{folder}/{LOCK}", "a run", lambda _: None):
        assert main(["run", "configs/tiny.yaml", *sets(tmp_path, src)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"pid {os.getpid()}" in err and "delete" in err
    assert not (tmp_path / "runs" / "tiny" / "ingest").exists()

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    record = {
        "owner": "someone",
        "host": os.uname().nodename,
        "pid": gone.pid,
        "started_at": "2026-01-01T00:00:00Z",
        "command": "binllm run",
        "token": "x",
    }
    (tmp_path / "runs" / "tiny" / LOCK).write_text(json.dumps(record))
    run(tmp_path, src, "--stages", "ingest")
    out = capsys.readouterr().out
    assert "taking over the stale lock of run" in out and f"pid {gone.pid}" in out
    assert not (tmp_path / "runs" / "tiny" / LOCK).exists()  # released at the end


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_killed_inside_publish_keeps_the_previous_output_and_the_next_run_cleans_up(
    tmp_path: Path, capsys
):
    src = source_copy(tmp_path)
    run(tmp_path, src, "--stages", "ingest")
    before = (tmp_path / "runs" / "tiny" / "ingest" / MANIFEST).read_text()
    rows = read_output(str(tmp_path / "runs" / "tiny" / "ingest"), "interactions").num_rows

    env = {**os.environ, "BINLLM_TEST_FAULT": "publish", "RAY_ADDRESS": ""}
    cmd = [
        sys.executable,
        "-m",
        "jobs.pipeline",
        "configs/tiny.yaml",
        *sets(tmp_path, src),
        "--stages",
        "ingest",
        "--force",
    ]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 86, done.stderr[-2000:]  # killed between tables and pointer

    folder = tmp_path / "runs" / "tiny" / "ingest"
    assert (folder / MANIFEST).read_text() == before
    assert read_output(str(folder), "interactions").num_rows == rows
    versions = sorted(p.name for p in folder.glob("v-*"))
    assert len(versions) == 2  # the current one and the killed run's unpublished one
    assert (tmp_path / "runs" / "tiny" / LOCK).exists()  # the killed run's lock: its pid is gone

    run(tmp_path, src, "--stages", "ingest")
    out = capsys.readouterr().out
    assert "taking over the stale lock" in out and "ingest: skipped" in out
    assert [p.name for p in folder.glob("v-*")] == [json.loads(before)["version"]]


@pytest.mark.slow  # ingest and samples through the CLI, several times
@pytest.mark.usefixtures("ray_session")
def test_s3_run_publishes_skips_and_replaces_versions(
    tmp_path: Path, s3_bucket: tuple[str, dict], capsys
):
    bucket, opts = s3_bucket
    src = source_copy(tmp_path)
    root = f"{bucket}/runs"
    options = json.dumps(opts)
    args = [
        "run",
        "configs/tiny.yaml",
        "--stages",
        "ingest,samples",
        "--set",
        f"output_root={root}",
        "--set",
        f"data.uri={src}",
        "--set",
        f"output_storage_options={options}",
    ]
    assert main(args) == 0
    first = read_output(f"{root}/tiny/samples", "samples", storage_options=opts)
    fs, base = resolve(f"{root}/tiny/samples", opts)
    version = json.loads(fs.cat_file(f"{base}/{MANIFEST}"))["version"]
    run = base.rsplit("/", 1)[0]
    (log,) = fs.glob(f"{run}/_logs/*-run-*.log")  # the command's log, copied up at its end
    assert "binllm command: " in fs.cat_file(log).decode()
    capsys.readouterr()

    assert main(args) == 0
    assert "samples: skipped" in capsys.readouterr().out
    assert main([*args, "--force"]) == 0
    now = json.loads(fs.cat_file(f"{base}/{MANIFEST}"))
    assert now["version"] != version
    fs.invalidate_cache()
    assert [e.rsplit("/", 1)[-1] for e in fs.ls(base) if "/v-" in e] == [now["version"]]
    again = read_output(f"{root}/tiny/samples", "samples", storage_options=opts)
    assert again.sort_by("sample_id").equals(first.sort_by("sample_id"))
    assert not fs.exists(f"{root}/tiny/{LOCK}")


# ---- a trained run: outputs, copies, retraining (slow: two tiny trainings) -----------------
TRAIN = (
    "finetune.strategy=one_step",
    "prompts.modes=[text,binary]",
    "finetune.step2={lr: 1.0e-2, warmup_steps: 1, batch_size: 8, max_steps: 4}",
    "finetune.eval_every=2",
    "encoder.max_epochs=3",
    "score.splits=[test]",
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, ray_session) -> tuple[Path, Path, Path]:
    """(work folder, source folder, run folder) of a whole tiny run, trained once per module."""
    tmp = tmp_path_factory.mktemp("trained")
    src = source_copy(tmp)
    run(tmp, src, extra=TRAIN)
    return tmp, src, tmp / "runs" / "tiny"


def pairs_file(folder: Path) -> Path:
    path = folder / "pairs.parquet"
    pq.write_table(
        pa.table({"user": ["1", "2", "3", "nobody"], "item": ["10", "11", "12", "5"]}), path
    )
    return path


def run_files(run_dir: Path) -> list[str]:
    """Every path under a run folder but its commands' logs."""
    paths = (p.relative_to(run_dir) for p in run_dir.rglob("*"))
    return sorted(str(p) for p in paths if p.parts[0] != "_logs")


def manifests_of(run_dir: Path) -> dict[str, str]:
    return {p.parent.name: p.read_text() for p in run_dir.glob(f"*/{MANIFEST}")}


@pytest.mark.slow
def test_score_output_never_replaces_what_binllm_did_not_write(trained, tmp_path: Path, capsys):
    _, _, run_dir = trained
    pairs = pairs_file(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    before = manifests_of(run_dir)

    def score(*output: str) -> int:
        return main(["score", "--run", str(run_dir), "--input", str(pairs), *output])

    for target in (mine, mine / "notes.txt", run_dir, run_dir.parent, run_dir / "samples"):
        capsys.readouterr()
        assert score("--output", str(target)) == 2, target
        err = capsys.readouterr().err.strip()
        assert err.startswith("binllm: error:") and "\n" not in err, err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert (mine / "notes.txt").read_text() == "keep me"
    assert manifests_of(run_dir) == before

    # An earlier output of binllm score is replaced by a new version, whole.
    out = tmp_path / "scored"
    assert score("--output", str(out)) == 0
    first = json.loads((out / MANIFEST).read_text())
    assert first["kind"] == "pairs" and first["tables"]["scores"]["rows"] == 4
    assert score("--output", str(out)) == 0
    second = json.loads((out / MANIFEST).read_text())
    assert second["version"] != first["version"]
    assert [p.name for p in out.glob("v-*")] == [second["version"]]
    assert read_output(str(out), "scores").num_rows == 4

    # Without --output, the scores go into the run: RUN/pairs/<input name>.
    assert score() == 0
    assert read_output(str(run_dir / "pairs" / "pairs"), "scores").num_rows == 4


@pytest.mark.slow
def test_tiny_run_retrieves_reranks_and_reports_ranking(trained):
    import polars as pl

    _, _, run_dir = trained
    cfg = load_config("configs/tiny.yaml")
    top_n, rerank_n = cfg.retrieve.top_n, cfg.rerank.top_n
    cands = pl.from_arrow(read_output(str(run_dir / "retrieve"), "candidates"))
    users = pl.from_arrow(read_output(str(run_dir / "retrieve"), "users"))
    samples = pl.from_arrow(read_output(str(run_dir / "samples"), "samples"))
    items = samples["iid"].n_unique()
    tested = samples.filter((pl.col("split") == "test") & (pl.col("label") == 1))
    assert users.height == tested["uid"].n_unique()  # every user with a test positive
    codes = read_output(str(run_dir / "encode"), "codes").sort_by(
        [("entity", "ascending"), ("id", "ascending")]
    )
    vectors = read_output(str(run_dir / "encode"), "embeddings").sort_by(
        [("entity", "ascending"), ("id", "ascending")]
    )
    relaxed = np.stack(vectors["relaxed"].to_numpy(zero_copy_only=False))
    bits = np.stack(codes["bits"].to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(relaxed > 0, bits == 1)  # the codes are the relaxed signs
    full = cands.filter(pl.col("protocol") == "full")
    for user in users.iter_rows(named=True):
        mine = full.filter(pl.col("uid") == user["uid"]).sort("rank")
        train = samples.filter((pl.col("uid") == user["uid"]) & (pl.col("split") == "train"))
        assert not set(mine["iid"]) & set(train["iid"])  # never an item the user has in train
        assert mine.height == min(top_n, items - len(user["exclude"]))
        assert mine["hamming"].is_sorted()  # nearest first
        pool = cands.filter((pl.col("protocol") == "sampled") & (pl.col("uid") == user["uid"]))
        assert user["sampled_positive"] in pool["iid"].to_list()
        assert pool.height == cfg.retrieve.sampled_negatives + 1
    recs = pl.from_arrow(read_output(str(run_dir / "rerank"), "recommendations"))
    assert recs["mode"].unique().to_list() == ["binary"]
    assert recs["uid"].n_unique() == cfg.rerank.max_users < users.height  # a seeded subset
    for key, part in recs.group_by(["protocol", "split", "mode", "uid"]):
        assert sorted(part["rank"]) == list(range(1, rerank_n + 1)), key
        first = cands.filter(
            (pl.col("protocol") == key[0])
            & (pl.col("uid") == key[3])
            & (pl.col("rank") <= rerank_n)
        )
        assert set(part["iid"]) == set(first["iid"])  # the same candidates, re-ordered
        assert part.sort("rank")["score"].is_sorted(descending=True)
        # tiny.yaml retrieves test users only: no valid user to choose by, the retriever's order
        assert part.sort("blend_rank")["retrieval_rank"].to_list() == list(range(1, rerank_n + 1))
    ranking = pl.from_arrow(read_output(str(run_dir / "evaluate"), "ranking"))
    methods = set(ranking.select("protocol", "method").unique().iter_rows())
    baselines = ("codes", "float", "popularity", "recent_popularity")
    llm = ("codes+llm", "blend")
    assert methods == {(p, m) for p in ("full", "sampled") for m in (*baselines, *llm)}
    full_ = ranking.filter(pl.col("protocol") == "full")
    assert full_.filter(pl.col("users") == "all")["n_users"].unique().to_list() == [len(users)]
    reranked = full_.filter(pl.col("users") == "reranked")["n_users"].unique().to_list()
    assert reranked == [cfg.rerank.max_users]
    report = next((run_dir / "evaluate").glob("v-*/report/report.md")).read_text()
    assert "## Ranking" in report and "ranking_test_full.png" in report
    # What `binllm run` prints last: the lists' NDCG@10 on every test user, as in the table.
    evaluated = manifest(run_dir.parent.parent, "evaluate")["metrics"]
    headline = lists_headline(evaluated["ranking"], evaluated["ratios"])
    at_10 = full_.filter(
        (pl.col("users") == "all") & (pl.col("k") == 10) & (pl.col("split") == "test")
    )
    assert headline.startswith(f"test NDCG@10, full catalog, {len(users)} users: codes ")
    for row in at_10.iter_rows(named=True):
        assert f"{row['method']} {row['ndcg']:.4f} [{row['ndcg_low']:.4f}," in headline
    ndcg = {r["method"]: r["ndcg"] for r in at_10.iter_rows(named=True)}
    (ratio,) = [r for r in evaluated["ratios"] if r["split"] == "test" and r["protocol"] == "full"]
    assert ratio["ratio"] == pytest.approx(ndcg["codes"] / ndcg["float"])
    assert headline.endswith(
        f"; codes / float {ratio['ratio']:.3f} [{ratio['low']:.3f}, {ratio['high']:.3f}] "
        "(paired bootstrap)"
    )
    # and then the lists that ship, beside the codes' on the same re-ranked users
    blend = manifest(run_dir.parent.parent, "rerank")["metrics"]["blend"]
    shipped = blend_headline(
        manifest(run_dir.parent.parent, "evaluate")["metrics"]["ranking"], blend
    )
    same_users = full_.filter(
        (pl.col("users") == "reranked") & (pl.col("k") == 10) & (pl.col("split") == "test")
    )
    assert shipped.startswith(f"test NDCG@10, full catalog, the {reranked[0]} users the LLM ")
    for row in same_users.filter(pl.col("method").is_in(["codes", "blend"])).iter_rows(named=True):
        name = "codes" if row["method"] == "codes" else f"blend ({row['mode']}), alpha "
        assert name in shipped and f" {row['ndcg']:.4f} [{row['ndcg_low']:.4f}," in shipped


@pytest.mark.slow
def test_copied_run_scores_with_its_own_adapters_after_the_original_is_retrained(
    trained, tmp_path: Path
):
    work, src, run_dir = trained
    copy = tmp_path / "archive" / "tiny-copy"
    shutil.copytree(run_dir, copy)  # as cp -a / aws s3 sync would
    finetune = json.loads((copy / "finetune" / MANIFEST).read_text())
    adapter = finetune["metrics"]["final_adapter"]
    assert not Path(adapter).is_absolute() and adapter.startswith("finetune/v-")
    old_weights = (copy / adapter / "adapter_model.safetensors").read_bytes()
    old_codes = read_output(str(copy / "encode"), "codes").sort_by(
        [("entity", "ascending"), ("id", "ascending")]
    )

    # Every label of the original's data flipped (rating r -> 6 - r), then retrained with --force.
    inter = src / "tiny.inter"
    head, *rows = inter.read_text().splitlines()
    flipped = []
    for line in rows:
        user, item, rating, stamp = line.split("\t")
        flipped.append(f"{user}\t{item}\t{6 - float(rating):g}\t{stamp}")
    inter.write_text("\n".join([head, *flipped]) + "\n")
    run(work, src, "--force", "--stages", "ingest,samples,encode,render,finetune", extra=TRAIN)

    retrained = json.loads((run_dir / "finetune" / MANIFEST).read_text())
    new_adapter = run_dir / retrained["metrics"]["final_adapter"]
    assert (new_adapter / "adapter_model.safetensors").read_bytes() != old_weights
    new_codes = read_output(str(run_dir / "encode"), "codes").sort_by(
        [("entity", "ascending"), ("id", "ascending")]
    )
    assert new_codes["code_binary"] != old_codes["code_binary"]
    for stage in ("encode", "finetune"):  # only checkpoints of the new inputs are left
        digest = json.loads((run_dir / stage / MANIFEST).read_text())["config_hash"]
        names = [p.name for p in (run_dir / stage / "checkpoints").iterdir()]
        assert names and all(n.endswith(digest) for n in names), names

    # The copy scores with its own (old) adapters, and says so.
    pairs = pairs_file(tmp_path)
    assert main(["score", "--run", str(copy), "--input", str(pairs)]) == 0
    scores = read_output(str(copy / "pairs" / "pairs"), "scores")
    binary = scores.filter(pc.equal(scores["mode"], "binary"))
    assert binary.num_rows and set(binary["adapter"].to_pylist()) == {str(copy / adapter)}
    fs, path = resolve(str(copy / adapter))
    assert set(binary["adapter_hash"].to_pylist()) == {content_identity(fs, path)}
    fs, path = resolve(str(new_adapter))
    assert content_identity(fs, path) not in set(binary["adapter_hash"].to_pylist())


@pytest.mark.slow
def test_an_adapter_trained_on_codes_that_were_redone_is_never_served(
    trained, tmp_path: Path, capsys
):
    """``--stages encode`` with another seed makes new codes; the adapter was trained on prompts
    with the old ones. Scoring, top-K lists and a score stage run alone refuse in one line naming
    the stages to redo, and write nothing."""
    work, src, run_dir = trained
    shutil.copytree(run_dir, tmp_path / "runs" / "tiny")
    copy = tmp_path / "runs" / "tiny"
    run(tmp_path, src, "--stages", "encode", extra=(*TRAIN, "encoder.seed=9"))
    capsys.readouterr()
    before = manifests_of(copy)
    written = run_files(copy)

    pairs = pairs_file(tmp_path)
    assert main(["score", "--run", str(copy), "--input", str(pairs)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("binllm: error: scoring with this run would read stale outputs: ")
    assert "render was made from encode output" in err and err.count("\n") == 1
    assert "binllm run CONFIG --stages render,finetune" in err
    assert main(["recommend", "--run", str(copy), "--k", "3"]) == 2
    assert "top-K lists with this run would read stale outputs" in capsys.readouterr().err

    args = ["run", "configs/tiny.yaml", *sets(tmp_path, src, *TRAIN, "encoder.seed=9")]
    assert main([*args, "--stages", "score"]) == 2
    err = capsys.readouterr().err
    assert "stage score would read stale outputs: render was made from encode output" in err
    assert "--stages render,finetune,score" in err
    assert manifests_of(copy) == before and run_files(copy) == written


@pytest.mark.slow
def test_a_max_length_that_cuts_most_prompts_is_refused_and_a_few_cut_are_counted(
    trained, tmp_path: Path, capsys
):
    """``finetune.max_length=8`` kept the last 8 tokens of every sequence: a model of item titles
    alone (valid AUC exactly 0.5). It is refused with the lengths render measured; the trained
    run's manifests count the prompts that were cut (none at 512)."""
    work, src, run_dir = trained
    shutil.copytree(run_dir, tmp_path / "runs" / "tiny")
    args = ["run", "configs/tiny.yaml", *sets(tmp_path, src, *TRAIN, "finetune.max_length=8")]
    assert main([*args, "--stages", "finetune"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("binllm: error: finetune.max_length = 8 cuts ")
    assert "train prompts (binary) (their tokens: median " in err and err.count("\n") == 1
    finetune = manifest(work, "finetune")["metrics"]["truncated"]
    assert finetune == {"binary": {"train": 0, "valid": 0}}  # one_step: binary prompts only
    score = manifest(work, "score")["metrics"]["modes"]
    assert score and all(m["truncated"] == 0 for m in score.values())


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_a_run_reopened_from_another_directory_reads_what_it_read(
    tmp_path: Path, monkeypatch, capsys
):
    """``data.uri: tests/fixtures/tiny`` is relative to where binllm ran; the run records it
    absolute, so its folder opened from elsewhere finds the same source."""
    out = tmp_path / "runs"
    assert (
        main(["run", "configs/tiny.yaml", "--set", f"output_root={out}", "--stages", "ingest"]) == 0
    )
    recorded = manifest(tmp_path, "ingest")["config"]["data"]["uri"]
    assert recorded == str(FIXTURE)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    (out / "tiny" / "render").mkdir()  # a run folder opens once render has finished
    publish = {"layout": 2, "config": {}, "kind": "stage:render", "tables": {}}
    (out / "tiny" / "render" / MANIFEST).write_text(json.dumps(publish))
    assert main(["status", str(out / "tiny")]) == 0
    status = capsys.readouterr().out
    assert "ingest           done" in status, status
