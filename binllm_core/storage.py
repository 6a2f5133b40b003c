"""The one storage layer: fsspec/pyarrow plumbing, reading Parquet folders, and publishing.

Every output binllm writes (a stage, a nightly partition, a ``binllm score`` result) is a
*target* folder holding ``_manifest.json`` and versioned data folders::

    {target}/_manifest.json               the pointer: which version is current, and its tables
    {target}/v-20261124T101500Z-1a2b3c4d/{table}/part-*.parquet

A new output is written whole under a new version folder, then published by writing the
manifest in one atomic step (a rename on a local disk, a single PUT on object stores), the way
table formats commit. Readers follow the manifest, so they see the old version or the new one,
never a mix. Only after the pointer is in place are older versions removed (the newest ``keep``
stay), together with the version folders of killed runs that were never published.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from binllm_core.errors import StageError
from binllm_core.io.faults import fault_point

MANIFEST = "_manifest.json"
LAYOUT = 2
"""Manifest layout: 2 = versioned folders with run-relative paths. Older manifests are stale."""
VERSION_RE = re.compile(r"^v-\d{8}T\d{6}Z-[0-9a-f]{8}$")
POINTER_TMP = "_manifest.json.tmp-"


# ---- filesystems and paths ---------------------------------------------------------------------
def resolve(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """``(filesystem, path)`` of a local path or a URL (``s3://``, ``https://``...); local paths
    come back absolute."""
    try:
        fs, path = url_to_fs(uri, **(storage_options or {}))
    except (ImportError, ValueError) as err:
        raise StageError(f"cannot open {uri} ({err})", todo="check the URI's scheme") from None
    if is_local(fs):
        path = os.path.abspath(os.path.expanduser(fs._strip_protocol(path)))
    return fs, path.rstrip("/") or "/"


def protocol(fs: fsspec.AbstractFileSystem) -> str:
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return protocol(fs) in ("file", "local")


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path of ``fs`` as a URI any process can open (a local path stays a path)."""
    return path if is_local(fs) else f"{protocol(fs)}://{path}"


BUCKET_STORES = ("s3", "s3a", "gs", "gcs")
"""Object stores whose first path component is a bucket that binllm must never create."""


def check_store(fs: fsspec.AbstractFileSystem, path: str, key: str, setting: str) -> None:
    """The bucket of an object-store ``path`` exists and answers with these credentials and
    endpoint, or one line naming the URI and what to set: writing would otherwise create a
    bucket that does not exist, and a wrong endpoint or key surfaces as a raw trace later."""
    if is_local(fs) or protocol(fs) not in BUCKET_STORES:
        return
    bucket = path.split("/", 1)[0]
    uri = to_uri(fs, path)
    try:
        fs.ls(bucket)
    except FileNotFoundError:
        raise StageError(
            f"{key} {uri}: the bucket {bucket} does not exist",
            todo="create it first (binllm never creates buckets), or correct the URI",
        ) from None
    except Exception as err:  # noqa: BLE001 - any refusal of the store is the same one line
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise StageError(
            f"cannot reach {uri} ({key}): {type(err).__name__}: {detail}",
            todo=f"check its endpoint and credentials: {setting} (endpoint_url, key, secret) "
            "or the AWS_* environment variables",
        ) from None


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> Any:
    """``fs`` for pyarrow and Ray Data (None for local paths, which they open themselves)."""
    if is_local(fs):
        return None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs))


def join(path: str, *parts: str) -> str:
    return "/".join([path.rstrip("/"), *[p.strip("/") for p in parts if p.strip("/")]])


def is_relative(path: str) -> bool:
    """A path written relative to a run folder (no scheme, not absolute)."""
    return "://" not in path and not os.path.isabs(path)


def inside(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or lies under it (both plain paths of one filesystem)."""
    path, folder = path.rstrip("/"), folder.rstrip("/")
    return path == folder or path.startswith(folder + "/")


def jsonable(value: Any) -> Any:
    """Plain JSON data: nan (e.g. an undefined AUC) becomes null, tuples become lists."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


# ---- reading -----------------------------------------------------------------------------------
def parquet_files(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    """Every ``.parquet`` file under ``folder``, in name order."""
    if not fs.exists(folder):
        return []
    if fs.isfile(folder):
        return [folder]
    return sorted(p for p in fs.find(folder) if p.endswith(".parquet"))


def read_parquet(
    fs: fsspec.AbstractFileSystem, folder: str, columns: list[str] | None = None
) -> pa.Table:
    """Every Parquet file under ``folder`` (or the file itself) as one table, in name order.

    A file that is not Parquet is one line naming it."""
    tables = []
    for f in parquet_files(fs, folder):
        try:
            with fs.open(f, "rb") as fh:
                tables.append(pq.read_table(fh, columns=columns))
        except pa.ArrowInvalid as err:
            detail = str(err).splitlines()[0]
            raise StageError(f"cannot read {to_uri(fs, f)} as Parquet ({detail})") from None
    if not tables:
        raise StageError(f"no Parquet files under {to_uri(fs, folder)}")
    return pa.concat_tables(tables, promote_options="default")


def partition_path(folder: str, part: Mapping[str, str] | None) -> str:
    """The folder of one partition of a table: ``folder/key=value/...`` in the order given.

    A partitioned table keeps its partition columns inside the files too, so any slice (and the
    whole table, read recursively) is self-describing; readers turn hive partition discovery
    off."""
    return join(folder, *(f"{k}={v}" for k, v in (part or {}).items()))


def write_parquet(fs: fsspec.AbstractFileSystem, folder: str, table: pa.Table) -> None:
    """``table`` as ``folder/part-00000.parquet``."""
    fs.makedirs(folder, exist_ok=True)
    with fs.open(join(folder, "part-00000.parquet"), "wb") as fh:
        pq.write_table(table, fh)


def read_manifest(fs: fsspec.AbstractFileSystem, target: str) -> dict[str, Any] | None:
    """The manifest of a published output, or None where there is none."""
    path = join(target, MANIFEST)
    if not fs.exists(path):
        return None
    try:
        manifest = json.loads(fs.cat_file(path))
    except (ValueError, UnicodeDecodeError) as err:
        manifest, detail = None, f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
    else:
        detail = "not a JSON object"
    if not isinstance(manifest, dict):
        name = target.rstrip("/").rsplit("/", 1)[-1]
        raise StageError(
            f"{to_uri(fs, path)} is damaged ({detail})",
            todo=f"restore it, or redo what wrote it: for a stage, binllm run CONFIG --stages "
            f"{name} --force; for a command's output, run the command again",
        )
    return manifest


def table_folder(target: str, manifest: dict[str, Any], table: str) -> str:
    """Where the current version of ``table`` lies (the manifest's path is relative)."""
    entry = manifest.get("tables", {}).get(table)
    if entry is None:
        raise StageError(f"{target} has no table {table} (it has {sorted(manifest['tables'])})")
    return join(target, entry["path"])


def damaged_table(fs: fsspec.AbstractFileSystem, target: str, manifest: dict[str, Any]) -> str:
    """Why the files of a published output no longer match its manifest (a Parquet file that is
    gone, cut short or not Parquet: its row counts, read from the footers, differ), or ``""``.
    Folders that are not Parquet tables (no schema in the manifest) are not checked."""
    for table, entry in manifest.get("tables", {}).items():
        if not entry.get("schema"):
            continue
        folder = join(target, entry["path"])
        rows = 0
        for f in parquet_files(fs, folder) if fs.exists(folder) else []:
            try:
                with fs.open(f, "rb") as fh:
                    rows += pq.ParquetFile(fh).metadata.num_rows
            except (pa.ArrowInvalid, FileNotFoundError) as err:  # other I/O errors: raised
                detail = str(err).splitlines()[0] if str(err) else type(err).__name__
                return f"{to_uri(fs, f)} is not readable Parquet ({detail})"
        if rows != entry["rows"]:
            return f"table {table} has {rows:,} rows on disk, {entry['rows']:,} in the manifest"
    return ""


def read_output(
    uri: str,
    table: str | None = None,
    columns: list[str] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> pa.Table:
    """A table of a published output (its only table when ``table`` is None), following its
    manifest: what a reader in Python uses to see one consistent version."""
    fs, target = resolve(uri, storage_options)
    return read_published(fs, target, table, columns)


def read_published(
    fs: fsspec.AbstractFileSystem, target: str, table: str | None, columns: list[str] | None = None
) -> pa.Table:
    """:func:`read_output` for a target folder of ``fs``."""
    manifest = read_manifest(fs, target)
    if manifest is None or manifest.get("layout") != LAYOUT:
        where = to_uri(fs, target)
        raise StageError(f"{where} is not a published binllm output (no current {MANIFEST})")
    names = [t for t, v in manifest["tables"].items() if v.get("schema")]
    name = table or (names[0] if len(names) == 1 else "")
    if not name:
        raise StageError(
            f"{to_uri(fs, target)} holds several tables ({', '.join(names)})", todo="name one"
        )
    return read_parquet(fs, table_folder(target, manifest, name), columns)


# ---- identity ----------------------------------------------------------------------------------
RUN_LINEAGE = ("adapter", "scored_at")
"""Lineage columns whose values differ from run to run for the same content: ``scored_at`` (when
the scoring call started) and ``adapter`` (where the adapter lay: a path under the version folder
of the finetune output that trained it). :func:`content_identity` leaves them out of a Parquet
file's hash; ``adapter_hash``, ``model`` and ``run_name`` (the same for the same inputs) count."""


def file_digest(fs: fsspec.AbstractFileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**22), b""):
            digest.update(block)
    return digest.hexdigest()


def parquet_digest(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The digest of a Parquet file: of its bytes, or, for a file holding a column of
    :data:`RUN_LINEAGE`, of the encoded bytes of its other columns (each column chunk as written,
    nothing decoded: only the footer and those byte ranges are read), with their names, types and
    the row counts of the row groups."""
    with fs.open(path, "rb") as fh:
        meta = pq.read_metadata(fh)
    schema = meta.schema
    lineage = [
        i
        for i in range(meta.num_columns)
        if any(_in_column(schema.column(i).path, name) for name in RUN_LINEAGE)
    ]
    if not lineage:
        return file_digest(fs, path)
    kept = [i for i in range(meta.num_columns) if i not in lineage]
    digest = hashlib.sha256(b"parquet columns\n")
    for i in kept:
        column = schema.column(i)
        digest.update(f"{column.path}\t{column.physical_type}\t{column.logical_type}\n".encode())
    with fs.open(path, "rb") as fh:
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            digest.update(f"rows {group.num_rows}\n".encode())
            for i in kept:
                chunk = group.column(i)
                start = chunk.data_page_offset
                if chunk.has_dictionary_page and chunk.dictionary_page_offset is not None:
                    start = min(start, chunk.dictionary_page_offset)
                fh.seek(start)
                left = chunk.total_compressed_size
                while left > 0:
                    block = fh.read(min(left, 2**22))
                    if not block:
                        raise StageError(f"{to_uri(fs, path)} ends inside a column chunk")
                    digest.update(block)
                    left -= len(block)
    return digest.hexdigest()


def _in_column(path: str, name: str) -> bool:
    """Whether the Parquet leaf ``path`` (dotted) belongs to the top-level column ``name``."""
    return path == name or path.startswith(name + ".")


def content_identity(fs: fsspec.AbstractFileSystem, folder: str) -> str:
    """16 hex of SHA-256 over what ``folder`` holds, independent of where it lies.

    Parquet files count by folder (a table, or a partition of one) and content, not by name
    (Ray names its files with a random write id), the columns of :data:`RUN_LINEAGE` left out
    (:func:`parquet_digest`); other files (adapters, reports) by relative path and content. The
    same data written again gives the same identity."""
    entries = []
    base = folder.rstrip("/") + "/"
    for f in sorted(fs.find(folder)):
        rel = f[len(base) :] if f.startswith(base) else f
        if rel.endswith(".parquet"):
            entries.append(f"{rel.rpartition('/')[0]}/*.parquet\t{parquet_digest(fs, f)}")
        else:
            entries.append(f"{rel}\t{file_digest(fs, f)}")
    return hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()[:16]


# ---- publishing --------------------------------------------------------------------------------
def new_version_name() -> str:
    return f"v-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"


@dataclass
class Publication:
    """One new version of a target folder: write under :attr:`path`, then :meth:`publish`.

    ``kind`` names what the target holds (``stage:ingest``, ``pairs``, ``nightly``); it is
    written into the manifest so that a later write can tell a binllm output of its own kind
    from anything else."""

    fs: Any
    target: str
    kind: str
    version: str
    written: dict[str, int] = field(default_factory=dict)
    """Rows each table's writers produced, counted where they wrote (see :meth:`produced`)."""
    hosts: dict[str, set[str]] = field(default_factory=dict)
    """The hosts whose writers wrote rows of each table (named when the counts disagree)."""

    @classmethod
    def begin(cls, fs: Any, target: str, kind: str) -> Publication:
        version = new_version_name()
        fs.makedirs(join(target, version), exist_ok=True)
        return cls(fs, target, kind, version)

    @property
    def path(self) -> str:
        """The new version's folder: tables go in subfolders of it."""
        return join(self.target, self.version)

    def table_path(self, table: str) -> str:
        return join(self.path, table)

    def write_table(self, table: pa.Table, name: str) -> None:
        write_parquet(self.fs, self.table_path(name), table)
        self.produced(name, table.num_rows, [socket.gethostname()])

    def produced(self, table: str, rows: int, hosts: list[str]) -> None:
        """Record that writers on ``hosts`` wrote ``rows`` rows of ``table`` (or of one of its
        partitions) into this version; :meth:`publish` checks the files hold as many."""
        self.written[table] = self.written.get(table, 0) + rows
        self.hosts.setdefault(table, set()).update(hosts)

    def publish(self, manifest: dict[str, Any], keep: int = 1) -> dict[str, Any]:
        """Summarise the new version, point the manifest at it (atomically), then remove
        versions beyond the newest ``keep`` and never-published ones. Returns the manifest."""
        previous = read_manifest(self.fs, self.target) or {}
        tables = {}
        for entry in sorted(self.fs.ls(self.path, detail=False)):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            tables[name] = self._summary(name)
        self._check_produced(tables)
        history = []
        if previous.get("layout") == LAYOUT and previous.get("version") != self.version:
            history = [previous["version"], *previous.get("history", [])][: max(keep - 1, 0)]
        manifest = {
            **manifest,
            "kind": self.kind,
            "layout": LAYOUT,
            "version": self.version,
            "history": history,
            "tables": tables,
            "identity": content_identity(self.fs, self.path),
            "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        fault_point("publish")
        put_atomically(self.fs, join(self.target, MANIFEST), _dump(manifest))
        prune(self.fs, self.target, {self.version, *history}, previous)
        return manifest

    def _check_produced(self, tables: dict[str, dict[str, Any]]) -> None:
        """Every table holds, as this process sees its files, the rows its writers produced.

        A local path that is not shared between the nodes of a cluster shows this process
        only the files written on its own node: publishing would lose the rest silently."""
        for name, rows in sorted(self.written.items()):
            seen = tables.get(name, {}).get("rows", 0)
            if seen != rows:
                hosts = ", ".join(sorted(self.hosts.get(name, ()))) or "?"
                raise StageError(
                    f"table {name} of {to_uri(self.fs, self.target)}: {rows:,} rows were "
                    f"written (on {hosts}) but {seen:,} are there as {socket.gethostname()} "
                    "sees it; nothing was published",
                    todo="write outputs where every node reads the same files: an s3:// (or "
                    "other object store) output_root/--output, or a mount shared by every node",
                )

    def abandon(self) -> None:
        """Remove the unpublished version (a failed write); the current one stays."""
        if self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)

    def _summary(self, name: str) -> dict[str, Any]:
        rows, schema = 0, None
        for f in parquet_files(self.fs, self.table_path(name)):
            with self.fs.open(f, "rb") as fh:
                meta = pq.read_metadata(fh)
            rows += meta.num_rows
            schema = schema or meta.schema.to_arrow_schema()
        columns = {f.name: str(f.type) for f in schema} if schema else {}
        return {"path": f"{self.version}/{name}", "rows": rows, "schema": columns}


def _dump(manifest: dict[str, Any]) -> bytes:
    return json.dumps(jsonable(manifest), indent=2, default=str).encode()


def put_atomically(fs: Any, path: str, data: bytes) -> None:
    """Replace the file at ``path`` in one step: a rename locally, one PUT on object stores
    (where a single PUT is atomic), so a reader sees the old file or the new one."""
    if is_local(fs):
        tmp = f"{path.rsplit('/', 1)[0]}/{POINTER_TMP}{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return
    fs.pipe_file(path, data)


def prune(fs: Any, target: str, keep: set[str], previous: dict[str, Any]) -> None:
    """Remove binllm's own leftovers under ``target``: version folders not in ``keep`` (older
    versions and those of killed runs), pointer temp files, and the tables of a manifest of an
    older layout. Nothing else is touched."""
    for entry in fs.ls(target, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        mine = (VERSION_RE.match(name) and name not in keep) or name.startswith(POINTER_TMP)
        mine = mine or name.startswith("_staging-")  # the layout before versioned folders
        if mine:
            fs.rm(entry, recursive=True)
    if previous and previous.get("layout") != LAYOUT:
        for name in previous.get("tables", {}):
            old = join(target, name)
            if not VERSION_RE.match(name) and fs.exists(old):
                fs.rm(old, recursive=True)


def keep_newest(fs: Any, target: str, manifest: dict[str, Any], keep: int) -> dict[str, Any]:
    """The current version and the newest ``keep - 1`` before it stay; older ones go (the
    manifest's history is trimmed first, in one atomic put). Applies a lowered
    ``keep_versions`` to an output that is not rewritten (a skipped stage)."""
    history = manifest.get("history", [])
    kept = history[: max(keep - 1, 0)]
    if kept != history:
        manifest = {**manifest, "history": kept}
        put_atomically(fs, join(target, MANIFEST), _dump(manifest))
    prune(fs, target, {manifest["version"], *kept}, {})
    return manifest


def litter(fs: Any, target: str, keep: set[str]) -> Iterator[str]:
    """Names under ``target`` that :func:`prune` would remove."""
    if not fs.exists(target):
        return
    for entry in fs.ls(target, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if (VERSION_RE.match(name) and name not in keep) or name.startswith(POINTER_TMP):
            yield name


def check_target(fs: Any, target: str, kind: str, protected: list[str] | None = None) -> None:
    """Refuse to write ``target`` unless it is absent, empty, or a binllm output of ``kind``
    (binllm never deletes what it did not write); ``protected`` folders (a run) and their
    ancestors are refused too."""
    for folder in protected or []:
        if inside(folder, target):
            raise StageError(
                f"{to_uri(fs, target)} holds the run {to_uri(fs, folder)}; "
                "writing there would replace it",
                todo="choose an output folder of its own",
            )
    if not fs.exists(target):
        return
    if fs.isfile(target):
        raise StageError(
            f"{to_uri(fs, target)} is a file", todo="choose a new or empty output folder"
        )
    manifest = read_manifest(fs, target)
    if manifest is not None:
        if manifest.get("kind") != kind:
            raise StageError(
                f"{to_uri(fs, target)} holds a binllm output of another kind "
                f"({manifest.get('kind') or manifest.get('stage') or 'unknown'}, not {kind})",
                todo="choose a new or empty output folder",
            )
        return
    names = [e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(target, detail=False)]
    foreign = [n for n in names if not (VERSION_RE.match(n) or n.startswith(("_lock", "_manif")))]
    if foreign:
        raise StageError(
            f"{to_uri(fs, target)} is not empty and not a binllm output (it holds {foreign[0]})",
            todo="choose a new or empty output folder; binllm never deletes files it did not write",
        )
