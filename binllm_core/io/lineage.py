"""Identities of what a stage reads from outside the run: the source files, the model, an
adapter folder. A stage's hash covers these next to its config and its upstreams' output
identities (:func:`binllm_core.storage.content_identity`), so any change redoes what depends on
it, and nothing else."""

from __future__ import annotations

import hashlib
import os
from typing import Any

from binllm_core.config import DataConfig, ModelConfig
from binllm_core.data.formats import detect
from binllm_core.data.sources import Source, SourceFile, list_source, open_file
from binllm_core.errors import ConfigError
from binllm_core.io.artifacts import as_folder, identity, is_remote, join_uri, stat_identity
from binllm_core.storage import content_identity, resolve


def _digest(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def source_files(cfg: DataConfig) -> tuple[Source, list[SourceFile]]:
    """The source and the files its dataset is read from (interactions, items)."""
    from binllm_core.errors import BinllmError

    source = list_source(cfg.uri, cfg.storage_options, cfg.cache_dir)
    try:
        layout = detect(
            [f.name for f in source.files], cfg.format, cfg.name, source.anchor, source.root_name
        )
    except BinllmError as err:
        raise type(err)(f"in {source.uri}: {err}") from None
    files = {f.name: f for f in source.files}
    return source, [files[layout.interactions], files[layout.items]]


def source_identity(cfg: DataConfig) -> dict[str, Any]:
    """``{"identity": 16 hex, "files": [...]}`` of the files ingest reads: by name, size and
    stamp (``data.identity: stat``) or by their bytes (``content``)."""
    source, files = source_files(cfg)
    lines, described = [], []
    for f in files:
        if cfg.identity == "content":
            digest = hashlib.sha256()
            with open_file(f) as fh:
                for block in iter(lambda fh=fh: fh.read(2**22), b""):
                    digest.update(block)
            mark = f"sha256={digest.hexdigest()}"
        else:
            mark = f"size={f.size};{f.stamp}"
        lines.append(f"{f.name}\t{mark}")
        described.append({"file": f.label, "mark": mark})
    return {"identity": _digest(lines), "files": described, "by": cfg.identity}


def model_identity(cfg: ModelConfig) -> str:
    """The backbone: its name for a hub id or ``tiny``; for local weights, the names, sizes and
    modification times of its files (a replaced model file changes it); for weights at a URI
    (``s3://``, ``https://``...), the objects' sizes and ETags / modification times as the
    store gives them (:func:`binllm_core.io.artifacts.identity`: a replaced object changes it)."""
    name = cfg.backbone
    if name != "tiny" and is_remote(name):
        if cfg.gguf_file:
            uri = join_uri(name, cfg.gguf_file)
        elif name.rstrip("/").endswith(".gguf"):
            uri = name
        else:
            uri = as_folder(name)
        return identity(uri, cfg.storage_options, "model.backbone", "model.storage_options")
    path = os.path.expanduser(name.removeprefix("file://"))
    if name.endswith(".gguf") and os.path.isfile(path):
        return _stat_identity([path])
    if os.path.isdir(path):
        if cfg.gguf_file:
            return _stat_identity([os.path.join(path, cfg.gguf_file)])
        files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
        return _stat_identity(sorted(files))
    return _digest([name, cfg.gguf_file])


def _stat_identity(files: list[str]) -> str:
    return stat_identity(files, "model file", "check model.backbone")


def folder_identity(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """Content identity of a folder outside the run (e.g. ``finetune.init_adapter``)."""
    fs, path = resolve(uri, storage_options)
    if not fs.isdir(path):
        raise ConfigError(f"folder {uri} is not there")
    return content_identity(fs, path)
