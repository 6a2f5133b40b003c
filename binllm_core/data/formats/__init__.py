"""Source formats: which files make a dataset, and parsing their bytes into Arrow tables.

One module per format family (:mod:`.movielens`, :mod:`.movielens_csv`, :mod:`.amazon`,
:mod:`.recbole`), each defining :class:`FormatSpec` values, collected in ``FORMATS``
(:mod:`.registry`); the readers they share are in :mod:`.delimited` and :mod:`.jsonl`, the line
handling in :mod:`.lines`, detection in :mod:`.detect`.

Each parse returns ``(good, rejects)``: the parsed rows and the malformed lines (``REJECTS``
schema). With ``skip_bad=False`` the first malformed line raises a one-line :class:`DataError`.
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa

from binllm_core.data.formats.detect import Layout, detect
from binllm_core.data.formats.registry import FORMATS
from binllm_core.data.formats.spec import FormatSpec
from binllm_core.data.formats.tables import INTERACTIONS, REJECTS, dedupe_items

__all__ = [
    "FORMATS",
    "INTERACTIONS",
    "REJECTS",
    "FormatSpec",
    "Layout",
    "dedupe_items",
    "detect",
    "parse_interactions",
    "parse_items",
]


def parse_interactions(
    fmt: str,
    data: bytes,
    *,
    offset: int,
    header: str | None,
    label: str,
    skip_bad: bool,
    lines_before: Callable[[], int],
) -> tuple[pa.Table, pa.Table]:
    """Parse a chunk of an interaction file into ``INTERACTIONS`` rows and rejects.

    ``offset`` is the chunk's byte offset in its file; ``header`` the file's first line for
    formats with a header, None for the file's first chunk (which holds it: after a byte order
    mark, its offset is 3); ``lines_before``
    counts the file's lines before the chunk, called only to report a malformed line.
    """
    spec = FORMATS[fmt]
    return spec.interactions(
        spec,
        data,
        offset=offset,
        header=header,
        label=label,
        skip_bad=skip_bad,
        lines_before=lines_before,
    )


def parse_items(fmt: str, data: bytes, *, label: str, skip_bad: bool) -> tuple[pa.Table, pa.Table]:
    """Parse a whole item file into ``item``, ``title``, what the source has, and ``row``
    (the line's byte offset, so duplicates can keep the last one); and its rejects."""
    spec = FORMATS[fmt]
    return spec.items(spec, data, label, skip_bad)
