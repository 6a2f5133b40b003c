"""Detection: which files of a source make the dataset to ingest, and in which format.

Every file is offered to each format's anchor (the one format named by ``data.format``, or all
under ``auto``): a file that anchors a dataset names the companion file it needs next to it.
"""

from __future__ import annotations

from dataclasses import dataclass

from fsspec.utils import infer_compression

from binllm_core.data.formats.registry import FORMATS
from binllm_core.errors import DataError


@dataclass(frozen=True)
class Layout:
    """One dataset found among a source's files (paths relative to the source root)."""

    format: str
    name: str
    interactions: str
    items: str


def plain_name(path: str) -> str:
    """The file name without folder and compression suffix (``meta_X.json.gz`` -> ``...json``)."""
    base = path.rpartition("/")[2]
    compression = infer_compression(base)
    return base.rsplit(".", 1)[0] if compression else base


def detect(
    files: list[str], fmt: str = "auto", name: str = "", anchor: str = "", root_name: str = ""
) -> Layout:
    """Pick the dataset to ingest among ``files``.

    ``fmt`` (``auto`` or a format) and ``name`` narrow the candidates; ``anchor`` is the file the
    user's URI named, which the dataset must contain. ``root_name`` names datasets that lie at the
    root of the source (e.g. ``ml-100k`` for ``ml-100k.zip``).
    """
    found, incomplete = _candidates(files, fmt, root_name)
    if fmt != "auto":
        found = [c for c in found if c.format == fmt]
        incomplete = [(c, m) for c, m in incomplete if c.format == fmt]
    if anchor:
        found = [c for c in found if anchor in (c.interactions, c.items)]
        incomplete = [(c, m) for c, m in incomplete if c.interactions == anchor]
    if name:
        found = [c for c in found if c.name == name]
        incomplete = [(c, m) for c, m in incomplete if c.name == name]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        listed = ", ".join(f"{c.name or '(root)'} ({c.format})" for c in found)
        raise DataError(
            f"the source holds several datasets: {listed}",
            todo="choose one with data.name (and data.format if names repeat)",
        )
    if incomplete:
        layout, missing = incomplete[0]
        raise DataError(
            f"{layout.format} dataset {layout.interactions} has no {missing} next to it",
            todo=f"add {missing} (format {layout.format} needs {FORMATS[layout.format].files})",
        )
    shown = ", ".join(files[:20]) + (f" and {len(files) - 20} more" if len(files) > 20 else "")
    wanted = "any supported format" if fmt == "auto" else f"format {fmt}"
    wanted += f" named {name}" if name else ""
    supported = "; ".join(f"{s.name}: {s.files}" for s in FORMATS.values())
    raise DataError(
        f"no dataset of {wanted} among the files found ({shown or 'none'})",
        todo=f"point data.uri at a folder, file or .zip holding one of: {supported}",
    )


def _candidates(
    files: list[str], fmt: str, root_name: str
) -> tuple[list[Layout], list[tuple[Layout, str]]]:
    """Complete datasets, and datasets whose companion file is missing (with its name)."""
    present = set(files)
    found: list[Layout] = []
    incomplete: list[tuple[Layout, str]] = []
    specs = [s for s in FORMATS.values() if fmt in ("auto", s.name)]
    for path in files:
        folder, _, base = path.rpartition("/")
        for spec in specs:
            anchored = spec.anchor(plain_name(base), base, fmt != "auto")
            if anchored is None:
                continue
            name, companions = anchored
            options = [f"{folder}/{c}" if folder else c for c in companions]
            owner = name or folder.rpartition("/")[2] or root_name
            match = next((c for c in options if c in present), "")
            layout = Layout(spec.name, owner, path, match or options[0])
            if match:
                found.append(layout)
            else:
                incomplete.append((layout, companions[0]))
    return found, incomplete
