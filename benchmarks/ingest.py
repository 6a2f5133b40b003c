"""Benchmark: stages ingest + samples (+ render, text mode) on Ray against a plain polars process.

Datasets: the shared MovieLens 100K (RecBole files), synthetic MovieLens-CSV folders
(``benchmarks/synthetic.py``, default 1M, 10M and 30M ratings, ml100k protocol) and a synthetic
Amazon-2018-shaped JSON folder (default 10M reviews, ``amazon_book`` protocol: 2017 only, >20
filter, month split with December halves). Both sides do the same steps: parse the source, write
``interactions`` and ``items`` Parquet, apply the protocol and write ``samples``, and, up to
``--render-max`` interactions, render the text prompts with their token counts and write them.
The plain side is one fresh Python process running ``binllm_core.data.protocol.build_samples`` on
the whole frame and ``binllm_core.prompts.render.render_table`` on frames of 500k samples (the
prompts of 30M would not fit), writing them with one ``ParquetWriter``.

Measured: interactions per second of wall time; the peak resident memory of the Ray driver (this
process) and of the whole process tree (raylet, GCS, workers), each also above its idle level
before the case; the plain process's peak. ``--before FILE`` adds the driver and tree figures of
an earlier run of this script (e.g. on the commit before the data stages streamed).

Resumable: each finished case is saved at once to ``benchmarks/results/ingest.json`` (and the
table to BENCHMARKS.md) and skipped by a later run; ``--fresh`` starts over. Generated sources
are kept under ``--work`` and reused.

    python benchmarks/ingest.py [--sizes 1000000,10000000,30000000] [--amazon 10000000]
        [--render-max 30000000] [--plain-max N] [--skip-ml100k] [--before results.json]
        [--fresh | --redo TEXT]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, ROOT, SHARED, commit, measured, save, table  # noqa: E402
from benchmarks.synthetic import amazon2018_json, movielens_csv  # noqa: E402

NAME = "ingest"
LAYOUT = 2
"""Results of this layout are resumed; older ones (another table) are started over."""
BACKBONE = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The tokenizer render counts tokens with (read from the GGUF file, no download)."""

PLAIN_SCRIPT = """
import sys, polars as pl, pyarrow as pa, pyarrow.parquet as pq
from binllm_core.config import load_config
from binllm_core.data.protocol import build_samples
src, out, fmt, config, render, backbone = sys.argv[1:7]
CHUNK = 500_000
if fmt == "ml_csv":
    raw = pl.read_csv(f"{src}/ratings.csv", schema_overrides={"userId": pl.String,
                      "movieId": pl.String, "rating": pl.Float32, "timestamp": pl.Int64})
    raw = raw.rename({"userId": "user", "movieId": "item"})
    items = pl.read_csv(f"{src}/movies.csv", schema_overrides={"movieId": pl.String})
    items = items.rename({"movieId": "item"})
elif fmt == "amazon2018":
    raw = pl.read_ndjson(f"{src}/Books_5.json", schema={"reviewerID": pl.String,
                         "asin": pl.String, "overall": pl.Float32, "unixReviewTime": pl.Int64})
    raw = raw.rename({"reviewerID": "user", "asin": "item", "overall": "rating",
                      "unixReviewTime": "timestamp"})
    items = pl.read_ndjson(f"{src}/meta_Books.json", schema={"asin": pl.String,
                           "title": pl.String}).rename({"asin": "item"})
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
cfg = load_config(config, [f"model.backbone={backbone}", "prompts.modes=[text]"])
result = build_samples(inter, cfg.protocol, items["item"])
result.samples.write_parquet(f"{out}/samples.parquet")
if render == "1":
    from binllm_core.llm.loading import load_tokenizer
    from binllm_core.prompts.token_lengths import TokenLengths
    from binllm_core.prompts import (SAMPLE_COLUMNS, lookups_from_tables, render_table,
                                     templates_from_config)
    lookups = lookups_from_tables(items.select("item", "title").to_arrow(),
                                  result.item_map.to_arrow(), None)
    templates = templates_from_config(cfg.prompts)
    lengths_of = TokenLengths(load_tokenizer(cfg.model))
    samples = result.samples.select(SAMPLE_COLUMNS).to_arrow()
    writer = None
    for start in range(0, samples.num_rows, CHUNK):  # whole frames of CHUNK samples at a time
        prompts = render_table(samples.slice(start, CHUNK), lookups, templates, ["text"],
                               cfg.prompts.history_len)
        lengths = []
        for at in range(0, prompts.num_rows, 2048):  # the stage's batch: no 1M-list of ids
            lengths += lengths_of(prompts["prompt"].slice(at, 2048).to_pylist())
        prompts = prompts.append_column("n_tokens", pa.array(lengths, pa.int32()))
        writer = writer or pq.ParquetWriter(f"{out}/prompts.parquet", prompts.schema)
        writer.write_table(prompts)
    writer.close()
print(result.samples.height)
"""


def run_plain(src: Path, out: Path, fmt: str, config: str, render: bool) -> dict[str, float]:
    """The same steps in one plain Python process (polars), measured from outside."""
    out.mkdir(parents=True, exist_ok=True)
    args = [str(src), str(out), fmt, config, "1" if render else "0", str(BACKBONE)]
    proc = subprocess.Popen(
        [sys.executable, "-c", PLAIN_SCRIPT, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with measured(proc.pid) as m:
        stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(stderr[-2000:])
    m["samples"] = int(stdout.strip().splitlines()[-1])
    return m


def run_ray(src: Path, out: Path, fmt: str, config: str, render: bool) -> dict[str, float]:
    """Stages ingest + samples (+ render) through the pipeline (Ray already started)."""
    from binllm_core.config import load_config
    from pipelines.runtime.registry import run_pipeline

    cfg = load_config(
        config,
        [
            f"data.uri={src}",
            f"data.format={fmt}",
            f"output_root={out}",
            "run_name=bench",
            f"model.backbone={BACKBONE}",
            "prompts.modes=[text]",
        ],
    )
    stages = ["ingest", "samples", *(["render"] if render else [])]
    with measured() as m:
        manifests = run_pipeline(cfg, stages, force=True, log=lambda _: None)
    m["samples"] = manifests["samples"]["tables"]["samples"]["rows"]
    m["partitions"] = manifests["samples"]["metrics"].get("partitions", 1)
    return m


def cases(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """The datasets to run, smallest first: name, source maker, format, config, size."""
    found: list[dict[str, Any]] = []
    if not args.skip_ml100k and (SHARED / "data" / "ml-100k").exists():
        found.append(
            {
                "name": "ml-100k (RecBole files)",
                "size": 100_000,
                "fmt": "recbole",
                "config": "configs/ml100k.yaml",
                "src": SHARED / "data" / "ml-100k",
            }
        )
    for size in [int(s) for s in args.sizes.split(",") if s]:
        found.append(
            {
                "name": f"synthetic MovieLens CSV, {size:,}",
                "size": size,
                "fmt": "ml_csv",
                "config": "configs/ml100k.yaml",
                "make": movielens_csv,
                "src": work / f"movielens-{size}",
            }
        )
    for size in [int(s) for s in args.amazon.split(",") if s]:
        found.append(
            {
                "name": f"synthetic Amazon-2018 JSON, {size:,} (amazon_book)",
                "size": size,
                "fmt": "amazon2018",
                "config": "configs/amazon_book.yaml",
                "make": amazon2018_json,
                "src": work / f"amazon-{size}",
            }
        )
    return sorted(found, key=lambda c: c["size"])


def source(case: dict[str, Any]) -> Path:
    """The case's source folder, generated once (into a temporary name, then renamed)."""
    src: Path = case["src"]
    if "make" in case and not src.exists():
        partial = src.with_name(src.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        case["make"](partial, case["size"])
        partial.rename(src)
    return src


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1000000,10000000,30000000")
    parser.add_argument("--amazon", default="10000000")
    parser.add_argument(
        "--render-max",
        type=int,
        default=30_000_000,
        help="render the text prompts only for cases up to this many rows",
    )
    parser.add_argument(
        "--plain-max",
        type=int,
        default=10**12,
        help="run the plain side only for cases up to this many rows (it renders whole frames)",
    )
    parser.add_argument("--skip-ml100k", action="store_true")
    parser.add_argument("--work", type=Path, default=Path("/tmp/binllm-bench-ingest"))
    parser.add_argument("--before", type=Path, help="an earlier results JSON of this script")
    parser.add_argument("--name", default=NAME, help="results name (e.g. ingest-before)")
    parser.add_argument("--fresh", action="store_true", help="ignore finished cases")
    parser.add_argument(
        "--redo",
        default="",
        help="measure again the finished cases whose 'dataset [stages]' contains this text",
    )
    args = parser.parse_args()

    import ray

    from pipelines.runtime.ray_helpers import ensure_ray

    results_path = RESULTS / f"{args.name}.json"
    done: dict[str, Any] = {}
    saved = json.loads(results_path.read_text()) if results_path.exists() else {}
    if saved.get("layout") == LAYOUT and not args.fresh:
        # A case keeps the commit it was measured on (older files: the file's commit).
        done = {_key(c): {"commit": saved["commit"], **c} for c in saved["cases"]}
        if args.redo:
            done = {k: c for k, c in done.items() if args.redo not in f"{k[0]} [{k[1]}]"}
    before: dict[Any, Any] = {}
    if args.before and args.before.exists():
        earlier = json.loads(args.before.read_text())
        before = {_key(c): c for c in earlier["cases"]} | {"commit": earlier["commit"]}

    started = time.perf_counter()
    ensure_ray()
    ray_start_s = time.perf_counter() - started
    args.work.mkdir(parents=True, exist_ok=True)
    for case in cases(args, args.work):
        render = case["size"] <= args.render_max
        stages = "ingest, samples" + (", render" if render else "")
        key = (case["name"], stages)
        earlier = done.get(key)
        wants_plain = case["size"] <= args.plain_max
        if earlier and (earlier["plain_polars"] or not wants_plain):
            print(f"skip {case['name']} [{stages}] (finished)", flush=True)
            continue
        src = source(case)
        if earlier:  # its Ray side is measured; only the plain side is filled in
            ray_m = earlier["ray"]
        else:
            ray_m = run_ray(src, args.work / "ray", case["fmt"], case["config"], render)
            shutil.rmtree(args.work / "ray", ignore_errors=True)
        plain_m = None
        if wants_plain:
            plain_m = run_plain(src, args.work / "plain", case["fmt"], case["config"], render)
            shutil.rmtree(args.work / "plain", ignore_errors=True)
        if plain_m is not None and ray_m["samples"] != plain_m["samples"]:
            raise SystemExit(
                f"{case['name']}: Ray made {ray_m['samples']:,} samples, "
                f"plain polars {plain_m['samples']:,}"
            )
        done[key] = {
            "dataset": case["name"],
            "interactions": case["size"],
            "samples": ray_m["samples"],
            "stages": stages,
            "commit": earlier["commit"] if earlier else commit(),
            "ray": ray_m,
            "plain_polars": plain_m,
            "plain_commit": commit() if plain_m else None,
            "time_ratio_ray_over_plain": plain_m and ray_m["wall_s"] / plain_m["wall_s"],
        }
        print(json.dumps(done[key]), flush=True)
        _save(list(done.values()), before, ray_start_s, args)
    if done:  # also when every case was finished before: the table with --before's figures
        _save(list(done.values()), before, saved.get("ray_start_s", ray_start_s), args)
    ray.shutdown()


def _save(
    finished: list[dict[str, Any]],
    before: dict[str, Any],
    ray_start_s: float,
    args: argparse.Namespace,
) -> None:
    rows = []
    for c in sorted(finished, key=lambda c: (c["interactions"], c["stages"])):
        ray_m, plain_m, n = c["ray"], c["plain_polars"], c["interactions"]
        old = before.get(_key(c), {}).get("ray")
        rows.append(
            [
                c["dataset"],
                c["stages"],
                f"{n:,}",
                f"{c['samples']:,}",
                f"{n / ray_m['wall_s']:,.0f}",
                f"{n / plain_m['wall_s']:,.0f}" if plain_m else "not run",
                f"{c['time_ratio_ray_over_plain']:.2f}" if plain_m else "",
                _then_now(old, ray_m, "self_extra_rss_gib"),
                _then_now(old, ray_m, "peak_rss_gib"),
                f"{plain_m['peak_rss_gib']:.2f}" if plain_m else "",
                _measured_at(c),
            ]
        )
    markdown = "\n".join(
        [
            "## Ingest + samples + render (`benchmarks/ingest.py`)",
            "",
            "Stages `ingest`, `samples` and (where the stages column says so) `render` in text "
            "mode through `run_pipeline` on a local Ray (started beforehand, "
            f"{ray_start_s:.1f} s, not counted) against the same steps in one plain polars "
            "process (a fresh Python process, its start and imports included). Rows/s = "
            "interactions per second of wall time. **Driver above idle**: the peak resident "
            "memory of the Ray driver (the process that runs the pipeline) minus its own before "
            "the case. **Ray tree peak**: the sum of the resident memory of the whole process "
            "tree (driver, raylet, GCS, workers); it counts the object store's shared pages once "
            "per process that maps them, so it overstates what the machine holds. 'before → "
            "now' where the `--before` run has the case: before = this script run on a checkout of "
            f"{before.get('commit', '?').split('+')[0]}, before the data stages streamed (samples "
            "built in one polars pass in the driver). Render counts tokens with SmolLM2's "
            "tokenizer (each distinct word once, `binllm_core/prompts/token_lengths.py`, on both "
            "sides); "
            "it runs on the rows whose stages name it (`--render-max`), and a size run with and "
            "without it shows render's share. 'not run': the plain side was skipped for that case "
            "(`--plain-max`, to save time; a later run fills it in).",
            "",
            table(
                [
                    "dataset",
                    "stages",
                    "interactions",
                    "samples",
                    "Ray rows/s",
                    "plain rows/s",
                    "time Ray/plain",
                    "driver above idle GiB",
                    "Ray tree peak GiB",
                    "plain peak GiB",
                    "measured at",
                ],
                rows,
            ),
        ]
    )
    save(args.name, {"layout": LAYOUT, "ray_start_s": ray_start_s, "cases": finished}, markdown)


def _measured_at(case: dict[str, Any]) -> str:
    """The commit of the Ray side, and the plain side's where it was filled in later."""
    ray_at, plain_at = case.get("commit", ""), case.get("plain_commit")
    return ray_at if plain_at in (None, ray_at) else f"{ray_at} (plain {plain_at})"


def _key(case: dict[str, Any]) -> tuple[str, str]:
    """A case is its dataset and its stages: one size may be run with and without render."""
    return case["dataset"], case["stages"]


def _then_now(old: dict[str, float] | None, now: dict[str, float], key: str) -> str:
    if old is None or key not in old:
        return f"{now[key]:.2f}"
    return f"{old[key]:.2f} → {now[key]:.2f}"


if __name__ == "__main__":
    main()
