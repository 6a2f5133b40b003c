"""A trained run opened for scoring: from its YAML config or from its folder (local or a URI).

A run folder is self-contained: its manifests record their paths relative to the run, so a run
copied with ``cp -a``, moved, or synced to a bucket opens and scores with its own files.
"""

from __future__ import annotations

from typing import Any

from binllm_core.config import (
    RunConfig,
    anchor_paths,
    apply_override,
    build_with_overrides,
    load_config,
)
from binllm_core.errors import ConfigError
from binllm_core.llm.backbone import check_backbone
from binllm_core.modes import MODES
from binllm_core.prompts.user_pairs import RunLookups, build_lookups
from binllm_core.storage import LAYOUT, check_store, join, read_manifest, resolve, to_uri
from pipelines.runtime.stage import StageContext


def open_run(ref: str, overrides: list[str] | None = None, trained: bool = True) -> RunConfig:
    """The config of a run: a YAML config file, or a run folder whose stage manifests hold the
    config sections they ran with (``--set`` overrides either). With ``trained`` (scoring,
    nightly, top-K lists), the run must have a finished render stage: checked before anything
    starts or is written."""
    if ref.endswith((".yaml", ".yml")):
        cfg = load_config(ref, overrides)
        if trained:
            check_backbone(cfg.model)
            ctx = StageContext.open(cfg, "render")
            if not _rendered(ctx.fs, ctx.stage_path()):
                raise ConfigError(
                    f"the run of {ref} ({ctx.uri(ctx.run_path)}) has no finished render stage",
                    todo=f"run it first: binllm run {ref}; or give the run's folder",
                )
        return cfg
    given: dict[str, Any] = {}
    for item in overrides or []:  # before the folder is opened: its storage options among them
        apply_override(given, item)
    fs, path = resolve(ref, given.get("output_storage_options") or {})
    check_store(fs, path, "the run", "--set output_storage_options.*")
    if not _rendered(fs, f"{path}/render"):
        raise ConfigError(
            f"{ref} is neither a YAML config nor a run folder with a finished render stage",
            todo="give configs/NAME.yaml or {output_root}/{run_name}",
        )
    from pipelines.runtime.registry import STAGES  # the registry imports the stages, they this

    raw: dict[str, Any] = {}
    for stage in STAGES:  # each manifest holds the config sections its stage ran with
        manifest = read_manifest(fs, f"{path}/{stage.name}")
        if manifest is not None:
            raw.update(manifest.get("config", {}))
    parent, _, name = path.rpartition("/")
    raw.update(run_name=name, output_root=to_uri(fs, parent or "/"))
    cfg = anchor_paths(build_with_overrides(raw, overrides or [], ref))
    if trained:
        check_backbone(cfg.model)
    return cfg


def run_folder(cfg: RunConfig) -> tuple[Any, str]:
    """The run's filesystem and folder ``{output_root}/{run_name}``."""
    fs, root = resolve(cfg.output_root, cfg.output_storage_options)
    return fs, join(root, cfg.run_name)


def _rendered(fs: Any, render_path: str) -> bool:
    manifest = read_manifest(fs, render_path)
    return manifest is not None and manifest.get("layout") == LAYOUT


def load_lookups(ctx: StageContext, mode: str) -> RunLookups:
    """Titles, id maps, histories and codes of the run (read once, on the driver)."""
    codes = None
    if MODES[mode].has_codes:  # soft: the entities with codes have embeddings
        codes = ctx.read_table("encode", "codes", columns=["entity", "id", "bits"])
    return build_lookups(
        ctx.read_table("ingest", "items", columns=["item", "title"]),
        ctx.read_table("samples", "user_map", columns=["user", "uid"]),
        ctx.read_table("samples", "item_map", columns=["item", "iid"]),
        codes,
        ctx.read_table(
            "samples", "samples", columns=["sample_id", "uid", "iid", "label", "timestamp"]
        ),
        ctx.cfg.prompts.history_len,
    )


def input_stem(uri: str, default: str) -> str:
    """The name of an input file or folder without ``.parquet`` (outputs are named after it)."""
    return uri.rstrip("/").rsplit("/", 1)[-1].removesuffix(".parquet") or default
