"""The stage contract: where a stage reads and writes, its lineage, skipping and publishing.

Stage ``S`` of a run writes a new version of ``{output_root}/{run_name}/S/`` and publishes it by
writing ``_manifest.json`` last, atomically (:class:`binllm_core.storage.Publication`): a stage
that fails or is killed leaves the previous version current and whole. A stage's hash covers its
config sections (without resource fields), the output identities of its upstream stages and the
identities of what it reads from outside the run (source files, model, adapters); a stage whose
manifest holds the same hash is skipped, and anything that changed upstream redoes it. Training
checkpoints live in ``S/checkpoints/``, named by that hash, so only a re-run of the *same*
inputs resumes them; ``--force`` starts from scratch, checkpoints included.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pyarrow as pa
import ray

from binllm_core.config import RunConfig, config_hash, hashed, to_dict
from binllm_core.errors import StageError
from binllm_core.storage import (
    LAYOUT,
    Publication,
    arrow_filesystem,
    damaged_table,
    is_relative,
    join,
    keep_newest,
    partition_path,
    read_manifest,
    read_parquet,
    resolve,
    table_folder,
    to_uri,
)
from pipelines.runtime.publish import write_dataset
from pipelines.runtime.shared_paths import LocalPath

PACKAGES = ("binllm", "ray", "torch", "transformers", "peft", "pyarrow", "polars", "fsspec")
CHECKPOINTS = "checkpoints"


@dataclass
class StageContext:
    """What a stage function gets: the config, reading upstream outputs, writing its own."""

    cfg: RunConfig
    stage: str
    fs: Any
    run_path: str
    digest: str = ""
    """This run's stage hash (names training checkpoints)."""
    upstream: tuple[str, ...] = ()
    """The stages whose outputs this run reads (they depend on the config)."""
    publication: Publication | None = field(default=None, repr=False)

    @classmethod
    def open(cls, cfg: RunConfig, stage: str) -> StageContext:
        fs, root = resolve(cfg.output_root, cfg.output_storage_options)
        return cls(cfg=cfg, stage=stage, fs=fs, run_path=join(root, cfg.run_name))

    # ---- locations -------------------------------------------------------------------------
    def stage_path(self, stage: str | None = None) -> str:
        return join(self.run_path, stage or self.stage)

    def table_path(self, stage: str, table: str) -> str:
        """Where the current version of ``table`` of ``stage`` (which must have finished) lies."""
        return table_folder(self.stage_path(stage), self.manifest_of(stage), table)

    def scratch_path(self, name: str) -> str:
        """A folder of this stage that outlives its versions (training checkpoints)."""
        path = join(self.stage_path(), name)
        self.fs.makedirs(path, exist_ok=True)
        return path

    @property
    def arrow_fs(self) -> Any:
        """The output filesystem for pyarrow and Ray (None: local paths as they are)."""
        return arrow_filesystem(self.fs)

    def uri(self, path: str) -> str:
        """A path under the output filesystem as a URI other processes can open."""
        return to_uri(self.fs, path)

    def relative(self, path: str) -> str:
        """``path`` relative to the run folder: what manifests record, so that a run copied or
        moved elsewhere refers to its own files."""
        base = self.run_path.rstrip("/") + "/"
        if not path.startswith(base):
            raise ValueError(f"{path} is not inside the run folder {self.run_path}")
        return path[len(base) :]

    def run_uri(self, path: str) -> str:
        """The URI of a path recorded relative to the run (other paths are returned as they are)."""
        return self.uri(join(self.run_path, path)) if is_relative(path) else path

    # ---- reading ---------------------------------------------------------------------------
    def manifest_of(self, stage: str) -> dict[str, Any]:
        manifest = read_manifest(self.fs, self.stage_path(stage))
        if manifest is None or manifest.get("layout") != LAYOUT:
            state = "has not finished" if manifest is None else "was written by an older binllm"
            raise StageError(
                f"stage {self.stage} needs the output of stage {stage}, which {state}",
                self.uri(self.stage_path(stage)),
                f"run it first: binllm run CONFIG --stages {stage}",
            )
        return manifest

    def read_dataset(
        self, stage: str, table: str, part: Mapping[str, str] | None = None
    ) -> ray.data.Dataset:
        """A table, or only its partition ``part`` (e.g. ``{"mode": "text"}``), as a dataset."""
        path = partition_path(self.table_path(stage, table), part)
        return ray.data.read_parquet(path, filesystem=self.arrow_fs, partitioning=None)

    def read_table(
        self,
        stage: str,
        table: str,
        columns: list[str] | None = None,
        part: Mapping[str, str] | None = None,
    ) -> pa.Table:
        """A table (or its partition ``part``) in this process, for steps that need all rows at
        once."""
        return read_parquet(self.fs, partition_path(self.table_path(stage, table), part), columns)

    # ---- writing (into the new version, published when the stage succeeds) ----------------
    def output_path(self, name: str) -> str:
        """A folder of the new version for outputs that are not tables (adapters, report)."""
        if self.publication is None:
            raise RuntimeError("the stage is not running: nothing to write into")
        return self.publication.table_path(name)

    def write_dataset(
        self,
        ds: ray.data.Dataset,
        table: str,
        part: Mapping[str, str] | None = None,
        rows_per_file: int | None = None,
    ) -> None:
        """Write a Ray dataset as this stage's ``table``, or as its partition ``part`` (in files
        of ``rows_per_file`` rows but the last, each one row group, when given)."""
        assert self.publication is not None, "the stage is not running"
        write_dataset(self.publication, ds, table, part, rows_per_file=rows_per_file)

    def write_table(self, data: pa.Table, table: str) -> None:
        """Write an Arrow table from this process as this stage's ``table``."""
        assert self.publication is not None, "the stage is not running"
        self.publication.write_table(data, table)


StageFn = Callable[[StageContext], dict[str, Any]]
Upstream = Callable[[RunConfig], tuple[str, ...]]
Inputs = Callable[[RunConfig], dict[str, Any]]


def _none(cfg: RunConfig) -> tuple[str, ...]:
    return ()


def _no_inputs(cfg: RunConfig) -> dict[str, Any]:
    return {}


def _no_paths(cfg: RunConfig) -> list[LocalPath]:
    return []


def _always(cfg: RunConfig) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    """A named stage: its function, the config sections it depends on, the stages it reads
    (a function of the config: a text-only run reads no codes), the identities of what it reads
    from outside the run, whether the config needs it at all, and the paths it reads."""

    name: str
    fn: StageFn
    sections: tuple[str, ...]
    upstream: Upstream | tuple[str, ...] = _none
    inputs: Inputs = _no_inputs
    needed: Callable[[RunConfig], bool] = _always
    paths: Callable[[RunConfig], list[LocalPath]] = _no_paths
    """The paths it reads from outside the run, with the config keys that give them (on a
    cluster, a local one must be the same on every node)."""

    def reads(self, cfg: RunConfig) -> tuple[str, ...]:
        """The stages whose outputs this stage reads under ``cfg``."""
        return self.upstream(cfg) if callable(self.upstream) else tuple(self.upstream)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


# ---- lineage -------------------------------------------------------------------------------------
@dataclass
class Expected:
    """What a stage's output would be made from now: its hash and the parts it covers."""

    digest: str
    inputs: dict[str, str]
    """Upstream stage -> its output identity; outside input -> its identity."""
    config: dict[str, Any]
    """The hashed config sections (resource fields left out)."""
    details: dict[str, Any] = field(default_factory=dict)
    """What the outside-input identities were made from (source files...), for the manifest."""


def expected(ctx: StageContext, stage: Stage) -> Expected:
    """The hash ``stage`` would have if run now (its upstreams must have finished)."""
    inputs: dict[str, str] = {}
    for name in stage.reads(ctx.cfg):
        inputs[name] = ctx.manifest_of(name)["identity"]
    details = {}
    for name, value in stage.inputs(ctx.cfg).items():
        if isinstance(value, dict):
            inputs[name] = value["identity"]
            details[name] = value
        else:
            inputs[name] = value
    config = {s: hashed(getattr(ctx.cfg, s)) for s in stage.sections}
    digest = config_hash(stage.name, LAYOUT, config, inputs)
    return Expected(digest, inputs, config, details)


def why_stale(previous: dict[str, Any] | None, now: Expected) -> str:
    """Why a stage's current output does not match what it would be made from now."""
    if previous is None:
        return "never run"
    if previous.get("layout") != LAYOUT:
        return "written by an older binllm (no lineage)"
    changed = _changed_keys(previous.get("hashed_config", {}), _mask(now.config))
    reasons = [f"config changed: {', '.join(changed[:4])}"] if changed else []
    before = previous.get("inputs", {})
    for name, identity in now.inputs.items():
        if before.get(name) != identity:
            reasons.append(f"input {name} changed ({_short(before.get(name))} -> {identity[:8]})")
    for name in before:
        if name not in now.inputs:
            reasons.append(f"no longer reads {name}")
    return "; ".join(reasons) or "hash changed"


def _short(value: str | None) -> str:
    return value[:8] if value else "none"


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def stale_chain(
    ctx: StageContext, reads: tuple[str, ...], stages: Collection[str]
) -> tuple[str, str] | None:
    """``(stage, why)`` when outputs read through ``reads`` would be stale, else None: the first
    finished stage
    among them or their upstreams (``stages`` are the stage names) whose manifest records an
    upstream output other than the one that upstream holds now, e.g. an adapter trained on
    prompts whose codes were redone since. A stage that has not finished is left to the reader
    (it says so itself)."""
    todo, seen = list(reads), set()
    while todo:
        name = todo.pop(0)
        if name in seen:
            continue
        seen.add(name)
        manifest = read_manifest(ctx.fs, ctx.stage_path(name))
        if not manifest or manifest.get("layout") != LAYOUT:
            continue
        for upstream, identity in manifest.get("inputs", {}).items():
            if upstream not in stages:
                continue  # an outside input (source files, model, adapter folder)
            current = read_manifest(ctx.fs, ctx.stage_path(upstream))
            if current is None or current.get("layout") != LAYOUT:
                continue
            if current.get("identity") != identity:
                return name, (
                    f"{name} was made from {upstream} output {_short(identity)}, and {upstream} "
                    f"now holds {_short(current.get('identity'))}"
                )
            todo.append(upstream)
    return None


def describe_skip(manifest: dict[str, Any]) -> str:
    inputs = ", ".join(f"{k} {str(v)[:8]}" for k, v in manifest.get("inputs", {}).items())
    return (
        f"skipped: unchanged config and inputs ({inputs or 'none'}); "
        f"output {manifest['identity'][:8]} of {manifest.get('published_at', '?')}"
    )


# ---- running -------------------------------------------------------------------------------------
def run_stage(cfg: RunConfig, stage: Stage, force: bool = False) -> dict[str, Any]:
    """Run one stage unless its current manifest holds the same hash; publish its output.

    The returned manifest has ``skipped`` (and, when skipped, ``why`` it was)."""
    ctx = StageContext.open(cfg, stage.name)
    ctx.upstream = stage.reads(cfg)
    now = expected(ctx, stage)
    target = ctx.stage_path()
    previous = read_manifest(ctx.fs, target)
    damage = ""
    if previous and previous.get("config_hash") == now.digest and not force:
        if previous.get("layout") == LAYOUT:
            damage = damaged_table(ctx.fs, target, previous)
            if not damage:
                previous = keep_newest(ctx.fs, target, previous, max(1, cfg.keep_versions))
                return {**previous, "skipped": True, "why": describe_skip(previous)}
    _check_upstream_files(ctx)
    checkpoints = join(target, CHECKPOINTS)
    if force and ctx.fs.exists(checkpoints):
        ctx.fs.rm(checkpoints, recursive=True)
    ctx.digest = now.digest
    ctx.publication = Publication.begin(ctx.fs, target, f"stage:{stage.name}")
    started = time.time()
    try:
        metrics = stage.fn(ctx)
    except BaseException:
        ctx.publication.abandon()
        raise
    manifest = {
        "stage": stage.name,
        "run_name": cfg.run_name,
        "config_hash": now.digest,
        "inputs": now.inputs,
        "input_details": now.details,
        "hashed_config": _mask(now.config),
        "config": {s: plain_config(getattr(cfg, s)) for s in stage.sections},
        "metrics": metrics,
        "packages": package_versions(),
        "wall_time_s": round(time.time() - started, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    manifest = ctx.publication.publish(manifest, keep=max(1, cfg.keep_versions))
    _prune_checkpoints(ctx)
    why = "forced" if force else why_stale(previous, now)
    if damage:
        why = f"redone: its files no longer matched its manifest ({damage})"
    return {**manifest, "skipped": False, "why": why}


def _check_upstream_files(ctx: StageContext) -> None:
    """Every table the stage reads still matches its manifest (a corrupt or missing file is
    named here, not deep inside a read)."""
    for stage in ctx.upstream:
        manifest = read_manifest(ctx.fs, ctx.stage_path(stage))
        damage = damaged_table(ctx.fs, ctx.stage_path(stage), manifest) if manifest else ""
        if damage:
            raise StageError(
                f"stage {ctx.stage} reads stage {stage}, whose files no longer match its "
                f"manifest: {damage}",
                todo=f"run stage {stage} again (binllm run CONFIG --stages {stage}): it is redone",
            )


def _prune_checkpoints(ctx: StageContext) -> None:
    """Checkpoints of other hashes can never be resumed again: remove them."""
    folder = join(ctx.stage_path(), CHECKPOINTS)
    if not ctx.fs.exists(folder):
        return
    for entry in ctx.fs.ls(folder, detail=False):
        if not entry.rstrip("/").endswith(ctx.digest):
            ctx.fs.rm(entry, recursive=True)


def stage_state(cfg: RunConfig, stage: Stage, upstream_state: dict[str, str]) -> dict[str, str]:
    """``{stage, state, why}`` of one stage without running anything: ``done`` (current output
    matches the config and inputs), ``stale`` (it exists but would be redone), ``missing``."""
    ctx = StageContext.open(cfg, stage.name)
    previous = read_manifest(ctx.fs, ctx.stage_path())
    waiting = [u for u in stage.reads(cfg) if upstream_state.get(u) != "done"]
    if waiting:
        state = "stale" if previous else "missing"
        return {"stage": stage.name, "state": state, "why": f"waits on {', '.join(waiting)}"}
    now = expected(ctx, stage)
    if previous and previous.get("layout") == LAYOUT and previous["config_hash"] == now.digest:
        damage = damaged_table(ctx.fs, ctx.stage_path(), previous)
        if damage:
            return {"stage": stage.name, "state": "stale", "why": f"files damaged: {damage}"}
        return {"stage": stage.name, "state": "done", "why": describe_skip(previous)[9:]}
    state = "stale" if previous else "missing"
    return {"stage": stage.name, "state": state, "why": why_stale(previous, now)}


SECRET_WORDS = ("key", "secret", "token", "password", "credential")


def plain_config(section: Any) -> Any:
    """A config section as plain data for the manifest, with credentials masked."""
    plain = to_dict(section) if hasattr(section, "__dataclass_fields__") else section
    return _mask(plain)


def _mask(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _mask(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v) for v in value]
    if value and any(word in key.lower() for word in SECRET_WORDS):
        return "***"
    return value
