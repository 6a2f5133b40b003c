"""What a source format is: a :class:`FormatSpec`, one per entry of the registry ``FORMATS``.

A spec says which files make a dataset (for detection and error messages), their text encoding,
their rating scale, and how its interaction and item files are parsed (the readers of
:mod:`.delimited` and :mod:`.jsonl`, or the format's own function).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import pyarrow as pa

Anchor = Callable[[str, str, bool], "tuple[str, list[str]] | None"]
"""``(plain name, file name, format named explicitly)`` of a file -> ``(dataset name, companion
file names)`` when the file is the interaction file of a dataset of the format (dataset name
empty: named after its folder), else None."""


class InteractionReader(Protocol):
    """Parses a chunk of an interaction file (:mod:`.delimited`, :mod:`.jsonl`)."""

    @property
    def header(self) -> bool:
        """The interaction file starts with a header line, which every byte range of it needs."""
        ...

    def __call__(
        self,
        spec: FormatSpec,
        data: bytes,
        *,
        offset: int,
        header: str | None,
        label: str,
        skip_bad: bool,
        lines_before: Callable[[], int],
    ) -> tuple[pa.Table, pa.Table]:
        """See :func:`binllm_core.data.formats.parse_interactions`."""
        ...


ItemReader = Callable[["FormatSpec", bytes, str, bool], "tuple[pa.Table, pa.Table]"]
"""``(spec, whole item file, label, skip_bad)`` -> items and rejects (see
:func:`binllm_core.data.formats.parse_items`)."""


@dataclass(frozen=True)
class FormatSpec:
    """One source format."""

    name: str
    """The ``data.format`` value."""
    files: str
    """The files a dataset needs, as error messages show them (``u.data + u.item``)."""
    anchor: Anchor
    interactions: InteractionReader
    items: ItemReader
    encoding: str = "utf-8"
    """The documented text encoding besides UTF-8 (UTF-8 bytes are always read as such)."""
    rating_scale: tuple[float, float] | None = None
    """The documented rating scale: a rating outside it is a bad line. None: no fixed scale."""

    @property
    def header(self) -> bool:
        """The interaction file starts with a header line."""
        return self.interactions.header


def fixed_names(interactions: str, items: str) -> Anchor:
    """The anchor of a format whose files have fixed names (``u.data`` + ``u.item``), maybe
    compressed (``u.data.gz``; the item file is looked for by its plain name)."""

    def anchor(plain: str, base: str, explicit: bool) -> tuple[str, list[str]] | None:
        return ("", [items]) if plain == interactions else None

    return anchor
