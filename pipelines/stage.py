"""The stage contract: where a stage reads and writes, its manifest, skipping and committing.

A stage writes its tables under ``{output_root}/{run_name}/{stage}/{table}/`` as Parquet and
``_manifest.json`` last. Tables are first written to a staging folder and moved into place only
when the stage has succeeded, so a failed re-run leaves the previous output whole.
"""

from __future__ import annotations

import json
import platform
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from pyarrow.fs import FSSpecHandler, PyFileSystem

from binllm_core.config import RunConfig
from binllm_core.errors import StageError
from binllm_core.storage import is_local, join, jsonable, resolve

MANIFEST = "_manifest.json"
PACKAGES = ("binllm", "ray", "torch", "transformers", "peft", "pyarrow", "polars", "fsspec")


@dataclass
class StageContext:
    """What a stage function gets: the config, and reading/writing under the run folder."""

    cfg: RunConfig
    stage: str
    fs: Any
    run_path: str
    staging: str = field(default="")
    written: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, cfg: RunConfig, stage: str) -> StageContext:
        fs, root = resolve(cfg.output_root, cfg.output_storage_options)
        if is_local(fs):
            root = fs._strip_protocol(root)
            fs.makedirs(root, exist_ok=True)
        run_path = join(root, cfg.run_name)
        staging = join(run_path, stage, f"_staging-{uuid.uuid4().hex[:8]}")
        return cls(cfg=cfg, stage=stage, fs=fs, run_path=run_path, staging=staging)

    # ---- locations -------------------------------------------------------------------------
    def stage_path(self, stage: str | None = None) -> str:
        return join(self.run_path, stage or self.stage)

    def table_path(self, stage: str, table: str) -> str:
        """Path of a committed table of ``stage`` (which must have finished)."""
        self.manifest_of(stage)
        return join(self.stage_path(stage), table)

    def scratch_path(self, name: str) -> str:
        """A persistent folder of this stage that survives re-runs (e.g. training checkpoints)."""
        path = join(self.stage_path(), name)
        self.fs.makedirs(path, exist_ok=True)
        return path

    @property
    def arrow_fs(self) -> Any:
        """The output filesystem for pyarrow and Ray Data (None: local paths as they are)."""
        return None if is_local(self.fs) else PyFileSystem(FSSpecHandler(self.fs))

    def uri(self, path: str) -> str:
        """A path under the output filesystem as a URI other processes can open."""
        if is_local(self.fs):
            return path
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return f"{protocol}://{path}"

    # ---- reading ---------------------------------------------------------------------------
    def manifest_of(self, stage: str) -> dict[str, Any]:
        path = join(self.stage_path(stage), MANIFEST)
        if not self.fs.exists(path):
            raise StageError(
                f"stage {self.stage} needs the output of stage {stage}, which has not finished",
                self.uri(self.stage_path(stage)),
                f"run it first: binllm run CONFIG --stages {stage}",
            )
        return json.loads(self.fs.cat_file(path))

    def read_dataset(self, stage: str, table: str) -> ray.data.Dataset:
        return ray.data.read_parquet(self.table_path(stage, table), filesystem=self.arrow_fs)

    def read_table(self, stage: str, table: str, columns: list[str] | None = None) -> pa.Table:
        """A whole table in this process (for steps that need all rows at once)."""
        path = self.table_path(stage, table)
        files = sorted(p for p in self.fs.find(path) if p.endswith(".parquet"))
        tables = []
        for f in files:
            with self.fs.open(f, "rb") as fh:
                tables.append(pq.read_table(fh, columns=columns))
        return pa.concat_tables(tables, promote_options="default")

    # ---- writing ---------------------------------------------------------------------------
    def write_dataset(self, ds: ray.data.Dataset, table: str) -> None:
        """Write a Ray dataset as this stage's ``table`` (into staging until commit)."""
        path = join(self.staging, table)
        ds.write_parquet(path, filesystem=self.arrow_fs)
        self.written.append(table)
        if not self.fs.exists(path) or not self.fs.find(path):
            # An empty dataset writes no file; keep its schema so readers get typed columns.
            schema = ds.schema()
            arrow_schema = getattr(schema, "base_schema", None) or pa.schema([])
            self.written.pop()
            self.write_table(arrow_schema.empty_table(), table)

    def write_table(self, data: pa.Table, table: str) -> None:
        """Write an Arrow table from this process as this stage's ``table``."""
        path = join(self.staging, table)
        self.fs.makedirs(path, exist_ok=True)
        with self.fs.open(join(path, "part-00000.parquet"), "wb") as fh:
            pq.write_table(data, fh)
        self.written.append(table)

    def commit(self, manifest: dict[str, Any]) -> None:
        """Move staged tables into place, drop tables the old output had, write the manifest."""
        out = self.stage_path()
        manifest_path = join(out, MANIFEST)
        if self.fs.exists(manifest_path):
            self.fs.rm(manifest_path)
        stale = set(self.written) | set(manifest.get("previous_tables", []))
        for name in stale:
            if self.fs.exists(join(out, name)):
                self.fs.rm(join(out, name), recursive=True)
        for table in self.written:
            self.fs.mv(join(self.staging, table), join(out, table), recursive=True)
        if self.fs.exists(self.staging):
            self.fs.rm(self.staging, recursive=True)
        manifest["tables"] = {t: self._table_summary(join(out, t)) for t in self.written}
        manifest.pop("previous_tables", None)
        with self.fs.open(manifest_path, "w") as fh:
            json.dump(jsonable(manifest), fh, indent=2, default=str)

    def discard(self) -> None:
        if self.fs.exists(self.staging):
            self.fs.rm(self.staging, recursive=True)

    def _table_summary(self, path: str) -> dict[str, Any]:
        rows, schema = 0, None
        for f in sorted(p for p in self.fs.find(path) if p.endswith(".parquet")):
            with self.fs.open(f, "rb") as fh:
                meta = pq.read_metadata(fh)
            rows += meta.num_rows
            schema = schema or meta.schema.to_arrow_schema()
        columns = {f.name: str(f.type) for f in schema} if schema else {}
        return {"path": self.uri(path), "rows": rows, "schema": columns}


StageFn = Callable[[StageContext], dict[str, Any]]


@dataclass(frozen=True)
class Stage:
    """A named stage: its function, the config sections it depends on, and its inputs."""

    name: str
    fn: StageFn
    sections: tuple[str, ...]
    upstream: tuple[str, ...] = ()


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def stage_hash(ctx: StageContext, stage: Stage) -> str:
    from binllm_core.config import config_hash

    sections = [getattr(ctx.cfg, s) for s in stage.sections]
    upstream = [ctx.manifest_of(u)["config_hash"] for u in stage.upstream]
    return config_hash(stage.name, sections, upstream)


def run_stage(cfg: RunConfig, stage: Stage, force: bool = False) -> dict[str, Any]:
    """Run one stage unless a manifest with the same config hash says it is done."""
    ctx = StageContext.open(cfg, stage.name)
    digest = stage_hash(ctx, stage)
    manifest_path = join(ctx.stage_path(), MANIFEST)
    previous: dict[str, Any] = {}
    if ctx.fs.exists(manifest_path):
        previous = json.loads(ctx.fs.cat_file(manifest_path))
        if previous.get("config_hash") == digest and not force:
            previous["skipped"] = True
            return previous
    started = time.time()
    try:
        metrics = stage.fn(ctx)
    except BaseException:
        ctx.discard()
        raise
    manifest = {
        "stage": stage.name,
        "run_name": cfg.run_name,
        "config_hash": digest,
        "config": {s: plain_config(getattr(cfg, s)) for s in stage.sections},
        "metrics": metrics,
        "packages": package_versions(),
        "wall_time_s": round(time.time() - started, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "previous_tables": list(previous.get("tables", {})),
    }
    ctx.commit(manifest)
    manifest["skipped"] = False
    return manifest


SECRET_WORDS = ("key", "secret", "token", "password", "credential")


def plain_config(section: Any) -> Any:
    """A config section as plain data for the manifest, with credentials masked."""
    from binllm_core.config import to_dict

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
