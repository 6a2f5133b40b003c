"""Model files from anywhere: a local path, ``s3://``, ``gs://``, ``http(s)://``, fetched once
per node.

:func:`fetch` gives a local path for a file or folder at a URI: a local path as it is; a remote
object is downloaded into ``{cache_dir}/{sha256(uri)[:16]}-{version}/{name}``, where ``version``
digests what the store says of each object (sizes and ETags / modification times, as
``data.cache_dir`` keys remote sources), so an edited object is downloaded again and an
unchanged one never. A copy is written into a temporary folder beside its place and renamed
into it when whole, under an ``fcntl`` lock on ``{key}.lock``: the actors and workers of one
node download an object once, the others wait and take that copy, and a killed download
leaves no half copy behind (its temporary folder is removed by the next one).

:func:`identity` is the same version digest (16 hex) for the lineage; for local files it is the
stat identity (names, sizes and modification times) that manifests have always recorded.
:func:`build_once` is the lock-and-rename step alone, for anything else made once per node (a
GGUF converted to a model folder, :mod:`binllm_core.llm.loading`).

Nothing here imports Ray: any process calls it on its own node.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlparse

from fsspec.core import split_protocol, url_to_fs

from binllm_core.data.sources import STORAGE_ERRORS, file_stamp
from binllm_core.errors import ConfigError

LOCAL = ("file", "local")
HTTP = ("http", "https")
TMP = ".tmp-"
"""Infix of a copy being written (``{key}.tmp-XXXX``), renamed to ``{key}`` when whole."""


def _storage_errors() -> tuple[type[BaseException], ...]:
    """What a missing object, a refused connection or missing credentials raise."""
    errors: tuple[type[BaseException], ...] = STORAGE_ERRORS
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        errors = (*errors, BotoCoreError, ClientError)
    except ImportError:
        pass
    return errors


def is_remote(uri: str) -> bool:
    """``uri`` names an object store or web server (``s3://``, ``gs://``, ``https://``...), not
    a local path (``file://`` is local)."""
    return (split_protocol(uri)[0] or "file") not in LOCAL


def local_path(uri: str) -> str:
    """A local path or ``file://`` URI as an absolute path (``~`` expanded)."""
    return os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))


def join_uri(uri: str, name: str) -> str:
    """``name`` inside the folder ``uri`` (a URI or a local path)."""
    return f"{uri.rstrip('/')}/{name}" if is_remote(uri) else os.path.join(uri, name)


def as_folder(uri: str) -> str:
    """A folder URI as :func:`listing` reads it: a web server's folder is a page of links
    under ``.../`` (other stores and local paths as they are)."""
    return uri.rstrip("/") + "/" if split_protocol(uri)[0] in HTTP else uri


def base_name(uri: str) -> str:
    """The last name of a URI or path (a URL's query left out)."""
    path = urlparse(uri).path if split_protocol(uri)[0] in HTTP else uri
    return path.rstrip("/").rsplit("/", 1)[-1]


# ---- errors ------------------------------------------------------------------------------------
def _todo(setting: str) -> str:
    options = setting or "the storage options"
    return (
        f"check the URI; for s3/gs/https set {options} (e.g. {{endpoint_url: ..., key: ..., "
        "secret: ...}) or the usual environment variables (AWS_*)"
    )


def missing(uri: str, what: str = "", setting: str = "") -> ConfigError:
    """``{what} {uri} is not there`` as one line, with what to check."""
    return ConfigError(f"{what} {uri} is not there".strip(), todo=_todo(setting))


def unreadable(uri: str, err: BaseException, what: str = "", setting: str = "") -> ConfigError:
    """A storage failure (a refused connection, no credentials, a forbidden bucket) as one
    line naming the URI."""
    if isinstance(err, FileNotFoundError):
        cause = err.__cause__  # fsspec's http says "not found" when nothing answered at all
        gone = cause is None or isinstance(cause, FileNotFoundError)
        if gone or getattr(cause, "status", None) in (404, 410):
            return missing(uri, what, setting)
        err = cause
    if isinstance(err, ConfigError):
        return err
    detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
    return ConfigError(
        f"cannot read {what} {uri} ({type(err).__name__}: {detail})",
        todo=_todo(setting),
    )


@contextlib.contextmanager
def _reading(uri: str, what: str, setting: str) -> Iterator[None]:
    try:
        yield
    except _storage_errors() as err:
        raise unreadable(uri, err, what, setting) from None


# ---- remote objects ----------------------------------------------------------------------------
def remote_fs(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """``(filesystem, path)`` of a remote URI; an http(s) folder keeps its trailing ``/``
    (relative links in its listing resolve against it)."""
    try:
        fs, path = url_to_fs(uri, **(storage_options or {}))
    except (ImportError, ValueError, TypeError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"cannot open {uri} ({detail})", todo="check the URI's scheme and its storage options"
        ) from None
    return fs, path


def _protocol(fs: Any) -> str:
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def listing(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    what: str = "",
    setting: str = "",
) -> tuple[bool, dict[str, dict[str, Any]]]:
    """``(is_folder, {relative name: fsspec info})`` of the remote file or folder at ``uri``;
    a file's one entry is named by its base name. Reads what the store says of the objects,
    never their bytes. A one-line :class:`ConfigError` when it is not there or unreachable."""
    fs, path = remote_fs(uri, storage_options)
    with _reading(uri, what, setting):
        if _protocol(fs) in HTTP:  # a web server lists a folder only as a page of links
            folder = uri.endswith("/")
            info = None if folder else fs.info(path)
        else:
            info = fs.info(path)
            folder = info.get("type") == "directory"
        if not folder:
            assert info is not None
            return False, {base_name(uri): info}
        root = path.rstrip("/")
        found = fs.find(path, detail=True)
        entries = {}
        for full, item in sorted(found.items()):
            if item.get("type", "file") != "file" or full.endswith("/"):
                continue
            name = full[len(root) :].lstrip("/") if full.startswith(root) else base_name(full)
            if item.get("size") is None:  # a web server's listing says nothing of a file
                item = fs.info(full)
            entries[name] = item
    if not entries:
        raise missing(uri, what, setting)
    return True, entries


def version(entries: dict[str, dict[str, Any]]) -> str:
    """16 hex digesting each object's name, size and version marks (ETag, modification time,
    generation...), as the store gives them."""
    lines = [f"{n}\t{i.get('size')}\t{file_stamp(i)}" for n, i in sorted(entries.items())]
    return _digest(lines)


def _digest(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


# ---- identity ----------------------------------------------------------------------------------
def stat_identity(files: list[str], what: str = "file", todo: str = "") -> str:
    """16 hex of the base names, sizes and modification times of local ``files``."""
    lines = []
    for f in files:
        try:
            st = os.stat(f)
        except FileNotFoundError:
            raise ConfigError(f"{what} {f} is not there", todo=todo) from None
        lines.append(f"{os.path.basename(f)}\t{st.st_size}\t{st.st_mtime_ns}")
    return _digest(lines)


def identity(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    what: str = "",
    setting: str = "",
) -> str:
    """What tells a version of the file or folder at ``uri`` from another, without reading its
    bytes (16 hex): for a local one, its files' names, sizes and modification times; for a
    remote one, :func:`version` of what the store says of its objects."""
    if not is_remote(uri):
        path = local_path(uri)
        if os.path.isfile(path):
            return stat_identity([path])
        if os.path.isdir(path):
            files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
            return stat_identity(files)
        raise missing(uri, what, setting)
    return version(listing(uri, storage_options, what, setting)[1])


def exists(
    uri: str, storage_options: dict[str, Any] | None = None, what: str = "", setting: str = ""
) -> bool:
    """Whether a file or folder is at ``uri`` (a local path or any fsspec URI); a store that
    cannot be reached is a one-line error, not False."""
    if not is_remote(uri):
        return os.path.exists(local_path(uri))
    fs, path = remote_fs(uri, storage_options)
    with _reading(uri, what, setting):
        return bool(fs.exists(path))


def read_head(
    uri: str,
    n: int,
    storage_options: dict[str, Any] | None = None,
    what: str = "",
    setting: str = "",
) -> bytes:
    """The first ``n`` bytes of the file at ``uri`` (a ranged read: never the whole object)."""
    if not is_remote(uri):
        with open(local_path(uri), "rb") as handle:
            return handle.read(n)
    fs, path = remote_fs(uri, storage_options)
    with _reading(uri, what, setting):
        with fs.open(path, "rb", block_size=max(n, 2**16)) as handle:
            return handle.read(n)


# ---- once per node -----------------------------------------------------------------------------
def build_once(root: str, key: str, build: Callable[[str], None]) -> str:
    """The folder ``{root}/{key}``, made by ``build(tmp)`` into a temporary folder beside it
    and renamed into place, at most once per node: under an ``fcntl`` lock on
    ``{root}/{key}.lock``, so a second process waits for the first and takes its folder. A
    finished folder is reused; a temporary one of a killed process is removed."""
    root = os.path.expanduser(root)
    final = os.path.join(root, key)
    if os.path.isdir(final):
        return final
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f"{key}.lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.path.isdir(final):
                return final
            for stale in os.listdir(root):  # left by a process killed while holding this lock
                if stale.startswith(f"{key}{TMP}"):
                    shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
            tmp = tempfile.mkdtemp(prefix=f"{key}{TMP}", dir=root)
            try:
                build(tmp)
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return final
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cache_key(uri: str, version_digest: str) -> str:
    """``{sha256(uri)[:16]}-{version}``: one cache entry per object and version."""
    return f"{hashlib.sha256(uri.encode()).hexdigest()[:16]}-{version_digest}"


def fetch(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    cache_dir: str = "~/.cache/binllm/models",
    what: str = "",
    setting: str = "",
) -> str:
    """A local path of the file or folder at ``uri``: a local one as it is (absolute); a remote
    one downloaded once per node and version into ``cache_dir`` (``~`` expanded here, on the
    node), see the module's docstring. ``what`` (``model.backbone``) and ``setting``
    (``model.storage_options``) name the config keys in a one-line error."""
    if not is_remote(uri):
        path = local_path(uri)
        if not os.path.exists(path):
            raise missing(uri, what, setting)
        return path
    folder, entries = listing(uri, storage_options, what, setting)
    name = base_name(uri) or "object"
    fs, path = remote_fs(uri, storage_options)

    def download(tmp: str) -> None:
        with _reading(uri, what, setting):
            for rel, info in entries.items():
                source = info.get("name") or path
                if _protocol(fs) not in HTTP and "://" in source:
                    source = fs._strip_protocol(source)
                target = os.path.join(tmp, name, rel) if folder else os.path.join(tmp, name)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                fs.get_file(source, target)
                size = info.get("size")
                if size is not None and os.path.getsize(target) != size:
                    raise ConfigError(
                        f"{what} {uri} changed while it was downloaded ({rel}: "
                        f"{os.path.getsize(target)} bytes, listed {size})".strip(),
                        todo="run again once the upload is finished",
                    )

    key = cache_key(uri, version(entries))
    return os.path.join(build_once(cache_dir, key, download), name)
