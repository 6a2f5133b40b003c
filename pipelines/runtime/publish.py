"""Writing Ray datasets into a new version, and publishing outputs that are not stages
(``binllm score`` results, nightly partitions) with the one publish of :mod:`binllm_core.storage`:
check the target, lock it, write a new version, point the manifest at it.

Every write counts the rows it produced where they are written (in the write tasks, on whatever
node they run) and records them in the :class:`Publication`, which refuses to publish a version
whose files, as the publishing process sees them, hold other counts: a local path that is not
shared between the nodes would otherwise publish what one node happens to see."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pyarrow as pa
import ray
from ray.data._internal.datasource.parquet_datasink import ParquetDatasink
from ray.data.block import Block, BlockAccessor

from binllm_core.io.lock import LOCK, WriterLock
from binllm_core.storage import (
    Publication,
    arrow_filesystem,
    check_target,
    join,
    parquet_files,
    partition_path,
    to_uri,
    write_parquet,
)


def write_dataset(
    publication: Publication,
    ds: ray.data.Dataset,
    table: str,
    part: Mapping[str, str] | None = None,
    schema: pa.Schema | None = None,
    rows_per_file: int | None = None,
) -> None:
    """``ds`` as ``table`` (or its partition ``part``) of the new version; an empty dataset as
    an empty, typed file: of ``schema`` when given (a dataset mapped from no rows has lost its
    own), else of the dataset's. With ``rows_per_file``, files of that many rows but the last,
    one row group each, whatever the dataset's blocks were (so the same rows in the same order
    make the same files)."""
    path = partition_path(publication.table_path(table), part)
    fs = publication.fs
    sink = CountingParquetSink(
        path,
        filesystem=arrow_filesystem(fs),
        min_rows_per_file=rows_per_file,
        max_rows_per_file=rows_per_file,
    )
    ds.write_datasink(sink)
    publication.produced(table, sink.rows, sink.hosts)
    if not sink.rows and not parquet_files(fs, path):
        arrow_schema = schema or getattr(ds.schema(), "base_schema", None) or pa.schema([])
        write_parquet(fs, path, arrow_schema.empty_table())


class CountingParquetSink(ParquetDatasink):
    """Ray Data's Parquet writer (the same files) whose write tasks also say how many rows they
    wrote and on which host: the count of what was produced, taken where it was written."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rows = 0
        self.hosts: list[str] = []

    def write(self, blocks: Iterable[Block], ctx: Any) -> dict[str, Any]:  # type: ignore[override]
        blocks = list(blocks)
        super().write(blocks, ctx)
        rows = sum(BlockAccessor.for_block(b).num_rows() for b in blocks)
        return {"rows": rows, "host": socket.gethostname()}

    def on_write_complete(self, write_result: Any) -> None:
        super().on_write_complete(write_result)
        returns = [r for r in write_result.write_returns if r]
        self.rows = sum(int(r["rows"]) for r in returns)
        self.hosts = sorted({r["host"] for r in returns if r["rows"]})


@contextmanager
def publishing(
    fs: Any,
    target: str,
    kind: str,
    protected: list[str],
    log: Callable[[str], None] = print,
) -> Iterator[Publication]:
    """Hold ``target`` for one new version: check it, lock it, begin a :class:`Publication`.

    Enter it before the work, so that a bad target or a second writer stops at once (one line
    naming the holder), not after the scoring. ``target`` must be new, empty or an earlier output
    of ``kind``; ``protected`` folders (the run) and their ancestors are refused. The body writes
    its tables and calls ``publish``; an exception abandons the new version and leaves the
    current one as it was."""
    check_target(fs, target, kind, protected)
    with WriterLock(fs, join(target, LOCK), f"{kind} output {to_uri(fs, target)}", log):
        publication = Publication.begin(fs, target, kind)
        try:
            yield publication
        except BaseException:
            publication.abandon()
            raise
