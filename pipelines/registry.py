"""The stages in pipeline order, and running a selection of them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from binllm_core.config import RunConfig
from binllm_core.errors import ConfigError
from pipelines import encode, evaluate, finetune, ingest, render, samples, score
from pipelines.runtime import ensure_ray
from pipelines.stage import Stage, run_stage

STAGES: tuple[Stage, ...] = (
    Stage("ingest", ingest.run, ("data",)),
    Stage("samples", samples.run, ("protocol",), ("ingest",)),
    Stage("encode", encode.run, ("encoder",), ("samples",)),
    Stage("render", render.run, ("prompts", "model"), ("samples", "encode", "ingest")),
    Stage("finetune", finetune.run, ("finetune", "model"), ("render",)),
    Stage("score", score.run, ("score", "model"), ("render", "finetune")),
    Stage("evaluate", evaluate.run, ("protocol",), ("score", "encode")),
)


def select(names: list[str] | None) -> list[Stage]:
    """The named stages in pipeline order (all of them when ``names`` is empty)."""
    by_name = {s.name: s for s in STAGES}
    if not names:
        return list(STAGES)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ConfigError(
            f"unknown stage {unknown[0]}", todo=f"choose among: {', '.join(by_name)}"
        )
    return [s for s in STAGES if s.name in names]


def run_pipeline(
    cfg: RunConfig,
    names: list[str] | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
    """Run the selected stages in order on Ray; return each stage's manifest."""
    stages = select(names)
    ensure_ray()
    manifests = {}
    for stage in stages:
        log(f"[binllm] {stage.name}: running")
        manifest = run_stage(cfg, stage, force=force)
        state = "skipped (unchanged config, finished before)" if manifest["skipped"] else "done"
        tables = manifest.get("tables", {}).items()
        # Folders that are not Parquet tables (adapters, report) have no schema: not counted.
        rows = ", ".join(f"{t}={v['rows']:,}" for t, v in tables if v["schema"])
        log(f"[binllm] {stage.name}: {state} in {manifest['wall_time_s']:.1f}s  {rows}")
        manifests[stage.name] = manifest
    return manifests
