"""Stage ``samples`` gives the very tables it gave before it streamed (commit 6fa341d, one polars
pass over the whole table on the driver): the digests in ``fixtures/samples_golden.json`` were
taken from that implementation on the same sources and configs.

A digest is the SHA-256 of the table sorted by all its columns and written as CSV (lists joined
by spaces), so it pins every value and not the order of rows or files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from benchmarks.synthetic import amazon2018_json, movielens_csv
from binllm_core.config import load_config
from binllm_core.storage import read_output
from pipelines.runtime.registry import run_pipeline
from pipelines.stages import samples
from tests.conftest import FIXTURES, ML100K

GOLDEN = json.loads((FIXTURES / "samples_golden.json").read_text())

ML1M_MONTHS = [
    "protocol.train_months=[2015-01, 2018-06]",
    "protocol.valid_months=[2018-07, 2018-12]",
    "protocol.test_months=[2019-01, 2019-12]",
]
CASES: dict[str, tuple[str, str, list[str]]] = {
    # name: (config, source, overrides); a source "movielens:N" / "amazon:N" is synthetic.
    "ml100k": ("configs/ml100k.yaml", "ml100k", []),
    "ml100k_global": ("configs/ml100k_global.yaml", "ml100k", []),
    "movielens_1m": ("configs/ml100k.yaml", "movielens:1000000", ["data.format=ml_csv"]),
    "movielens_months": (
        "configs/ml1m.yaml",
        "movielens:200000",
        ["data.format=ml_csv", *ML1M_MONTHS],
    ),
    "amazon_book": ("configs/amazon_book.yaml", "amazon:60000", []),
}
PARTITIONS = 4
"""Each case runs on this many partitions of users (the streaming path, not one frame)."""
TABLES = ("samples", "user_map", "item_map", "dropped")


def digest(table: pa.Table) -> str:
    frame = pl.from_arrow(table)
    frame = frame.with_columns(
        pl.col(c).cast(pl.List(pl.String)).list.join(" ")
        for c, t in frame.schema.items()
        if isinstance(t, pl.List)
    )
    frame = frame.sort(frame.columns) if frame.height else frame
    return hashlib.sha256(frame.write_csv().encode()).hexdigest()


def source(spec: str, folder: Path) -> Path:
    if spec == "ml100k":
        if not (ML100K / "ml-100k.inter").exists():
            pytest.skip(f"shared MovieLens 100K not found at {ML100K}")
        return ML100K
    kind, n = spec.split(":")
    make = {"movielens": movielens_csv, "amazon": amazon2018_json}[kind]
    return make(folder / spec.replace(":", "-"), int(n))


def run_case(name: str, out: Path) -> dict:
    """Ingest + samples of case ``name`` under ``out``: the tables' digests and the metrics."""
    config, spec, sets = CASES[name]
    uri = source(spec, out)
    cfg = load_config(config, [f"data.uri={uri}", f"output_root={out}", "run_name=eq", *sets])
    run_pipeline(cfg, ["ingest"], log=lambda _: None)
    rows = json.loads((out / "eq" / "ingest" / "_manifest.json").read_text())["metrics"]
    samples.PARTITION_ROWS = -(-rows["interactions_rows"] // PARTITIONS)
    manifests = run_pipeline(cfg, ["ingest", "samples"], log=lambda _: None)
    folder = str(out / "eq" / "samples")
    return {
        "digests": {t: digest(read_output(folder, t)) for t in TABLES},
        "metrics": manifests["samples"]["metrics"],
    }


@pytest.mark.parametrize(
    "name",
    [
        "ml100k",
        "ml100k_global",
        pytest.param("movielens_1m", marks=pytest.mark.slow),
        "movielens_months",
        "amazon_book",
    ],
)
def test_samples_are_those_of_the_single_pass_implementation(
    ray_session, tmp_path, monkeypatch, name
):
    monkeypatch.setattr(samples, "PARTITION_ROWS", samples.PARTITION_ROWS)
    got, want = run_case(name, tmp_path), GOLDEN[name]
    assert got["metrics"]["partitions"] == PARTITIONS
    changed = want.get("changed", {"metrics": {}, "tables": []})  # on purpose, with its why
    for table in TABLES:
        if table not in changed["tables"]:
            assert got["digests"][table] == want["digests"][table], table
    metrics = want["metrics"] | changed["metrics"]
    assert {k: got["metrics"][k] for k in metrics} == metrics
