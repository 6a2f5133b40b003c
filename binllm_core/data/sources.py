"""Locating the files behind a source URI, and reading them from any process.

A source is a folder, a single data file or an official ``.zip``, on a local path, ``http(s)://``
or ``s3://``. Every file becomes a :class:`SourceFile` whose fsspec URL any process can open by
itself (a Ray task on another node included): zip members through ``zip://`` URL chaining, remote
data through ``filecache::`` so each node downloads a remote file once into ``cache_dir``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any

import aiohttp
import fsspec
from fsspec.core import split_protocol, url_to_fs
from fsspec.utils import infer_compression

from binllm_core.errors import DataError

LOCAL = ("file", "local")
STORAGE_ERRORS = (OSError, ValueError, zipfile.BadZipFile, aiohttp.ClientError)
"""What a missing file, an HTTP error, a refused connection or a missing bucket raise."""
CHUNK_BYTES = 64 * 2**20
"""Plain local files larger than this are parsed in byte ranges of about this size."""


@dataclass(frozen=True)
class SourceFile:
    """One file of a source, openable from its URL in any process."""

    name: str
    """Path relative to the source root, ``/``-separated (``ml-100k/u.data``)."""
    url: str
    """fsspec URL, chained for zip members and cached remote files."""
    label: str
    """Where the file is, for messages."""
    protocol: str
    """Protocol of the storage under the file (``file``, ``s3``, ``https``...)."""
    options: dict[str, Any] = field(default_factory=dict)
    """fsspec options of that storage (``data.storage_options``)."""
    cache_dir: str = ""
    """Local cache folder for remote storage (``~`` expanded where the file is opened)."""
    size: int | None = None
    """Bytes, when known."""
    stamp: str = ""
    """What tells a version of the file from another without reading it: the modification time
    of a local file, the ETag / Last-Modified of an S3 or HTTP object (a zip member's is the
    zip's). Remote files are cached per stamp, so an edited remote file is downloaded again."""

    @property
    def splittable(self) -> bool:
        """A plain local file can be read in byte ranges by several tasks at once."""
        plain = infer_compression(self.name) is None and not self.url.startswith("zip://")
        return plain and self.protocol in LOCAL and self.size is not None


@dataclass(frozen=True)
class Source:
    """The files behind a URI."""

    uri: str
    files: list[SourceFile]
    anchor: str = ""
    """The file the URI named, when it named a data file rather than a folder or a zip."""
    root_name: str = ""
    """Name of the folder or zip (``ml-100k``), for datasets lying at its root."""


@dataclass(frozen=True)
class Chunk:
    """A byte range of a file, aligned to lines when read; ``end`` None reads to the end."""

    file: SourceFile
    start: int = 0
    end: int | None = None


def list_source(uri: str, storage_options: dict[str, Any], cache_dir: str) -> Source:
    """The files of the folder, file or ``.zip`` at ``uri``; one-line DataError when unreachable."""
    if not uri:
        raise DataError("data.uri is empty", todo="set data.uri to a folder, file or .zip")
    protocol = split_protocol(uri)[0] or "file"
    if protocol in LOCAL:
        uri = os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))
    cache = "" if protocol in LOCAL else cache_dir
    base = SourceFile("", uri, uri, protocol, dict(storage_options), cache)
    try:
        if uri.lower().endswith(".zip"):
            return _list_zip(base)
        return _list_plain(base)
    except STORAGE_ERRORS as err:
        raise unreachable(uri, err) from None


def unreachable(where: str, err: BaseException) -> DataError:
    """A storage failure (404, refused connection, NoSuchBucket...) as one line."""
    detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return DataError(
        f"cannot read {where} ({type(err).__name__}: {detail[:200]})",
        todo="check that the URI exists and is reachable; for s3 set data.storage_options "
        "(endpoint_url, key, secret) or the AWS_* environment variables",
    )


def _list_zip(base: SourceFile) -> Source:
    zfs, zpath = url_to_fs(base.url, **base.options)
    stamp = file_stamp(zfs.info(zpath))
    base = dataclasses.replace(base, stamp=stamp)
    chain = _chain(base)
    fs, _ = url_to_fs(f"zip://::{chain}", **_options(base))
    members = fs.find("", detail=True)
    files = [
        SourceFile(
            name=path,
            url=f"zip://{path}::{chain}",
            label=f"{base.url}/{path}",
            protocol=base.protocol,
            options=base.options,
            cache_dir=base.cache_dir,
            size=info.get("size"),
            stamp=stamp,
        )
        for path, info in sorted(members.items())
    ]
    root = base.url.rstrip("/").rpartition("/")[2]
    return Source(base.url, files, root_name=root[: -len(".zip")])


def _list_plain(base: SourceFile) -> Source:
    fs, path = url_to_fs(base.url, **base.options)
    if fs.isdir(path):
        root, anchor = path.rstrip("/"), ""
        found = fs.find(root, detail=True)
    elif fs.isfile(path):
        root, _, anchor = path.rstrip("/").rpartition("/")
        found = {i["name"]: i for i in fs.ls(root, detail=True) if i.get("type") == "file"}
    else:
        fs.info(path)  # raises the storage's own reason (no such bucket, key, file...)
        raise DataError(f"{base.url} does not exist", todo="check data.uri")
    prefix = base.url.rstrip("/") if not anchor else base.url.rstrip("/").rpartition("/")[0]
    files = []
    for full, info in sorted(found.items()):
        name = full[len(root) :].lstrip("/") if full.startswith(root) else full.rpartition("/")[2]
        url = f"{prefix}/{name}"
        files.append(
            SourceFile(
                name=name,
                url=url,
                label=url,
                protocol=base.protocol,
                options=base.options,
                cache_dir=base.cache_dir,
                size=info.get("size"),
                stamp=file_stamp(info),
            )
        )
    return Source(base.url, files, anchor=anchor, root_name=root.rpartition("/")[2])


STAMP_KEYS = ("ETag", "LastModified", "Last-Modified", "mtime", "last_modified", "generation")


def file_stamp(info: dict[str, Any]) -> str:
    """The version marks an fsspec ``info`` dict carries (see :attr:`SourceFile.stamp`)."""
    return ";".join(f"{k}={info[k]}" for k in STAMP_KEYS if info.get(k) not in (None, ""))


def _chain(file: SourceFile) -> str:
    """The URL of the storage object, behind ``filecache::`` when remote."""
    return f"filecache::{file.url}" if file.cache_dir else file.url


def _options(file: SourceFile) -> dict[str, Any]:
    """fsspec keyword arguments for a (possibly chained) URL of ``file``, keyed by protocol."""
    options: dict[str, Any] = {file.protocol: dict(file.options)}
    if file.cache_dir:
        stored = file.url.rsplit("::", 1)[-1]  # a zip member's storage object is the zip
        version = hashlib.sha256(f"{stored}\n{file.stamp}".encode()).hexdigest()[:16]
        folder = os.path.join(os.path.expanduser(file.cache_dir), version)
        options["filecache"] = {"cache_storage": folder}
    return options


@contextmanager
def open_file(file: SourceFile) -> Iterator[IO[bytes]]:
    """Open ``file`` for binary reading (decompressed), in whatever process calls this."""
    url = file.url if file.url.startswith("zip://") else _chain(file)
    try:
        # The OpenFile owns the chain (zip, cache, remote): it must outlive the handle.
        opener = fsspec.open(url, "rb", compression=infer_compression(file.name), **_options(file))
        handle = opener.open()
    except STORAGE_ERRORS as err:
        raise unreachable(file.label, err) from None
    try:
        yield handle
    finally:
        opener.close()


def plan_chunks(file: SourceFile, chunk_bytes: int = CHUNK_BYTES) -> list[Chunk]:
    """Byte ranges of ``file`` for parallel parsing: several for a large plain local file."""
    if not file.splittable or file.size <= chunk_bytes:
        return [Chunk(file)]
    starts = range(0, file.size, chunk_bytes)
    return [Chunk(file, s, min(s + chunk_bytes, file.size)) for s in starts]


BOM = b"\xef\xbb\xbf"
"""The UTF-8 byte order mark some editors write at the start of a file."""


def read_chunk(chunk: Chunk) -> tuple[int, bytes]:
    """The whole lines that start inside ``[start, end)`` of the chunk's file, and the byte
    offset of the first of them.

    A line belongs to the range its first byte lies in, so adjacent ranges never share or lose
    a line: the range skips the partial line it starts in and finishes the one it ends in.
    """
    with open_file(chunk.file) as fh:
        position, head = chunk.start, b""
        if position:
            fh.seek(position - 1)
            position += len(fh.readline()) - 1
        else:  # a UTF-8 byte order mark is not part of the first line (no seek: streams too)
            head = fh.read(len(BOM))
            if head == BOM:
                position, head = len(BOM), b""
        if chunk.end is None:
            return position, head + fh.read()
        if position >= chunk.end:
            return position, b""
        data = head + fh.read(chunk.end - position - len(head))
        if data and not data.endswith(b"\n"):
            data += fh.readline()
        return position, data


def lines_before(chunk: Chunk) -> int:
    """How many lines of the file precede the chunk (reads the file up to the chunk)."""
    if not chunk.start:
        return 0
    count, remaining = 0, chunk.start
    with open_file(chunk.file) as fh:
        fh.seek(chunk.start - 1)
        starts_line = fh.read(1) == b"\n"
        fh.seek(0)
        while remaining > 0:
            block = fh.read(min(remaining, 2**24))
            if not block:
                break
            count += block.count(b"\n")
            remaining -= len(block)
    # The chunk's first line starts after the newline that ends the line holding ``start - 1``.
    return count if starts_line else count + 1


def first_line(file: SourceFile) -> str:
    """The file's first line (a header), decoded, without a byte order mark."""
    with open_file(file) as fh:
        return fh.readline().decode("utf-8-sig", errors="replace")
