"""fsspec helpers shared by every stage (resolve a URI to a filesystem and a path) and turning
results into plain JSON data."""

from __future__ import annotations

import math
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from binllm_core.errors import StageError


def resolve(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """Return ``(filesystem, path)`` for a local path or a URL (``s3://``, ``https://``...)."""
    try:
        fs, path = url_to_fs(uri, **(storage_options or {}))
    except (ImportError, ValueError) as err:
        raise StageError(f"cannot open {uri} ({err})", todo="check the URI's scheme") from None
    return fs, path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def join(path: str, *parts: str) -> str:
    return "/".join([path.rstrip("/"), *[p.strip("/") for p in parts]])


def jsonable(value: Any) -> Any:
    """Plain JSON data: nan (e.g. an undefined AUC) becomes null, tuples become lists."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value
