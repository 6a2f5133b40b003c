"""Stable identities: the same content gives the same output identity, so forcing a stage whose
output comes out the same redoes nothing after it (README, Outputs: Lineage)."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from binllm_core.config import ModelConfig, RetrieveConfig, load_config
from binllm_core.llm.backbone import ADAPTER_CONFIG
from binllm_core.llm.recommender import LLMRecommender
from binllm_core.ranking.retrieval import Catalog
from binllm_core.storage import (
    MANIFEST,
    RUN_LINEAGE,
    Publication,
    content_identity,
    resolve,
)
from jobs.cli import main
from pipelines.ops.retrieval import UserRetriever
from pipelines.runtime.registry import STAGES


# ---- the hashing rules (fast) ------------------------------------------------------------------
def scores(logits: list[float], adapter: str, at: str, adapter_hash: str = "ab12") -> pa.Table:
    """A ``scores``-like table: content columns and the lineage columns of stage score."""
    n = len(logits)
    return pa.table(
        {
            "sample_id": pa.array(range(n), pa.int64()),
            "mode": ["binary"] * n,
            "logit_yes": pa.array(logits, pa.float64()),
            "history": pa.array([[1, 2]] * n, pa.list_(pa.int32())),
            "model": ["tiny"] * n,
            "adapter": [adapter] * n,
            "adapter_hash": [adapter_hash] * n,
            "run_name": ["tiny"] * n,
            "scored_at": pa.array(
                [dt.datetime.fromisoformat(at)] * n, pa.timestamp("us", tz="UTC")
            ),
        }
    )


def identity_of(folder: Path, tables: dict[str, pa.Table], name: str = "part-00000") -> str:
    for table, data in tables.items():
        (folder / table).mkdir(parents=True)
        pq.write_table(data, folder / table / f"{name}.parquet")
    fs, path = resolve(str(folder))
    return content_identity(fs, path)


def test_run_lineage_columns_are_left_out_of_a_tables_identity(tmp_path: Path):
    first = identity_of(
        tmp_path / "a",
        {"scores": scores([0.5, -1.0], "/runs/tiny/finetune/v-1/adapters/step2", "2026-01-01")},
    )
    # Scored again later, with the same adapter copied into another version folder, the files
    # named otherwise (Ray names them with a random write id): the same identity.
    again = identity_of(
        tmp_path / "b",
        {"scores": scores([0.5, -1.0], "/runs/tiny/finetune/v-2/adapters/step2", "2026-02-03")},
        name="1a2b3c_000000_000000-0",
    )
    assert again == first
    # Other scores, or the same scores from an adapter of other content: another identity.
    other_scores = {"scores": scores([0.5, -0.9], "/a", "2026-01-01")}
    other_adapter = {"scores": scores([0.5, -1.0], "/a", "2026-01-01", adapter_hash="cd34")}
    assert identity_of(tmp_path / "c", other_scores) != first
    assert identity_of(tmp_path / "d", other_adapter) != first
    # A table in another folder (table name) is another output.
    renamed = {"recommendations": scores([0.5, -1.0], "/a", "2026-01-01")}
    assert identity_of(tmp_path / "e", renamed) != first
    assert set(RUN_LINEAGE) == {"scored_at", "adapter"}


def test_tables_without_run_lineage_columns_count_by_their_bytes(tmp_path: Path):
    table = pa.table({"uid": pa.array([1, 2], pa.int32()), "adapter_hash": ["x", "y"]})
    one = identity_of(tmp_path / "a", {"t": table})
    assert identity_of(tmp_path / "b", {"t": table}, name="other-name") == one
    assert identity_of(tmp_path / "c", {"t": table.slice(0, 1)}) != one
    assert identity_of(tmp_path / "d", {"t": table.take([1, 0])}) != one  # order is content


def test_a_published_scores_manifest_changes_only_with_its_content(tmp_path: Path):
    def publish(table: pa.Table) -> str:
        fs, target = resolve(str(tmp_path / "out"))
        pub = Publication.begin(fs, target, "demo")
        pub.write_table(table, "scores")
        return pub.publish({})["identity"]

    first = publish(scores([0.1, 0.2], "/x/v-1/step2", "2026-01-01T00:00:00+00:00"))
    assert publish(scores([0.1, 0.2], "/x/v-2/step2", "2026-01-01T00:05:00+00:00")) == first
    assert publish(scores([0.1, 0.3], "/x/v-2/step2", "2026-01-01T00:05:00+00:00")) != first


def test_a_saved_adapter_config_is_canonical(tmp_path: Path):
    """peft holds ``target_modules`` as a set and writes it in the set's order, which changes
    with each process's string hashing: whatever the order, the saved bytes are the same."""
    rec = LLMRecommender.from_backbone(ModelConfig(backbone="tiny"), trainable=True)
    texts = []
    for order in (["q_proj", "v_proj"], ["v_proj", "q_proj"]):
        rec.net.peft_config["default"].target_modules = order  # as a set may iterate
        folder = tmp_path / "_".join(order)
        rec.save(folder)
        texts.append((folder / ADAPTER_CONFIG).read_text())
    assert texts[0] == texts[1]
    config = json.loads(texts[0])
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert list(config) == sorted(config)
    fs, _ = resolve(str(tmp_path))
    one, two = (content_identity(fs, str(tmp_path / n)) for n in ("q_proj_v_proj", "v_proj_q_proj"))
    assert one == two


def test_candidates_come_out_in_the_users_order_whatever_the_batches():
    """The same users give the same candidate rows in the same order, in one batch or many, so
    ``retrieve.batch_users`` (a resource setting) never changes the output."""
    rng = np.random.default_rng(0)
    n_items, n_users, dim = 30, 7, 16
    catalog = Catalog.build(
        np.arange(n_items), rng.integers(0, 2, (n_items, dim)), rng.integers(0, 9, n_items)
    )
    cfg = RetrieveConfig(top_n=5, sampled_negatives=4)
    retriever = UserRetriever(
        catalog,
        rng.integers(0, 2, (n_users, dim)).astype(np.uint8),
        None,
        np.array([f"u{u}" for u in range(n_users)], dtype=object),
        np.array([f"i{i}" for i in range(n_items)], dtype=object),
        cfg,
        np.array([True] * 5 + [False] * 2),  # users 5 and 6 have no code: popularity lists
    )
    users = pa.table(
        {
            "split": ["test"] * n_users,
            "uid": pa.array(range(n_users), pa.int32()),
            "exclude": [[u, u + 1] for u in range(n_users)],
            "seen": [[u, u + 1, u + 2] for u in range(n_users)],
            "sampled_positive": [u + 2 for u in range(n_users)],
        }
    )
    whole = retriever(users)
    assert whole["uid"].to_pylist() == sorted(whole["uid"].to_pylist())
    for size in (1, 2, 3):
        parts = [retriever(users.slice(i, size)) for i in range(0, n_users, size)]
        assert pa.concat_tables(parts).equals(whole), size


# ---- forcing each stage of a tiny run (slow) ---------------------------------------------------
BUDGET = (
    "finetune.step1.max_steps=4",
    "finetune.step2.max_steps=4",
    "finetune.eval_every=2",
    "encoder.max_epochs=3",
    # Codes for the lists apart from the prompts' (stage encode_retrieval), so every stage runs.
    "retrieval_encoder.objective=implicit",
    "retrieval_encoder.dim=16",
    "retrieval_encoder.prior_bits=4",
    "retrieval_encoder.max_epochs=3",
    "score.splits=[test]",
    # Many small batches of users on two actors: blocks finish in any order.
    "retrieve.batch_users=4",
    "retrieve.num_actors=2",
)
SKIPPED = re.compile(r"^\[binllm\] (\w+): skipped: unchanged config and inputs", re.M)
FINETUNE_VERSION = re.compile(r"/finetune/v-\d{8}T\d{6}Z-[0-9a-f]{8}/")


def evaluate_content(run_dir: Path, manifest: dict) -> dict[str, object]:
    """What evaluate's version holds: each table's identity, each other file's bytes, with the
    reports' adapter paths cut to ``finetune/v-*/`` (see the evaluate case below)."""
    folder = run_dir / "evaluate" / manifest["version"]
    fs, _ = resolve(str(folder))
    out: dict[str, object] = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.suffix == ".parquet":
            out[rel.rpartition("/")[0]] = content_identity(fs, str(path.parent))
        elif path.suffix in (".md", ".json"):
            out[rel] = FINETUNE_VERSION.sub("/finetune/v-*/", path.read_text())
        elif path.is_file():
            out[rel] = path.read_bytes()
    return out


@pytest.mark.slow  # the tiny pipeline once, then every stage again: ~6 min on 2 cores
@pytest.mark.usefixtures("ray_session")
def test_forcing_a_stage_that_makes_the_same_output_leaves_everything_after_it_current(
    tmp_path: Path, capsys
):
    args = ["run", "configs/tiny.yaml", "--set", f"output_root={tmp_path / 'runs'}"]
    for kv in BUDGET:
        args += ["--set", kv]
    run_dir = tmp_path / "runs" / "tiny"
    names = [s.name for s in STAGES]

    def manifests() -> dict[str, dict]:
        return {n: json.loads((run_dir / n / MANIFEST).read_text()) for n in names}

    assert main(args) == 0
    first = manifests()
    assert set(first) == set(names)  # the tiny config runs every stage
    first_evaluate = evaluate_content(run_dir, first["evaluate"])
    for stage in names:
        capsys.readouterr()
        assert main([*args, "--stages", stage, "--force"]) == 0
        forced = manifests()
        assert forced[stage]["version"] != first[stage]["version"], stage
        assert main(args) == 0
        out = capsys.readouterr().out
        now = manifests()
        changed = {n: (first[n]["identity"], now[n]["identity"]) for n in names}
        changed = {n: v for n, v in changed.items() if v[0] != v[1]}
        if stage == "evaluate" and set(changed) == {"evaluate"}:
            # Known: evaluate's report.md and metrics.json name each mode's adapter by its path,
            # which lies in finetune's version folder; forced finetune and score moved it to the
            # new (same) adapter, so the forced report differs in that path alone. Nothing reads
            # evaluate's output; everything else of it is the same.
            assert evaluate_content(run_dir, now["evaluate"]) == first_evaluate
            del changed["evaluate"]
        assert not changed, f"forcing {stage} changed the identities {changed}\n{out}"
        skipped = set(SKIPPED.findall(out))
        assert skipped == set(names), f"forcing {stage} redid {set(names) - skipped}\n{out}"
        assert all(now[n]["version"] == forced[n]["version"] for n in names), stage


def test_rerank_depends_on_the_popularity_windows_only_where_popular_items_may_join() -> None:
    rerank = next(s for s in STAGES if s.name == "rerank")
    windows = "evaluate.popularity_windows=[30, 90]"
    off = [load_config("configs/tiny.yaml", sets) for sets in ([], [windows])]
    assert rerank.inputs(off[0]) == rerank.inputs(off[1])
    union = "rerank.popular_places=[0, 1]"
    on = [load_config("configs/tiny.yaml", sets) for sets in ([union], [union, windows])]
    assert rerank.inputs(on[0])["popularity_windows"] == "7,30,90,180,365"
    assert rerank.inputs(on[1])["popularity_windows"] == "30,90"
