"""The stages in pipeline order, what each reads, and running or inspecting a selection."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from binllm_core.config import NO_ADAPTER, STEP_NAMES, RunConfig
from binllm_core.errors import ConfigError, StageError
from binllm_core.io.lineage import folder_identity, model_identity, source_identity
from binllm_core.io.lock import LOCK, WriterLock
from binllm_core.llm.backbone import check_backbone
from binllm_core.llm.strategies import plan
from binllm_core.modes import MODES, SOFT
from binllm_core.storage import check_store, join, resolve, to_uri
from pipelines.ops.retrieval import codes_stage
from pipelines.runtime.console import LOGS
from pipelines.runtime.runs import run_folder
from pipelines.runtime.shared_paths import LocalPath, check_shared, run_paths
from pipelines.runtime.stage import Stage, StageContext, run_stage, stage_state, stale_chain
from pipelines.stages import (
    encode,
    evaluate,
    finetune,
    ingest,
    render,
    rerank,
    retrieve,
    samples,
    score,
)

OTHER_OUTPUTS = ("pairs", "nightly", "recommendations", LOCK, LOGS)
"""Entries of a run folder that binllm writes besides the stage folders."""


def codes_needed(cfg: RunConfig) -> bool:
    """A run needs the encoder only when it renders prompts with codes (or soft tokens)."""
    return any(MODES[m].has_codes for m in cfg.prompts.modes)


def _with_codes(cfg: RunConfig, *names: str) -> tuple[str, ...]:
    return (*names, "encode") if codes_needed(cfg) else names


def retrieve_needed(cfg: RunConfig) -> bool:
    """Candidates come from the codes: a run retrieves when it trains an encoder."""
    return codes_needed(cfg) and cfg.retrieve.top_n > 0


def retrieval_encoder_needed(cfg: RunConfig) -> bool:
    """A run trains codes for the lists alone when it retrieves and sets ``retrieval_encoder``."""
    return retrieve_needed(cfg) and cfg.retrieval_encoder is not None


def rerank_needed(cfg: RunConfig) -> bool:
    return retrieve_needed(cfg) and cfg.rerank.top_n > 0


def _evaluate_reads(cfg: RunConfig) -> tuple[str, ...]:
    names = _with_codes(cfg, "score")
    if retrieve_needed(cfg):
        names = (*names, "samples", codes_stage(cfg), "retrieve")
    if rerank_needed(cfg):
        names = (*names, "rerank")
    return tuple(dict.fromkeys(names))  # the retrieval codes may be the prompts' (encode)


def _model(cfg: RunConfig) -> dict[str, Any]:
    return {"model": model_identity(cfg.model)}


def _finetune_inputs(cfg: RunConfig) -> dict[str, Any]:
    inputs = _model(cfg)
    if cfg.finetune.init_adapter:
        inputs["init_adapter"] = folder_identity(
            cfg.finetune.init_adapter, cfg.output_storage_options
        )
    return inputs


def _reads_embeddings(cfg: RunConfig) -> bool:
    """Soft steps and soft scoring read ``encode/embeddings`` besides the rendered prompts
    (whose soft prompts hold placeholders, not the vectors)."""
    return bool(cfg.finetune.soft_step) or SOFT in cfg.score.modes


def _finetune_reads(cfg: RunConfig) -> tuple[str, ...]:
    """The rendered prompts; the embeddings for soft steps; and for a listwise step what its
    groups are built from: samples, retrieve's candidates, the titles and codes."""
    names = ("render", "encode") if _reads_embeddings(cfg) else ("render",)
    if cfg.finetune.listwise_steps:  # the config refuses them without retrieval
        names = (*names, "ingest", "samples", "encode", "retrieve")
    return tuple(dict.fromkeys(names))


def _score_reads(cfg: RunConfig) -> tuple[str, ...]:
    return ("render", "finetune", "encode") if _reads_embeddings(cfg) else ("render", "finetune")


def _rerank_inputs(cfg: RunConfig) -> dict[str, Any]:
    """Scoring's inputs, and the time-aware popularity's windows where popular items may join
    the candidates (the window is chosen among them)."""
    inputs = _score_inputs(cfg)
    if list(cfg.rerank.popular_places) != [0]:
        inputs["popularity_windows"] = ",".join(map(str, cfg.evaluate.popularity_windows))
    return inputs


def _score_inputs(cfg: RunConfig) -> dict[str, Any]:
    inputs = _model(cfg)
    steps = {step.name for step in plan(cfg.finetune)}
    for mode, choice in sorted(cfg.score.adapters.items()):
        if choice and choice != NO_ADAPTER and choice not in steps:
            inputs[f"adapter_{mode}"] = folder_identity(choice, cfg.output_storage_options)
    return inputs


def _source_paths(cfg: RunConfig) -> list[LocalPath]:
    return [LocalPath("data.uri", cfg.data.uri)]


def _model_paths(cfg: RunConfig) -> list[LocalPath]:
    return [LocalPath("model.backbone", cfg.model.backbone)]


def _finetune_paths(cfg: RunConfig) -> list[LocalPath]:
    init = cfg.finetune.init_adapter
    return _model_paths(cfg) + ([LocalPath("finetune.init_adapter", init)] if init else [])


def score_paths(cfg: RunConfig) -> list[LocalPath]:
    """The backbone and the adapter folders ``score.adapters`` names (a step name or ``none``
    is not a path): what scoring reads from outside the run, in the stages and the commands."""
    adapters = [
        LocalPath(f"score.adapters.{mode}", choice)
        for mode, choice in sorted(cfg.score.adapters.items())
        if choice not in (*STEP_NAMES, NO_ADAPTER)
    ]
    return _model_paths(cfg) + adapters


STAGES: tuple[Stage, ...] = (
    Stage(
        "ingest",
        ingest.run,
        ("data",),
        inputs=lambda c: {"source": source_identity(c.data)},
        paths=_source_paths,
    ),
    Stage("samples", samples.run, ("protocol",), lambda c: ("ingest",)),
    Stage("encode", encode.run, ("encoder",), lambda c: ("samples",), needed=codes_needed),
    Stage(
        "encode_retrieval",
        encode.run_retrieval,
        ("retrieval_encoder",),
        lambda c: ("samples",),
        needed=retrieval_encoder_needed,
    ),
    Stage(
        "retrieve",
        retrieve.run,
        ("retrieve",),
        lambda c: ("samples", codes_stage(c)),
        needed=retrieve_needed,
    ),
    Stage(
        "render",
        render.run,
        ("prompts", "model"),
        lambda c: _with_codes(c, "samples", "ingest"),
        inputs=_model,
        paths=_model_paths,
    ),
    Stage(
        "finetune",
        finetune.run,
        ("finetune", "model"),
        _finetune_reads,
        _finetune_inputs,
        paths=_finetune_paths,
    ),
    Stage("score", score.run, ("score", "model"), _score_reads, _score_inputs, paths=score_paths),
    Stage(
        "rerank",
        rerank.run,
        ("rerank", "score", "prompts", "model"),
        lambda c: tuple(
            dict.fromkeys(("ingest", "samples", "encode", codes_stage(c), "retrieve", "finetune"))
        ),
        _rerank_inputs,
        needed=rerank_needed,
        paths=score_paths,
    ),
    Stage("evaluate", evaluate.run, ("protocol", "rerank", "evaluate"), _evaluate_reads),
)


STAGE_NAMES = frozenset(s.name for s in STAGES)


def select(names: list[str] | None, cfg: RunConfig | None = None) -> list[Stage]:
    """The named stages in pipeline order; without names, every stage the config needs."""
    by_name = {s.name: s for s in STAGES}
    if not names:
        return [s for s in STAGES if cfg is None or s.needed(cfg)]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ConfigError(f"unknown stage {unknown[0]}", todo=f"choose among: {', '.join(by_name)}")
    return [s for s in STAGES if s.name in names]


def check_run_folder(cfg: RunConfig) -> None:
    """The run folder must be new, empty, or binllm's own: binllm never writes into (or prunes
    in) a folder of someone else's files."""
    fs, path = run_folder(cfg)
    if not fs.exists(path):
        return
    if fs.isfile(path):
        raise StageError(f"the run folder {to_uri(fs, path)} is a file", todo="choose run_name")
    names = {e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False)}
    ours = {s.name for s in STAGES} | set(OTHER_OUTPUTS)
    if names and not names & ours:
        raise StageError(
            f"the run folder {to_uri(fs, path)} holds files binllm did not write "
            f"({sorted(names)[0]}, ...)",
            todo="choose another run_name or output_root",
        )


def run_lock(cfg: RunConfig, log: Callable[[str], None] = print) -> WriterLock:
    """The lock that makes one ``binllm run`` at a time write this run."""
    fs, path = run_folder(cfg)
    return WriterLock(fs, join(path, LOCK), f"run {to_uri(fs, path)}", log)


def preflight(cfg: RunConfig, names: list[str] | None = None) -> list[Stage]:
    """The checks made before anything is written or Ray starts: the stage names, the run
    folder (new, empty or binllm's), the model files when a stage uses them; the stages."""
    stages = select(names, cfg)
    check_rendered_modes(cfg)
    fs, root = resolve(cfg.output_root, cfg.output_storage_options)
    check_store(fs, root, "output_root", "output_storage_options")
    check_run_folder(cfg)
    if any("model" in stage.sections for stage in stages):
        check_backbone(cfg.model)
    return stages


def check_rendered_modes(cfg: RunConfig) -> None:
    """Every prompt mode a finetune step trains on is one render writes: found before ingest,
    not at finetune after the stages before it ran."""
    for step in plan(cfg.finetune):
        if step.mode not in cfg.prompts.modes:
            raise ConfigError(
                f"finetune.strategy {cfg.finetune.strategy} trains {step.name} on {step.mode} "
                f"prompts, which prompts.modes {cfg.prompts.modes} does not render",
                todo=f"add {step.mode} to prompts.modes, or choose another finetune.strategy "
                "or finetune.code_mode",
            )


def run_pipeline(
    cfg: RunConfig,
    names: list[str] | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
    """Run the selected stages in order on Ray, holding the run's lock; each stage's manifest."""
    from pipelines.runtime.ray_helpers import ensure_ray

    stages = preflight(cfg, names)
    manifests = {}
    with run_lock(cfg, log):
        ensure_ray()
        check_shared(run_paths(cfg, [s.paths for s in stages]))
        for stage in stages:
            check_fresh_reads(cfg, stage)
            log(f"[binllm] {stage.name}: running")
            manifest = run_stage(cfg, stage, force=force)
            if manifest["skipped"]:
                log(f"[binllm] {stage.name}: {manifest['why']}")
            else:
                tables = manifest.get("tables", {}).items()
                # Folders that are not Parquet tables (adapters, report) have no schema.
                rows = ", ".join(f"{t}={v['rows']:,}" for t, v in tables if v["schema"])
                seconds = manifest["wall_time_s"]
                log(
                    f"[binllm] {stage.name}: done in {seconds:.1f}s ({manifest['why']})  {rows}"
                    f"  output {manifest['identity'][:8]}"
                )
            manifests[stage.name] = manifest
    return manifests


def check_fresh_reads(cfg: RunConfig, stage: Stage) -> None:
    """Refuse, in one line, to run ``stage`` on outputs made from other upstream outputs than
    the run now holds (``--stages encode,score`` would score new codes with an adapter trained on
    the old ones); name the stages to redo in between."""
    check_fresh(cfg, stage.reads(cfg), f"stage {stage.name}", stage.name)


def check_fresh(cfg: RunConfig, reads: tuple[str, ...], who: str, through: str) -> None:
    """The outputs ``who`` reads (``reads`` and their upstreams) were made from what the run
    holds now, or one line naming the stale one and the stages to redo, up to ``through``."""
    found = stale_chain(StageContext.open(cfg, through), reads, STAGE_NAMES)
    if found is None:
        return
    stale, why = found
    names = [s.name for s in STAGES if s.needed(cfg)]
    redo = names[names.index(stale) : names.index(through) + 1] if stale in names else [stale]
    raise StageError(
        f"{who} would read stale outputs: {why}",
        todo=f"redo them first: binllm run CONFIG --stages {','.join(redo)} (or run every stage)",
    )


def pipeline_status(cfg: RunConfig) -> list[dict[str, str]]:
    """Per stage: ``done`` / ``stale`` / ``missing`` / ``not needed`` and why; runs nothing."""
    states: dict[str, str] = {}
    rows = []
    for stage in STAGES:
        if not stage.needed(cfg):
            rows.append({"stage": stage.name, "state": "not needed", "why": _unneeded(stage)})
            continue
        row = stage_state(cfg, stage, states)
        states[stage.name] = row["state"]
        rows.append(row)
    return rows


def _unneeded(stage: Stage) -> str:
    if stage.name == "encode":
        return "prompts.modes has no code mode (a text-only run)"
    if stage.name == "encode_retrieval":
        return "retrieval_encoder is empty (retrieve ranks by the prompts' codes), or no retrieve"
    if stage.name in ("retrieve", "rerank"):
        return "retrieve.top_n or rerank.top_n is 0, or a text-only run (no codes to retrieve by)"
    return "not needed by this config"
