"""Benchmark: stages ingest + samples on Ray against a plain single-process polars run.

Datasets: the shared MovieLens 100K (RecBole files) and synthetic MovieLens-CSV folders of 1M and
10M interactions that this script generates (``ratings.csv`` + ``movies.csv``, the layout of
MovieLens latest/25M). Both sides do the same steps: parse the source, write ``interactions`` and
``items`` Parquet, apply the ml100k protocol (``binllm_core.protocol.build_samples``) and write
``samples``. Measured: rows per second and peak resident memory of the whole process tree (Ray's
raylet and workers included), and the ratio Ray / plain.

    python benchmarks/ingest.py [--sizes 1000000,10000000] [--skip-ml100k]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, SHARED, measured, save, table  # noqa: E402


def generate_movielens_csv(folder: Path, n: int, seed: int = 0) -> Path:
    """A MovieLens-CSV folder with ``n`` ratings, ~100 per user, Zipf-like item popularity."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_users, n_items = max(n // 100, 10), max(n // 500, 50)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.8
    items = rng.choice(n_items, size=n, p=popularity / popularity.sum()) + 1
    ratings = pl.DataFrame(
        {
            "userId": rng.integers(1, n_users + 1, size=n),
            "movieId": items,
            "rating": rng.integers(1, 11, size=n) / 2.0,
            "timestamp": rng.integers(1_420_070_400, 1_577_836_800, size=n),
        }
    )
    ratings.write_csv(folder / "ratings.csv")
    ids = np.arange(1, n_items + 1)
    movies = pl.DataFrame(
        {
            "movieId": ids,
            "title": [f"Movie {i}, The ({1950 + i % 70})" for i in ids],
            "genres": ["Comedy|Drama" if i % 2 else "Action" for i in ids],
        }
    )
    movies.write_csv(folder / "movies.csv", quote_style="non_numeric")
    return folder


PLAIN_SCRIPT = """
import sys, polars as pl
from binllm_core.config import load_config
from binllm_core.protocol import build_samples
src, out, fmt = sys.argv[1], sys.argv[2], sys.argv[3]
if fmt == "ml_csv":
    raw = pl.read_csv(f"{src}/ratings.csv", schema_overrides={"userId": pl.String,
                      "movieId": pl.String, "rating": pl.Float32, "timestamp": pl.Int64})
    raw = raw.rename({"userId": "user", "movieId": "item"})
    items = pl.read_csv(f"{src}/movies.csv", schema_overrides={"movieId": pl.String})
    items = items.rename({"movieId": "item"})
else:
    raw = pl.read_csv(f"{src}/ml-100k.inter", separator="\\t", schema_overrides={
        "user_id:token": pl.String, "item_id:token": pl.String, "rating:float": pl.Float32,
        "timestamp:float": pl.Float64})
    raw = raw.rename({"user_id:token": "user", "item_id:token": "item", "rating:float": "rating",
                      "timestamp:float": "timestamp"})
    raw = raw.with_columns(pl.col("timestamp").cast(pl.Int64))
    items = pl.read_csv(f"{src}/ml-100k.item", separator="\\t", quote_char=None,
                        infer_schema=False)
    items = items.rename({"item_id:token": "item", "movie_title:token_seq": "title"})
inter = raw.with_row_index("row").with_columns(pl.col("row").cast(pl.Int64))
inter.write_parquet(f"{out}/interactions.parquet")
items.write_parquet(f"{out}/items.parquet")
result = build_samples(inter, load_config("configs/ml100k.yaml").protocol)
result.samples.write_parquet(f"{out}/samples.parquet")
print(result.samples.height)
"""


def run_plain(src: Path, out: Path, fmt: str) -> dict[str, float]:
    """The same steps in one plain Python process (polars), measured from outside."""
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", PLAIN_SCRIPT, str(src), str(out), fmt],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    with measured(proc.pid) as m:
        stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(stderr[-2000:])
    m["rows"] = int(stdout.strip().splitlines()[-1])
    return m


def run_ray(src: Path, out: Path, fmt: str) -> dict[str, float]:
    """Stages ingest + samples through the pipeline (Ray already started, not timed)."""
    from binllm_core.config import load_config
    from pipelines.registry import run_pipeline

    cfg = load_config(
        "configs/ml100k.yaml",
        [f"data.uri={src}", f"data.format={fmt}", f"output_root={out}", "run_name=bench"],
    )
    with measured() as m:
        manifests = run_pipeline(cfg, ["ingest", "samples"], force=True, log=lambda _: None)
    m["rows"] = manifests["samples"]["tables"]["samples"]["rows"]
    return m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--skip-ml100k", action="store_true")
    args = parser.parse_args()

    import ray

    from pipelines.runtime import ensure_ray

    started = time.perf_counter()
    ensure_ray()
    ray_start_s = time.perf_counter() - started

    work = Path(tempfile.mkdtemp(prefix="binllm-bench-ingest-"))
    cases: list[tuple[str, Path, str]] = []
    if not args.skip_ml100k and (SHARED / "data" / "ml-100k").exists():
        cases.append(("ml-100k (RecBole files)", SHARED / "data" / "ml-100k", "recbole"))
    for size in [int(s) for s in args.sizes.split(",") if s]:
        folder = generate_movielens_csv(work / f"csv-{size}", size)
        cases.append((f"synthetic MovieLens CSV, {size:,}", folder, "ml_csv"))

    results, rows = [], []
    for name, src, fmt in cases:
        ray_m = run_ray(src, work / "ray", fmt)
        plain_m = run_plain(src, work / "plain", fmt)
        assert ray_m["rows"] == plain_m["rows"], (name, ray_m["rows"], plain_m["rows"])
        n = ray_m["rows"]
        entry = {"dataset": name, "interactions": n, "ray": ray_m, "plain_polars": plain_m}
        entry["time_ratio_ray_over_plain"] = ray_m["wall_s"] / plain_m["wall_s"]
        entry["memory_ratio_ray_over_plain"] = ray_m["peak_rss_gib"] / plain_m["peak_rss_gib"]
        results.append(entry)
        rows.append([
            name, f"{n:,}",
            f"{n / ray_m['wall_s']:,.0f}", f"{n / plain_m['wall_s']:,.0f}",
            f"{entry['time_ratio_ray_over_plain']:.2f}",
            f"{ray_m['peak_rss_gib']:.2f}", f"{ray_m['extra_rss_gib']:.2f}",
            f"{plain_m['peak_rss_gib']:.2f}",
            f"{entry['memory_ratio_ray_over_plain']:.2f}",
        ])
        print(rows[-1], flush=True)
        shutil.rmtree(work / "ray", ignore_errors=True)
        shutil.rmtree(work / "plain", ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    ray.shutdown()

    markdown = "\n".join([
        "## Ingest + samples (`benchmarks/ingest.py`)",
        "",
        "Stages `ingest` + `samples` through `run_pipeline` on a local Ray (started beforehand, "
        f"{ray_start_s:.1f} s, not counted) against the same steps in one plain polars process. "
        "Rows/s = interactions per second of wall time; memory = peak resident memory of the "
        "whole process tree (Ray's raylet, GCS and workers included; 'above idle' subtracts "
        "the tree before the run). The plain side is a fresh Python process, its start and "
        "imports included.",
        "",
        table(
            ["dataset", "interactions", "Ray rows/s", "plain rows/s", "time Ray/plain",
             "Ray peak GiB", "Ray above idle GiB", "plain peak GiB", "memory Ray/plain"],
            rows,
        ),
    ])
    save("ingest", {"ray_start_s": ray_start_s, "cases": results}, markdown)


if __name__ == "__main__":
    main()
