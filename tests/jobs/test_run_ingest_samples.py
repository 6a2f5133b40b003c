"""`binllm run configs/ml100k.yaml --stages ingest,samples` as a user runs it, on real data."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from binllm_core.storage import read_output
from jobs.cli import main

pytestmark = pytest.mark.slow  # all of MovieLens 100K through Ray Data


def run_cli(uri: Path, out: Path, *extra: str) -> dict:
    args = ["run", "configs/ml100k.yaml", "--stages", "ingest,samples",
            "--set", f"data.uri={uri}", "--set", f"output_root={out}", *extra]
    assert main(args) == 0
    run = out / "ml100k"
    return {s: json.loads((run / s / "_manifest.json").read_text()) for s in ("ingest", "samples")}


def ml100k_as_movielens_csv(src: Path, dst: Path) -> Path:
    """The shared RecBole ml-100k rewritten as a MovieLens-CSV folder (ratings.csv, movies.csv)."""
    dst.mkdir()
    inter = pl.read_csv(src / "ml-100k.inter", separator="\t")
    inter.columns = ["userId", "movieId", "rating", "timestamp"]
    inter.with_columns(pl.col("timestamp").cast(pl.Int64)).write_csv(dst / "ratings.csv")
    items = pl.read_csv(src / "ml-100k.item", separator="\t", quote_char=None, infer_schema=False)
    movies = items.select(
        pl.col("item_id:token").alias("movieId"),
        (pl.col("movie_title:token_seq") + " (" + pl.col("release_year:token")
         + ")").alias("title"),
        pl.col("class:token_seq").str.replace_all(" ", "|").alias("genres"),
    )
    movies.write_csv(dst / "movies.csv", quote_style="non_numeric")
    return dst


@pytest.mark.usefixtures("ray_session")
def test_ml100k_ingest_and_samples_from_shared_copy(ml100k_dir: Path, tmp_path: Path, capsys):
    manifests = run_cli(ml100k_dir, tmp_path)
    tables = manifests["ingest"]["tables"]
    assert tables["interactions"]["rows"] == 100_000
    assert tables["items"]["rows"] == 1_682
    metrics = manifests["samples"]["metrics"]
    assert sum(metrics[f"{s}_rows"] for s in ("train", "valid", "test")) == 100_000
    assert manifests["samples"]["tables"]["samples"]["rows"] == 100_000
    # A second run with the same config skips both stages.
    again = run_cli(ml100k_dir, tmp_path)
    assert again["samples"]["finished_at"] == manifests["samples"]["finished_at"]
    assert "skipped" in capsys.readouterr().out


@pytest.mark.usefixtures("ray_session")
def test_movielens_csv_folder_works_unchanged_but_for_the_uri(ml100k_dir: Path, tmp_path: Path):
    folder = ml100k_as_movielens_csv(ml100k_dir, tmp_path / "ml-csv")
    manifests = run_cli(folder, tmp_path / "out")
    assert manifests["ingest"]["metrics"]["format"] == "ml_csv"
    assert manifests["ingest"]["tables"]["interactions"]["rows"] == 100_000
    assert manifests["ingest"]["tables"]["items"]["rows"] == 1_682
    assert manifests["samples"]["tables"]["samples"]["rows"] == 100_000
    samples = pl.from_arrow(read_output(str(tmp_path / "out" / "ml100k" / "samples"), "samples"))
    assert samples["split"].value_counts().sort("split")["count"].sum() == 100_000
