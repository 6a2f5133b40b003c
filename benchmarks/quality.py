"""Benchmark: the quality table. Do codes as text beat text-only and codes-only on ml-100k?

Runs the pipeline's own stages (``run_pipeline``) for each row, on one split, one backbone, one
budget per tuning step and fixed seeds; the test split is only scored, never used to choose:

* ``base`` run, two-step binary: the encoder gives the float MF and binary MF rows; its step-1
  adapter scores the text-only row (TALLRec-style, BinLLM-TO) and its step-2 adapter the BinLLM
  binary two-step row;
* ``dotdec`` run: step 2 on dot-decimal prompts from the same step-1 adapter (the base run's,
  through ``finetune.init_adapter``), so both two-step rows share their first step;
* ``onestep`` run: binary prompts from a fresh adapter, as many training sequences as step 1 and
  step 2 together, at step 1's learning rate (intuitive tuning, BinLLM-IT).

The variant runs reuse the base run's ingest, samples, encode and render outputs (copied; their
manifests match, so those stages are skipped). Every LLM row is scored on the same seeded test
subsample (``score.max_rows``); the codes rows are given on that subsample and on the whole test
split. Results: ``benchmarks/results/quality-<config>.json`` and a table in BENCHMARKS.md.

    python benchmarks/quality.py [--config configs/ml100k.yaml] [--output-root /tmp/quality]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import SHARED, save, table  # noqa: E402
from binllm_core.config import RunConfig, load_config, to_dict  # noqa: E402
from binllm_core.metrics import score_report  # noqa: E402

SHARED_STAGES = ("ingest", "samples", "encode", "render")
METRICS = ("auc", "uauc", "warm_auc", "warm_uauc", "cold_auc", "cold_uauc")


def variant_overrides(cfg: RunConfig, base_adapter: str) -> dict[str, list[str]]:
    """``--set`` overrides of each run, on top of the config."""
    s1, s2 = cfg.finetune.step1, cfg.finetune.step2
    onestep_steps = -(-(s1.max_steps * s1.batch_size + s2.max_steps * s2.batch_size)
                      // s1.batch_size)
    step1_as_step2 = {**to_dict(s1), "max_steps": onestep_steps}
    return {
        "base": ["finetune.strategy=two_step", "finetune.code_mode=binary",
                 "score.modes=[text, binary]"],
        "dotdec": ["finetune.strategy=one_step", "finetune.code_mode=dotdec",
                   f"finetune.init_adapter={base_adapter}", "score.modes=[dotdec]"],
        "onestep": ["finetune.strategy=one_step", "finetune.code_mode=binary",
                    f"finetune.step2={json.dumps(step1_as_step2)}", "score.modes=[binary]"],
    }


def run_variant(
    config: str, sets: list[str], root: Path, name: str, base: Path | None
) -> tuple[RunConfig, dict[str, Any], float]:
    from pipelines.registry import run_pipeline

    cfg = load_config(config, [*sets, f"output_root={root}", f"run_name={name}"])
    if base is not None:
        for stage in SHARED_STAGES:
            target = root / name / stage
            if not target.exists():
                shutil.copytree(base / stage, target, ignore=shutil.ignore_patterns("checkpoints"))
    manifests = run_pipeline(cfg, None, log=lambda m: print(f"[{name}] {m}", flush=True))
    # Stage wall times from the manifests: a re-run that skips finished stages still counts them.
    stages = [m for s, m in manifests.items() if base is None or s not in SHARED_STAGES]
    return cfg, manifests, sum(m["wall_time_s"] for m in stages)


def scored(root: Path, name: str) -> pl.DataFrame:
    return pl.read_parquet(root / name / "score" / "scores" / "*.parquet").filter(
        pl.col("split") == "test"
    )


def llm_row(label: str, root: Path, name: str, mode: str, manifests: dict[str, Any],
            step: str, sequences: int, train_s: float) -> dict[str, Any]:
    scores = scored(root, name).filter(pl.col("mode") == mode)
    report = score_report(
        scores["uid"].to_numpy(), scores["label"].to_numpy(), scores["logit_yes"].to_numpy(),
        scores["warm"].to_numpy(), scores["not_cold"].to_numpy(),
    )
    tokens = manifests["render"]["metrics"]["tokens_per_mode"][mode]
    ft = manifests["finetune"]["metrics"]["steps"]
    return {
        "row": label, "mode": mode, "test_rows": scores.height, **report,
        "valid_auc": ft[step]["best_valid_auc"], "training_sequences": sequences,
        "tokens_per_prompt": tokens["mean"],
        "train_s": train_s,
    }


def codes_rows(root: Path, name: str, manifests: dict[str, Any]) -> list[dict[str, Any]]:
    """Float and binary MF on the whole test split (encode manifest) and binary MF on the LLM
    rows' test subsample (inner products of the exported codes)."""
    enc = manifests["encode"]["metrics"]
    rows = [
        {"row": "float MF (all test)", "mode": "codes", **enc["continuous"]["test"],
         "valid_auc": enc["continuous"]["valid"]["auc"]},
        {"row": "binary MF (all test)", "mode": "codes", **enc["codes"]["test"],
         "valid_auc": enc["codes"]["valid"]["auc"]},
    ]
    codes = pl.read_parquet(root / name / "encode" / "codes" / "*.parquet")
    bits = {
        entity: dict(zip(part["id"].to_list(), np.asarray(part["bits"].to_list(), np.float32),
                         strict=True))
        for (entity,), part in codes.group_by(["entity"])
    }
    subset = scored(root, name).filter(pl.col("mode") == "text")
    signs = [(2 * bits["user"][u] - 1) @ (2 * bits["item"][i] - 1)
             for u, i in zip(subset["uid"], subset["iid"], strict=True)]
    report = score_report(
        subset["uid"].to_numpy(), subset["label"].to_numpy(), np.asarray(signs),
        subset["warm"].to_numpy(), subset["not_cold"].to_numpy(),
    )
    rows.append({"row": "binary MF (LLM test subsample)", "mode": "codes",
                 "test_rows": subset.height, **report, "valid_auc": enc["codes"]["valid"]["auc"]})
    return rows


def fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/ml100k.yaml")
    parser.add_argument("--output-root", default="runs/quality")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    shared = [
        f"data.uri={SHARED / 'data' / 'ml-100k'}",
        f"model.backbone={SHARED / 'models' / 'SmolLM2-135M-Instruct.Q4_1.gguf'}",
        *args.overrides,
    ]
    root = Path(args.output_root).resolve()
    stem = Path(args.config).stem
    cfg = load_config(args.config, shared)
    s1, s2 = cfg.finetune.step1, cfg.finetune.step2
    started = time.perf_counter()

    sets = variant_overrides(cfg, "")
    base_cfg, base, base_s = run_variant(args.config, [*shared, *sets["base"]], root,
                                         f"{stem}-base", None)
    step1_adapter = base["finetune"]["metrics"]["adapters"]["step1"]
    sets = variant_overrides(cfg, step1_adapter)
    runs = {"base": (base, base_s)}
    for name in ("dotdec", "onestep"):
        _, manifests, seconds = run_variant(args.config, [*shared, *sets[name]], root,
                                            f"{stem}-{name}", root / f"{stem}-base")
        runs[name] = (manifests, seconds)

    def step(run: str, name: str) -> dict[str, Any]:
        return runs[run][0]["finetune"]["metrics"]["steps"][name]

    s1m, s2m, dot, one = step("base", "step1"), step("base", "step2"), step(
        "dotdec", "step1"), step("onestep", "step1")
    rows = codes_rows(root, f"{stem}-base", base)
    rows += [
        llm_row("text-only LoRA (step 1; TALLRec)", root, f"{stem}-base", "text", base,
                "step1", s1m["sequences"], s1m["wall_time_s"]),
        llm_row("BinLLM binary, two-step", root, f"{stem}-base", "binary", base, "step2",
                s1m["sequences"] + s2m["sequences"], s1m["wall_time_s"] + s2m["wall_time_s"]),
        llm_row("BinLLM dot-decimal, two-step", root, f"{stem}-dotdec", "dotdec",
                runs["dotdec"][0], "step1", s1m["sequences"] + dot["sequences"],
                s1m["wall_time_s"] + dot["wall_time_s"]),
        llm_row("BinLLM binary, one-step", root, f"{stem}-onestep", "binary",
                runs["onestep"][0], "step1", one["sequences"], one["wall_time_s"]),
    ]
    header = ["row", "test rows", "AUC", "UAUC", "warm AUC", "warm UAUC", "cold AUC",
              "cold UAUC", "valid AUC", "train seqs", "tokens/prompt", "finetune s"]
    body = [[r["row"], fmt(r.get("test_rows")), *[fmt(r.get(k)) for k in METRICS],
             fmt(r.get("valid_auc")), fmt(r.get("training_sequences")),
             fmt(r.get("tokens_per_prompt"), 1), fmt(r.get("train_s"), 0)] for r in rows]
    total_s = time.perf_counter() - started
    markdown = "\n".join([
        f"## Quality on ml-100k (`benchmarks/quality.py --config {args.config}`)",
        "",
        f"SmolLM2-135M-Instruct (GGUF, float32, CPU), split `{cfg.protocol.split}` "
        f"{cfg.protocol.fractions}; LLM rows scored on a seeded {cfg.score.max_rows} test "
        f"samples (score.seed {cfg.score.seed}), codes rows also on the whole test split. "
        f"Budget: step 1 {s1.max_steps} x {s1.batch_size} text prompts at lr {s1.lr}, step 2 "
        f"{s2.max_steps} x {s2.batch_size} code prompts at lr {s2.lr}, adapters chosen on "
        f"{cfg.finetune.max_valid_samples} valid_small prompts (valid AUC column). "
        f"The base run (the default config's whole pipeline) took {runs['base'][1] / 60:.1f} "
        f"min of stage time; the whole table {sum(v[1] for v in runs.values()) / 60:.0f} min. "
        "Cold = user or item unseen in train; warm = "
        f"user and item each > {cfg.protocol.warm_more_than} train interactions.",
        "",
        table(header, body),
    ])
    stage_s = {s: m["wall_time_s"] for s, m in base.items()}
    result = {"config": args.config, "overrides": shared, "config_resolved": to_dict(base_cfg),
              "rows": rows, "pipeline_s": {k: v[1] for k, v in runs.items()},
              "base_stage_s": stage_s, "total_s": total_s}
    save(f"quality-{stem}", result, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
