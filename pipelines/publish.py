"""Publishing outputs that are not stages (``binllm score`` results, nightly partitions) with the
one publish of :mod:`binllm_core.storage`: check the target, lock it, write a new version,
point the manifest at it."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pyarrow as pa
import ray

from binllm_core.lock import LOCK, WriterLock
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
) -> None:
    """``ds`` as ``table`` (or its partition ``part``) of the new version; an empty dataset as
    an empty, typed file: of ``schema`` when given (a dataset mapped from no rows has lost its
    own), else of the dataset's."""
    path = partition_path(publication.table_path(table), part)
    fs = publication.fs
    ds.write_parquet(path, filesystem=arrow_filesystem(fs))
    if not parquet_files(fs, path):
        arrow_schema = schema or getattr(ds.schema(), "base_schema", None) or pa.schema([])
        write_parquet(fs, path, arrow_schema.empty_table())


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
