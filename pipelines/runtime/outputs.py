"""Outputs that are not stages: what ``binllm score``, ``binllm recommend`` and ``binllm nightly``
publish into ``{run}/{kind}/{name}/`` (or ``--output``), checked and published one way.

Apart from :mod:`pipelines.runtime.publish` because the check reads the stage registry, and the
registry's stages import :mod:`pipelines.runtime.publish` to write their own tables."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa
import ray

from binllm_core.config import RunConfig, config_hash
from binllm_core.storage import check_store, is_local, join, resolve, to_uri
from pipelines.runtime.publish import publishing, write_dataset
from pipelines.runtime.registry import check_fresh, codes_needed, score_paths
from pipelines.runtime.runs import run_folder
from pipelines.runtime.shared_paths import LocalPath, check_shared, run_paths
from pipelines.runtime.stage import package_versions, plain_config


def output_target(cfg: RunConfig, output_uri: str, folder: str, name: str) -> tuple[Any, str, list]:
    """Where an output that is not a stage goes: ``output_uri``, else ``{run}/{folder}/{name}``;
    with the folders it must never replace (the run and its ancestors, where they share a
    filesystem)."""
    fs, run = run_folder(cfg)
    if not output_uri:
        return fs, join(run, folder, name), [run]
    out_fs, target = resolve(output_uri, cfg.output_storage_options)
    return out_fs, target, [] if type(out_fs) is not type(fs) else [run]


def check_command(
    cfg: RunConfig, fs: Any, target: str, who: str, reads: tuple[str, ...] = ()
) -> None:
    """What a scoring command checks before it writes anything: the adapters and the prompts'
    codes it reads are current, and, with Ray started, the paths it uses (the run, the model,
    ``score.adapters``, the output folder ``target`` of ``fs``) are the same on every node."""
    from pipelines.runtime.ray_helpers import ensure_ray

    check_store(fs, target, "--output", "output_storage_options")
    scoring = ("finetune", "render", "encode") if codes_needed(cfg) else ("finetune", "render")
    check_fresh(cfg, (*scoring, *reads), who, "finetune")
    ensure_ray()
    paths = run_paths(cfg, [score_paths])
    if is_local(fs):
        paths.append(LocalPath("--output", target, writes=True))
    check_shared(paths)


def manifest_base(cfg: RunConfig) -> dict[str, Any]:
    """What every command's manifest records of the run: its name, and the config it scored
    with (hashed and whole) and the package versions."""
    return {
        "run_name": cfg.run_name,
        "config_hash": config_hash(cfg.score, cfg.model, cfg.prompts),
        "config": {"score": plain_config(cfg.score), "model": plain_config(cfg.model)},
        "packages": package_versions(),
    }


def publish_command(
    cfg: RunConfig,
    *,
    kind: str,
    name: str,
    who: str,
    produce: Callable[[], tuple[ray.data.Dataset, dict[str, Any]]],
    table: str,
    schema: pa.Schema,
    fields: dict[str, Any],
    output_uri: str = "",
    log: Callable[[str], None] = print,
    reads: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Publish what ``produce`` makes as the table ``table`` (``schema``) of a new version of
    ``output_uri``, else ``{run}/{kind}/{name}``; returns its manifest, with ``output``.

    The target and the run are checked (:func:`check_command`, ``who`` names the command in a
    refusal) and the target locked before ``produce`` runs, so that a bad target, stale adapters
    or a second writer stop at once, not after the scoring. The manifest holds ``fields`` (what
    the command was given), :func:`manifest_base` and the counts ``produce`` returns as
    ``metrics``. ``reads``: stages the command reads besides those scoring reads (checked
    fresh too)."""
    fs, target, protected = output_target(cfg, output_uri, kind, name)
    check_command(cfg, fs, target, who, reads)
    with publishing(fs, target, kind, protected, log) as publication:
        out, stats = produce()
        write_dataset(publication, out, table, schema=schema)
        manifest = {**fields, **manifest_base(cfg), "metrics": stats, "path": to_uri(fs, target)}
        manifest = publication.publish(manifest, keep=cfg.keep_versions)
    return {**manifest, "output": manifest["path"]}
